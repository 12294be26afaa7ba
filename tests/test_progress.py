"""Progress people can watch, a quiet console, and a run that describes itself.

- RunProgress: one line per 10 % of the run (and every N seconds) when not on a terminal, one tqdm
  bar (no lines) on a terminal;
- the Prefect shard task's progress callback updates the flow's progress artifact once per batch;
- a direct run on the tiny model with stderr captured (not a terminal): progress lines, no torchvision
  note, no loading bars; the run's dataset card, classes.json and typed manifests.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from maskmill.run.progress import RunProgress, progress_line
from runs import save_tiny_pipeline, subprocess_env, write_config

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^progress (\S+): (\d+)/(\d+) samples \((\d+) %\), ([\d.]+) images/s, ETA (\S+)$")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_rate_and_eta():
    assert progress_line("run", 25, 100, 10.0) == "progress run: 25/100 samples (25 %), 2.5 images/s, ETA 0:00:30"
    assert progress_line("run", 0, 100, 0.0).endswith("0.0 images/s, ETA ?")
    # a shard task starting part-way: the rate counts only what it did
    assert "1.0 images/s, ETA 0:00:40" in progress_line("run", 60, 100, 10.0, initial=50)


def test_not_a_terminal_prints_a_line_per_tenth_and_every_n_seconds():
    out, clock = io.StringIO(), FakeClock()
    with RunProgress(total=40, name="demo", stream=out, every_seconds=30, clock=clock) as p:
        for _ in range(40):
            clock.t += 0.5
            p.update(1)
        lines = out.getvalue().splitlines()
        assert [int(LINE.match(ln).group(2)) for ln in lines] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
        assert lines[-1] == "progress demo: 40/40 samples (100 %), 2.0 images/s, ETA 0:00:00"
    out, clock = io.StringIO(), FakeClock()
    p = RunProgress(total=1000, name="slow", stream=out, every_seconds=30, clock=clock)
    for _ in range(5):  # 5 samples a minute: far below 10 %, but a line every 30 s
        clock.t += 61
        p.update(1)
    assert len(out.getvalue().splitlines()) == 5 and "ETA" in out.getvalue()


def test_rejections_grow_the_total_and_a_terminal_gets_a_bar_not_lines():
    out = io.StringIO()
    p = RunProgress(total=4, name="r", stream=out, clock=FakeClock())
    p.update(6)  # two rejected samples made up from further indices
    assert p.total == 6 and out.getvalue().splitlines()[-1].startswith("progress r: 6/6 samples (100 %)")
    tty = TTY()
    with RunProgress(total=10, name="bar", stream=tty) as p:
        p.update(5)
    assert "progress bar:" not in tty.getvalue() and "5/10" in tty.getvalue() and "\r" in tty.getvalue()
    quiet = io.StringIO()
    with RunProgress(total=10, name="off", stream=quiet, enabled=False) as p:
        p.update(10)
    assert quiet.getvalue() == ""


def test_shard_task_updates_the_flow_progress_artifact_per_batch(tmp_path, monkeypatch):
    import prefect.artifacts

    from maskmill.config import parse_config
    from maskmill.plan import RunPlan
    from maskmill.shards import RunLayout
    from tasks.produce import run_progress

    cfg = parse_config({"classes": ["a", "b"], "images_per_class": 10, "batch_size": 4, "shard_size": 8,
                        "output": str(tmp_path / "run")}, check_files=False)
    layout = RunLayout(tmp_path / "run").create()
    plan = RunPlan(cfg)
    assert [plan.quota(s) for s in range(plan.num_shards)] == [8, 8, 4]
    (layout.stats_path(0)).write_text("{}")  # shard 0 complete
    layout.tar_path(0).write_bytes(b"")
    calls = []
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda aid, progress: calls.append((aid, progress)))
    display, update = run_progress(cfg, layout, 1, {"artifact_id": "abc", "shard_ids": [0, 1, 2]})
    with display:
        for _ in range(8):
            update(1)
    assert calls == [("abc", 60.0), ("abc", 80.0)]  # (8 + 4) / 20, then (8 + 8) / 20: once per batch of 4


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress-run")
    model = save_tiny_pipeline(tmp / "model")
    config = write_config(tmp / "c.yaml", model, tmp / "run", images_per_class=3, license="creativeml-openrail-m")
    proc = subprocess.run([sys.executable, "-m", "maskmill", "generate", "--config", str(config), "--direct", "--json"],
                          capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


def test_direct_run_off_a_terminal_prints_progress_lines_and_nothing_noisy(direct_run):
    run, proc = direct_run
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("progress ")]
    assert lines and all(LINE.match(ln) for ln in lines), proc.stderr
    done = [int(LINE.match(ln).group(2)) for ln in lines]
    assert done == sorted(done) and LINE.match(lines[-1]).group(4) == "100"
    assert LINE.match(lines[-1]).group(1) == run.name and int(LINE.match(lines[-1]).group(3)) >= 12
    for noise in ("torchvision", "Loading pipeline components", "Loading weights", "it/s]"):
        assert noise not in proc.stderr, (noise, proc.stderr)
    assert "\r" not in proc.stderr  # no bar redrawn in a log


def test_finished_run_has_its_card_classes_and_typed_manifests(direct_run):
    run, proc = direct_run
    summary = json.loads(proc.stdout)
    assert summary["valid"] and summary["card"] == str(run / "README.md")
    card = (run / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == "creativeml-openrail-m"
    names = next(f for f in next(f for f in header["dataset_info"]["features"] if f["name"] == "json")["struct"]
                 if f["name"] == "classes")["list"]["class_label"]["names"]
    assert names == {"0": "background", "1": "circle", "2": "square", "3": "triangle", "4": "star"}
    classes = json.loads((run / "classes.json").read_text())
    assert classes["classes"] == ["circle", "square", "triangle", "star"]
    assert classes["id2label"]["0"] == "background" and classes["id2label"]["255"] == "ignore"
    table = ds.dataset(str(run / "manifests"), format="parquet").to_table()  # every shard's manifest, one glob
    assert table.num_rows == summary["accepted"] + summary["rejected"]
    assert table.schema.field("classes").type == pa.list_(pa.string())
    assert all(set(c) <= set(classes["classes"]) for c in table.column("classes").to_pylist())
