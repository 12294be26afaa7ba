"""The parquet manifest of a shard: one row per record, accepted and rejected, in `manifests/`.

Every shard's manifest has the same schema, so all of a run's manifests concatenate into one
table (`datasets.load_dataset("parquet", data_dir="RUN/manifests")` or pyarrow). Rows are
buffered and flushed in row groups, so memory stays flat with shard size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .encode import json_text
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
