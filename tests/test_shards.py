"""The shard-writing stage: keys, records, writer, layout/resume and validation.

Shards are read back the way users read them: webdataset (masks decoded per extension so
they stay single-channel) and Hugging Face `datasets` (offline).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from maskmill.shards import (
    IGNORE,
    MANIFEST_SCHEMA,
    RunLayout,
    SampleRecord,
    ShardStats,
    ShardWriter,
    build_meta,
    key_digits,
    remap_labels,
    sample_key,
    shard_name,
    validate_run,
    write_shard,
)
from maskmill.atomic import atomic_write_bytes
from maskmill.shards.labels import class_color

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
SIZE = 32
DIGITS = 3


def make_record(shard_id: int, i: int, *, rejected: bool = False, class_id: int = 1, seed_offset: int = 0):
    """A small accepted sample (square object of `class_id`, a ring of ignore) or a rejected one."""
    index = shard_id * 100 + i
    meta = build_meta(prompt=f"a {CLASSES[class_id - 1]}", seed=index + seed_offset, classes=[CLASSES[class_id - 1]],
                      class_ids=[class_id], model="toy-sd", extractor="seediff",
                      extractor_params={"threshold": 0.3}, confidence=np.array([0.75], np.float32),
                      width=SIZE, height=SIZE)
    key = sample_key(shard_id, i, DIGITS)
    if rejected:
        return SampleRecord(index, key, "rejected", reason="low confidence", meta=meta)
    rng = np.random.default_rng(index + seed_offset)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    lo = 4 + i % 8
    mask[lo - 1:lo + 13, lo - 1:lo + 13] = IGNORE
    mask[lo:lo + 12, lo:lo + 12] = class_id
    return SampleRecord(index, key, "accepted", image=image, mask=mask, meta=meta)


def make_records(shard_id: int, n: int, reject_every: int = 4):
    """n records for a shard; every `reject_every`-th one rejected (generated lazily)."""
    for i in range(n):
        yield make_record(shard_id, i, rejected=reject_every > 0 and i % reject_every == reject_every - 1,
                          class_id=1 + i % 2)


def make_run(root: Path, shards: int = 2, n: int = 8) -> RunLayout:
    layout = RunLayout(root).create()
    layout.write_classes(CLASSES)
    for sid in range(shards):
        write_shard(layout.root, sid, make_records(sid, n))
    return layout


def mask_handler(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.asarray(im).copy()


def read_decoded(tar: Path) -> list[dict]:
    """webdataset with the mask decoded by its own handler (registered before "rgb8": png matches mask.png)."""
    ds = wds.WebDataset(str(tar), shardshuffle=False).decode(wds.handle_extension("mask.png", mask_handler), "rgb8")
    return list(ds)


def files(d: Path) -> list[str]:
    """Every file under `d`, as paths relative to it."""
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.exists() else []


SHARD_0 = ["manifests/00000.parquet", "shards/00000.tar", "stats/00000_stats.json"]


# --- keys and records ------------------------------------------------------------------------
def test_sample_key_is_img2dataset_style_unique_and_dot_free():
    assert sample_key(3, 7, 4) == "000030007"
    assert shard_name(0) == "00000" and shard_name(42) == "00042"
    keys = [sample_key(s, i, 2) for s in range(3) for i in range(100)]
    assert len(set(keys)) == len(keys) and keys == sorted(keys)
    assert all("." not in k and len(k) == 7 for k in keys)
    assert key_digits(1000) == 3 and key_digits(1001) == 4
    with pytest.raises(ValueError):
        sample_key(0, 100, 2)


def test_remap_labels_prompt_local_to_run_ids():
    local = np.array([[0, 1, 2, 255]], np.uint8)
    assert remap_labels(local, [3, 1]).tolist() == [[0, 3, 1, 255]]
    with pytest.raises(ValueError, match="no class id"):
        remap_labels(local, [3])


def test_ignore_label_matches_extractor_contract():
    from maskmill.extractors.base import IGNORE as EXTRACTOR_IGNORE

    assert IGNORE == EXTRACTOR_IGNORE


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(key="0001.5"), "no dots"),
        (dict(image=np.zeros((SIZE, SIZE, 3), np.float32)), "image must be a uint8"),
        (dict(image=np.zeros((SIZE, SIZE), np.uint8)), "image must be a uint8"),
        (dict(mask=np.zeros((SIZE, SIZE, 1), np.uint8)), "mask must be a uint8"),
        (dict(mask=np.zeros((SIZE, SIZE), np.int32)), "mask must be a uint8"),
        (dict(mask=np.zeros((SIZE, SIZE + 1), np.uint8)), "differs from image size"),
        (dict(reason="why not"), "no reason"),
        (dict(status="maybe"), "status"),
    ],
)
def test_malformed_records_cannot_be_built(change, message):
    good = make_record(0, 0)
    fields = dict(index=good.index, key=good.key, status=good.status, reason=good.reason, image=good.image,
                  mask=good.mask, meta=good.meta)
    with pytest.raises(ValueError, match=message):
        SampleRecord(**{**fields, **change})
    with pytest.raises(ValueError, match="needs a reason"):
        SampleRecord(0, "k", "rejected")


# --- writing and reading back --------------------------------------------------------------------
def test_shard_reads_back_with_webdataset_single_channel_masks(tmp_path):
    records = list(make_records(0, 8))
    stats = write_shard(tmp_path, 0, iter(records))
    assert files(tmp_path) == SHARD_0

    accepted = [r for r in records if r.accepted]
    samples = read_decoded(tmp_path / "shards" / "00000.tar")
    assert [s["__key__"] for s in samples] == [r.key for r in accepted]
    for s, r in zip(samples, accepted):
        assert sorted(k for k in s if not k.startswith("__")) == ["json", "mask.png", "png"]
        assert s["mask.png"].dtype == np.uint8 and s["mask.png"].shape == (SIZE, SIZE)
        np.testing.assert_array_equal(s["mask.png"], r.mask)  # lossless, labels intact
        np.testing.assert_array_equal(s["png"], r.image)
        assert s["json"] == {**r.meta, "index": r.index}

    # every member of the tar, as raw bytes: masks are mode L PNGs
    for raw in wds.WebDataset(str(tmp_path / "shards" / "00000.tar"), shardshuffle=False):
        assert Image.open(io.BytesIO(raw["mask.png"])).mode == "L"
    assert (stats.records, stats.accepted, stats.rejected) == (8, 6, 2)
    assert stats.reasons == {"low confidence": 2}


def test_shards_read_with_hf_datasets_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    layout = make_run(tmp_path / "run", shards=2, n=6)
    tars = [str(layout.tar_path(s)) for s in layout.completed_shards()]
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 2 * 5  # 6 records per shard, one rejected each
    assert {"png", "mask.png", "json", "__key__"} <= set(ds.column_names)
    row = ds[0]
    assert row["mask.png"].mode == "L" and row["png"].mode == "RGB"
    assert set(np.unique(np.asarray(row["mask.png"]))) <= {0, 1, 2, IGNORE}
    assert row["json"]["classes"] == ["circle"] and len(set(ds["__key__"])) == ds.num_rows


@pytest.mark.parametrize("form", ["webdataset data_dir", "folder"])
def test_hf_datasets_reads_the_shards_folder_as_samples_only(tmp_path, monkeypatch, form):
    """shards/ holds only tars: HF datasets given the folder loads samples, never manifest or stats rows."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    layout = make_run(tmp_path / "run", shards=2, n=6)
    cache = str(tmp_path / "hf")
    if form == "folder":
        ds = datasets.load_dataset(str(layout.shards_dir), split="train", cache_dir=cache)
    else:
        ds = datasets.load_dataset("webdataset", data_dir=str(layout.shards_dir), split="train", cache_dir=cache)
    assert ds.num_rows == 2 * 5 and {"png", "mask.png", "json", "__key__"} <= set(ds.column_names)
    assert "status" not in ds.column_names and "accepted" not in ds.column_names
    assert ds[0]["png"].mode == "RGB" and ds[0]["mask.png"].mode == "L"
    # the manifests load as one table of every record, from their own folder
    manifests = datasets.load_dataset("parquet", data_dir=str(layout.manifests_dir), split="train", cache_dir=cache)
    assert manifests.num_rows == 2 * 6 and manifests["status"].count("rejected") == 2


def test_validate_flags_anything_but_tars_in_the_shards_folder(tmp_path):
    layout = make_run(tmp_path, shards=1, n=4)
    (layout.shards_dir / "00000.parquet").write_bytes(layout.manifest_path(0).read_bytes())  # the old layout
    report = validate_run(tmp_path)
    assert not report.ok
    assert report.errors == ["shards/00000.parquet: not a shard tar; shards/ must hold only tars, or readers such as "
                             "HF datasets take it for samples (manifests go to manifests/, stats to stats/)"]


def test_jpg_images_keep_lossless_masks(tmp_path):
    records = list(make_records(0, 4, reject_every=0))
    write_shard(tmp_path, 0, records, image_format="jpg")
    samples = read_decoded(tmp_path / "shards" / "00000.tar")
    assert sorted(k for k in samples[0] if not k.startswith("__")) == ["jpg", "json", "mask.png"]
    for s, r in zip(samples, records):
        np.testing.assert_array_equal(s["mask.png"], r.mask)
        assert s["jpg"].shape == (SIZE, SIZE, 3)


def test_manifest_lists_every_record_with_identical_columns(tmp_path):
    write_shard(tmp_path, 0, make_records(0, 8))
    write_shard(tmp_path, 1, make_records(1, 3, reject_every=0))
    t0, t1 = pq.read_table(tmp_path / "manifests" / "00000.parquet"), pq.read_table(tmp_path / "manifests" / "00001.parquet")
    assert t0.schema.remove_metadata().equals(MANIFEST_SCHEMA) and t1.schema.equals(t0.schema)
    rows = t0.to_pylist()
    assert [r["index"] for r in rows] == list(range(8))
    assert [r["status"] for r in rows].count("rejected") == 2
    rejected = next(r for r in rows if r["status"] == "rejected")
    assert rejected["reason"] == "low confidence" and rejected["foreground_fraction"] is None
    first = rows[0]
    assert first["prompt"] == "a circle" and first["seed"] == 0 and first["width"] == SIZE
    assert first["classes"] == ["circle"] and first["class_ids"] == [1]
    assert first["foreground_fraction"] == pytest.approx(144 / SIZE**2)
    assert json.loads(first["meta"])["extractor_params"] == {"threshold": 0.3}


def test_manifest_columns_are_typed_and_one_glob_reads_every_shard(tmp_path):
    import pyarrow as pa
    import pyarrow.dataset as ds

    write_shard(tmp_path, 0, make_records(0, 8))
    write_shard(tmp_path, 1, make_records(1, 3, reject_every=0))
    schema = pq.read_schema(tmp_path / "manifests" / "00000.parquet")
    assert schema.field("classes").type == pa.list_(pa.string())
    assert schema.field("class_ids").type == pa.list_(pa.int32())
    assert schema.field("confidence").type == pa.list_(pa.float64())
    table = ds.dataset(str(tmp_path / "manifests"), format="parquet").to_table()
    assert table.num_rows == 11 and sorted(table.column("index").to_pylist()) == [*range(8), *range(100, 103)]
    frame = pd.read_parquet(tmp_path / "manifests")  # pandas over the folder, through pyarrow.dataset
    assert len(frame) == 11 and list(frame.loc[frame["index"] == 0, "classes"].iloc[0]) == ["circle"]
    conf = frame.loc[frame["index"] == 1, "confidence"].iloc[0]
    assert conf.dtype == np.float64 and len(conf) == 1
    accepted = frame[frame["status"] == "accepted"]
    assert set(accepted["classes"].map(tuple)) == {("circle",), ("square",)}


def test_manifest_row_refuses_a_non_list_of_classes(tmp_path):
    records = list(make_records(0, 1, reject_every=0))
    records[0].meta["confidence"] = "0.9"
    with pytest.raises(ValueError, match="confidence.*list of float"):
        write_shard(tmp_path, 0, records)


def test_stats_count_reasons_bytes_and_coverage(tmp_path):
    stats = write_shard(tmp_path, 5, make_records(5, 8))
    on_disk = json.loads((tmp_path / "stats" / "00005_stats.json").read_text())
    assert on_disk == stats.to_dict()
    assert stats.shard == "00005" and stats.fields == ["json", "mask.png", "png"]
    assert stats.tar_bytes == (tmp_path / "shards" / "00005.tar").stat().st_size
    assert stats.manifest_bytes == (tmp_path / "manifests" / "00005.parquet").stat().st_size
    assert (stats.first_index, stats.last_index) == (500, 507)
    assert set(stats.coverage) == {"1", "2"}
    # i = 3, 7 rejected; even i carry class 1 (4 samples), odd i class 2 (1 and 5)
    assert stats.coverage["1"] == {"mean": pytest.approx(144 / SIZE**2), "samples": 4}
    assert stats.coverage["2"]["samples"] == 2
    assert stats.mean_ignore_fraction == pytest.approx(52 / SIZE**2)


def test_same_records_and_mtime_give_identical_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_shard(a, 0, make_records(0, 6), mtime=1_700_000_000)
    write_shard(b, 0, make_records(0, 6), mtime=1_700_000_000)
    write_shard(c, 0, make_records(0, 6), mtime=0)
    tar, manifest = Path("shards/00000.tar"), Path("manifests/00000.parquet")
    assert (a / tar).read_bytes() == (b / tar).read_bytes()
    assert (a / manifest).read_bytes() == (b / manifest).read_bytes()
    assert (a / tar).read_bytes() != (c / tar).read_bytes()  # mtime is stamped
    with tarfile.open(a / tar) as tf:
        members = tf.getmembers()
    assert {m.mtime for m in members} == {1_700_000_000}
    assert all(not m.pax_headers for m in members)  # int mtime: no extra PAX header per member


def test_empty_shard_is_complete_and_valid(tmp_path):
    layout = RunLayout(tmp_path).create()
    layout.write_classes(CLASSES)
    stats = write_shard(layout.root, 0, [])
    assert stats.records == 0 and layout.completed_shards() == [0]
    assert validate_run(tmp_path).ok


# --- bad records -----------------------------------------------------------------------------------
def _mutated(**change):
    r = make_record(0, 3)
    for k, v in change.items():
        setattr(r, k, v)  # bypasses the constructor's checks: the writer must catch it
    return r


@pytest.mark.parametrize(
    "bad, message",
    [
        (_mutated(key="000.003"), "no dots"),
        (_mutated(mask=np.zeros((SIZE, SIZE), np.uint16)), "mask must be a uint8"),
        (_mutated(image=np.zeros((SIZE, SIZE, 4), np.uint8)), "image must be a uint8"),
        (_mutated(mask=np.zeros((SIZE // 2, SIZE), np.uint8)), "differs from image size"),
        (_mutated(mask=np.full((SIZE, SIZE), 3, np.uint8)), r"labels \[3\] outside"),
        (_mutated(meta={**make_record(0, 3).meta, "extra": object()}), "not JSON-serialisable"),
        (_mutated(meta={**make_record(0, 3).meta, "scores": {"x": float("nan")}}), "not JSON-serialisable"),
        (_mutated(meta={**make_record(0, 3).meta, "new_key": 1}), "meta keys differ"),
        (_mutated(meta={**make_record(0, 3).meta, "seed": "seven"}), "seed"),
        (_mutated(meta={**make_record(0, 3).meta, "width": SIZE * 2}), "meta says height, width"),
        (_mutated(meta={**make_record(0, 3).meta, "index": 99}), "contradicts"),
        (make_record(0, 0), "duplicate key"),
    ],
)
def test_bad_record_raises_and_leaves_no_files(tmp_path, bad, message):
    def records():
        yield from make_records(0, 3, reject_every=0)
        yield bad

    with pytest.raises(ValueError, match=message):
        write_shard(tmp_path / "run", 0, records())
    assert files(tmp_path / "run") == []


def test_bad_first_record_touches_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no dots"):
        write_shard(out, 0, [_mutated(key="a.b")])
    assert not out.exists()
    with pytest.raises(ValueError, match="image_format"):
        write_shard(out, 0, [], image_format="webp")


# --- completion marker, interruption and resume --------------------------------------------------
def test_stats_file_is_renamed_into_place_last(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def logging_replace(src, dst):
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", logging_replace)
    write_shard(tmp_path, 0, make_records(0, 4))
    assert renamed == ["00000.tar", "00000.parquet", "00000_stats.json"]


def test_failure_between_tar_and_stats_leaves_no_completion_marker(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path).create()
    layout.write_classes(CLASSES)
    write_shard(layout.root, 0, make_records(0, 4))

    def crash(self, stats):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "_write_stats", crash)
    # a clean failure: write_shard aborts and removes what it wrote
    with pytest.raises(RuntimeError, match="disk full"):
        write_shard(layout.root, 1, make_records(1, 4))
    assert files(layout.root) == ["classes.json", *SHARD_0]

    # a hard kill at the same point (no abort runs): tar and manifest in place, no stats
    monkeypatch.setattr(ShardWriter, "abort", lambda self: None)
    with pytest.raises(RuntimeError):
        write_shard(layout.root, 1, make_records(1, 4))
    assert layout.tar_path(1).exists() and not layout.stats_path(1).exists()
    assert layout.completed_shards() == [0]
    report = validate_run(tmp_path)
    assert not report.ok and any("00001.tar: no 00001_stats.json" in e for e in report.errors)

    removed = layout.clean_partial(1)
    assert sorted(p.name for p in removed) == ["00001.parquet", "00001.tar"]
    assert layout.clean_partial(0) == []  # a complete shard is left alone
    assert validate_run(tmp_path).ok


def test_killed_process_leaves_only_temporaries_which_resume_cleans(tmp_path):
    """A real kill (os._exit) mid-shard: no final files for that shard, then clean + rewrite."""
    layout = make_run(tmp_path, shards=1, n=4)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_shards import make_records
        from maskmill.shards import write_shard
        def dying():
            for i, r in enumerate(make_records(1, 8)):
                if i == 5:
                    os._exit(1)
                yield r
        write_shard({str(layout.root)!r}, 1, dying())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert files(layout.root) == ["classes.json", "manifests/00000.parquet", "manifests/00001.parquet.tmp",
                                  "shards/00000.tar", "shards/00001.tar.tmp", "stats/00000_stats.json"]
    assert layout.completed_shards() == [0]
    report = validate_run(tmp_path)
    assert any("leftover temporary" in e for e in report.errors)

    assert sorted(p.name for p in layout.clean_partial(1)) == ["00001.parquet.tmp", "00001.tar.tmp"]
    write_shard(layout.root, 1, make_records(1, 8))  # resume redoes the incomplete shard
    assert layout.completed_shards() == [0, 1] and validate_run(tmp_path).ok


def test_rewriting_a_shard_drops_its_old_completion_marker_first(tmp_path, monkeypatch):
    layout = make_run(tmp_path, shards=1, n=4)
    seen = []

    def record_state(self, stats):
        seen.append(layout.stats_path(0).exists())
        atomic_write_bytes(self.paths.stats, json.dumps(stats.to_dict()).encode())

    monkeypatch.setattr(ShardWriter, "_write_stats", record_state)
    write_shard(layout.root, 0, make_records(0, 6))
    assert seen == [False] and ShardStats.read(layout.stats_path(0)).records == 6


# --- layout ---------------------------------------------------------------------------------------
def test_layout_paths_classes_and_completed_shards(tmp_path):
    layout = RunLayout(tmp_path / "run").create()
    assert layout.tar_path(3) == tmp_path / "run" / "shards" / "00003.tar"
    assert layout.manifest_path(3) == tmp_path / "run" / "manifests" / "00003.parquet"
    assert layout.stats_path(3) == tmp_path / "run" / "stats" / "00003_stats.json"
    layout.write_classes(CLASSES)
    assert layout.read_classes() == CLASSES
    doc = json.loads(layout.classes_path.read_text())
    assert doc["classes"] == CLASSES
    assert doc["id2label"] == {"0": "background", "1": CLASSES[0], "2": CLASSES[1], "3": CLASSES[2], "255": "ignore"}
    assert doc["palette"][0] == [0, 0, 0] and doc["palette"][1] == list(class_color(1)) and len(doc["palette"]) == 4
    layout.classes_path.write_text(json.dumps(CLASSES))  # an older run's plain list still reads
    assert layout.read_classes() == CLASSES
    layout.classes_path.write_text(json.dumps({"id2label": {}}))
    with pytest.raises(ValueError, match="expected"):
        layout.read_classes()
    with pytest.raises(ValueError, match="duplicate"):
        layout.write_classes(["a", "a"])
    layout.stats_path(7).write_text("{}")  # stats without a tar is not complete
    write_shard(layout.root, 2, make_records(2, 2))
    assert layout.completed_shards() == [2]
    assert layout.shard_ids_on_disk() == [2, 7]


# --- validation ----------------------------------------------------------------------------------
def test_validate_accepts_a_good_run(tmp_path):
    make_run(tmp_path, shards=2, n=8)
    report = validate_run(tmp_path)
    assert report.ok, report.summary()
    assert (report.shards, report.complete_shards, report.samples, report.records, report.rejected) == (2, 2, 12, 16, 4)
    assert report.num_classes == 3


@pytest.mark.parametrize("cut_in, expected", [
    ("data", "00001.tar: unreadable after 2 samples"),  # tarfile raises: unexpected end of data
    ("header", "00001.tar:00001002: fields ['json'] differ"),  # tarfile silently stops at a cut header
])
def test_validate_catches_a_truncated_tar(tmp_path, cut_in, expected):
    layout = make_run(tmp_path, shards=2, n=8)
    tar = layout.tar_path(1)
    with tarfile.open(tar) as tf:
        member = tf.getmembers()[7]  # the 3rd sample's mask.png
    cut = (member.offset_data if cut_in == "data" else member.offset) + 100
    tar.write_bytes(tar.read_bytes()[:cut])
    report = validate_run(tmp_path)
    assert not report.ok
    assert any(e.startswith(expected) for e in report.errors), report.errors
    assert any("bytes but stats say" in e for e in report.errors)


def test_validate_catches_a_tar_cut_at_a_member_boundary(tmp_path):
    """webdataset reads such a tar without complaint (3 of 6 samples); stats and manifest give it away."""
    layout = make_run(tmp_path, shards=1, n=8)
    tar = layout.tar_path(0)
    with tarfile.open(tar) as tf:
        cut = tf.getmembers()[9].offset  # header of the 4th sample's first member
    tar.write_bytes(tar.read_bytes()[:cut])  # no end-of-archive marker either
    assert len(list(wds.WebDataset(str(tar), shardshuffle=False))) == 3
    errors = validate_run(tmp_path).errors
    assert any("3 samples but stats say 6 accepted" in e for e in errors), errors
    assert any("accepted keys disagree" in e for e in errors), errors


def test_validate_catches_duplicate_keys_across_shards(tmp_path):
    layout = make_run(tmp_path, shards=1, n=4)
    write_shard(layout.root, 1, make_records(0, 4))  # shard 1 reuses shard 0's keys
    report = validate_run(tmp_path)
    assert any("00001.tar:00000000: duplicate key (also in 00000.tar)" in e for e in report.errors)


def test_validate_catches_out_of_range_labels(tmp_path):
    layout = make_run(tmp_path, shards=1, n=2)
    # the writer only knows the prompt's ids; class 7 does not exist in classes.json (K = 3)
    bad = make_record(1, 0)
    bad.meta = {**bad.meta, "class_ids": [7]}
    bad.mask = np.where(bad.mask == 1, 7, bad.mask).astype(np.uint8)
    write_shard(layout.root, 1, [bad])
    report = validate_run(tmp_path)
    assert not report.ok
    assert report.errors == ["00001.tar:00001000: mask labels [7] outside 0..3 and 255"]


def test_validate_catches_rgb_masks_and_mixed_fields(tmp_path):
    layout = make_run(tmp_path, shards=1, n=3)
    tar = layout.tar_path(0)
    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    rgb = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(rgb, format="PNG")
    with open(tar, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as w:
        for i, s in enumerate(samples):
            sample = {k: v for k, v in s.items() if not k.startswith("__")}
            sample["__key__"] = s["__key__"]
            if i == 0:
                sample["mask.png"] = rgb.getvalue()
            if i == 1:
                sample["txt"] = b"extra"
            w.write(sample)
    errors = validate_run(tmp_path).errors
    assert any("bad mask" in e and "mode L" in e for e in errors), errors
    assert any("fields" in e and "txt" in e for e in errors), errors


def test_validate_reports_missing_classes_and_empty_runs(tmp_path):
    report = validate_run(tmp_path)
    assert not report.ok and "no shards directory" in report.errors[0]
    RunLayout(tmp_path).create()
    errors = validate_run(tmp_path).errors
    assert any("classes.json: missing" in e for e in errors) and any("no shards" in e for e in errors)
