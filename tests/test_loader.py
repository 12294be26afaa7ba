"""The torch loader over runs: splitting across ranks and workers, class-name merging, ignore kept."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from maskmill.loader import run_dataset
from maskmill.shards import IGNORE, RunLayout, SampleRecord, build_meta, sample_key, write_shard

SIZE = 8


def write_run(root: Path, classes: list[str], objects: list[list[str]], shard_size: int = 3) -> RunLayout:
    """A run whose i-th sample holds objects[i] (class names), one per row band, and a ring of 255.

    Pixel (0, 0) encodes the sample's index (image red channel) so tests can identify samples.
    """
    layout = RunLayout(root).create()
    layout.write_classes(classes)
    records = []
    for i, names in enumerate(objects):
        ids = [classes.index(n) + 1 for n in names]
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for j, cid in enumerate(ids):
            mask[1 + 2 * j : 3 + 2 * j, 1:7] = cid
        mask[SIZE - 1, :] = IGNORE
        image = np.full((SIZE, SIZE, 3), 40, np.uint8)
        image[0, 0, 0] = i
        meta = build_meta(prompt=" and ".join(names), seed=i, classes=names, class_ids=ids, model="toy",
                          extractor="test", extractor_params={})
        records.append(SampleRecord(i, sample_key(i // shard_size, i % shard_size, 3), "accepted",
                                    image=image, mask=mask, meta=meta))
    for sid in range(0, len(records), shard_size):
        write_shard(layout.root, sid // shard_size, records[sid : sid + shard_size])
    return layout


def sample_ids(images: torch.Tensor) -> list[int]:
    return [int(round(v)) for v in (images[:, 0, 0, 0] * 255).tolist()]


# Each rank in a fresh interpreter, as torchrun starts them: forking DataLoader workers from this test
# process fails once other tests have left Prefect's server threads running in it.
RANK_SCRIPT = """
import json, sys
from torch.utils.data import DataLoader
from maskmill.loader import run_dataset
ids = []
for images, _ in DataLoader(run_dataset([sys.argv[1]], shuffle=16, seed=3), batch_size=4, num_workers=2):
    ids += [int(round(v)) for v in (images[:, 0, 0, 0] * 255).tolist()]
print(json.dumps(ids))
"""


def test_two_ranks_two_workers_read_every_sample_exactly_once(tmp_path):
    import json
    import os
    import subprocess
    import sys

    write_run(tmp_path / "run", ["circle"], [["circle"]] * 24, shard_size=3)  # 8 shards
    seen = Counter()
    per_rank = []
    repo = str(Path(__file__).resolve().parents[1])
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", RANK_SCRIPT, str(tmp_path / "run")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        ids = json.loads(out.stdout.strip().splitlines()[-1])
        per_rank.append(ids)
        seen.update(ids)
    assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}
    assert all(len(ids) == 12 for ids in per_rank)


def test_without_rank_environment_one_process_reads_everything(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_run(tmp_path / "run", ["circle"], [["circle"]] * 7, shard_size=3)
    ids = [sample_ids(im[None])[0] for im, _ in run_dataset([tmp_path / "run"])]
    assert ids == list(range(7))  # no shuffle: tar order


def test_runs_merge_by_class_name_and_keep_ignore(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_run(tmp_path / "a", ["circle", "star"], [["star"], ["circle", "star"]])
    write_run(tmp_path / "b", ["square", "star", "triangle"], [["star", "triangle"], ["square"]])
    ds = run_dataset([tmp_path / "a", tmp_path / "b"], with_meta=True)
    assert ds.classes == ["circle", "star", "square", "triangle"]
    rows = list(ds)
    assert len(rows) == 4
    for image, mask, meta in rows:
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE) and float(image.max()) <= 1.0
        assert mask.dtype == torch.long and mask.shape == (SIZE, SIZE)
        assert (mask[SIZE - 1] == IGNORE).all() and mask[0, 0] == 0
        # the object in band j is the j-th class named in the sample's own metadata
        for j, name in enumerate(meta["classes"]):
            assert int(mask[1 + 2 * j, 3]) == ds.classes.index(name) + 1
    # "star" is id 2 in run a and id 2 in run b, "triangle" id 3 in run b -> 4 in the merged space
    assert int(rows[2][1][1, 3]) == 2 and int(rows[2][1][3, 3]) == 4
    # an explicit label space reorders the ids
    fixed = run_dataset([tmp_path / "b"], classes=["triangle", "square", "star"])
    assert [int(m[1, 3]) for _, m in fixed] == [3, 2]


def test_transform_is_applied_to_image_and_mask_together(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_run(tmp_path / "run", ["circle"], [["circle"]])
    plain = next(iter(run_dataset([tmp_path / "run"])))
    flipped = next(iter(run_dataset([tmp_path / "run"], transform=lambda im, m: (im.flip(-2), m.flip(-2)))))
    assert torch.equal(flipped[0], plain[0].flip(-2)) and torch.equal(flipped[1], plain[1].flip(-2))


def test_bad_inputs_are_refused_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="no classes.json"):
        run_dataset([tmp_path])
    RunLayout(tmp_path / "empty").create().write_classes(["circle"])
    with pytest.raises(FileNotFoundError, match="no complete shards"):
        run_dataset([tmp_path / "empty"])
    write_run(tmp_path / "run", ["circle", "star"], [["circle"]])
    with pytest.raises(ValueError, match=r"\['star'\] are not in the label space"):
        run_dataset([tmp_path / "run"], classes=["circle"])
