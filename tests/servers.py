"""Real servers on 127.0.0.1 for the tests, each started here and stopped on exit.

    with postgres() as db_url, prefect_server(db_url) as api_url: ...
    with s3_server() as endpoint: ...   # moto's S3 API, reached through s3fs

Every wait has a deadline; a server that does not come up fails the test with the tail of its
log instead of hanging. PostgreSQL refuses to run as root, so it runs as the `postgres` user
that Debian's package creates (`.ci/run` installs the package).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

PG_BIN = Path("/usr/lib/postgresql")


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode} before {url} answered:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServerError(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log) if log else ''}")


def stop_process(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def pg_bin() -> Path | None:
    versions = sorted(PG_BIN.glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1; yields an asyncpg URL to database `prefect`."""
    bindir = pg_bin()
    if bindir is None:
        raise ServerError("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    root = Path(tempfile.mkdtemp(prefix="maskmill-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    data, log, port = root / "data", root / "pg.log", free_port()
    try:
        subprocess.run(as_postgres + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "prefect"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(as_postgres + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                      "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"],
                       check=True, capture_output=True, timeout=90)
        subprocess.run([str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "postgres",
                        "-c", "CREATE DATABASE prefect"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    except subprocess.CalledProcessError as e:
        raise ServerError(f"PostgreSQL did not start: {e.stderr.decode(errors='replace')}\n{_tail(log)}") from None
    finally:
        subprocess.run(as_postgres + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def prefect_env(api_url: str, home: Path) -> dict[str, str]:
    """The environment a process needs to talk to the server at `api_url` (and nothing else)."""
    env = dict(os.environ)
    env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@contextlib.contextmanager
def prefect_server(db_url: str | None = None, timeout: float = 120) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 (on `db_url`'s database, else SQLite); yields the API URL."""
    home = Path(tempfile.mkdtemp(prefix="maskmill-prefect-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api, home)
    env.pop("PREFECT_API_URL")  # the server itself must not point at an API
    if db_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = db_url
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"{api}/health", timeout, proc, log)
        yield api
    finally:
        stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def s3_server(timeout: float = 60) -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1; yields its endpoint URL (any key and secret work)."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="maskmill-moto-")) / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", timeout, proc, log)
        yield endpoint
    finally:
        stop_process(proc)
        shutil.rmtree(log.parent, ignore_errors=True)
