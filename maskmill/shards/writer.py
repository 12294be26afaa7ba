"""Write one shard: accepted samples to a tar, every record to a parquet manifest, stats last.

    stats = write_shard(run_dir, shard_id, records, image_format="png", mtime=0.0)
    # -> run_dir/shards/00007.tar, run_dir/manifests/00007.parquet, run_dir/stats/00007_stats.json

Each tar sample has exactly these members (HF `datasets` infers features from the first
samples and fails on mixed fields):

    {key}.png | {key}.jpg    the image
    {key}.json               metadata (meta + "index"), sorted keys
    {key}.mask.png           single-channel (L) lossless PNG: 0 background, k class k, 255 ignore

Crash safety (img2dataset's rules): the tar and the manifest are written under `.tmp` names
and renamed when complete; `{shard}_stats.json` is written last, also via a rename, and marks
the shard complete. A stale stats file is removed before a shard is rewritten. A run at a URL
(s3://, gs://, memory://) gets the same order with whole objects: the tar and the manifest are
written to a local scratch folder, then uploaded one after the other (an object PUT is atomic),
and the stats object last; a kill at any point leaves no stats object, so no shard that looks
complete. The stats record each file's size and sha256, which resume and validate compare.

Records are consumed one at a time from the iterable and never held, so memory stays flat
with shard size; each is checked before anything of it is written. A bad record aborts the
shard and removes its files: a shard is written whole or not at all.

Same records + same `mtime` -> byte-identical tar (TarWriter sorts members and stamps `mtime`,
rounded to whole seconds).
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from ..storage import HASH_CHUNK, local_scratch, remove_scratch
from .encode import IMAGE_FORMATS, MASK_FIELD, META_FIELD, encode_image, encode_mask, json_text, sample_fields
from .layout import TMP_SUFFIX, RunLayout, ShardPaths
from .manifest import ManifestWriter, manifest_row
from .records import BACKGROUND, IGNORE, SampleRecord, shard_name
from .stats import Coverage, ShardStats
from .timing import StageClock


class ShardWriter:
    """Writes one shard record by record; `close()` finalises it, `abort()` removes it.

        with ShardWriter(run_dir, 7) as w:
            for record in records:
                w.write(record)
        stats = w.stats          # set by close(); an exception inside `with` aborts instead

    Files are opened at the first valid record (or at close), so a malformed first record
    leaves the directory untouched.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        shard_id: int,
        image_format: str = "png",
        mtime: float = 0.0,
        clock: StageClock | None = None,
    ) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.layout = RunLayout(run_dir)
        self.paths: ShardPaths = self.layout.shard(shard_id)
        self._scratch: Path | None = None  # remote runs: the local folder the files are written in
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
        self._coverage = Coverage()
        self._keys: set[str] = set()  # ~100 B per record: the only per-record state kept
        self._meta_keys: frozenset[str] | None = None  # of the first accepted sample
        self._tar_file = None
        self._tar: wds.TarWriter | None = None
        self._manifest: ManifestWriter | None = None
        self._started = 0.0
        # encoding and writing time go here; with a clock, `seconds` counts from its start (the shard's)
        self.clock = clock or StageClock()
        self._timed_whole_shard = clock is not None
        self._closed = False

    # --- public interface --------------------------------------------------------------
    def write(self, record: SampleRecord) -> None:
        """Check, encode and write one record (accepted: tar + manifest; rejected: manifest only)."""
        if self._closed:
            raise RuntimeError(f"shard {self._stats.shard} is already closed")
        with self.clock.timed("encoding"):
            sample, row, fractions, prompted = self._prepare(record)
        with self.clock.timed("writing"):
            self._write(record, sample, row, fractions, prompted)

    def _write(self, record: SampleRecord, sample, row, fractions, prompted) -> None:
        self._open()  # only after the record passed every check
        if sample is not None:
            self._tar.write(sample)
            # tarfile keeps a TarInfo per member for the archive's lifetime (~1 KB per sample);
            # a write-only stream never reads them back, so drop them to keep memory flat.
            self._tar.tarstream.members.clear()
            self._coverage.add(fractions, prompted)
        self._manifest.add(row)
        self._count(record)

    def close(self) -> ShardStats:
        """Finish the tar and manifest, rename them into place, then write the stats (last)."""
        if self._closed:
            raise RuntimeError(f"shard {self._stats.shard} is already closed")
        with self.clock.timed("writing"):
            self._open()  # an empty shard still gets its three files
            self._tar.close()
            _fsync_close(self._tar_file)
            self._manifest.close()
            self._hash_files()  # sizes and hashes of the local files, before they move
            store = self.layout.store
            store.upload(self._local(self.paths.tar), self.paths.tar)
            store.upload(self._local(self.paths.manifest), self.paths.manifest)
        stats = self._finish_stats()
        self._write_stats(stats)  # last: the completion marker
        remove_scratch(self._scratch)
        self._closed = True
        self.stats = stats
        return stats

    def abort(self) -> None:
        """Drop the shard: close handles, remove its temporaries and any final file of it."""
        self._closed = True
        for close in (getattr(self._tar, "close", None), getattr(self._tar_file, "close", None),
                      getattr(self._manifest, "abort", None)):
            if close is not None:
                try:
                    close()
                except Exception:  # already broken; removing the files is what matters
                    pass
        if self._tar_file is None:
            return  # nothing was ever opened, so nothing of ours is on disk
        remove_scratch(self._scratch)
        if not self.layout.remote:
            for path in self.paths.temporaries():
                Path(path).unlink(missing_ok=True)
        for path in (self.paths.stats, *self.paths.finals()):  # the completion marker first
            self.layout.store.remove(path)

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
        row = manifest_row(record, meta_text, where)
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
        for path in self.paths.finals():
            self.layout.store.makedirs(path.parent)
        # Rewriting a shard: drop its completion marker first, so a crash from here on
        # leaves it incomplete (and redone on resume) rather than "complete" with new data.
        self.layout.store.remove(self.paths.stats)
        if self.layout.remote:
            self._scratch = local_scratch(f"maskmill-{self._stats.shard}-")
        self._started = time.perf_counter()
        self._tar_file = open(self._local(self.paths.tar), "wb")
        # encoder=False: members are already bytes, encoded by us (mask forced to mode L).
        self._tar = wds.TarWriter(self._tar_file, encoder=False, mtime=self.mtime)
        self._manifest = ManifestWriter(self._local(self.paths.manifest))

    def _local(self, final) -> Path:
        """Where the file bound for `final` is written: its `.tmp` beside it, or in the local scratch folder."""
        if self._scratch is not None:
            return self._scratch / final.name
        return Path(str(final) + TMP_SUFFIX)

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

    def _write_stats(self, stats: ShardStats) -> None:
        self.layout.store.write_bytes(self.paths.stats, stats.to_json().encode(), tmp=self.paths.stats_tmp)

    def _hash_files(self) -> None:
        s = self._stats
        s.tar_bytes, s.tar_sha256 = _size_and_sha256(self._local(self.paths.tar))
        s.manifest_bytes, s.manifest_sha256 = _size_and_sha256(self._local(self.paths.manifest))

    def _finish_stats(self) -> ShardStats:
        s = self._stats
        s.reasons = dict(sorted(self._reasons.items()))
        wall = self.clock.elapsed() if self._timed_whole_shard else time.perf_counter() - self._started
        s.seconds = round(wall, 6)
        s.time_split = self.clock.split(wall)
        self._coverage.fill(s)
        return s


def write_shard(
    run_dir: str | os.PathLike,
    shard_id: int,
    records: Iterable[SampleRecord],
    image_format: str = "png",
    mtime: float = 0.0,
    clock: StageClock | None = None,
) -> ShardStats:
    """Write shard `shard_id` from `records` (consumed lazily) and return its stats.

    Produces `shards/{shard}.tar` (accepted samples), `manifests/{shard}.parquet` (every record)
    and, last, `stats/{shard}_stats.json` in the run folder `run_dir`. Raises ValueError on a
    malformed record; the shard then has no files. `clock`: the shard's StageClock (its start
    is the shard's start; encoding and writing are added to it); without one, `seconds` counts
    from the first record.
    """
    writer = ShardWriter(run_dir, shard_id, image_format=image_format, mtime=mtime, clock=clock)
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


def _size_and_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
