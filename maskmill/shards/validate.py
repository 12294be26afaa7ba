"""Check a run folder the way its users will read it (backs `maskmill validate RUN`).

Reads every shard to the end with webdataset and reports, without stopping at the first
problem: unreadable or truncated tars, missing stats (incomplete shards), leftover
temporaries, files in shards/ that are not tars, duplicate or dotted keys, samples with different fields or json keys, masks
that are not single-channel uint8 or hold labels outside {0..K, 255} (K = len(classes.json)),
image/mask size mismatches, manifests that disagree with their tars or stats, and tars or
manifests whose size or sha256 differs from what their stats recorded. The run may be a folder
or a URL (s3://, memory://, ...).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from .layout import RunLayout
from .reader import decode_image, decode_mask, raw_samples
from .records import ACCEPTED, IGNORE, REJECTED, check_key
from .encode import META_FIELD, sample_fields
from .manifest import LEGACY_MANIFEST_SCHEMA, MANIFEST_SCHEMA
from .stats import ShardStats

MAX_ERRORS = 200  # beyond this a broken run only repeats itself


@dataclass
class ValidationReport:
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    shards: int = 0  # tars found
    complete_shards: int = 0  # tars with stats
    samples: int = 0  # samples read from the tars
    records: int = 0  # manifest rows (accepted + rejected)
    rejected: int = 0
    num_classes: int | None = None
    suppressed_errors: int = 0

    def error(self, message: str) -> None:
        self.ok = False
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)
        else:
            self.suppressed_errors += 1

    def summary(self) -> str:
        head = (f"{'OK' if self.ok else 'FAILED'}: {self.shards} shards ({self.complete_shards} complete), "
                f"{self.samples} samples, {self.records} records ({self.rejected} rejected), "
                f"{self.num_classes} classes")
        lines = [head, *(f"  - {e}" for e in self.errors)]
        if self.suppressed_errors:
            lines.append(f"  ... and {self.suppressed_errors} more errors")
        return "\n".join(lines)


class RunInvalidError(RuntimeError):
    """A finished run that does not validate (raised by the runners; its message is one line)."""


def invalid_run_message(run: str | os.PathLike, report: ValidationReport) -> str:
    """One line: the run, how many problems, the first, and what to do."""
    n = len(report.errors) + report.suppressed_errors
    first = report.errors[0] if report.errors else "unknown problem"
    return (f"{run} does not validate ({n} problem{'s' if n != 1 else ''}; first: {first}); "
            f"`maskmill validate {run}` lists them, and rerunning the same config redoes damaged shards")


class _RunState:
    """What must agree across shards: keys seen, and the first sample's fields and json keys."""

    def __init__(self) -> None:
        self.key_owner: dict[str, str] = {}
        self.fields: tuple[str, frozenset[str]] | None = None  # (where first seen, fields)
        self.meta_keys: tuple[str, frozenset[str]] | None = None


def validate_run(root: str | os.PathLike) -> ValidationReport:
    """Validate every shard of the run at `root`; never raises for problems in the data."""
    layout = RunLayout(root)
    report = ValidationReport()
    if not layout.store.isdir(layout.shards_dir):
        report.error(f"{layout.location_of(layout.shards_dir)}: no shards directory")
        return report

    classes = layout.location_of(layout.classes_path)
    try:
        report.num_classes = len(layout.read_classes())
    except FileNotFoundError:
        report.error(f"{classes}: missing")
    except (ValueError, json.JSONDecodeError) as e:
        report.error(f"{classes}: unreadable ({e})")

    for tmp in layout.temporaries():
        report.error(f"{tmp.name}: leftover temporary file (interrupted write; rerunning the run removes it)")
    for stray in layout.strays():
        report.error(f"{layout.shards_dir.name}/{stray.name}: not a shard tar; shards/ must hold only tars, or "
                     f"readers such as HF datasets take it for samples (manifests go to manifests/, stats to stats/)")

    state = _RunState()
    for shard_id in layout.shard_ids_on_disk():
        paths = layout.shard(shard_id)
        if not layout.store.isfile(paths.tar):
            for p in (paths.manifest, paths.stats):
                if layout.store.isfile(p):
                    report.error(f"{p.name}: present but {paths.tar.name} is missing")
            continue
        report.shards += 1
        _check_shard(layout, paths, report, state)
    if report.shards == 0:
        report.error(f"{layout.location_of(layout.shards_dir)}: no shards")
    return report


def _check_shard(layout: RunLayout, paths, report: ValidationReport, state: _RunState) -> None:
    name = paths.tar.name
    store = layout.store
    stats = None
    if not store.isfile(paths.stats):
        report.error(f"{name}: no {paths.stats.name} (incomplete shard)")
    else:
        try:
            stats = ShardStats.from_json(store.read_text(paths.stats))
            report.complete_shards += 1
        except (ValueError, TypeError) as e:
            report.error(f"{paths.stats.name}: unreadable ({e})")
    image_format = stats.image_format if stats else None

    tar_keys = _check_tar_samples(layout.location_of(paths.tar), name, image_format, report, state)

    if stats is not None:
        size = store.size(paths.tar)
        if size != stats.tar_bytes:
            report.error(f"{name}: {size} bytes but stats say {stats.tar_bytes} (truncated or rewritten; "
                         f"a rerun redoes it)")
        elif stats.tar_sha256 and store.sha256(paths.tar) != stats.tar_sha256:
            report.error(f"{name}: sha256 differs from its stats (rewritten in place; a rerun redoes it)")
        if tar_keys is not None and len(tar_keys) != stats.accepted:
            report.error(f"{name}: {len(tar_keys)} samples but stats say {stats.accepted} accepted")
    _check_manifest(store, paths, tar_keys, stats, report)


def _check_tar_samples(tar, name: str, image_format: str | None, report: ValidationReport,
                       state: _RunState) -> list[str] | None:
    """Read the tar (a path or URL) to its end; check every sample. Returns its keys, or None if unreadable."""
    expected = frozenset(sample_fields(image_format)) if image_format else None
    keys: list[str] = []
    try:
        for sample in raw_samples(tar):
            key = sample["__key__"]
            keys.append(key)
            report.samples += 1
            _check_sample(name, key, sample, expected, report, state)
    except Exception as e:  # truncated/corrupt tar: tarfile.ReadError, duplicate member, ...
        report.error(f"{name}: unreadable after {len(keys)} samples ({type(e).__name__}: {e.args[0] if e.args else e})")
        return None
    return keys


def _check_sample(shard: str, key: str, sample: dict, expected: frozenset[str] | None,
                  report: ValidationReport, state: _RunState) -> None:
    where = f"{shard}:{key}"
    try:
        check_key(key)
    except ValueError as e:
        report.error(f"{where}: {e}")
    if key in state.key_owner:
        report.error(f"{where}: duplicate key (also in {state.key_owner[key]})")
    else:
        state.key_owner[key] = shard

    fields = frozenset(k for k in sample if not k.startswith("__"))
    if state.fields is None:
        state.fields = (where, fields)
    if fields != state.fields[1]:
        report.error(f"{where}: fields {sorted(fields)} differ from {sorted(state.fields[1])} of {state.fields[0]}")
        return
    if expected is not None and fields != expected:
        report.error(f"{where}: fields {sorted(fields)}, expected {sorted(expected)}")
        return
    image_fields = [f for f in fields if f in ("png", "jpg")]
    if "mask.png" not in fields or META_FIELD not in fields or len(image_fields) != 1:
        report.error(f"{where}: needs one image (png|jpg), mask.png and json; has {sorted(fields)}")
        return

    try:
        meta = json.loads(sample[META_FIELD])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        report.error(f"{where}: bad json ({e})")
        meta = None
    if meta is not None:
        meta_keys = frozenset(meta)
        if state.meta_keys is None:
            state.meta_keys = (where, meta_keys)
        elif meta_keys != state.meta_keys[1]:
            diff = sorted(meta_keys ^ state.meta_keys[1])
            report.error(f"{where}: json keys differ from {state.meta_keys[0]}'s (in {diff})")

    try:
        mask = decode_mask(sample["mask.png"])
    except Exception as e:  # not a PNG, or not mode L
        report.error(f"{where}: bad mask ({e})")
        return
    try:
        image = decode_image(sample[image_fields[0]])
    except Exception as e:
        report.error(f"{where}: bad image ({e})")
        return
    if image.shape[:2] != mask.shape:
        report.error(f"{where}: mask size {mask.shape} differs from image size {image.shape[:2]}")
    labels = np.unique(mask)
    k = report.num_classes if report.num_classes is not None else IGNORE - 1
    bad = labels[(labels > k) & (labels != IGNORE)]
    if bad.size:
        report.error(f"{where}: mask labels {bad.tolist()} outside 0..{k} and {IGNORE}")


def _check_manifest(store, paths, tar_keys: list[str] | None, stats: ShardStats | None,
                    report: ValidationReport) -> None:
    name = paths.manifest.name
    if not store.isfile(paths.manifest):
        report.error(f"{paths.tar.name}: manifest {name} missing")
        return
    try:
        data = store.read_bytes(paths.manifest)  # small: one row per record
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        report.error(f"{name}: unreadable ({e})")
        return
    if stats is not None and stats.manifest_sha256:
        if (len(data), hashlib.sha256(data).hexdigest()) != (stats.manifest_bytes, stats.manifest_sha256):
            report.error(f"{name}: size or sha256 differs from its stats (a rerun redoes the shard)")
    schema = table.schema.remove_metadata()
    if not (schema.equals(MANIFEST_SCHEMA) or schema.equals(LEGACY_MANIFEST_SCHEMA)):
        report.error(f"{name}: columns {table.schema.names} differ from the manifest schema {MANIFEST_SCHEMA.names}")
        return
    keys = table.column("key").to_pylist()
    status = table.column("status").to_pylist()
    report.records += len(keys)
    report.rejected += sum(s == REJECTED for s in status)
    if len(set(keys)) != len(keys):
        report.error(f"{name}: duplicate keys in manifest")
    unknown = sorted(set(status) - {ACCEPTED, REJECTED})
    if unknown:
        report.error(f"{name}: unknown status values {unknown}")
    accepted = [k for k, s in zip(keys, status) if s == ACCEPTED]
    if tar_keys is not None and accepted != tar_keys:
        missing = sorted(set(accepted) - set(tar_keys))[:5]
        extra = sorted(set(tar_keys) - set(accepted))[:5]
        report.error(f"{name}: accepted keys disagree with {paths.tar.name} "
                     f"(in manifest only: {missing}, in tar only: {extra}, same set: {set(accepted) == set(tar_keys)})")
    if stats is not None and (len(keys), len(accepted)) != (stats.records, stats.accepted):
        report.error(f"{name}: {len(keys)} records / {len(accepted)} accepted, "
                     f"stats say {stats.records} / {stats.accepted}")
