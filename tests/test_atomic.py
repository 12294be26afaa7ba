"""Atomic writes: the target holds the old or the whole new content, and no temporary is left."""
from __future__ import annotations

import os

import numpy as np
import pytest

from maskmill.atomic import atomic_save_npz, atomic_write, atomic_write_bytes, write_if_changed


def test_bytes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "bank.safetensors"
    target.write_bytes(b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_a_named_temporary_is_used_and_renamed(tmp_path):
    target, tmp = tmp_path / "x_stats.json", tmp_path / "x_stats.json.tmp"
    seen = []
    atomic_write(target, lambda p: (seen.append(p), p.write_bytes(b"{}")), tmp=tmp)
    assert seen == [tmp] and target.read_bytes() == b"{}" and not tmp.exists()


def test_write_if_changed_skips_equal_content(tmp_path):
    target = tmp_path / "config.yaml"
    assert write_if_changed(target, b"a: 1\n")
    os.utime(target, ns=(1, 1))
    assert not write_if_changed(target, b"a: 1\n")
    assert target.stat().st_mtime_ns == 1
    assert write_if_changed(target, b"a: 2\n") and target.read_bytes() == b"a: 2\n"


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot serialise this")


def test_npz_is_saved_at_exactly_its_path_and_reads_back(tmp_path):
    target = tmp_path / "pool.cache"  # no ".npz": numpy alone would write pool.cache.npz
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    atomic_save_npz(target, {"images": images, "seconds": 1.5})
    atomic_save_npz(tmp_path / "plain.npz", {"images": images}, compressed=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.npz", "pool.cache"]
    with np.load(target) as z:
        assert np.array_equal(z["images"], images) and float(z["seconds"]) == 1.5
    with np.load(tmp_path / "plain.npz") as z:
        assert np.array_equal(z["images"], images)


def test_npz_whose_serialisation_fails_midway_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "generated.npz"
    atomic_save_npz(target, {"images": np.zeros((2, 8, 8, 3), np.uint8)})
    before = target.read_bytes()
    big = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)  # written before the failure
    with pytest.raises(RuntimeError, match="cannot serialise"):
        atomic_save_npz(target, {"images": big, "broken": np.array([_Unpicklable()], dtype=object)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated.npz"]
