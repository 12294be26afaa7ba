"""`maskmill export`: image/mask pairs in mmsegmentation's and a plain folder layout, read back."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskmill.export import ExportError, export_run, split_of
from maskmill.shards.reader import iter_samples
from test_shards import CLASSES, make_run


@pytest.mark.parametrize("fmt, img, ann", [("mmseg", "img_dir/{split}", "ann_dir/{split}"),
                                          ("folder", "images", "masks")])
def test_export_round_trips_every_accepted_sample(tmp_path, fmt, img, ann):
    run = make_run(tmp_path / "run", shards=2, n=8).root
    report = export_run(run, fmt, tmp_path / "out", val_fraction=0.3, seed=1)
    originals = {s.key: s for s in iter_samples(run)}
    assert sum(report.counts.values()) == len(originals) == 12  # 2 shards x 8, every 4th rejected
    assert report.counts["val"] > 0 and report.counts["train"] > 0
    seen = set()
    for split in ("train", "val"):
        keys = (tmp_path / "out" / "splits" / f"{split}.txt").read_text().split()
        for key in keys:
            image = np.asarray(Image.open(tmp_path / "out" / img.format(split=split) / f"{key}.png"))
            with Image.open(tmp_path / "out" / ann.format(split=split) / f"{key}.png") as m:
                assert m.mode == "L"  # single channel, as the trainers' loaders expect
                mask = np.asarray(m)
            np.testing.assert_array_equal(image, originals[key].image)
            np.testing.assert_array_equal(mask, originals[key].mask)
            assert split_of(key, 0.3, 1) == split
            seen.add(key)
    assert seen == set(originals)
    meta = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert meta["classes"] == ["background", *CLASSES]
    assert meta["id2label"]["255"] == "ignore" and meta["id2label"]["1"] == CLASSES[0]
    assert len(meta["palette"]) == len(CLASSES) + 1 and meta["palette"][0] == [0, 0, 0]
    if fmt == "mmseg":
        info = json.loads((tmp_path / "out" / "metainfo.json").read_text())
        assert info["classes"][1:] == CLASSES


def test_split_is_seeded_and_close_to_the_fraction():
    keys = [f"{i:09d}" for i in range(4000)]
    share = sum(split_of(k, 0.2, 0) == "val" for k in keys) / len(keys)
    assert 0.18 < share < 0.22
    assert [split_of(k, 0.2, 0) for k in keys[:50]] != [split_of(k, 0.2, 1) for k in keys[:50]]


@pytest.mark.parametrize("args, message", [
    (dict(fmt="coco"), "unknown export format 'coco'"),
    (dict(val_fraction=1.0), "--val-fraction must be in"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, args, message):
    run = make_run(tmp_path / "run", shards=1, n=4).root
    kwargs = dict(fmt="folder", val_fraction=0.1) | args
    with pytest.raises(ExportError, match=message):
        export_run(run, kwargs["fmt"], tmp_path / "out", val_fraction=kwargs["val_fraction"])
    assert not (tmp_path / "out").exists()


def test_non_empty_out_and_non_runs_are_refused(tmp_path):
    run = make_run(tmp_path / "run", shards=1, n=4).root
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(run, "folder", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not a maskmill run"):
        export_run(tmp_path / "busy", "folder", tmp_path / "out")
