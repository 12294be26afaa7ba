"""Write one shard: accepted samples to a tar, every record to a parquet manifest, stats last.

    stats = write_shard(layout.shards_dir, shard_id, records, image_format="png", mtime=0.0)

Each tar sample has exactly these members (HF `datasets` infers features from the first
samples and fails on mixed fields):

    {key}.png | {key}.jpg    the image
    {key}.json               metadata (meta + "index"), sorted keys
    {key}.mask.png           single-channel (L) lossless PNG: 0 background, k class k, 255 ignore

Crash safety (img2dataset's rules): the tar and the manifest are written under `.tmp` names
and renamed when complete; `{shard}_stats.json` is written last, also via a rename, and marks
the shard complete. A stale stats file is removed before a shard is rewritten.

Records are consumed one at a time from the iterable and never held, so memory stays flat
with shard size; each is checked before anything of it is written. A bad record aborts the
shard and removes its files: a shard is written whole or not at all.

Same records + same `mtime` -> byte-identical tar (TarWriter sorts members and stamps `mtime`,
rounded to whole seconds).
"""
from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from ..atomic import atomic_write_bytes
from .layout import ShardPaths, shard_paths
from .records import BACKGROUND, IGNORE, SampleRecord, shard_name

IMAGE_FORMATS = ("png", "jpg")
MASK_FIELD = "mask.png"
META_FIELD = "json"
JPEG_QUALITY = 95
MANIFEST_BATCH_ROWS = 256  # manifest rows buffered before a parquet row group is flushed

# Identical for every shard, so all manifests concatenate into one table.
MANIFEST_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("classes", pa.string()),  # JSON list of class names
        ("class_ids", pa.string()),  # JSON list of run class ids
        ("confidence", pa.string()),  # JSON list, one score per class
        ("model", pa.string()),
        ("extractor", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("foreground_fraction", pa.float64()),  # of pixels labelled 1..254; null when rejected
        ("ignore_fraction", pa.float64()),  # of pixels labelled 255; null when rejected
        ("meta", pa.string()),  # the full metadata as JSON
    ]
)


def sample_fields(image_format: str) -> tuple[str, ...]:
    """The members every sample of a shard written with `image_format` has (besides __key__)."""
    return (image_format, META_FIELD, MASK_FIELD)


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
    seconds: float = 0.0
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

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ShardStats":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _json_default(o: Any) -> Any:
    # Extractors hand out numpy confidences; converting here spares every caller the .tolist().
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# One encoder for every call: json.dumps with options builds a new one each time (4 per record).
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                         default=_json_default)


def json_text(obj: Any) -> str:
    """Deterministic, strict JSON (sorted keys; NaN refused; numpy scalars/arrays converted)."""
    return _JSON.encode(obj)


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Single-channel 8-bit PNG: lossless, and read back as mode "L" (not RGB, not a palette)."""
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")  # a 2-D uint8 array becomes mode "L"
    return buf.getvalue()


class _Coverage:
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


class ShardWriter:
    """Writes one shard record by record; `close()` finalises it, `abort()` removes it.

        with ShardWriter(shards_dir, 7) as w:
            for record in records:
                w.write(record)
        stats = w.stats          # set by close(); an exception inside `with` aborts instead

    Files are opened at the first valid record (or at close), so a malformed first record
    leaves the directory untouched.
    """

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        shard_id: int,
        image_format: str = "png",
        mtime: float = 0.0,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.paths: ShardPaths = shard_paths(Path(shards_dir), shard_id)
        self.shard_id = shard_id
        self.image_format = image_format
        # Whole seconds: tarfile gives every member with a float mtime an extra PAX header
        # (+1 KiB per member), and ustar headers hold integer seconds anyway.
        self.mtime = int(round(mtime))
        self.fields = sample_fields(image_format)
        self.stats: ShardStats | None = None
        self._stats = ShardStats(shard_id=shard_id, shard=shard_name(shard_id), image_format=image_format,
                                 fields=sorted(self.fields), mtime=self.mtime)
        self._reasons: Counter[str] = Counter()
        self._coverage = _Coverage()
        self._keys: set[str] = set()  # ~100 B per record: the only per-record state kept
        self._meta_keys: frozenset[str] | None = None  # of the first accepted sample
        self._rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
        self._tar_file = None
        self._tar: wds.TarWriter | None = None
        self._manifest: pq.ParquetWriter | None = None
        self._started = 0.0
        self._closed = False

    # --- public interface --------------------------------------------------------------
    def write(self, record: SampleRecord) -> None:
        """Check, encode and write one record (accepted: tar + manifest; rejected: manifest only)."""
        if self._closed:
            raise RuntimeError(f"shard {self._stats.shard} is already closed")
        sample, row, fractions, prompted = self._prepare(record)
        self._open()  # only after the record passed every check
        if sample is not None:
            self._tar.write(sample)
            # tarfile keeps a TarInfo per member for the archive's lifetime (~1 KB per sample);
            # a write-only stream never reads them back, so drop them to keep memory flat.
            self._tar.tarstream.members.clear()
            self._coverage.add(fractions, prompted)
        self._add_row(row)
        self._count(record)

    def close(self) -> ShardStats:
        """Finish the tar and manifest, rename them into place, then write the stats (last)."""
        if self._closed:
            raise RuntimeError(f"shard {self._stats.shard} is already closed")
        self._open()  # an empty shard still gets its three files
        self._tar.close()
        _fsync_close(self._tar_file)
        self._flush_rows()
        self._manifest.close()
        _fsync_path(self.paths.manifest_tmp)
        os.replace(self.paths.tar_tmp, self.paths.tar)
        os.replace(self.paths.manifest_tmp, self.paths.manifest)
        stats = self._finish_stats()
        self._write_stats(stats)
        self._closed = True
        self.stats = stats
        return stats

    def abort(self) -> None:
        """Drop the shard: close handles, remove its temporaries and any final file of it."""
        self._closed = True
        for closer in (self._tar, self._tar_file, self._manifest):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # already broken; removing the files is what matters
                    pass
        if self._tar_file is None:
            return  # nothing was ever opened, so nothing of ours is on disk
        for path in (*self.paths.temporaries(), *self.paths.finals()):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # --- steps ---------------------------------------------------------------------------
    def _prepare(self, record: SampleRecord):
        """Every check and all encoding for one record, before any of it touches the disk."""
        if not isinstance(record, SampleRecord):
            raise TypeError(f"expected a SampleRecord, got {type(record).__name__}")
        record.check()  # again: arrays may have been swapped since construction
        where = f"shard {self._stats.shard}, record {record.index} ({record.key!r})"
        if record.key in self._keys:
            raise ValueError(f"{where}: duplicate key in shard")
        if record.meta.get("index", record.index) != record.index:
            raise ValueError(f"{where}: meta['index'] = {record.meta['index']} contradicts the record's index")
        meta = dict(record.meta)
        meta["index"] = int(record.index)
        try:
            meta_text = json_text(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: meta is not JSON-serialisable: {e}") from None
        row = _manifest_row(record, meta_text, where)
        if not record.accepted:
            return None, row, None, None

        if self._meta_keys is None:
            self._meta_keys = frozenset(meta)
        elif frozenset(meta) != self._meta_keys:
            diff = sorted(frozenset(meta) ^ self._meta_keys)
            raise ValueError(f"{where}: meta keys differ from the shard's first sample's (differ in {diff}); "
                             "every sample's json must have the same keys (see build_meta)")
        mask = record.mask
        stated = (record.meta.get("height"), record.meta.get("width"))
        if stated != (None, None) and stated != mask.shape:
            raise ValueError(f"{where}: meta says height, width = {stated} but the image is {mask.shape}")
        # One pass over the pixels; then only the handful of labels present are looked at.
        counts = np.bincount(mask.ravel(), minlength=256)
        fractions = {int(c): int(counts[c]) / mask.size for c in np.flatnonzero(counts)}
        prompted = _class_ids(record.meta, where)
        if prompted is not None:
            allowed = {BACKGROUND, IGNORE, *prompted}
            stray = sorted(c for c in fractions if c not in allowed)
            if stray:
                raise ValueError(f"{where}: mask has labels {stray} outside background, ignore "
                                 f"and the prompt's class ids {prompted}")
        row["ignore_fraction"] = fractions.get(IGNORE, 0.0)
        row["foreground_fraction"] = sum(f for c, f in fractions.items() if c not in (BACKGROUND, IGNORE))
        sample = {
            "__key__": record.key,
            self.image_format: encode_image(record.image, self.image_format),
            MASK_FIELD: encode_mask(mask),
            META_FIELD: meta_text.encode("utf-8"),
        }
        return sample, row, fractions, prompted

    def _open(self) -> None:
        if self._tar is not None:
            return
        self.paths.tar.parent.mkdir(parents=True, exist_ok=True)
        # Rewriting a shard: drop its completion marker first, so a crash from here on
        # leaves it incomplete (and redone on resume) rather than "complete" with new data.
        self.paths.stats.unlink(missing_ok=True)
        self._started = time.perf_counter()
        self._tar_file = open(self.paths.tar_tmp, "wb")
        # encoder=False: members are already bytes, encoded by us (mask forced to mode L).
        self._tar = wds.TarWriter(self._tar_file, encoder=False, mtime=self.mtime)
        self._manifest = pq.ParquetWriter(self.paths.manifest_tmp, MANIFEST_SCHEMA)

    def _add_row(self, row: dict[str, Any]) -> None:
        for name, column in self._rows.items():
            column.append(row[name])
        if len(self._rows["index"]) >= MANIFEST_BATCH_ROWS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if self._rows["index"]:
            self._manifest.write_table(pa.Table.from_pydict(self._rows, schema=MANIFEST_SCHEMA))
            for column in self._rows.values():
                column.clear()

    def _count(self, record: SampleRecord) -> None:
        s = self._stats
        s.records += 1
        if record.accepted:
            s.accepted += 1
        else:
            s.rejected += 1
            self._reasons[record.reason] += 1
        self._keys.add(record.key)
        idx = int(record.index)
        s.first_index = idx if s.first_index is None else min(s.first_index, idx)
        s.last_index = idx if s.last_index is None else max(s.last_index, idx)

    def _finish_stats(self) -> ShardStats:
        s = self._stats
        s.reasons = dict(sorted(self._reasons.items()))
        s.tar_bytes = self.paths.tar.stat().st_size
        s.manifest_bytes = self.paths.manifest.stat().st_size
        s.seconds = round(time.perf_counter() - self._started, 6)
        self._coverage.fill(s)
        return s

    def _write_stats(self, stats: ShardStats) -> None:
        atomic_write_bytes(self.paths.stats, json.dumps(stats.to_dict(), indent=1, sort_keys=True).encode(),
                           tmp=self.paths.stats_tmp)


def write_shard(
    shards_dir: str | os.PathLike,
    shard_id: int,
    records: Iterable[SampleRecord],
    image_format: str = "png",
    mtime: float = 0.0,
) -> ShardStats:
    """Write shard `shard_id` from `records` (consumed lazily) and return its stats.

    Produces `{shard}.tar` (accepted samples), `{shard}.parquet` (every record) and, last,
    `{shard}_stats.json`. Raises ValueError on a malformed record; the shard then has no files.
    """
    writer = ShardWriter(shards_dir, shard_id, image_format=image_format, mtime=mtime)
    try:
        for record in records:
            writer.write(record)
        return writer.close()
    except BaseException:  # includes KeyboardInterrupt: never leave half a shard behind
        writer.abort()
        raise


# --- helpers ---------------------------------------------------------------------------------
def _class_ids(meta: dict[str, Any], where: str) -> list[int] | None:
    ids = meta.get("class_ids")
    if ids is None:
        return None
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: meta['class_ids'] must be a list of ints, got {ids!r}") from None
    if not all(0 < i < IGNORE for i in ids):
        raise ValueError(f"{where}: class ids must be in 1..254, got {ids}")
    return ids


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json_text(value)


def _meta_value(meta: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """meta[name] if it is absent/None or of `kind`; raises now rather than when the row group is flushed."""
    value = meta.get(name)
    if value is None:
        return None
    if kind is int and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not -(2**63) <= int(value) < 2**63:
            raise ValueError(f"{where}: meta[{name!r}] = {value} does not fit in int64")
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"{where}: meta[{name!r}] must be {kind.__name__}, got {value!r}")


def _manifest_row(record: SampleRecord, meta_json: str, where: str) -> dict[str, Any]:
    meta = record.meta
    if record.accepted:
        height, width = record.image.shape[:2]
    else:
        height, width = _meta_value(meta, "height", int, where), _meta_value(meta, "width", int, where)
    return {
        "index": int(record.index),
        "key": record.key,
        "status": record.status,
        "reason": record.reason,
        "prompt": _meta_value(meta, "prompt", str, where),
        "seed": _meta_value(meta, "seed", int, where),
        "classes": _json_or_none(meta.get("classes")),
        "class_ids": _json_or_none(meta.get("class_ids")),
        "confidence": _json_or_none(meta.get("confidence")),
        "model": _meta_value(meta, "model", str, where),
        "extractor": _meta_value(meta, "extractor", str, where),
        "width": int(width) if width is not None else None,
        "height": int(height) if height is not None else None,
        "foreground_fraction": None,
        "ignore_fraction": None,
        "meta": meta_json,
    }


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
