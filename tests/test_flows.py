"""The Prefect layer: the generate_dataset flow, its artifacts, the served deployment, prefect.yaml.

Everything runs against `prefect_test_harness` (a real Prefect API server on 127.0.0.1 with a
temporary SQLite database), telemetry off, on a tiny random pipeline. The served deployment
runs in a subprocess pointed at the harness server; the test triggers it with
`run_deployment` and finds the shards its flow run wrote.
"""
from __future__ import annotations

import os

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"

import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from maskmill.config import load_config  # noqa: E402
from maskmill.run.folder import RunConflictError  # noqa: E402
from maskmill.run.pipelines import clear_pipeline_cache  # noqa: E402
from maskmill.shards import RunLayout, validate_run  # noqa: E402
from deadlines import wait_for  # noqa: E402
from runs import REPO, subprocess_env, write_config  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def fresh_pipeline_cache():
    """The flows' in-process pipelines go with this module."""
    yield
    clear_pipeline_cache()


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_flow_writes_shards_and_artifacts(prefect_api, tiny_model, tmp_path):
    from flows.generate_dataset import artifact_key, generate_dataset

    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "flow-run")
    summary = generate_dataset(str(cfg_path), overrides=["images_per_class=3"])
    cfg = load_config(cfg_path, ["images_per_class=3"])
    assert summary["complete"] and summary["valid"]
    assert summary["accepted"] == cfg.total_samples == 12 and summary["shards"] == summary["num_shards"] == 6
    assert summary["written"] == list(range(6)) and summary["busy"] == []
    assert Path(summary["shards_dir"]) == RunLayout(cfg.output).shards_dir
    assert len(list(Path(summary["shards_dir"]).glob("*.tar"))) == 6
    assert Path(summary["contact_sheet"]).is_file()
    assert validate_run(cfg.output).ok

    run_dir = summary["run_dir"]
    table = _artifacts(artifact_key(run_dir, "shards"))
    assert table and table[0].type == "table"
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert [r["shard_id"] for r in rows] == list(range(6))
    assert sum(r["accepted"] for r in rows) == 12 and {r["this_run"] for r in rows} == {"written"}
    progress = _artifacts(artifact_key(run_dir, "progress"))
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    assert _artifacts(artifact_key(run_dir, "summary"))

    # a rerun of the finished run writes nothing; another config into its folder is refused
    again = generate_dataset(str(cfg_path), overrides=["images_per_class=3"])
    assert again["written"] == [] and again["valid"]
    with pytest.raises(RunConflictError, match="steps: 2 -> 3"):
        generate_dataset(str(cfg_path), overrides=["images_per_class=3", "steps=3"])


def test_failed_shard_is_retried_and_redone_from_the_frozen_config(prefect_api, tiny_model, tmp_path, monkeypatch):
    """A produce task that fails mid-shard is retried and the retry redoes the shard from scratch;
    editing the source config meanwhile changes nothing (tasks read the run's frozen config.yaml)."""
    import maskmill.produce as produce
    from flows.generate_dataset import generate_dataset
    from maskmill.run.writers_log import read_writers_log

    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "retried", images_per_class=1,
                            shard_size=4, batch_size=2)
    fingerprint = load_config(cfg_path).fingerprint()
    calls = {"n": 0}
    real_generate = produce.generate_with_attention

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # someone edits the source config while the run goes on
            write_config(cfg_path, tiny_model, tmp_path / "retried", images_per_class=1, shard_size=4, steps=3)
        if calls["n"] == 2:  # the shard's second batch: its first two records are already written
            raise RuntimeError("injected failure mid-shard")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(produce, "generate_with_attention", flaky)
    summary = generate_dataset(str(cfg_path))
    assert summary["complete"] and summary["valid"] and summary["accepted"] == 4
    assert summary["fingerprint"] == fingerprint
    assert [e["event"] for e in read_writers_log(tmp_path / "retried")] == ["claimed", "failed", "claimed", "written"]
    assert not RunLayout(tmp_path / "retried").temporaries()
    # the edited source is another config now: a rerun with it is refused
    with pytest.raises(RunConflictError, match="steps: 2 -> 3"):
        generate_dataset(str(cfg_path))


def test_gpu_limit_wraps_generation_only(prefect_api, tiny_model, tmp_path, monkeypatch):
    """MASKMILL_GPU_LIMIT=name: each batch's generation (only) holds a slot of that global limit;
    MASKMILL_TASK_TAGS tags the produce task runs."""
    import prefect.concurrency.sync as prefect_concurrency
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    import maskmill.produce as produce
    from flows.generate_dataset import generate_dataset

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-test", limit=1))
    events: list[str] = []
    real_concurrency, real_generate = prefect_concurrency.concurrency, produce.generate_with_attention

    @contextlib.contextmanager
    def recording(names, occupy=1, **kwargs):
        with real_concurrency(names, occupy=occupy, **kwargs):  # the real slot, on the harness server
            events.append(f"enter {names}")
            yield
            events.append(f"exit {names}")

    def generate(*args, **kwargs):
        events.append("generate")
        return real_generate(*args, **kwargs)

    def extract_outside(*args, **kwargs):
        events.append("extract")
        return real_extract(*args, **kwargs)

    from maskmill.extractors.seediff import SeeDiffExtractor as SeeDiff

    real_extract = SeeDiff.extract
    monkeypatch.setattr(prefect_concurrency, "concurrency", recording)
    monkeypatch.setattr(produce, "generate_with_attention", generate)
    monkeypatch.setattr(SeeDiff, "extract", lambda self, *a, **k: extract_outside(self, *a, **k))
    monkeypatch.setenv("MASKMILL_GPU_LIMIT", "gpu-test")
    monkeypatch.setenv("MASKMILL_TASK_TAGS", "gpu-tag-test")  # opt-in tags, for tag-based task limits
    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "gated", images_per_class=1,
                            shard_size=4, batch_size=2)
    summary = generate_dataset(str(cfg_path))
    assert summary["complete"] and summary["accepted"] == 4
    # two batches of two: the slot is held around generation, released before extraction
    assert events == ["enter gpu-test", "generate", "exit gpu-test", "extract", "extract"] * 2, events
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-test").active_slots == 0
        tagged = client.read_task_runs(task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=["gpu-tag-test"])))
    assert [t.name for t in tagged] == ["shard-0"]  # the produce task only



def _stop(proc: subprocess.Popen, grace: float = 20) -> bool:
    """SIGINT the process group (serve shuts down cleanly on Ctrl-C), SIGKILL after `grace`. True if clean."""
    if proc.poll() is not None:
        return True
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False


def test_served_deployment_runs_when_triggered(prefect_api, tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "served-run")
    name = "maskmill-test-served"
    env = dict(subprocess_env(), PREFECT_API_URL=prefect_api)
    code = ("from flows.scheduled import serve; import sys; "
            f"serve(sys.argv[1], cron='0 3 * * *', name={name!r})")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def deployment():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name(f"generate-dataset/{name}")
                except Exception:
                    return None

        dep = wait_for(deployment, 120, "the served deployment")
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
        assert dep.parameters["config_path"] == str(cfg_path.resolve())

        run = run_deployment(f"generate-dataset/{name}", timeout=0, as_subflow=False)

        def finished():
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(run.id).state
            return state if state is not None and state.is_final() else None

        state = wait_for(finished, 240, "the triggered flow run", interval=1)
        assert state.is_completed(), f"{state}: {(tmp_path / 'serve.log').read_text()[-3000:]}"
    finally:
        clean = _stop(server)
        print(f"serve stopped cleanly: {clean}")
        log.close()

    # the shards the served run wrote
    layout = RunLayout(tmp_path / "served-run")
    assert layout.completed_shards() == [0, 1, 2, 3]
    report = validate_run(layout.root)
    assert report.ok and report.samples == 8, report.summary()
    assert (layout.root / "contact_sheet.png").is_file()
    if clean:  # served with pause_on_shutdown=False: stopping it leaves the schedule active
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"generate-dataset/{name}")
        assert not dep.paused and all(s.active for s in dep.schedules)


def test_prefect_yaml_deploys_with_cron_on_the_work_pool(prefect_api):
    """`prefect deploy` accepts prefect.yaml: the deployment has its cron, parameters and work pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="maskmill-gpu", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    env = dict(subprocess_env(), PREFECT_API_URL=prefect_api, MASKMILL_REPO=str(REPO))
    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("generate-dataset/shapes-nightly")
    assert dep.work_pool_name == "maskmill-gpu"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters == {"config_path": "configs/shapes.yaml", "overrides": []}
    assert dep.entrypoint == "flows/generate_dataset.py:generate_dataset"
    assert dep.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
