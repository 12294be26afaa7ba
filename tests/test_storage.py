"""Runs at fsspec URLs (memory:// here; S3 in test_s3.py), the output check, and the repair of
damaged complete shards on resume (a truncated, deleted or rewritten tar is redone)."""
from __future__ import annotations

import json
import re

import fsspec
import pytest

from maskmill.config import load_config
from maskmill.run.direct import run_direct
from maskmill.shards import RunLayout, iter_samples, validate_run
from maskmill.shards.writer import ShardWriter, write_shard
from maskmill.storage import StorageError, check_output

from runs import write_config
from test_shards import CLASSES, make_records


@pytest.fixture
def memory_url(request):
    """A fresh memory:// run URL, removed afterwards (the memory filesystem is process-wide)."""
    fs = fsspec.filesystem("memory")
    path = "/maskmill-tests/" + re.sub(r"\W", "-", request.node.name)  # no glob characters
    if fs.exists(path):
        fs.rm(path, recursive=True)
    yield f"memory://{path}"
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _memory_objects(url: str) -> list[str]:
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    return sorted(p.removeprefix(root + "/") for p in fs.find(root))


# --- shards at a URL -----------------------------------------------------------------------------------
def test_shard_at_url_uploaded_whole_with_hashes_and_read_back(memory_url):
    layout = RunLayout(memory_url)
    layout.write_classes(CLASSES)
    stats = write_shard(memory_url, 0, make_records(0, 8))
    assert _memory_objects(memory_url) == ["classes.json", "manifests/00000.parquet", "shards/00000.tar",
                                           "stats/00000_stats.json"]  # no temporaries at the URL
    tar = layout.store.read_bytes(layout.tar_path(0))
    import hashlib

    assert (stats.tar_bytes, stats.tar_sha256) == (len(tar), hashlib.sha256(tar).hexdigest())
    assert layout.read_stats(0).manifest_sha256 == stats.manifest_sha256 != ""
    assert layout.completed_shards() == [0] and layout.damage(0) is None
    report = validate_run(memory_url)
    assert report.ok and report.samples == stats.accepted == 6, report.summary()
    samples = list(iter_samples(memory_url))
    assert [s.key for s in samples] == [r.key for r in make_records(0, 8) if r.accepted]
    assert samples[0].url == f"{layout.location}/shards/00000.tar" and samples[0].mask.ndim == 2


def test_failed_stats_upload_leaves_no_complete_shard_and_a_rerun_completes_it(memory_url, monkeypatch):
    layout = RunLayout(memory_url)
    layout.write_classes(CLASSES)

    def fail(self, stats):
        raise ConnectionError("upload of the stats object cut off")

    monkeypatch.setattr(ShardWriter, "_write_stats", fail)
    with pytest.raises(ConnectionError):
        write_shard(memory_url, 0, make_records(0, 8))
    assert not layout.store.isfile(layout.stats_path(0))  # nothing looks complete
    assert layout.completed_shards() == []
    monkeypatch.undo()
    write_shard(memory_url, 0, make_records(0, 8))
    assert layout.completed_shards() == [0] and validate_run(memory_url).ok


def test_tar_uploaded_but_no_stats_is_not_complete_and_is_cleaned(memory_url):
    """What a kill between the tar's upload and the stats' leaves: a tar object and no stats."""
    layout = RunLayout(memory_url)
    layout.write_classes(CLASSES)
    write_shard(memory_url, 0, make_records(0, 4))
    layout.drop_stats(0)  # as if the process died before the stats upload
    assert layout.store.isfile(layout.tar_path(0)) and layout.completed_shards() == []
    assert not validate_run(memory_url).ok
    assert sorted(p.name for p in layout.clean_partial(0)) == ["00000.parquet", "00000.tar"]
    assert _memory_objects(memory_url) == ["classes.json"]


# --- the output check ------------------------------------------------------------------------------------
def test_check_output_refuses_in_one_line(tmp_path, monkeypatch, memory_url):
    check_output(memory_url)  # writable: passes, and leaves nothing behind
    assert _memory_objects(memory_url) == []
    check_output(str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()  # nothing created by the check
    cases = {"bogus://bucket/run": "unknown storage protocol bogus://",
             str(tmp_path / "a-file"): "is a file, not a folder",
             str(tmp_path / "a-file" / "run"): "which is a file, not a folder"}
    (tmp_path / "a-file").write_text("x")
    for location, words in cases.items():
        with pytest.raises(StorageError) as err:
            check_output(location)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)

    def not_installed(protocol):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", not_installed)
    with pytest.raises(StorageError, match=r"s3:// backend is not installed \(pip install 'maskmill\[s3\]'\)"):
        check_output("s3://bucket/run")


# --- direct runner at a URL; damaged shards repaired on resume -----------------------------------------------
def _damage(layout: RunLayout) -> dict[int, bytes]:
    """Truncate shard 0's tar, delete shard 1's, flip the last (padding) byte of shard 2's. Returns the originals."""
    store = layout.store
    originals = {sid: store.read_bytes(layout.tar_path(sid)) for sid in (0, 1, 2)}
    store.write_bytes(layout.tar_path(0), originals[0][: len(originals[0]) // 2])
    store.remove(layout.tar_path(1))
    store.write_bytes(layout.tar_path(2), originals[2][:-1] + bytes([originals[2][-1] ^ 1]))
    return originals


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_direct_run_keeps_complete_shards_and_repairs_damaged_ones(tmp_path, tiny_model, memory_url, where):
    output = str(tmp_path / "run") if where == "folder" else memory_url
    config = write_config(tmp_path / "c.yaml", tiny_model, output)
    cfg = load_config(config)
    first = run_direct(cfg, config, progress=False)
    assert first["complete"] and first["valid"] and first["accepted"] == 8, first.get("validation")
    layout = RunLayout(first["run_dir"])
    assert layout.store.isfile(layout.root / "contact_sheet.png")
    assert json.loads(layout.read_file("run.json"))["fingerprint"] == cfg.fingerprint()
    assert load_config(layout.location_of(layout.root / "config.yaml")).fingerprint() == cfg.fingerprint()

    again = run_direct(cfg, config, progress=False)  # complete: no work, no pipeline
    assert again["written"] == [] and again["loaded_pipeline"] is False and again["valid"]

    originals = _damage(layout)
    assert "sha256" in layout.damage(2) and "bytes" in layout.damage(0) and "missing" in layout.damage(1)
    damaged = validate_run(layout.location)
    assert not damaged.ok
    repaired = run_direct(cfg, config, progress=False)
    redone = [0, 1, 2]
    assert repaired["written"] == redone and repaired["valid"], repaired.get("validation")
    for sid in redone:  # the same samples, byte for byte
        assert layout.store.read_bytes(layout.tar_path(sid)) == originals[sid]


def test_cli_exits_non_zero_with_one_line_when_the_run_does_not_validate(tmp_path, tiny_model, monkeypatch, capsys):
    from maskmill.cli import main
    from maskmill.run import summary as run_summary
    from maskmill.shards.validate import ValidationReport

    def broken(run_dir):
        report = ValidationReport(shards=4, complete_shards=4)
        report.error("00001.tar: unreadable after 0 samples (ReadError: truncated)")
        return report

    config = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run")
    monkeypatch.setattr(run_summary, "validate_run", broken)
    assert main(["generate", "--config", str(config), "--direct", "--no-progress", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "does not validate (1 problem; first: 00001.tar: unreadable" in err
    assert "maskmill validate" in err


# --- the bank cache at a URL -----------------------------------------------------------------------------
def test_bank_cache_at_url_reuses_remembers_and_rebuilds_corrupted(memory_url):
    import torch

    from maskmill.prototypes import BankCache, load_bank
    from test_prototypes import FP, class_bank

    cache = BankCache(memory_url)
    calls: list[str] = []

    def build(name: str):
        calls.append(name)
        return class_bank(name)

    first = cache.get_or_build(["cat"], FP, build)
    entry = cache.entry_path("cat", FP)
    assert isinstance(entry, str) and entry.startswith(memory_url + "/cat/")
    second = cache.get_or_build(["cat", "dog"], FP, build)
    assert second.reused == ["cat"] and calls == ["cat", "dog"]
    assert torch.equal(load_bank(entry, expected_fingerprint=FP).vectors, first.bank.vectors)
    cache.remember("cat", "k1", FP)
    assert BankCache(memory_url).recall("cat", "k1") is not None  # a new process's view: no model load

    fs = fsspec.filesystem("memory")
    dog = cache.entry_path("dog", FP).removeprefix("memory://")
    fs.pipe_file(dog, fs.cat_file(dog)[:-8] + b"\0" * 8)
    third = cache.get_or_build(["dog"], FP, build)
    assert third.built == ["dog"] and "dog" in third.rebuilt_after_error
