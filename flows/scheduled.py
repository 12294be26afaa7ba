"""Serve `generate_dataset` as a deployment on a cron schedule (backs `maskmill serve`).

    from flows.scheduled import serve
    serve("configs/shapes.yaml", cron="0 3 * * *", name="maskmill-nightly")

The process polls the Prefect API (PREFECT_API_URL, else a local ephemeral server) and runs
each scheduled or triggered flow run in a subprocess. Stopping it (Ctrl-C) leaves the schedule
active (`pause_on_shutdown=False`), so a restarted server picks up again. Each run is a rerun
of the same config into the same folder: complete shards are kept, so a nightly schedule
finishes an interrupted run and does nothing once the run is complete.

For work pools and several GPU hosts, use `prefect.yaml` (`prefect deploy`) instead.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from flows.generate_dataset import generate_dataset  # noqa: E402

DEFAULT_CRON = "0 3 * * *"


def build_deployment(config_path: str, cron: str = DEFAULT_CRON, name: str = "maskmill-nightly",
                     overrides: list[str] | None = None):
    """A RunnerDeployment of generate_dataset with a cron schedule and the config as parameter.

    The config path is made absolute: served runs execute in subprocesses whose working
    directory need not be this one.
    """
    return generate_dataset.to_deployment(
        name=name, cron=cron, tags=["maskmill"],
        parameters={"config_path": str(Path(config_path).resolve()), "overrides": list(overrides or [])},
        description=f"maskmill generate_dataset on {config_path}, cron {cron!r}")


def serve(config_path: str, cron: str = DEFAULT_CRON, name: str = "maskmill-nightly",
          overrides: list[str] | None = None, limit: int | None = 1) -> None:
    """Serve the deployment until interrupted; at most `limit` flow runs at once (1: one pipeline)."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(config_path, cron, name, overrides), pause_on_shutdown=False, limit=limit)
