"""The direct runner: run folders, determinism, refusal of mixed configs, shard locks, quality filter.

Everything runs on a tiny random SD 1.x pipeline saved to a temporary folder (32 px, 2 steps,
tiny shards); torch uses one thread so that two runs compare byte for byte.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from maskmill.config import load_config
from maskmill.plan import RunPlan
from maskmill.run.direct import run_direct
from maskmill.run.folder import CONFIG_COPY, RUN_INFO, RunConflictError, pending_shards, prepare_run
from maskmill.run.locks import ShardLock
from maskmill.run.process import HOST
from maskmill.run.writers_log import read_writers_log
from maskmill.shards import RunLayout, raw_samples, validate_run

from deadlines import LineReader, ReadTimeout, tail
from runs import REPO, save_tiny_pipeline, subprocess_env, write_config


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root: (mtime_ns, content)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def tar_keys(tar: Path) -> list[str]:
    return [s["__key__"] for s in raw_samples(tar)]


# --- determinism, resume, refusal ------------------------------------------------------------------
def test_same_config_same_bytes_rerun_no_work_and_refusal(tmp_path, tiny_model, capsys):
    cfg_a = load_config(write_config(tmp_path / "a.yaml", tiny_model, tmp_path / "run-a"))
    # Same config, another folder. (Not another batch size: batched convolutions round differently,
    # which moves the odd pixel by 1/255, so batch_size is part of "same config" for byte identity.)
    cfg_b = load_config(write_config(tmp_path / "b.yaml", tiny_model, tmp_path / "run-b"))
    assert cfg_a.fingerprint() == cfg_b.fingerprint()

    a = run_direct(cfg_a, tmp_path / "a.yaml", progress=False)
    b = run_direct(cfg_b, tmp_path / "b.yaml", progress=False)
    plan = RunPlan(cfg_a)
    for s in (a, b):
        assert s["complete"] and s["valid"], s.get("validation")
        assert s["accepted"] == plan.total == 8 and s["shards"] == plan.num_shards == 4
        assert Path(s["contact_sheet"]).is_file()
    la, lb = RunLayout(a["run_dir"]), RunLayout(b["run_dir"])
    # same samples, byte for byte
    for sid in range(plan.num_shards):
        assert la.tar_path(sid).read_bytes() == lb.tar_path(sid).read_bytes(), f"shard {sid} differs"
        assert pq.read_table(la.manifest_path(sid)).equals(pq.read_table(lb.manifest_path(sid)))
    # the run folder: classes, the resolved config (loadable) and its fingerprint
    root = Path(a["run_dir"])
    assert json.loads((root / "classes.json").read_text())["classes"] == cfg_a.classes
    assert load_config(root / CONFIG_COPY).fingerprint() == cfg_a.fingerprint()
    assert cfg_a.fingerprint() in (root / CONFIG_COPY).read_text()
    assert json.loads((root / RUN_INFO).read_text())["fingerprint"] == cfg_a.fingerprint()

    # a finished run: a rerun does no work and touches no shard
    before = snapshot(la.shards_dir)
    again = run_direct(cfg_a, tmp_path / "a.yaml", progress=False)
    assert again["written"] == [] and again["loaded_pipeline"] is False and again["valid"]
    assert snapshot(la.shards_dir) == before

    # another config into the same folder: refused before any work, naming both fingerprints and the keys
    before = snapshot(root)
    changed = load_config(tmp_path / "a.yaml", ["steps=3", "filter.min_area=0.01"])
    with pytest.raises(RunConflictError) as err:
        run_direct(changed, tmp_path / "a.yaml", progress=False)
    msg = str(err.value)
    assert cfg_a.fingerprint() in msg and changed.fingerprint() in msg
    assert "steps: 2 -> 3" in msg and "filter.min_area: 0.0 -> 0.01" in msg
    assert snapshot(root) == before  # nothing overwritten, nothing added
    # the CLI refuses it too, with the same message, before Prefect starts
    from maskmill.cli import main

    assert main(["generate", "--config", str(tmp_path / "a.yaml"), "--set", "steps=3"]) == 2
    assert "refusing to mix runs" in capsys.readouterr().err
    assert snapshot(root) == before

    # same config, but the model was retrained into the same folder: refused as well
    retrained = save_tiny_pipeline(tmp_path / "retrained", seed=1)
    for f in retrained.rglob("*.safetensors"):
        target = tiny_model / f.relative_to(retrained)
        original = target.read_bytes()
        target.write_bytes(f.read_bytes())
        try:
            with pytest.raises(RunConflictError, match="other weights than when this run started"):
                run_direct(cfg_a, tmp_path / "a.yaml", progress=False)
        finally:
            target.write_bytes(original)  # the module's other tests use this model
    assert snapshot(root) == before


def test_shards_read_with_hf_datasets(tmp_path, tiny_model):
    """The shards load offline with HF `datasets` (same fields in every sample)."""
    datasets = pytest.importorskip("datasets")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", images_per_class=1))
    summary = run_direct(cfg, tmp_path / "c.yaml", progress=False, finalize=False)
    tars = sorted(str(p) for p in Path(summary["shards_dir"]).glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 4
    mask = np.asarray(ds[0]["mask.png"])
    assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 1, 2, 3, 4, 255}


def test_prepare_run_cleans_partial_shards(tmp_path, tiny_model):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run"))
    layout = prepare_run(cfg, tmp_path / "c.yaml")
    paths = layout.shard(1)
    paths.tar_tmp.write_bytes(b"half a tar")
    paths.tar.write_bytes(b"a tar without stats")  # renamed, but killed before the stats
    (layout.root / ".config.yaml.999.1.tmp").write_bytes(b"")  # a write of ours, interrupted
    assert pending_shards(cfg, layout) == [0, 1, 2, 3]
    prepare_run(cfg, tmp_path / "c.yaml")
    assert not paths.tar_tmp.exists() and not paths.tar.exists()
    assert not list(layout.root.glob(".*.tmp"))
    with pytest.raises(ValueError, match="outside"):
        pending_shards(cfg, layout, [7])


# --- shard locks -------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_shard_lock_exclusive_stale_and_foreign(tmp_path):
    layout = RunLayout(tmp_path / "run").create()
    first, second = ShardLock(layout, 3), ShardLock(layout, 3)
    assert first.try_acquire()
    owner = json.loads(first.path.read_text())
    assert owner["host"] and owner["pid"] == os.getpid()
    assert not second.try_acquire()  # held by a live process (us)
    first.release()
    assert not first.path.exists()
    assert second.try_acquire()
    second.release()

    # a lock left by a dead process on this host is taken over (and logged)
    lock = ShardLock(layout, 4)
    lock.path.write_text(json.dumps({"host": owner["host"], "pid": _dead_pid(), "start": "1", "time": 0}))
    assert lock.try_acquire()
    lock.release()
    assert any(e["event"] == "stale-lock-removed" and e["shard"] == 4 for e in read_writers_log(layout.root))

    # a live pid whose start time differs is a reused pid: stale too
    lock.path.write_text(json.dumps({"host": owner["host"], "pid": os.getpid(), "start": "-1", "time": 0}))
    assert lock.try_acquire()
    lock.release()

    # a lock from another host is trusted (we cannot see its processes)
    lock.path.write_text(json.dumps({"host": "another-host", "pid": 1, "start": "1", "time": 0}))
    assert not lock.try_acquire()
    lock.path.unlink()


def test_writer_killed_between_stats_and_log_is_logged_written_once(tmp_path, tiny_model):
    """A shard whose stats landed but whose writer died before logging "written" is logged by the
    next run's clean-up, once; a shard already logged is not logged again."""
    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", images_per_class=1)
    run_direct(load_config(cfg_path), cfg_path, progress=False, finalize=False)
    root = tmp_path / "run"
    lines = (root / "writers.jsonl").read_text().splitlines(keepends=True)
    # shard 1's writer "killed" after its stats, before its line; shard 0's after its line, before its unlock
    (root / "writers.jsonl").write_text("".join(
        line for line in lines if not (json.loads(line)["shard"] == 1 and json.loads(line)["event"] == "written")))
    layout = RunLayout(root)
    for sid in (0, 1):
        ShardLock(layout, sid).path.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "start": "1", "time": 0}))
    prepare_run(load_config(cfg_path), cfg_path)
    written = [e for e in read_writers_log(root) if e["event"] == "written"]
    assert sorted(e["shard"] for e in written) == [0, 1]
    assert [e["shard"] for e in written if e.get("recovered")] == [1]
    assert not list((root / "locks").glob("*.lock"))


_WORKER = """
import sys, json, time
from pathlib import Path
from maskmill.config import load_config
from maskmill.models import load_pipeline
from maskmill.run.direct import run_direct
cfg = load_config(sys.argv[1])
load_pipeline(cfg.model, cfg.scheduler, "cpu")  # warm imports and caches before the start line
print("READY", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
summary = run_direct(cfg, sys.argv[1], progress=False, finalize=False)
print(json.dumps({"written": summary["written"], "busy": summary["busy"]}), flush=True)
"""


def test_two_processes_on_one_run_write_each_shard_once(tmp_path, tiny_model):
    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", images_per_class=4, batch_size=1)
    cfg = load_config(cfg_path)
    plan = RunPlan(cfg)
    go = tmp_path / "go"
    errs = [tmp_path / f"worker-{i}.stderr" for i in range(2)]
    err_files = [err.open("w") for err in errs]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(cfg_path), str(go)], stdout=subprocess.PIPE,
                              stderr=f, text=True, env=subprocess_env(), cwd=REPO)
             for f in err_files]
    try:
        try:  # bounded waits: a stuck worker fails the test with its stderr instead of hanging it
            readers = [LineReader(p.stdout) for p in procs]
            for r in readers:
                assert r.readline(300) == "READY"
            go.touch()  # both start at once
            outs = [r.rest() + p.communicate(timeout=300)[0] for r, p in zip(readers, procs)]
        except (ReadTimeout, subprocess.TimeoutExpired) as e:
            for p in procs:
                p.kill()
            pytest.fail(f"a worker is stuck ({e}); killed. stderr:\n" + "\n".join(tail(err) for err in errs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in err_files:
            f.close()
    assert all(p.returncode == 0 for p in procs)
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    written = [set(r["written"]) for r in results]
    assert not written[0] & written[1], results
    assert written[0] | written[1] == set(range(plan.num_shards))

    log = [e for e in read_writers_log(cfg.output) if e["event"] == "written"]
    per_shard = {sid: [e["pid"] for e in log if e["shard"] == sid] for sid in range(plan.num_shards)}
    assert all(len(pids) == 1 for pids in per_shard.values()), per_shard  # exactly one writer per shard
    writers = {pid for pids in per_shard.values() for pid in pids}
    assert writers == {p.pid for p in procs}, per_shard  # both worked on the run, started at the same instant

    layout = RunLayout(cfg.output)
    keys = [k for sid in range(plan.num_shards) for k in tar_keys(layout.tar_path(sid))]
    assert len(keys) == len(set(keys)) == plan.total
    report = validate_run(cfg.output)
    assert report.ok, report.summary()
    assert not list((Path(cfg.output) / "locks").glob("*.lock"))


# --- quality filter ----------------------------------------------------------------------------------
def _threshold(conf: dict[int, float], quota: int) -> float | None:
    """A min_confidence far from every sample's confidence that rejects some of the first candidates."""
    values = sorted(set(conf.values()))
    best = None
    for lo, hi in zip(values, values[1:]):
        thr = (lo + hi) / 2
        passing = [i for i in sorted(conf) if conf[i] >= thr]
        if len(passing) < quota + 1:
            continue
        made_up = passing[quota - 1] >= quota  # at least one rejection before the quota is met
        if made_up and (best is None or hi - lo > best[0]):
            best = (hi - lo, thr)
    return None if best is None else best[1]


def test_quality_filter_rejects_records_and_makes_up_deterministically(tmp_path, tiny_model):
    # 1. every candidate of the first 12 indices, accepted (permissive), to learn their confidences
    probe = load_config(write_config(tmp_path / "p.yaml", tiny_model, tmp_path / "probe", images_per_class=3,
                                     shard_size=12, filter__max_retries_factor=1.0, batch_size=4))
    run_direct(probe, tmp_path / "p.yaml", progress=False, finalize=False)
    rows = pq.read_table(RunLayout(probe.output).manifest_path(0)).to_pylist()
    conf = {r["index"]: r["confidence"][0] for r in rows}
    assert len(conf) == 12 and all(r["status"] == "accepted" for r in rows)
    quota = 4
    thr = _threshold(conf, quota)
    assert thr is not None, f"no usable threshold in {conf}"

    # 2. a strict filter: one shard of 4 from the same 12 candidate indices (stride = 4 x 3)
    def strict(out: str) -> dict:
        path = write_config(tmp_path / f"{out}.yaml", tiny_model, tmp_path / out, images_per_class=1,
                            shard_size=quota, filter__max_retries_factor=3.0, filter__min_confidence=float(thr),
                            batch_size=4)
        return run_direct(load_config(path), path, progress=False)

    s1 = strict("strict-1")
    assert s1["complete"] and s1["valid"] and s1["accepted"] == quota and s1["shortfall"] == 0
    expected_ok = [i for i in sorted(conf) if conf[i] >= thr][:quota]
    expected_rejected = [i for i in range(expected_ok[-1]) if i not in expected_ok]
    assert expected_rejected and s1["rejected"] == len(expected_rejected)
    # reasons name the rule and the class, never a number, so the stats are a histogram
    assert sum(s1["reasons"].values()) == len(expected_rejected)
    assert all(re.fullmatch(r"low confidence: [a-z ]+", r) for r in s1["reasons"]), s1["reasons"]

    layout = RunLayout(s1["run_dir"])
    manifest = pq.read_table(layout.manifest_path(0)).to_pylist()
    assert [r["index"] for r in manifest] == list(range(expected_ok[-1] + 1))  # candidates in order
    for r in manifest:
        if r["index"] in expected_ok:
            assert r["status"] == "accepted" and r["reason"] == ""
        else:
            assert r["status"] == "rejected" and r["reason"].startswith("low confidence: ")
            assert r["prompt"] and r["seed"] is not None  # rejected samples stay traceable
    assert tar_keys(layout.tar_path(0)) == [r["key"] for r in manifest if r["status"] == "accepted"]

    # 3. deterministic: the same strict run elsewhere gives the same shard, byte for byte
    s2 = strict("strict-2")
    assert RunLayout(s2["run_dir"]).tar_path(0).read_bytes() == layout.tar_path(0).read_bytes()
    assert pq.read_table(RunLayout(s2["run_dir"]).manifest_path(0)).equals(pq.read_table(layout.manifest_path(0)))
