"""Atomic writes: the target holds the old or the whole new content, and no temporary is left."""
from __future__ import annotations

import os

import pytest

from maskmill.atomic import atomic_write, atomic_write_bytes, write_if_changed


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
