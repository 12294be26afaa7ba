"""A cron schedule that really fires: `maskmill serve --cron "* * * * *"` against a real Prefect
server on 127.0.0.1 produces a completed *scheduled* flow run (not a manual trigger)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from deadlines import wait_for
from servers import prefect_env, prefect_server, stop_process
from runs import REPO, save_tiny_pipeline, write_config



@pytest.fixture(scope="module")
def fast_scheduler_server(tmp_path_factory):
    """A server whose scheduler service looks for due schedules every 5 s (default 60 s)."""
    import os

    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"
    try:
        with prefect_server() as api:
            yield api
    finally:
        os.environ.pop("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", None)


def test_every_minute_cron_produces_a_completed_scheduled_run(fast_scheduler_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    model = save_tiny_pipeline(tmp_path / "model")
    cfg = write_config(tmp_path / "c.yaml", model, tmp_path / "cron-run")
    env = prefect_env(fast_scheduler_server, tmp_path / "home")
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "maskmill.cli", "serve", "--config", str(cfg), "--cron",
                              "* * * * *", "--name", "every-minute"], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        with temporary_settings({PREFECT_API_URL: fast_scheduler_server}):
            def completed_scheduled_run():
                with get_client(sync_client=True) as client:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["every-minute"])), flow_run_filter=FlowRunFilter())
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                done = [r for r in runs if r.state is not None and r.state.is_completed()]
                return done[0] if done else None

            # Generous for a loaded CI machine: start-up, the wait for the next minute, then the run itself.
            run = wait_for(completed_scheduled_run, 240, "a completed scheduled run")
    finally:
        stop_process(serve)
        log.close()
    elapsed = time.monotonic() - started
    assert run.auto_scheduled, "the completed run was not created by the schedule"
    print(f"first scheduled run completed {elapsed:.0f} s after `maskmill serve` started")
    assert (tmp_path / "cron-run" / "contact_sheet.png").is_file()
