"""The `produce-shards` flow: one slice of a run's shards, the unit a fan-out hands to a worker.

    produce_shards("/data/run/config.yaml", [4, 5, 6, 7])

Deployed on a work pool (`prefect.yaml`: `produce-shards/maskmill`), it is what the
`generate_dataset` flow starts once per slice with `run_deployment` when given `fan_out=`;
every `prefect worker start --pool …` process then takes slices. It writes each shard without
the run folder's lock files: Prefect's run states assign a slice to one flow run at a time, and a
slice whose run crashed (a killed worker, a dead host: see `deploy/crash-zombies.yaml`) is started
again by the parent, which cleans the shard's partial files first. The config path is the run's
frozen copy, so every slice reads the same resolved config.
"""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prefect import flow, unmapped  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from tasks import produce_shard_task  # noqa: E402


@flow(name="produce-shards", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def produce_shards(config_path: str, shard_ids: list[int]) -> list[dict]:
    """Write shards `shard_ids` of the run whose frozen config is `config_path`; their outcome rows."""
    futures = produce_shard_task.map(config_path, unmapped([]), shard_ids, claim=unmapped(False))
    return [f.result() for f in futures]
