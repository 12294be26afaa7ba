"""Export a run's samples as image/mask PNG pairs in the layouts segmentation trainers read.

    export_run("outputs/shapes-demo", "mmseg", "exports/shapes", val_fraction=0.1, seed=0)
    export_run("s3://bucket/shapes-demo", "folder", "exports/shapes")   # a run at a URL; `out` is local

`mmseg` (mmsegmentation's custom dataset; detectron2 reads the same pairs):

    img_dir/{train,val}/<key>.png     the image (a JPEG run keeps .jpg: bytes are copied, never re-encoded)
    ann_dir/{train,val}/<key>.png     single-channel mask: 0 background, k = class k, 255 ignore
    splits/{train,val}.txt            one key per line
    metainfo.json                     classes (background first) and palette, for BaseSegDataset's METAINFO

`folder` (what `maskmill evaluate-segmenter` and most hand-written loaders read):

    images/<key>.png, masks/<key>.png, splits/{train,val}.txt, classes.json

Both write `classes.json` ({"classes": [...], "id2label": {...}, "palette": [...]}). The split is
a seeded hash of each key, so a sample's split does not depend on the order or number of shards.
Only accepted samples are in the shards, so only those are exported.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .shards.labels import label_metadata
from .shards.layout import RunLayout
from .shards.reader import raw_samples
from .shards.encode import MASK_FIELD

FORMATS = ("mmseg", "folder")
SPLITS = ("train", "val")


class ExportError(ValueError):
    """Bad export arguments or an unreadable run; one line."""


@dataclass
class ExportReport:
    out: Path
    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})

    def summary(self) -> str:
        return f"exported {self.counts['train']} train + {self.counts['val']} val samples to {self.out}"


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """'val' for a seeded-hash share `val_fraction` of keys, else 'train'."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _dirs(out: Path, fmt: str, split: str) -> tuple[Path, Path]:
    if fmt == "mmseg":
        return out / "img_dir" / split, out / "ann_dir" / split
    return out / "images", out / "masks"


def _check(run: str | os.PathLike, fmt: str, out: Path, val_fraction: float) -> RunLayout:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not 0 <= val_fraction < 1:
        raise ExportError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    layout = RunLayout(run)  # a folder or a URL
    if not layout.has_classes():
        raise ExportError(f"{run} is not a maskmill run: no {layout.classes_path.name}")
    if not layout.completed_shards():
        raise ExportError(f"{run} has no completed shard to export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new one")
    return layout


def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike, val_fraction: float = 0.1,
               seed: int = 0) -> ExportReport:
    """Write every accepted sample of `run` to `out` in layout `fmt`; see the module docstring."""
    out = Path(out)
    layout = _check(run, fmt, out, val_fraction)
    meta = label_metadata(layout.read_classes())
    report = ExportReport(out)
    keys: dict[str, list[str]] = {s: [] for s in SPLITS}
    for shard_id in layout.completed_shards():
        for s in raw_samples(layout.tar_location(shard_id)):
            key = s["__key__"]
            split = split_of(key, val_fraction, seed)
            img_dir, ann_dir = _dirs(out, fmt, split)
            img_dir.mkdir(parents=True, exist_ok=True)
            ann_dir.mkdir(parents=True, exist_ok=True)
            ext = "png" if "png" in s else "jpg"
            (img_dir / f"{key}.{ext}").write_bytes(s[ext])
            (ann_dir / f"{key}.png").write_bytes(s[MASK_FIELD])
            keys[split].append(key)
            report.counts[split] += 1
    (out / "splits").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (out / "splits" / f"{split}.txt").write_text("".join(f"{k}\n" for k in keys[split]))
    (out / "classes.json").write_text(json.dumps(meta, indent=1) + "\n")
    if fmt == "mmseg":
        (out / "metainfo.json").write_text(json.dumps({"classes": meta["classes"], "palette": meta["palette"]},
                                                      indent=1) + "\n")
    return report
