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


@task(name="produce-shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      task_run_name="shard-{shard_id}")
def produce_shard_task(config_path: str, overrides: list[str] | None, shard_id: int, claim: bool = True) -> dict[str, Any]:
    """Generate, extract, filter and write shard `shard_id` of the run described by the config.

    Claims the shard's lock first: returns {"status": "busy"} if another live worker holds it,
    {"status": "complete"} if it is already done, else writes it and returns its stats row
    ({"status": "written", "accepted", "rejected", ...}). A failed attempt leaves no files of the
    shard; a retry (or a later rerun) redoes it from scratch, with the same samples.
    `claim=False` skips the lock file (fan-out slices: Prefect assigns each shard, see flows/fanout.py).
    """
    from tqdm.auto import tqdm

    from maskmill.plan import RunPlan

    cfg = load_config(config_path, overrides or [])
    layout = prepare_run(cfg, config_path, clean=False)
    worker = cached_pipeline(cfg.model, cfg.scheduler)
    # a bar on a terminal (disable=None: off when stderr is not a TTY, e.g. under a worker)
    with worker.lock, tqdm(total=RunPlan(cfg).quota(shard_id), desc=f"shard {shard_id}", unit="sample",
                           leave=False, disable=None) as bar:
        outcome = produce_claimed(cfg, layout, shard_id, worker.pipe, progress=bar.update,
                                  generation_gate=generation_gate(), claim=claim)
    with contextlib.suppress(Exception):  # no run context when called as a plain function (.fn)
        get_run_logger().info("shard %s: %s", shard_id, outcome)
    return outcome
