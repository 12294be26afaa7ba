"""The generation task: one shard per task run, mapped over shard ids.

The pipeline is loaded once per worker process (`maskmill.run.pipelines.cached_pipeline`, keyed by
model, scheduler and device) and used by one task at a time.

Concurrency limits, both opt-in on the worker's environment:
- MASKMILL_GPU_LIMIT=<name of a global concurrency limit> (e.g. "gpu" after
  `prefect gcl create gpu --limit 1`): each batch's *generation* runs inside
  `concurrency(name, occupy=1)`; extraction and shard writing stay outside it. The recommended
  way to share a GPU.
- MASKMILL_TASK_TAGS=gpu (comma-separated): the flow tags its produce task runs, so a tag-based
  task concurrency limit (`prefect concurrency-limit create gpu 1`) caps whole shard tasks.
  Not on by default: with any tag, Prefect 3.8 acquires a slot lease for every task run, which
  cost about 2 s per shard here (ephemeral SQLite server on a busy machine) - 7 % of a
  128-sample run.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from maskmill.config import load_config
from maskmill.run.claim import produce_claimed
from maskmill.run.folder import prepare_run
from maskmill.run.pipelines import cached_pipeline

GPU_TAG = "gpu"
GPU_LIMIT_ENV = "MASKMILL_GPU_LIMIT"
TASK_TAGS_ENV = "MASKMILL_TASK_TAGS"


def task_tags() -> list[str]:
    """Tags for the produce task runs, from MASKMILL_TASK_TAGS (e.g. "gpu"); none by default."""
    return [t.strip() for t in os.environ.get(TASK_TAGS_ENV, "").split(",") if t.strip()]


def generation_gate():
    """A factory of context managers around one generation call, or None when no limit is named."""
    name = os.environ.get(GPU_LIMIT_ENV, "").strip()
    if not name:
        return None
    from prefect.concurrency.sync import concurrency

    return lambda: concurrency(name, occupy=1, strict=False)


def run_progress(cfg, layout, shard_id: int, progress_to: dict[str, Any] | None):
    """The progress callback of one shard task: the run's overall display (a bar on a terminal, lines
    otherwise) and, given `progress_to` = {"artifact_id", "shard_ids"} from the flow, the flow's progress
    artifact updated after every batch, as the percentage of the considered shards' planned samples."""
    from maskmill.plan import RunPlan
    from maskmill.run.progress import RunProgress

    plan = RunPlan(cfg)
    considered = (progress_to or {}).get("shard_ids") or [shard_id]
    total = sum(plan.quota(s) for s in considered)
    before = sum(plan.quota(s) for s in considered if s != shard_id and layout.is_complete(s))
    display = RunProgress(total=total, name=layout.root.name, initial=before)
    artifact_id = (progress_to or {}).get("artifact_id")
    done_here = 0

    def update(n: int = 1) -> None:
        nonlocal done_here
        done_here += n
        display.update(n)
        quota = plan.quota(shard_id)
        if artifact_id and (done_here % cfg.batch_size == 0 or done_here >= quota):  # once per batch
            from prefect.artifacts import update_progress_artifact

            pct = 100.0 * min(before + done_here, total) / total if total else 100.0
            with contextlib.suppress(Exception):  # a progress report never fails the shard
                update_progress_artifact(artifact_id, progress=round(pct, 2))

    return display, update


@task(name="produce-shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="shard-{shard_id}")
def produce_shard_task(config_path: str, overrides: list[str] | None, shard_id: int, claim: bool = True,
                       progress_to: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate, extract, filter and write shard `shard_id` of the run described by the config.

    Claims the shard's lock first: returns {"status": "busy"} if another live worker holds it,
    {"status": "complete"} if it is already done, else writes it and returns its stats row
    ({"status": "written", "accepted", "rejected", ...}). A failed attempt leaves no files of the
    shard; a retry (or a later rerun) redoes it from scratch, with the same samples.
    `claim=False` skips the lock file (fan-out slices: Prefect assigns each shard, see flows/fanout.py).
    `progress_to` ({"artifact_id", "shard_ids"}): the flow's progress artifact, updated per batch.
    """
    cfg = load_config(config_path, overrides or [])
    layout = prepare_run(cfg, config_path, clean=False)
    worker = cached_pipeline(cfg.model, cfg.scheduler)
    display, update = run_progress(cfg, layout, shard_id, progress_to)
    with worker.lock, display:
        outcome = produce_claimed(cfg, layout, shard_id, worker.pipe, progress=update,
                                  generation_gate=generation_gate(), claim=claim)
    with contextlib.suppress(Exception):  # no run context when called as a plain function (.fn)
        get_run_logger().info("shard %s: %s", shard_id, outcome)
    return outcome
