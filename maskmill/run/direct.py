"""The direct (Prefect-free) runner, on one process or on each rank of a multi-process launch.

    summary = run_direct(cfg, "configs/shapes.yaml")   # the whole run, no Prefect

`run_direct` is the same work as the `generate_dataset` flow without Prefect: the reference for
the orchestration-overhead benchmark, the subject of the kill test, and what accelerate ranks run
when no Prefect server is configured. Several workers (processes, hosts on a shared filesystem,
accelerate ranks, Prefect workers) may work on one run: the shard locks keep a shard from being
written twice. A run at a URL (s3://...) has no lock files: run one direct runner per URL run (or
accelerate ranks, which split the shards between them), and use the Prefect fan-out to share it
between machines.

Same config -> same samples, byte for byte, given the same hardware, torch build and torch
thread count, and the same `batch_size` (batched convolutions round differently: another batch
size moves the odd pixel by 1/255, although batch_size is left out of the fingerprint because
the samples are otherwise the same). Shard ids and seeds come from the plan, never from the
worker, process or GPU count.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from ..config import RunConfig
from ..extractors import get_extractor
from ..models import load_pipeline
from ..plan import RunPlan
from ..shards.layout import RunLayout
from .claim import produce_claimed
from .folder import pending_shards, prepare_run, run_root
from .pipelines import worker_device
from .progress import RunProgress
from .summary import finalize_run, summarize_run


def run_direct(cfg: RunConfig, config_path: str | os.PathLike | None = None, shard_ids: Iterable[int] | None = None,
               device: str | None = None, progress: bool = True, finalize: bool = True,
               on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """The whole run without Prefect: prepare, produce every pending shard this worker can claim,
    then (with `finalize`, once every shard is complete) validate, write the contact sheet and the dataset card.
    Progress: one display for the run (`RunProgress`: a bar on a terminal, lines otherwise).

    The pipeline is loaded once, and only if there is work. `on_ready` is called after loading
    (tests use it to time kills). Returns `summarize_run`'s dict plus written/busy shard ids,
    `valid`, `contact_sheet`, `card` and `seconds`.
    """
    t0 = time.perf_counter()
    layout = prepare_run(cfg, config_path)
    pending = pending_shards(cfg, layout, shard_ids)
    written, busy = [], []
    if pending:
        pipe = load_pipeline(cfg.model, cfg.scheduler, device or worker_device())
        extractor = get_extractor(cfg.extractor.name, **cfg.extractor.params)
        if on_ready is not None:
            on_ready()
        plan = RunPlan(cfg)
        progress_display = RunProgress(total=sum(plan.quota(s) for s in pending), name=layout.root.name,
                                       enabled=progress)
        with progress_display:
            for sid in pending:
                outcome = produce_claimed(cfg, layout, sid, pipe, extractor, progress=progress_display.update)
                (written if outcome["status"] == "written" else busy if outcome["status"] == "busy" else []).append(sid)
                progress_display.note(f"shard {sid} {outcome['status']}")
    elif on_ready is not None:
        on_ready()
    summary = summarize_run(layout.location)
    summary.update(written=written, busy=busy, valid=None, contact_sheet=None, card=None,
                   loaded_pipeline=bool(pending))
    if finalize and summary["complete"]:
        summary.update(finalize_run(layout.location))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def world_size() -> int:
    """Processes of this launch (WORLD_SIZE, set by `accelerate launch` and torchrun); 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def run_distributed(cfg: RunConfig, config_path: str | os.PathLike,
                    run_shards: Callable[[list[int], str], Any] | None = None) -> dict[str, Any] | None:
    """One rank of a multi-process launch: the pending shards are split between the processes.

    The main process prepares the folder; every rank takes its contiguous slice of the pending
    shard ids (`PartialState().split_between_processes`) and writes them on its own device with
    `run_shards(shard_ids, device)` (default: `run_direct` without finalizing; the orchestration
    module passes the Prefect flow when a server is configured). Shard ids and seeds come from the
    plan, never from the rank, so the output is the same for any process count; the shard locks
    keep a shard from being written twice anyway. The main process then validates, draws the
    contact sheet and returns the summary; other ranks return None.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo between CPU processes
    if state.is_main_process:
        prepare_run(cfg, config_path)
    state.wait_for_everyone()
    layout = RunLayout(run_root(cfg))
    pending = pending_shards(cfg, layout)
    with state.split_between_processes(pending) as mine:
        mine = [int(s) for s in mine]
    if mine:
        if run_shards is not None:
            run_shards(mine, str(state.device))
        else:
            run_direct(cfg, config_path, shard_ids=mine, device=str(state.device), finalize=False,
                       progress=state.is_local_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = summarize_run(layout.location)
    summary.update(processes=state.num_processes, valid=None, contact_sheet=None, card=None)
    if summary["complete"]:
        summary.update(finalize_run(layout.location))
    return summary
