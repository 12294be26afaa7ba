"""Atomic file writes: readers see the old file or the whole new one, never half of one.

    atomic_write_bytes(path, data)                       # bytes
    atomic_save_npz(path, {"images": images})            # numpy arrays, as an .npz named exactly `path`
    atomic_write(path, lambda tmp: save_file(t, tmp))    # any writer that takes a path
    write_if_changed(path, data)                         # skip the write (and the mtime bump) if equal

Each write goes to a temporary file in the target's folder (a rename is atomic only within one
filesystem), is fsync'ed, then replaces the target with `os.replace`; the folder is fsync'ed too so
the rename survives a crash. A failed write removes its temporary. Unless the caller names the
temporary (`tmp=`, for layouts that track their temporaries by name), it is `.{name}.{random}.tmp`:
unique per writer, so concurrent writers of one file never share a temporary.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

TEMP_SUFFIX = ".tmp"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], tmp: str | os.PathLike | None = None) -> Path:
    """Call `write(tmp_path)` to fill a temporary beside `path`, then fsync it and rename it onto `path`.

    `write` gets the temporary's path and must write the whole file there (e.g. safetensors'
    `save_file(tensors, tmp)`). On any error the temporary is removed and the target is untouched.
    `tmp` names the temporary (default: a fresh `.{name}.{random}.tmp`). Returns `path`.
    """
    path = Path(path)
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        tmp_path = Path(name)
    else:
        tmp_path = Path(tmp)
    try:
        write(tmp_path)
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, tmp: str | os.PathLike | None = None) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda p: Path(p).write_bytes(data), tmp=tmp)


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, Any], compressed: bool = True) -> Path:
    """Save `arrays` (name -> array) as an npz at `path` atomically (see `atomic_write`): a run killed
    mid-write leaves the old cache or none, never a truncated one the next run would load."""
    import numpy as np

    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz" to it
            save(f, **arrays)

    return atomic_write(path, write)


def write_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """Write `data` atomically unless `path` already holds exactly it. True if it wrote."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True
