"""Serve `generate_dataset` or `build_prototypes` as a deployment on a cron schedule (backs `maskmill serve`).

    from flows.scheduled import serve, serve_prototypes
    serve("configs/shapes.yaml", cron="0 3 * * *", name="maskmill-nightly")
    serve_prototypes(load_bank_build_config("configs/prototypes/shapes.yaml"), cron="0 4 * * *", name="banks")

The process polls the Prefect API (PREFECT_API_URL, else a local ephemeral server) and runs
each scheduled or triggered flow run in a subprocess. Stopping it (Ctrl-C) leaves the schedule
active (`pause_on_shutdown=False`), so a restarted server picks up again. Each run is a rerun
of the same config into the same folder: complete shards are kept, so a nightly schedule
finishes an interrupted run and does nothing once the run is complete. A scheduled bank build
likewise reuses every class bank whose settings are unchanged (the per-class cache).
`check_cron` refuses a bad schedule with Prefect's own cron check, before anything is served.

For work pools and several GPU hosts, use `prefect.yaml` (`prefect deploy`) instead.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from flows.generate_dataset import generate_dataset  # noqa: E402

DEFAULT_CRON = "0 3 * * *"


def check_cron(cron: str) -> str:
    """`cron` if Prefect's CronSchedule accepts it, else ValueError naming it (one line)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ValueError(f"--cron {cron!r} is not a cron schedule: give five fields, minute hour day month "
                         f"weekday (e.g. \"0 3 * * *\" for 03:00 every day)") from None
    return cron


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


def build_prototypes_deployment(config, cron: str = DEFAULT_CRON, name: str = "maskmill-banks"):
    """A RunnerDeployment of build_prototypes on a cron schedule; `config` is a BankBuildConfig.

    Its folders (cache root, merged bank, a support run) are made absolute, as the config path
    of the generation deployment: served runs execute in subprocesses elsewhere.
    """
    from flows.build_prototypes import build_prototypes

    absolute = {k: str(Path(v).resolve()) for k in ("cache_root", "out") if (v := getattr(config, k))}
    if config.support != "generate":
        absolute["support"] = str(Path(config.support).resolve())
    frozen = config.model_copy(update=absolute)
    return build_prototypes.to_deployment(
        name=name, cron=cron, tags=["maskmill"], parameters={"config": frozen.model_dump(mode="json")},
        description=f"maskmill build_prototypes for {', '.join(config.classes)}, cron {cron!r}")


def serve_prototypes(config, cron: str = DEFAULT_CRON, name: str = "maskmill-banks", limit: int | None = 1) -> None:
    """Serve the bank build deployment until interrupted (the schedule stays active on shutdown)."""
    from prefect import serve as prefect_serve

    prefect_serve(build_prototypes_deployment(config, cron, name), pause_on_shutdown=False, limit=limit)


SERVE_JOBS = ("generate", "prototypes")


def check_serve(job: str, config_path: str, cron: str, overrides: list[str] | None = None):
    """The job's validated config (RunConfig or BankBuildConfig) once the cron passes `check_cron`;
    ConfigError / ValueError (one line) otherwise, before anything is served."""
    if job not in SERVE_JOBS:
        raise ValueError(f"unknown job {job!r}; choose one of {', '.join(SERVE_JOBS)}")
    check_cron(cron)
    if job == "generate":
        from maskmill.config import load_config
        from maskmill.run.folder import check_run_folder

        cfg = load_config(config_path, list(overrides or []))
        check_run_folder(cfg)  # a folder holding another config's run
        return cfg
    from maskmill.prototypes.build_config import load_bank_build_config

    cfg = load_bank_build_config(config_path, list(overrides or []))
    cfg.check_sources()
    return cfg


def serve_job(job: str, config_path: str, cron: str = DEFAULT_CRON, name: str | None = None,
              overrides: list[str] | None = None) -> None:
    """Check, then serve `job` ("generate" or "prototypes") on `cron` until interrupted."""
    cfg = check_serve(job, config_path, cron, overrides)
    if job == "generate":
        serve(config_path=config_path, cron=cron, name=name or "maskmill-nightly", overrides=list(overrides or []))
    else:
        serve_prototypes(cfg, cron=cron, name=name or "maskmill-banks")
