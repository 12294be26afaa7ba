"""Where a run's files live, and which shards are complete.

    RUN/
      classes.json              {"classes": ["circle", ...], "id2label", "palette"}; class id k = classes[k - 1]
      shards/
        00000.tar               accepted samples (webdataset); nothing else lives here, so
                                `datasets.load_dataset("webdataset", data_dir="RUN/shards")` reads samples only
      manifests/
        00000.parquet           manifest: every record, accepted and rejected
      stats/
        00000_stats.json        written last: the shard's completion marker
      (each file's temporary is its name + ".tmp", beside it, while the shard is being written)

A shard is complete when its stats file AND its tar exist (img2dataset's rule). On resume,
`clean_partial(shard)` (under the shard's lock: maskmill.run.folder.clean_run) removes whatever
an interrupted write left behind, and the incomplete shards are simply written again.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_bytes
from .labels import label_metadata
from .records import shard_name

TMP_SUFFIX = ".tmp"
SHARDS_DIR, MANIFESTS_DIR, STATS_DIR = "shards", "manifests", "stats"
# The file name each folder holds per shard: (\d+) is the shard id, (\.tmp)? a temporary.
_FILE_IN = {
    SHARDS_DIR: re.compile(r"^(\d+)\.tar(\.tmp)?$"),
    MANIFESTS_DIR: re.compile(r"^(\d+)\.parquet(\.tmp)?$"),
    STATS_DIR: re.compile(r"^(\d+)_stats\.json(\.tmp)?$"),
}


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


def shard_paths(run_dir: str | os.PathLike, shard_id: int) -> ShardPaths:
    """Paths of shard `shard_id` of the run folder `run_dir` (the one naming rule writer and layout share)."""
    name = shard_name(shard_id)
    root = Path(run_dir)
    return ShardPaths(tar=root / SHARDS_DIR / f"{name}.tar", manifest=root / MANIFESTS_DIR / f"{name}.parquet",
                      stats=root / STATS_DIR / f"{name}_stats.json")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


class RunLayout:
    """A run folder: its shards, manifests and stats folders, each shard's files, and classes.json."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards_dir = self.root / SHARDS_DIR
        self.manifests_dir = self.root / MANIFESTS_DIR
        self.stats_dir = self.root / STATS_DIR
        self.classes_path = self.root / "classes.json"

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    def create(self) -> "RunLayout":
        for d in (self.shards_dir, self.manifests_dir, self.stats_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # --- one shard's files -------------------------------------------------------------
    def shard(self, shard_id: int) -> ShardPaths:
        return shard_paths(self.root, shard_id)

    def tar_path(self, shard_id: int) -> Path:
        return self.shard(shard_id).tar

    def manifest_path(self, shard_id: int) -> Path:
        return self.shard(shard_id).manifest

    def stats_path(self, shard_id: int) -> Path:
        return self.shard(shard_id).stats

    def is_complete(self, shard_id: int) -> bool:
        p = self.shard(shard_id)
        return p.stats.is_file() and p.tar.is_file()

    # --- the shard folders ----------------------------------------------------------------
    def _shard_files(self) -> list[tuple[int, Path, bool]]:
        """(shard_id, path, is_temporary) of every file in shards/, manifests/ and stats/ that follows
        its folder's naming rule, sorted by path."""
        found = []
        for folder, rule in _FILE_IN.items():
            d = self.root / folder
            if not d.is_dir():
                continue
            for p in d.iterdir():
                m = rule.match(p.name)
                if m and p.is_file():
                    found.append((int(m.group(1)), p, m.group(2) is not None))
        return sorted(found, key=lambda f: f[1])

    def strays(self) -> list[Path]:
        """Files in shards/ that are not shard tars (or their temporaries): readers of the folder,
        such as HF datasets' webdataset loader, would take them for data."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(p for p in self.shards_dir.iterdir() if not _FILE_IN[SHARDS_DIR].match(p.name))

    def shard_ids_on_disk(self) -> list[int]:
        """Ids of every shard that has any file (final or temporary) in shards/, manifests/ or stats/."""
        return sorted({sid for sid, _, _ in self._shard_files()})

    def completed_shards(self) -> list[int]:
        """Ids of shards whose stats file and tar both exist, ascending."""
        return [sid for sid in self.shard_ids_on_disk() if self.is_complete(sid)]

    def temporaries(self) -> list[Path]:
        """Leftover temporary files of shards (in shards/, manifests/ and stats/)."""
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

    # --- classes.json --------------------------------------------------------------------
    def write_classes(self, names: list[str]) -> Path:
        """Write the run's classes: {"classes": names, "id2label": {...}, "palette": [...]}.

        Class id k (in masks) is names[k - 1]; id2label also names 0 (background) and 255 (ignore),
        and the palette is the contact sheet's, background first (maskmill.export.label_metadata).
        """
        names = list(names)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("class names must be non-empty strings")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        if len(names) > 254:
            raise ValueError(f"at most 254 classes fit in a uint8 mask (255 = ignore), got {len(names)}")
        meta = label_metadata(names)
        doc = {"classes": names, "id2label": meta["id2label"], "palette": meta["palette"]}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.classes_path, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode(),
                           tmp=_tmp(self.classes_path))
        return self.classes_path

    def read_classes(self) -> list[str]:
        """The run's class names (index k - 1 for class id k); reads the plain list older runs wrote too."""
        doc = json.loads(self.classes_path.read_text())
        names = doc.get("classes") if isinstance(doc, dict) else doc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{self.classes_path}: expected {{\"classes\": [names, ...], ...}} or a JSON list of names")
        return names
