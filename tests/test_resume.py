"""Kill a run with SIGKILL at random moments, rerun it, and check nothing is lost, doubled or torn.

A subprocess runs the direct runner's command line (`maskmill generate --direct`: the same work
the flow's tasks do) on a tiny random pipeline; the test kills it with SIGKILL after a seeded
random delay (mostly counted from the moment the pipeline is loaded, so kills land while shards
are being generated and written; some from its start, landing in folder preparation, cleanup
or pipeline loading), at least 10 times within a time budget, rerunning it each time, then lets
one rerun finish. The result must be the uninterrupted run's, byte for byte. To keep the test
short, each attempt is forked from a process that has done the slow imports once.

Nothing here waits without a deadline: every read from the fork server is bounded, and a child that
stops answering is killed with its fork server (one process group) and reported with its stderr.
The in-process runs are bounded by an alarm.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maskmill.config import load_config
from maskmill.plan import RunPlan
from maskmill.run.direct import run_direct
from maskmill.run.locks import LOCKS_DIR
from maskmill.run.writers_log import read_writers_log
from maskmill.shards import RunLayout, raw_samples, validate_run
from runs import REPO, save_tiny_pipeline, subprocess_env, write_config

from deadlines import LineReader, ReadTimeout, tail

MIN_KILLS = 10
KILL_BUDGET_S = 150  # the kill loop stops starting new attempts after this
# Deadlines far above what a healthy run needs on a busy 2-core machine (the fork server's imports
# take ~20 s, an attempt a few seconds, the whole run well under a minute): past them, it is stuck.
ANSWER_TIMEOUT_S = 300  # one line from the fork server: PID, READY or EXIT
IN_PROCESS_RUN_TIMEOUT_S = 600  # one run_direct in this process


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same bytes
    yield
    torch.set_num_threads(before)


# A fork server: imports torch, diffusers and maskmill once, then forks one child per attempt that
# runs the runner's command line. Each child is a fresh process (own pid, own locks) killed with
# SIGKILL by the test; only the import time (seconds per attempt on a busy machine) is saved.
_ZYGOTE = """
import os, sys
import diffusers, transformers, maskmill.cli, maskmill.run.direct  # the slow imports, done once
from maskmill.extractors import get_extractor
from maskmill.models import load_pipeline
load_pipeline(sys.argv[1], "ddim", "cpu")  # warms diffusers' lazy imports; the children load their own
for line in sys.stdin:
    argv = line.split()
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        try:
            code = maskmill.cli.main(argv)
        except BaseException:
            code = 1
        sys.stdout.flush()
        os._exit(code)
    print("PID", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("EXIT", pid, status, flush=True)
"""


class Zygote:
    def __init__(self, model: Path, stderr_path: Path) -> None:
        self.stderr_path = stderr_path  # the children's tracebacks, for the failure message
        with open(stderr_path, "w") as err:
            # its own process group: the fork server and every child it forks are killed together
            self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(model)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=subprocess_env(), cwd=REPO,
                                         start_new_session=True)
        self.lines = LineReader(self.proc.stdout)

    def stderr_tail(self, chars: int = 3000) -> str:
        return tail(self.stderr_path, chars)

    def start(self, argv: list[str]) -> int:
        try:
            self.proc.stdin.write(" ".join(argv) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.kill()
            pytest.fail(f"the fork server died. stderr:\n{self.stderr_tail()}")
        line = self.readline()
        assert line.startswith("PID "), line
        return int(line.split()[1])

    def readline(self) -> str:
        try:
            line = self.lines.readline(ANSWER_TIMEOUT_S)
        except ReadTimeout as e:
            self.kill()
            pytest.fail(f"the runner or its fork server is stuck ({e}); both were killed. stderr:\n"
                        f"{self.stderr_tail()}")
        if not line:
            self.kill()
            pytest.fail(f"the fork server died. stderr:\n{self.stderr_tail()}")
        return line

    def wait_exit(self, pid: int) -> int:
        while True:
            line = self.readline()
            if line.startswith("EXIT"):
                return self.exit_status(line, pid)

    def exit_status(self, line: str, pid: int) -> int:
        """The status of an EXIT line; a runner that crashed (not killed, exit code != 0) fails the test."""
        assert int(line.split()[1]) == pid
        status = int(line.split()[2])
        crashed = os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0
        assert not crashed, f"the runner exited with code {os.WEXITSTATUS(status)}:\n{self.stderr_tail()}"
        return status

    def kill(self) -> None:
        """SIGKILL the fork server and any child of it still running (they share its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # also a child left running: it would hold the run's locks


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Fail if the body runs longer than `seconds` (SIGALRM interrupts it, blocking calls included)."""
    def expire(_signum, _frame):
        raise TimeoutError(f"{what} still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _attempt(zygote: Zygote, cfg_path: Path, rng: random.Random, log: list[dict]) -> bool:
    """Start the runner, kill it at a random moment. Returns True if it finished before the kill."""
    import threading

    from_ready = rng.random() < 0.75
    delay = rng.uniform(0.05, 1.2) if from_ready else rng.uniform(0.0, 2.5)
    pid = zygote.start(["generate", "--direct", "--config", str(cfg_path), "--ready", "--no-progress", "--no-finalize",
                        "--json"])
    if from_ready:
        line = zygote.readline()  # READY once the pipeline is loaded (or the summary: nothing to do)
        if not line.startswith("READY"):
            # EXIT: gone before READY, so it crashed (fails in exit_status) or printed nothing
            zygote.exit_status(line, pid) if line.startswith("EXIT") else zygote.wait_exit(pid)
            log.append({"delay": None, "finished": True})
            return True
    # kill after `delay` unless it exits first; the fork server reports the exit either way
    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have exited just before
            os.kill(pid, signal.SIGKILL)

    killer = threading.Timer(delay, kill)
    killer.start()
    try:
        status = zygote.wait_exit(pid)
    finally:
        killer.cancel()
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    log.append({"delay": round(delay, 3), "from_ready": from_ready, "finished": not killed})
    return not killed


def test_sigkill_at_random_moments_then_resume(tmp_path):
    model = save_tiny_pipeline(tmp_path / "model")
    # 14 shards x 2 samples, one sample per batch: many generation steps and shard writes to land in
    cfg_path = write_config(tmp_path / "c.yaml", model, tmp_path / "run", images_per_class=7, batch_size=1,
                            steps=3)
    cfg = load_config(cfg_path)
    plan = RunPlan(cfg)
    layout = RunLayout(cfg.output)

    rng = random.Random(20240607)
    attempts: list[dict] = []
    kills = torn = 0
    t0 = time.monotonic()
    zygote = Zygote(model, tmp_path / "runner-stderr.txt")
    try:
        while kills < MIN_KILLS + 2 and time.monotonic() - t0 < KILL_BUDGET_S:
            if _attempt(zygote, cfg_path, rng, attempts):
                continue  # finished before its kill: the run may be complete; later attempts keep killing
            kills += 1
            # what the kill left behind: a lock of a dead process and/or half a shard
            leftovers = list((layout.root / LOCKS_DIR).glob("*.lock")) + layout.temporaries() + [
                layout.tar_path(s) for s in layout.shard_ids_on_disk() if not layout.is_complete(s)]
            torn += bool(leftovers)
    finally:
        zygote.close()
    assert kills >= MIN_KILLS, f"only {kills} kills in {KILL_BUDGET_S} s: {attempts}"
    assert torn >= 3, f"kills never interrupted a shard write: {attempts}"
    completed_before_final = len(layout.completed_shards())

    # the final, uninterrupted rerun (same code path, in this process)
    with deadline(IN_PROCESS_RUN_TIMEOUT_S, "the final rerun"):
        final = run_direct(cfg, cfg_path, progress=False)
    assert final["complete"] and final["valid"], final.get("validation")
    assert final["accepted"] == plan.total

    # exactly the planned number of unique keys, every tar readable to its end
    keys = []
    for sid in range(plan.num_shards):
        keys += [s["__key__"] for s in raw_samples(layout.tar_path(sid))]
    assert len(keys) == len(set(keys)) == plan.total
    report = validate_run(layout.root)
    assert report.ok, report.summary()
    assert report.samples == plan.total and report.complete_shards == plan.num_shards
    # no temporary file or lock left anywhere in the run folder
    assert not layout.temporaries()
    assert not [p for p in layout.root.rglob("*") if p.name.endswith(".tmp") or p.suffix == ".lock"]
    # manifests agree with the tars
    for sid in range(plan.num_shards):
        rows = pq.read_table(layout.manifest_path(sid)).to_pylist()
        accepted = [r["key"] for r in rows if r["status"] == "accepted"]
        assert accepted == [s["__key__"] for s in raw_samples(layout.tar_path(sid))]
    # every shard completed exactly once, however often its writing was interrupted
    written = [e["shard"] for e in read_writers_log(layout.root) if e["event"] == "written"]
    assert sorted(written) == list(range(plan.num_shards))

    # and the result is the uninterrupted run's, byte for byte
    ref_path = write_config(tmp_path / "ref.yaml", model, tmp_path / "ref", images_per_class=7, batch_size=1,
                            steps=3)
    with deadline(IN_PROCESS_RUN_TIMEOUT_S, "the reference run"):
        ref = run_direct(load_config(ref_path), ref_path, progress=False, finalize=False)
    ref_layout = RunLayout(ref["run_dir"])
    for sid in range(plan.num_shards):
        assert layout.tar_path(sid).read_bytes() == ref_layout.tar_path(sid).read_bytes(), f"shard {sid}"
        assert pq.read_table(layout.manifest_path(sid)).equals(pq.read_table(ref_layout.manifest_path(sid)))
    print(json.dumps({"kills": kills, "torn": torn, "completed_before_final": completed_before_final,
                      "seconds": round(time.monotonic() - t0, 1), "attempts": attempts}))


def test_a_silent_child_is_a_timeout_not_a_hang(tmp_path):
    """The bounded read the test above relies on: a child that stops writing is a ReadTimeout."""
    child = subprocess.Popen([sys.executable, "-c", "import time; print('READY', flush=True); time.sleep(120)"],
                             stdout=subprocess.PIPE, start_new_session=True)
    try:
        lines = LineReader(child.stdout)
        assert lines.readline(60) == "READY"
        t0 = time.monotonic()
        with pytest.raises(ReadTimeout, match="no line within 0.5 s"):
            lines.readline(0.5)
        assert time.monotonic() - t0 < 5
    finally:
        child.kill()
        child.wait(timeout=30)
    assert LineReader(child.stdout).readline(5) == ""  # a closed pipe is the end, not a wait
