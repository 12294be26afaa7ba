"""Where a run's files live, and which shards are complete.

    RUN/
      classes.json              ["circle", "square", ...]; run class id k = position + 1
      shards/
        00000.tar               accepted samples (webdataset)
        00000.parquet           manifest: every record, accepted and rejected
        00000_stats.json        written last: the shard's completion marker
        00000.tar.tmp ...       temporaries while a shard is being written

A shard is complete when its stats file AND its tar exist (img2dataset's rule). On resume,
`clean_temporaries()` removes whatever an interrupted run left behind, and the
incomplete shards are simply written again.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_bytes
from .records import shard_name

TMP_SUFFIX = ".tmp"
_SHARD_FILE = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)(\.tmp)?$")


@dataclass(frozen=True)
class ShardPaths:
    """The final and temporary paths of one shard's three files."""

    tar: Path
    manifest: Path
    stats: Path

    @property
    def tar_tmp(self) -> Path:
        return _tmp(self.tar)

    @property
    def manifest_tmp(self) -> Path:
        return _tmp(self.manifest)

    @property
    def stats_tmp(self) -> Path:
        return _tmp(self.stats)

    def finals(self) -> tuple[Path, Path, Path]:
        return self.tar, self.manifest, self.stats

    def temporaries(self) -> tuple[Path, Path, Path]:
        return self.tar_tmp, self.manifest_tmp, self.stats_tmp


def shard_paths(shards_dir: Path, shard_id: int) -> ShardPaths:
    """Paths of shard `shard_id` inside `shards_dir` (the one naming rule writer and layout share)."""
    name = shard_name(shard_id)
    d = Path(shards_dir)
    return ShardPaths(tar=d / f"{name}.tar", manifest=d / f"{name}.parquet", stats=d / f"{name}_stats.json")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


class RunLayout:
    """A run folder: its shards directory, its shard files and its classes.json."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards_dir = self.root / "shards"
        self.classes_path = self.root / "classes.json"

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    def create(self) -> "RunLayout":
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        return self

    # --- one shard's files -------------------------------------------------------------
    def shard(self, shard_id: int) -> ShardPaths:
        return shard_paths(self.shards_dir, shard_id)

    def tar_path(self, shard_id: int) -> Path:
        return self.shard(shard_id).tar

    def manifest_path(self, shard_id: int) -> Path:
        return self.shard(shard_id).manifest

    def stats_path(self, shard_id: int) -> Path:
        return self.shard(shard_id).stats

    def is_complete(self, shard_id: int) -> bool:
        p = self.shard(shard_id)
        return p.stats.is_file() and p.tar.is_file()

    # --- the whole shards directory ----------------------------------------------------
    def _shard_files(self) -> list[tuple[int, Path, bool]]:
        """(shard_id, path, is_temporary) of every file in shards/ that follows the naming rule."""
        if not self.shards_dir.is_dir():
            return []
        found = []
        for p in sorted(self.shards_dir.iterdir()):
            m = _SHARD_FILE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p, m.group(3) is not None))
        return found

    def shard_ids_on_disk(self) -> list[int]:
        """Ids of every shard that has any file (final or temporary) in shards/."""
        return sorted({sid for sid, _, _ in self._shard_files()})

    def completed_shards(self) -> list[int]:
        """Ids of shards whose stats file and tar both exist, ascending."""
        return [sid for sid in self.shard_ids_on_disk() if self.is_complete(sid)]

    def tars(self) -> list[Path]:
        """Every final .tar in shards/, complete or not, in shard order."""
        return [p for _, p, tmp in self._shard_files() if not tmp and p.suffix == ".tar"]

    def temporaries(self) -> list[Path]:
        """Leftover temporary files in shards/."""
        return [p for _, p, tmp in self._shard_files() if tmp]

    def clean_partial(self, shard_id: int) -> list[Path]:
        """Remove a shard's temporaries and, unless it is complete, its final files too.

        Returns the removed paths. A complete shard keeps its tar, manifest and stats.
        """
        p = self.shard(shard_id)
        doomed = list(p.temporaries())
        if not self.is_complete(shard_id):
            doomed += list(p.finals())
        removed = []
        for path in doomed:
            if path.exists():
                path.unlink()
                removed.append(path)
        return removed

    def clean_temporaries(self) -> list[Path]:
        """On resume: remove every temporary and every file of an incomplete shard. Returns removed paths.

        Only while no writer is running on this run: a shard being written is incomplete too.
        """
        removed: list[Path] = []
        for sid in self.shard_ids_on_disk():
            removed += self.clean_partial(sid)
        return removed

    # --- classes.json --------------------------------------------------------------------
    def write_classes(self, names: list[str]) -> Path:
        """Write the run's class names; class id k (in masks) is names[k - 1]; 0 and 255 are reserved."""
        names = list(names)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("class names must be non-empty strings")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        if len(names) > 254:
            raise ValueError(f"at most 254 classes fit in a uint8 mask (255 = ignore), got {len(names)}")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.classes_path, (json.dumps(names, indent=1, ensure_ascii=False) + "\n").encode(),
                           tmp=_tmp(self.classes_path))
        return self.classes_path

    def read_classes(self) -> list[str]:
        """The run's class names (index k - 1 for class id k)."""
        names = json.loads(self.classes_path.read_text())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{self.classes_path}: expected a JSON list of class names")
        return names
