"""The parquet manifest of a shard: one row per record, accepted and rejected, in `manifests/`.

Every shard's manifest has the same typed schema (`classes` a list of strings, `confidence` a
list of floats, ...), so all of a run's manifests read as one table with one glob:

    pyarrow.dataset.dataset("RUN/manifests", format="parquet").to_table()
    pandas.read_parquet("RUN/manifests")
    duckdb.sql("SELECT status, count(*) FROM 'RUN/manifests/*.parquet' GROUP BY status")

Rows are buffered and flushed in row groups, so memory stays flat with shard size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .records import SampleRecord

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
        ("classes", pa.list_(pa.string())),  # the prompt's class names
        ("class_ids", pa.list_(pa.int32())),  # their run class ids (mask values)
        ("confidence", pa.list_(pa.float64())),  # one score per class
        ("model", pa.string()),
        ("extractor", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("foreground_fraction", pa.float64()),  # of pixels labelled 1..254; null when rejected
        ("ignore_fraction", pa.float64()),  # of pixels labelled 255; null when rejected
        ("meta", pa.string()),  # the full metadata as JSON
    ]
)


# Manifests of older runs: the same columns, the lists as JSON text (validate accepts them; a run
# resumed since mixes both, so read such a run's manifests one file at a time).
LEGACY_MANIFEST_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if f.name in ("classes", "class_ids", "confidence")
                                    else f for f in MANIFEST_SCHEMA])


class ManifestWriter:
    """Appends manifest rows to a parquet file in row groups of MANIFEST_BATCH_ROWS."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._writer = pq.ParquetWriter(self.path, MANIFEST_SCHEMA)
        self._rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}

    def add(self, row: dict[str, Any]) -> None:
        for name, column in self._rows.items():
            column.append(row[name])
        if len(self._rows["index"]) >= MANIFEST_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows["index"]:
            self._writer.write_table(pa.Table.from_pydict(self._rows, schema=MANIFEST_SCHEMA))
            for column in self._rows.values():
                column.clear()

    def close(self) -> None:
        """Write the buffered rows and the footer, and fsync the file."""
        self._flush()
        self._writer.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        self._writer.close()


def _list_or_none(meta: dict[str, Any], name: str, kind: type, where: str) -> list | None:
    """meta[name] as a list of `kind` (None if absent); raises now rather than when the row group is flushed."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    numeric = kind in (int, float)
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        if numeric else isinstance(v, kind) for v in value)
    if not ok:
        raise ValueError(f"{where}: meta[{name!r}] must be a list of {kind.__name__}, got {value!r}")
    return [kind(v) for v in value]


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


def manifest_row(record: SampleRecord, meta_json: str, where: str) -> dict[str, Any]:
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
        "classes": _list_or_none(meta, "classes", str, where),
        "class_ids": _list_or_none(meta, "class_ids", int, where),
        "confidence": _list_or_none(meta, "confidence", float, where),
        "model": _meta_value(meta, "model", str, where),
        "extractor": _meta_value(meta, "extractor", str, where),
        "width": int(width) if width is not None else None,
        "height": int(height) if height is not None else None,
        "foreground_fraction": None,
        "ignore_fraction": None,
        "meta": meta_json,
    }
