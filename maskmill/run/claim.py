"""Write one shard under its lock: the unit of work of both the flow's tasks and the direct runner."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from ..config import RunConfig
from ..produce import produce_shard
from ..shards.layout import RunLayout
from ..shards.stats import ShardStats
from .locks import ShardLock
from .writers_log import log_event


def produce_claimed(cfg: RunConfig, layout: RunLayout, shard_id: int, pipe, extractor=None,
                    progress: Callable[[int], None] | None = None,
                    generation_gate: Callable[[], contextlib.AbstractContextManager] | None = None,
                    claim: bool = True) -> dict[str, Any]:
    """Write shard `shard_id` if it is incomplete and this worker can claim it.

    `claim=False` writes without the lock file: for a caller that Prefect (or another scheduler)
    has already given the shard exclusively, such as a fan-out slice started again after its
    first run crashed on a host whose locks nobody can break.

    A run at a URL has no lock files (object stores cannot create one exclusively): `claim` is
    ignored there, and the caller must be the shard's only writer (one direct runner, or the
    fan-out's assignment); its writers.jsonl events are not kept either (objects cannot be appended to).

    Returns {"shard_id", "status"} with status "written" (plus the shard's stats), "complete"
    (done before), or "busy" (another live worker holds its lock). Partial files of the shard
    (an interrupted or failed earlier attempt) are removed first, so a retry simply redoes it.
    """
    if layout.is_complete(shard_id):
        return {"shard_id": shard_id, "status": "complete"}
    claim = claim and not layout.remote
    lock = ShardLock(layout, shard_id)
    if claim and not lock.try_acquire():
        return {"shard_id": shard_id, "status": "busy", "owner": lock.owner()}
    try:
        if layout.is_complete(shard_id):  # finished by another worker since we looked
            return {"shard_id": shard_id, "status": "complete"}
        layout.clean_partial(shard_id)
        _log(layout, shard_id, "claimed")
        try:
            stats = produce_shard(cfg, shard_id, pipe, layout.location, extractor=extractor, progress=progress,
                                  generation_gate=generation_gate)
        except BaseException as e:
            _log(layout, shard_id, "failed", error=f"{type(e).__name__}: {e}")
            raise
        _log(layout, shard_id, "written", accepted=stats.accepted, rejected=stats.rejected)
        return {"status": "written", **shard_row(stats)}
    finally:
        if claim:
            lock.release()


def _log(layout: RunLayout, shard_id: int, event: str, **extra: Any) -> None:
    if not layout.remote:
        log_event(layout.root, shard_id, event, **extra)


def shard_row(stats: ShardStats) -> dict[str, Any]:
    """One shard's line for summaries and the Prefect table artifact."""
    top = max(stats.reasons.items(), key=lambda kv: kv[1])[0] if stats.reasons else ""
    return {"shard_id": stats.shard_id, "shard": stats.shard, "accepted": stats.accepted,
            "rejected": stats.rejected, "records": stats.records, "tar_bytes": stats.tar_bytes,
            "seconds": round(stats.seconds, 3), "top_reason": top}

