"""Fan a run's pending shards out to a work pool: one `produce-shards` child flow run per slice.

    slices = split_slices(pending, slice_shards=4)
    report = run_slices("produce-shards/maskmill", frozen_config, slices, on_done=progress)

Each slice is started with `run_deployment(..., timeout=0)` (linked to the calling flow run as a
subflow) and polled until its state is final. Prefect's run states are the ledger: a slice whose
run ended Failed, Crashed or Cancelled is started again (up to `max_attempts` runs in all), and
the new run cleans the slice's partial shards before writing them. A run on a worker that died
(SIGKILL, a lost host) stops sending heartbeats; the automation in `deploy/crash-zombies.yaml`
marks it Crashed, and it is started again like any failed slice.

Why child flow runs of a deployment and not task workers: a slice needs a process that has
loaded the pipeline (seconds to minutes on a GPU host) and a GPU of its own; process workers
give each flow run that process and the GPU its host was started with, and work pools, queues
and concurrency limits already describe GPU hosts. Task workers would share one process per
host across runs and offer none of these knobs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable
from uuid import UUID

WORKER_LABEL = "prefect.worker.name"


@dataclass
class SliceRun:
    """One attempt at one slice: its child flow run and how it ended."""

    index: int
    shard_ids: list[int]
    attempt: int
    flow_run_id: UUID
    state: str = "SCHEDULED"
    worker: str | None = None


@dataclass
class FanOutReport:
    runs: list[SliceRun] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # slice index -> last state message

    def completed(self) -> list[SliceRun]:
        return [r for r in self.runs if r.state == "COMPLETED"]

    def rows(self) -> list[dict[str, Any]]:
        return [{"slice": r.index, "shard_ids": r.shard_ids, "attempt": r.attempt, "state": r.state,
                 "worker": r.worker, "flow_run_id": str(r.flow_run_id)} for r in self.runs]


def split_slices(shard_ids: list[int], slice_shards: int) -> list[list[int]]:
    """Consecutive slices of at most `slice_shards` shards each (in the given order)."""
    if slice_shards < 1:
        raise ValueError(f"slice_shards must be >= 1, got {slice_shards}")
    return [list(shard_ids[i:i + slice_shards]) for i in range(0, len(shard_ids), slice_shards)]


def _start(deployment: str, config_path: str, index: int, shard_ids: list[int], attempt: int) -> SliceRun:
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"config_path": config_path, "shard_ids": shard_ids},
                         timeout=0, as_subflow=True,
                         flow_run_name=f"slice-{index:04d}-shards-{shard_ids[0]}-{shard_ids[-1]}-try-{attempt}")
    return SliceRun(index, shard_ids, attempt, run.id)


def run_slices(deployment: str, config_path: str, slices: list[list[int]], max_attempts: int = 3,
               poll_seconds: float = 2.0, on_done: Callable[[SliceRun], None] | None = None,
               log: Callable[[str], None] = print) -> FanOutReport:
    """Run every slice as a child flow run of `deployment` until each completed or ran out of attempts."""
    from prefect.client.orchestration import get_client

    report = FanOutReport()
    active = {r.flow_run_id: r for r in (_start(deployment, config_path, i, s, 1) for i, s in enumerate(slices))}
    report.runs.extend(active.values())
    with get_client(sync_client=True) as client:
        while active:
            time.sleep(poll_seconds)
            for run_id, run in list(active.items()):
                flow_run = client.read_flow_run(run_id)
                run.worker = (flow_run.labels or {}).get(WORKER_LABEL) or run.worker
                state = flow_run.state
                if state is None or not state.is_final():
                    continue
                run.state = state.type.value
                del active[run_id]
                if state.is_completed():
                    if on_done is not None:
                        on_done(run)
                    continue
                why = f"{state.type.value}: {state.message or state.name}"
                if run.attempt >= max_attempts:
                    report.failed[run.index] = why
                    log(f"slice {run.index} (shards {run.shard_ids}) gave up after {run.attempt} runs; last {why}")
                    continue
                log(f"slice {run.index} (shards {run.shard_ids}) run {run.attempt} ended {why}; starting it again")
                again = _start(deployment, config_path, run.index, run.shard_ids, run.attempt + 1)
                active[again.flow_run_id] = again
                report.runs.append(again)
    return report
