"""Prefect tasks of maskmill: small, typed, taking paths and ids (never pipelines).

- `plan_run(config_path, overrides, shard_ids) -> list[int]`: prepare the run folder, pending shard ids
- `produce_shard_task(config_path, overrides, shard_id) -> dict`: one shard (retried; tags and a
  generation-only GPU limit from the environment, see tasks/produce.py)
- `validate_run_task(run_dir) -> dict`, `write_preview(run_dir) -> str`, `write_card(run_dir) -> str`,
  `summarize_run(run_dir) -> dict`

Flows map `produce_shard_task` over shard ids; never one task per image.
"""
from .plan import plan_run
from .produce import GPU_TAG, produce_shard_task, task_tags
from .report import summarize_run, validate_run_task, write_card, write_preview

__all__ = ["GPU_TAG", "task_tags", "plan_run", "produce_shard_task", "summarize_run", "validate_run_task", "write_card",
           "write_preview"]
