"""Benchmark the fan-out: one run on 1 and on 2 Prefect process workers, on a real server.

    python benchmarks/bench_scaleout.py                        # 16 shards x 32 samples, slices of 8 shards
    python benchmarks/bench_scaleout.py --samples 128 --shard-size 8 --model tiny   # a quick look

The recipe is the README's (and tests/test_scaleout.py's): PostgreSQL and a Prefect server on
127.0.0.1, a process work pool, `prefect deploy --all`, N `prefect worker start --limit 1`
processes with one torch thread each, then `maskmill generate --fan-out produce-shards/maskmill`.
The same config runs into a fresh folder once with 1 worker and once with 2. Printed:

- wall time of each run and the speed-up (target >= 1.7 on this 2-core machine);
- orchestration cost: worker-seconds not spent inside a shard's own work (process start-up,
  pipeline loading, Prefect state calls, idle tails), as a share of N x wall (target <= 5 %), and
  the database transactions the server committed per shard (every API write is one or more).

On a machine shared with other jobs, both walls stretch and the speed-up drops: the figure is
only meaningful on an idle machine (the output says what the load average was).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from servers import pg_bin, postgres, prefect_env, prefect_server, stop_process  # noqa: E402

POOL = "maskmill-gpu"
DEPLOYMENT = "produce-shards/maskmill"


def prefect(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)


def transactions(db_url: str) -> int:
    """Transactions committed in the `prefect` database so far (pg_stat_database)."""
    port = db_url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run([str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", port, "-U", "prefect", "-d", "prefect",
                          "-Atc", "SELECT xact_commit FROM pg_stat_database WHERE datname = 'prefect'"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def shard_seconds(run: Path) -> float:
    """Sum of the shards' own work (`seconds` in their stats files, wherever the layout keeps them)."""
    return sum(json.loads(p.read_text())["seconds"] for p in run.rglob("*_stats.json"))


def one_run(env: dict, db_url: str, workers: int, model_args: list[str], out: Path, args) -> dict:
    procs = []
    for i in range(workers):
        log = open(out.parent / f"worker-{workers}-{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                       "--limit", "1", "--name", f"w{workers}-{i}"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    time.sleep(5)  # the workers' first poll
    tx0, t0 = transactions(db_url), time.perf_counter()
    per_class = args.samples // 4
    cmd = [sys.executable, "-m", "maskmill.cli", "generate", "--config", "configs/shapes.yaml", "--fan-out",
           DEPLOYMENT, "--slice-shards", str(args.slice_shards), "--json", "--set", f"output={out}",
           "--set", f"images_per_class={per_class}", "--set", f"shard_size={args.shard_size}", *model_args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tx = transactions(db_url) - tx0
    for p in procs:
        stop_process(p)
    if res.returncode != 0:
        raise SystemExit(f"generate failed with {workers} worker(s):\n{res.stderr[-3000:]}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    work = shard_seconds(out)
    return {"workers": workers, "wall_s": wall, "shard_work_s": work, "shards": summary["num_shards"],
            "accepted": summary["accepted"], "overhead": 1 - work / (workers * wall), "transactions": tx,
            "slices": len(summary["slices"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--slice-shards", type=int, default=8)
    ap.add_argument("--model", choices=["shapes-sd", "tiny"], default="shapes-sd")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="maskmill-bench-scaleout-"))
    model_args: list[str] = []
    if args.model == "tiny":
        from runs import save_tiny_pipeline

        model_args = ["--set", f"model={save_tiny_pipeline(tmp / 'tiny')}"]
    load0 = os.getloadavg()[0]
    with postgres() as db, prefect_server(db) as api:
        env = prefect_env(api, tmp / "home")
        env.update(MASKMILL_REPO=str(REPO), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PREFECT_WORKER_QUERY_SECONDS="2")
        prefect(env, "work-pool", "create", POOL, "--type", "process")
        prefect(env, "automation", "create", "--from-file", "deploy/crash-zombies.yaml")
        prefect(env, "deploy", "--all")
        rows = [one_run(env, db, n, model_args, tmp / f"run-{n}", args) for n in (1, 2)]
    one, two = rows
    print(f"fan-out: {args.samples} samples in shards of {args.shard_size}, slices of {args.slice_shards} shards, "
          f"model {args.model}; load average at start {load0:.1f} (2 cores)")
    for r in rows:
        print(f"  {r['workers']} worker(s): wall {r['wall_s']:.1f} s, shard work {r['shard_work_s']:.1f} s, "
              f"{r['slices']} slice runs, orchestration {100 * r['overhead']:.1f} % of worker time, "
              f"{r['transactions'] / r['shards']:.0f} DB transactions per shard")
    speedup = one["wall_s"] / two["wall_s"]
    print(f"  speed-up 2 vs 1 worker: x{speedup:.2f} (target >= 1.7); orchestration with 2 workers "
          f"{100 * two['overhead']:.1f} % (target <= 5 %)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "speedup": speedup, "load_average": load0}, indent=1))


if __name__ == "__main__":
    main()
