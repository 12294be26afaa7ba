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

The run may live in a folder or at any URL fsspec reaches (maskmill.storage.Store): a local
layout's paths are `pathlib.Path`s, a remote one's are `PurePosixPath`s inside its filesystem
(`location_of(path)` gives the URL). A remote run has no temporaries: each file is written to a
local temporary and uploaded whole (see shards/writer.py).

A shard is complete when its stats file AND its tar exist (img2dataset's rule). On resume,
`clean_partial(shard)` (under the shard's lock: maskmill.run.folder.clean_run) removes whatever
an interrupted write left behind, and the incomplete shards are simply written again; a complete
shard whose tar or manifest no longer matches its stats (`damage`) loses its stats first, and is
redone like any incomplete one.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from ..storage import Store
from .labels import label_metadata
from .records import shard_name
from .stats import ShardStats

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

    tar: PurePath
    manifest: PurePath
    stats: PurePath

    @property
    def tar_tmp(self) -> Path:
        return _tmp(self.tar)

    @property
    def manifest_tmp(self) -> Path:
        return _tmp(self.manifest)

    @property
    def stats_tmp(self) -> Path:
        return _tmp(self.stats)

    def finals(self) -> tuple[PurePath, PurePath, PurePath]:
        return self.tar, self.manifest, self.stats

    def temporaries(self) -> tuple[PurePath, PurePath, PurePath]:
        return self.tar_tmp, self.manifest_tmp, self.stats_tmp


def shard_paths(root: PurePath | str, shard_id: int) -> ShardPaths:
    """Paths of shard `shard_id` under the run root `root` (the one naming rule writer and layout share):
    a local folder, or `RunLayout.root` of a URL run (a path inside its filesystem)."""
    name = shard_name(shard_id)
    root = root if isinstance(root, PurePath) else Path(root)
    return ShardPaths(tar=root / SHARDS_DIR / f"{name}.tar", manifest=root / MANIFESTS_DIR / f"{name}.parquet",
                      stats=root / STATS_DIR / f"{name}_stats.json")


def _tmp(path: PurePath) -> PurePath:
    return path.with_name(path.name + TMP_SUFFIX)


class RunLayout:
    """A run (folder or URL): its shards, manifests and stats folders, each shard's files, and classes.json."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.store = Store(root)
        self.remote = self.store.remote
        self.root = self.store.root
        self.shards_dir = self.root / SHARDS_DIR
        self.manifests_dir = self.root / MANIFESTS_DIR
        self.stats_dir = self.root / STATS_DIR
        self.classes_path = self.root / "classes.json"

    def __repr__(self) -> str:
        return f"RunLayout({str(self.location)!r})"

    @property
    def location(self) -> str | Path:
        """The run as users name it: its folder (a Path), or its URL."""
        return self.store.url(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    def location_of(self, path: PurePath) -> str | Path:
        """A path of this run as something to open: itself (local) or its full URL (remote)."""
        return self.store.url(path)

    def create(self) -> "RunLayout":
        for d in (self.shards_dir, self.manifests_dir, self.stats_dir):
            self.store.makedirs(d)
        return self

    # --- one shard's files -------------------------------------------------------------
    def shard(self, shard_id: int) -> ShardPaths:
        return shard_paths(self.root, shard_id)

    def tar_path(self, shard_id: int) -> PurePath:
        return self.shard(shard_id).tar

    def tar_location(self, shard_id: int) -> str | Path:
        """The shard's tar as webdataset opens it (a path, or a URL)."""
        return self.location_of(self.tar_path(shard_id))

    def manifest_path(self, shard_id: int) -> PurePath:
        return self.shard(shard_id).manifest

    def stats_path(self, shard_id: int) -> PurePath:
        return self.shard(shard_id).stats

    def read_stats(self, shard_id: int) -> ShardStats:
        return ShardStats.from_json(self.store.read_text(self.stats_path(shard_id)))

    def is_complete(self, shard_id: int) -> bool:
        p = self.shard(shard_id)
        return self.store.isfile(p.stats) and self.store.isfile(p.tar)

    def damage(self, shard_id: int, check_hash: bool = True) -> str | None:
        """Why a complete shard's tar or manifest no longer matches its stats (size, sha256), else None.

        Reads both files once to hash them (for a URL run, a download): what resuming costs.
        """
        p = self.shard(shard_id)
        try:
            stats = self.read_stats(shard_id)
        except (OSError, ValueError, TypeError) as e:
            return f"{p.stats.name} unreadable ({type(e).__name__})"
        for path, size, digest in ((p.tar, stats.tar_bytes, stats.tar_sha256),
                                   (p.manifest, stats.manifest_bytes, stats.manifest_sha256)):
            if not self.store.isfile(path):
                return f"{path.name} missing"
            actual = self.store.size(path)
            if actual != size:
                return f"{path.name} has {actual} bytes, its stats say {size}"
            if check_hash and digest and self.store.sha256(path) != digest:
                return f"{path.name} differs from the sha256 in its stats"
        return None

    # --- the shard folders ----------------------------------------------------------------
    def _shard_files(self) -> list[tuple[int, PurePath, bool]]:
        """(shard_id, path, is_temporary) of every file in shards/, manifests/ and stats/ that follows
        its folder's naming rule, sorted by path."""
        found = []
        for folder, rule in _FILE_IN.items():
            for name in self.store.listdir(self.root / folder):
                m = rule.match(name)
                if m:
                    found.append((int(m.group(1)), self.root / folder / name, m.group(2) is not None))
        return sorted(found, key=lambda f: str(f[1]))

    def strays(self) -> list[PurePath]:
        """Files in shards/ that are not shard tars (or their temporaries): readers of the folder,
        such as HF datasets' webdataset loader, would take them for data."""
        return sorted(self.shards_dir / n for n in self.store.listdir(self.shards_dir)
                      if not _FILE_IN[SHARDS_DIR].match(n))

    def shard_ids_on_disk(self) -> list[int]:
        """Ids of every shard that has any file (final or temporary) in shards/, manifests/ or stats/."""
        return sorted({sid for sid, _, _ in self._shard_files()})

    def completed_shards(self) -> list[int]:
        """Ids of shards whose stats file and tar both exist, ascending (one listing per folder)."""
        finals = [(sid, p.parent.name) for sid, p, tmp in self._shard_files() if not tmp]
        with_tar = {sid for sid, folder in finals if folder == SHARDS_DIR}
        return sorted(sid for sid, folder in finals if folder == STATS_DIR and sid in with_tar)

    def temporaries(self) -> list[PurePath]:
        """Leftover temporary files of shards (in shards/, manifests/ and stats/)."""
        return [p for _, p, tmp in self._shard_files() if tmp]

    def clean_partial(self, shard_id: int) -> list[PurePath]:
        """Remove a shard's temporaries and, unless it is complete, its final files too.

        Returns the removed paths. A complete shard keeps its tar, manifest and stats. The stats
        go first, so a shard is never left looking complete with only some of its files.
        """
        p = self.shard(shard_id)
        doomed = [] if self.remote else list(p.temporaries())
        if not self.is_complete(shard_id):
            doomed += [p.stats, p.tar, p.manifest]
        return [path for path in doomed if self.store.remove(path)]

    def drop_stats(self, shard_id: int) -> bool:
        """Remove a shard's completion marker (it will be redone). True if there was one."""
        return self.store.remove(self.stats_path(shard_id))

    # --- classes.json and other run files ------------------------------------------------
    def has_classes(self) -> bool:
        return self.store.isfile(self.classes_path)

    def write_classes(self, names: list[str]) -> PurePath:
        """Write the run's classes: {"classes": names, "id2label": {...}, "palette": [...]}.

        Class id k (in masks) is names[k - 1]; id2label also names 0 (background) and 255 (ignore),
        and the palette is the contact sheet's, background first (shards.labels.label_metadata).
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
        self.store.makedirs(self.root)
        self.store.write_bytes(self.classes_path, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode(),
                               tmp=_tmp(self.classes_path))
        return self.classes_path

    def read_classes(self) -> list[str]:
        """The run's class names (index k - 1 for class id k); reads the plain list older runs wrote too."""
        doc = json.loads(self.store.read_text(self.classes_path))
        names = doc.get("classes") if isinstance(doc, dict) else doc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{self.location_of(self.classes_path)}: expected {{\"classes\": [names, ...], ...}} "
                             f"or a JSON list of names")
        return names

    def read_file(self, name: str) -> bytes | None:
        """A run-level file (run.json, config.yaml, ...) or None if absent."""
        path = self.root / name
        return self.store.read_bytes(path) if self.store.isfile(path) else None

    def write_file(self, name: str, data: bytes) -> str | Path:
        """Write a run-level file whole (atomically); returns where it went."""
        self.store.write_bytes(self.root / name, data)
        return self.location_of(self.root / name)
