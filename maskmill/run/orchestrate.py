"""The one place the library reaches up to the Prefect layer: choose the flow or the direct runner,
serve a job on a schedule, build prototype banks through their flow.

    summary = generate(cfg, "configs/shapes.yaml", overrides)               # the Prefect flow
    summary = generate(cfg, "configs/shapes.yaml", overrides, direct=True)  # run_direct, no Prefect

Under a multi-process launch (`accelerate launch`, torchrun: WORLD_SIZE > 1) the pending shards
are split between the ranks (`run_distributed`); each rank runs the flow on its slice when a
Prefect server is configured (PREFECT_API_URL), else `run_direct` (several ephemeral Prefect
servers would contend for one SQLite file). Every other module under `maskmill/` stays free of
`flows`, `tasks` and `prefect` (tests/test_import_layers.py checks it).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from ..config import RunConfig
from .direct import run_direct, run_distributed, world_size


def _flow_on_shards(config_path: str, overrides: list[str]) -> Callable[[list[int], str], Any]:
    def run(shard_ids: list[int], device: str) -> Any:
        from flows.generate_dataset import generate_dataset

        os.environ["MASKMILL_DEVICE"] = device  # the flow's tasks load their pipeline on this rank's device
        return generate_dataset(config_path, overrides, shard_ids=shard_ids)

    return run


def generate(cfg: RunConfig, config_path: str | os.PathLike, overrides: Iterable[str] = (), direct: bool = False,
             shard_ids: Iterable[int] | None = None, progress: bool = True, finalize: bool = True,
             on_ready: Callable[[], None] | None = None, fan_out: str | None = None,
             slice_shards: int = 2) -> dict[str, Any] | None:
    """Run the config's dataset job; returns the run summary (None on a non-main rank).

    `direct` runs without Prefect. `progress`, `finalize` and `on_ready` apply to the direct
    runner only (see `run_direct`); `shard_ids` restricts the run to some shards. `fan_out` names a
    produce-shards deployment whose work pool's workers write the shards (see flows/fanout.py).
    """
    overrides = list(overrides)
    if world_size() > 1:
        if shard_ids is not None:
            raise ValueError("shard ids cannot be chosen under a multi-process launch: the ranks split the "
                             "pending shards between them")
        use_flow = not direct and bool(os.environ.get("PREFECT_API_URL"))
        return run_distributed(cfg, config_path, _flow_on_shards(str(config_path), overrides) if use_flow else None)
    if direct:
        return run_direct(cfg, config_path, shard_ids=shard_ids, progress=progress, finalize=finalize,
                          on_ready=on_ready)
    from flows.generate_dataset import generate_dataset

    ids = None if shard_ids is None else [int(s) for s in shard_ids]
    return generate_dataset(config_path=str(config_path), overrides=overrides, shard_ids=ids, fan_out=fan_out,
                            slice_shards=slice_shards)


def check_serve(job: str, config_path: str, cron: str, overrides: Iterable[str] = ()):
    """The validated config of a job to serve, after Prefect's own cron check (flows/scheduled.py):
    ConfigError / ValueError, one line, before anything is served."""
    from flows.scheduled import check_serve as check

    return check(job, config_path, cron, list(overrides))


def serve(config_path: str, cron: str, name: str | None = None, overrides: Iterable[str] = (),
          job: str = "generate") -> None:
    """Serve the `job` deployment ("generate": dataset generation, "prototypes": prototype banks) on a
    cron schedule (blocks); a bad cron or config is refused first."""
    from flows.scheduled import serve_job

    serve_job(job, config_path, cron, name, list(overrides))


def build_prototypes(config) -> dict[str, Any]:
    """Run the build_prototypes flow on a BankBuildConfig (sources checked first); returns its summary."""
    config.check_sources()
    from flows.build_prototypes import build_prototypes as build_flow

    return build_flow(config)
