"""Planning task: prepare the run folder and list the shards still to write."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from maskmill.config import load_config
from maskmill.run.folder import pending_shards, prepare_run


@task(name="plan-run", cache_policy=NO_CACHE)
def plan_run(config_path: str, overrides: list[str] | None = None, shard_ids: list[int] | None = None) -> list[int]:
    """Prepare `output` of the config and return the ids of its incomplete shards (ascending).

    Refuses (RunConflictError) a folder that holds a run of another config fingerprint, before
    anything is written. Writes classes.json, config.yaml and run.json; removes stale locks and
    the files of partial shards nobody is writing. With `shard_ids`, only those shards are
    considered (accelerate ranks and workers splitting a run). Depends on disk state: never cached.
    """
    cfg = load_config(config_path, overrides or [])
    layout = prepare_run(cfg, config_path)
    return pending_shards(cfg, layout, shard_ids)
