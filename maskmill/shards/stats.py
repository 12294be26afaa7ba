"""`stats/{shard}_stats.json`: a shard's counts and class coverage, written last as its completion marker."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .records import BACKGROUND, IGNORE


@dataclass
class ShardStats:
    """What `{shard}_stats.json` records. Written last: its presence marks the shard complete."""

    shard_id: int
    shard: str
    records: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    tar_bytes: int = 0
    manifest_bytes: int = 0
    # what resume and validate compare the files with ("" in stats of older runs: not compared)
    tar_sha256: str = ""
    manifest_sha256: str = ""
    seconds: float = 0.0  # wall time of the shard, split in time_split (shards/timing.py)
    time_split: dict[str, float] = field(default_factory=dict)
    image_format: str = "png"
    fields: list[str] = field(default_factory=list)
    mtime: int = 0
    first_index: int | None = None
    last_index: int | None = None
    # class id (as str) -> {"mean": mean fraction of pixels, "samples": n}, over the accepted
    # samples whose prompt named the class (meta["class_ids"]), else where the class appears
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_background_fraction: float | None = None
    mean_ignore_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardStats":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ShardStats":
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ShardStats":
        return cls.from_json(Path(path).read_text())


class Coverage:
    """Running per-class pixel coverage over accepted samples (constant memory)."""

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.background = 0.0
        self.ignore = 0.0
        self.samples = 0

    def add(self, fractions: dict[int, float], prompted: list[int] | None) -> None:
        """fractions: label -> fraction of pixels, for the labels present in the mask."""
        ids = prompted if prompted is not None else [c for c in fractions if c not in (BACKGROUND, IGNORE)]
        for cid in ids:
            self.sums[cid] = self.sums.get(cid, 0.0) + fractions.get(cid, 0.0)
            self.counts[cid] = self.counts.get(cid, 0) + 1
        self.background += fractions.get(BACKGROUND, 0.0)
        self.ignore += fractions.get(IGNORE, 0.0)
        self.samples += 1

    def fill(self, stats: ShardStats) -> None:
        stats.coverage = {
            str(c): {"mean": self.sums[c] / self.counts[c], "samples": self.counts[c]} for c in sorted(self.sums)
        }
        if self.samples:
            stats.mean_background_fraction = self.background / self.samples
            stats.mean_ignore_fraction = self.ignore / self.samples
