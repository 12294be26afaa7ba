"""One run, several workers: the README's multi-machine recipe, on real servers on 127.0.0.1.

A PostgreSQL cluster, a Prefect server on it, a process work pool, the zombie automation
(deploy/crash-zombies.yaml), `prefect deploy` of prefect.yaml, and two `prefect worker start`
processes; `maskmill generate --fan-out produce-shards/maskmill` sends the shards to them.
Then the same with one worker (and the flow run it is running) killed with SIGKILL mid-run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskmill.shards import RunLayout, validate_run
from servers import postgres, prefect_env, prefect_server, stop_process
from runs import REPO, save_tiny_pipeline, write_config

POOL = "maskmill-gpu"
DEPLOYMENT = "produce-shards/maskmill"


def _prefect(env: dict, *args: str, timeout: float = 180) -> str:
    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def _start_worker(env: dict, name: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        # its own session: killing the group takes the flow run it started down too, like a lost host
        return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1",
                                 "--name", name], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Server on Postgres, pool, automation, deployments and two workers; yields (env, workers, tmp)."""
    tmp = tmp_path_factory.mktemp("scaleout")
    with postgres() as db, prefect_server(db) as api:
        env = prefect_env(api, tmp / "home")
        env.update(MASKMILL_REPO=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2", PYTHONPATH=str(REPO),
                   OMP_NUM_THREADS="1", MASKMILL_TEST_THREADS="1")
        _prefect(env, "work-pool", "create", POOL, "--type", "process")
        _prefect(env, "automation", "create", "--from-file", "deploy/crash-zombies.yaml")
        _prefect(env, "deploy", "--all")
        workers = {name: _start_worker(env, name, tmp / f"{name}.log") for name in ("worker-a", "worker-b")}
        try:
            yield env, workers, tmp
        finally:
            for proc in workers.values():
                stop_process(proc)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): Prefect may start flow runs in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_host(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything it started, as when its host is lost."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def _generate(env: dict, cfg: Path, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskmill.cli", "generate", "--config", str(cfg), "--fan-out",
                             DEPLOYMENT, "--slice-shards", "2", "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        out, err = proc.communicate()
        raise AssertionError(f"generate did not finish in {timeout} s:\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _check_run(root: Path, summary: dict, samples: int) -> None:
    layout = RunLayout(root)
    report = validate_run(root)
    assert report.ok, report.summary()
    assert report.samples == samples == summary["accepted"] and summary["complete"]
    done = [s for r in summary["slices"] if r["state"] == "COMPLETED" for s in r["shard_ids"]]
    assert sorted(done) == layout.completed_shards() == list(range(summary["num_shards"]))  # each shard once


def test_two_workers_share_one_run_through_the_pool(cluster, tmp_path):
    env, workers, _ = cluster
    model = save_tiny_pipeline(tmp_path / "model")
    cfg = write_config(tmp_path / "c.yaml", model, tmp_path / "run", images_per_class=4, shard_size=2)
    summary = _finish(_generate(env, cfg, 600), 600)
    assert summary["num_shards"] == 8
    _check_run(tmp_path / "run", summary, samples=16)
    writers = {r["worker"] for r in summary["slices"] if r["state"] == "COMPLETED"}
    assert writers == set(workers), summary["slices"]


def test_a_killed_worker_s_slice_runs_again_elsewhere(cluster, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env, workers, _ = cluster
    victim = "worker-a"
    model = save_tiny_pipeline(tmp_path / "model")
    # more samples per shard, so a slice is still running when the worker dies
    cfg = write_config(tmp_path / "c.yaml", model, tmp_path / "run", images_per_class=8, shard_size=4,
                       steps=25)
    gen = _generate(env, cfg, 900)
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        deadline = time.monotonic() + 300
        running = None
        while running is None and time.monotonic() < deadline:
            assert gen.poll() is None, gen.communicate()[1][-3000:]
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
            running = next((r for r in runs if (r.labels or {}).get("prefect.worker.name") == victim
                            and r.name.startswith("slice-")), None)
            time.sleep(1)
        assert running is not None, "no slice ran on the victim worker"
        time.sleep(2)  # past the run's first heartbeat: the automation needs one to miss the next
        _kill_host(workers[victim])
    summary = _finish(gen, 900)
    _check_run(tmp_path / "run", summary, samples=32)
    crashed = [r for r in summary["slices"] if r["state"] == "CRASHED"]
    assert [r["flow_run_id"] for r in crashed] == [str(running.id)], summary["slices"]
    again = [r for r in summary["slices"] if r["slice"] == crashed[0]["slice"] and r["attempt"] == 2]
    assert again and again[0]["state"] == "COMPLETED" and again[0]["worker"] == "worker-b"
