"""Run folders, shard claiming, and the direct (Prefect-free) runner.

    layout = prepare_run(cfg, "configs/shapes.yaml")   # folder, classes.json, config copy, cleanup
    pending = pending_shards(cfg, layout)              # shard ids without a completion marker
    summary = run_direct(cfg, "configs/shapes.yaml")   # the whole run, no Prefect

A run folder (the config's `output`) holds, besides `shards/` and `classes.json`:

    config.yaml        the resolved config (overrides applied, loadable with `load_config`),
                       fingerprint in its header; the flow's shard tasks read this frozen copy
    run.json           {"fingerprint", "identity" (what the fingerprint covers), "model_identity"
                       (hash of the model's weights), "num_shards", ...}
    locks/00007.lock   a shard being written: {"host", "pid", "start", "time"}; gone when it is done
    locks/.guard       flock()ed while the folder is prepared or a stale lock is broken
    writers.jsonl      append-only log of claims: one "written" line per shard ever completed

Rules:
- A folder that holds a run of another config fingerprint is refused (`RunConflictError`, naming
  both fingerprints and the differing keys) before anything is written; so is a rerun after the
  model's weights changed under the same name (e.g. retrained into the same folder).
- Several workers (processes, hosts on a shared filesystem, accelerate ranks, Prefect workers)
  may work on one run. A worker writes a shard only while it holds the shard's lock file, created
  with O_CREAT|O_EXCL; it releases it after the shard's stats (the completion marker) are written.
  A lock whose owner is dead (same host, pid gone, zombie or reused) is taken over. A lock from
  another host is trusted until removed by hand (we cannot see that host's processes).
- Partial shards (no stats) are cleaned only under their lock, so a shard another worker is
  writing right now is never touched.

Same config -> same samples, byte for byte, given the same hardware, torch build and torch
thread count, and the same `batch_size` (batched convolutions round differently: another batch
size moves the odd pixel by 1/255, although batch_size is left out of the fingerprint because
the samples are otherwise the same). Shard ids and seeds come from the plan, never from the
worker, process or GPU count.

`run_direct` is the same work as the `generate_dataset` flow without Prefect: the reference for
the orchestration-overhead benchmark, the subject of the kill test, and what accelerate ranks
run when no Prefect server is configured. `python -m maskmill.runner --config C [--set k=v]`
runs it from a shell and prints its summary as JSON.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from . import __version__
from .atomic import write_if_changed
from .config import ConfigError, RunConfig, load_config
from .models import model_identity
from .shards.layout import RunLayout
from .shards.records import shard_name
from .shards.writer import ShardStats

CONFIG_COPY = "config.yaml"
RUN_INFO = "run.json"
LOCKS_DIR = "locks"
GUARD = ".guard"
WRITERS_LOG = "writers.jsonl"
CONTACT_SHEET = "contact_sheet.png"
# What RunConfig.fingerprint() leaves out (they do not change the samples).
NOT_FINGERPRINTED = ("output", "batch_size")


class RunConflictError(ConfigError):
    """The run folder holds a run made with another config."""


# --- the run folder --------------------------------------------------------------------------
def run_root(cfg: RunConfig) -> Path:
    return Path(cfg.output).expanduser().resolve()


def identity(cfg: RunConfig) -> dict[str, Any]:
    """What the fingerprint covers, JSON-normalised (dict keys become strings)."""
    return json.loads(json.dumps(cfg.model_dump(exclude=set(NOT_FINGERPRINTED)), sort_keys=True))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every (dotted) key whose value differs, sorted by key."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            fa = "(absent)" if va is missing else json.dumps(va)
            fb = "(absent)" if vb is missing else json.dumps(vb)
            lines.append(f"{key}: {fa} -> {fb}")
    return lines


def read_run_info(root: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(root) / RUN_INFO
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_run_folder(cfg: RunConfig) -> None:
    """Raise RunConflictError if `cfg.output` holds another config's run. Reads only, writes nothing."""
    root = run_root(cfg)
    info = read_run_info(root)
    mine = cfg.fingerprint()
    if info is None:
        layout = RunLayout(root)
        if layout.shard_ids_on_disk():
            raise RunConflictError(
                f"refusing to write into {root}: it holds shards but no {RUN_INFO}, so it cannot be told "
                f"whether they were made with this config (fingerprint {mine}). Choose another `output` "
                f"(e.g. --set output={root}-2) or remove the folder.")
        return
    theirs = info.get("fingerprint")
    if theirs == mine:
        then, now = info.get("model_identity"), model_identity(cfg.model)
        if then is not None and then != now:
            raise RunConflictError(
                f"refusing to mix runs in {root}: model {cfg.model!r} has other weights than when this run "
                f"started ({then} then, {now} now; config fingerprint {mine} unchanged), so its shards "
                f"would mix two models. Choose another `output` (e.g. --set output={root}-2), restore the "
                f"model, or remove the folder to start over.")
        return
    diffs = config_differences(info.get("identity", {}), identity(cfg))
    listed = "; ".join(diffs) if diffs else "(no key differs: the fingerprint rule changed)"
    raise RunConflictError(
        f"refusing to mix runs in {root}: it holds a run with config fingerprint {theirs} "
        f"(from {info.get('config_path') or 'an unknown file'}), this config's fingerprint is {mine}. "
        f"Differing keys: {listed}. Choose another `output` (e.g. --set output={root}-2) "
        f"or remove the folder to start over.")


@contextlib.contextmanager
def _guard(root: Path) -> Iterator[None]:
    """Run-wide mutual exclusion (flock: released by the kernel if the holder dies)."""
    d = root / LOCKS_DIR
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / GUARD, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _config_yaml(cfg: RunConfig) -> bytes:
    """The resolved config (overrides applied, `output` absolute): what the flow's tasks read, so
    that editing the source config file while a run is going on cannot change it."""
    header = (f"# maskmill {__version__}: resolved config of this run (load_config accepts it; source in {RUN_INFO})\n"
              f"# fingerprint: {cfg.fingerprint()}  (covers every key but {', '.join(NOT_FINGERPRINTED)})\n")
    data = cfg.model_dump(mode="python")
    data["output"] = str(run_root(cfg))
    return (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode()


def resolved_config_path(cfg: RunConfig) -> Path:
    """`config.yaml` of the run folder: the frozen, resolved config (written by prepare_run)."""
    return run_root(cfg) / CONFIG_COPY


def prepare_run(cfg: RunConfig, config_path: str | os.PathLike | None = None, clean: bool = True) -> RunLayout:
    """Create or reopen the run folder `cfg.output` and make it ready for shard writers.

    Refuses (RunConflictError, before writing anything) a folder holding a run of another
    config fingerprint. Writes classes.json, config.yaml and run.json (only if they change),
    then, with `clean`, removes stale locks and the files of every partial shard it can claim.
    Safe to call from several workers at once.
    """
    from .plan import RunPlan

    check_run_folder(cfg)  # read-only first: nothing is created in a foreign folder
    root = run_root(cfg)
    layout = RunLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    with _guard(root):
        check_run_folder(cfg)  # again, now that no other worker can be preparing it
        for leftover in [*root.glob(".*.tmp"), root / "classes.json.tmp"]:  # our writes happen under
            leftover.unlink(missing_ok=True)                                 # the guard: these are stale
        layout.create()
        names = list(cfg.classes)
        if not layout.classes_path.is_file() or layout.read_classes() != names:
            layout.write_classes(names)
        write_if_changed(root / CONFIG_COPY, _config_yaml(cfg))
        if read_run_info(root) is None:
            plan = RunPlan(cfg)
            info = {"fingerprint": cfg.fingerprint(), "identity": identity(cfg),
                    "model_identity": model_identity(cfg.model),
                    "config_path": str(config_path) if config_path is not None else None,
                    "num_shards": plan.num_shards, "total_samples": plan.total, "stride": plan.stride,
                    "maskmill": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_if_changed(root / RUN_INFO, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    if clean:
        clean_run(layout)
    return layout


def clean_run(layout: RunLayout) -> dict[str, list]:
    """Remove stale locks and the files of every partial shard nobody is writing. Returns what went."""
    removed_locks = [sid for sid in lock_ids(layout) if ShardLock(layout, sid).break_if_stale()]
    cleaned: list[str] = []
    for sid in layout.shard_ids_on_disk():
        paths = layout.shard(sid)
        if layout.is_complete(sid) and not any(p.exists() for p in paths.temporaries()):
            continue
        lock = ShardLock(layout, sid)
        if lock.try_acquire():  # else: someone is writing it right now
            try:
                cleaned += [str(p) for p in layout.clean_partial(sid)]
            finally:
                lock.release()
    return {"stale_locks": removed_locks, "removed": cleaned}


def pending_shards(cfg: RunConfig, layout: RunLayout, shard_ids: Iterable[int] | None = None) -> list[int]:
    """The run's shard ids (or those of `shard_ids`) that are not complete, ascending."""
    from .plan import RunPlan

    n = RunPlan(cfg).num_shards
    wanted = range(n) if shard_ids is None else sorted(set(int(s) for s in shard_ids))
    bad = [s for s in wanted if not 0 <= s < n]
    if bad:
        raise ValueError(f"shards {bad} are outside this run's {n} shards (0..{n - 1})")
    return [s for s in wanted if not layout.is_complete(s)]


# --- shard locks -------------------------------------------------------------------------------
HOST = socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a local process, from /proc; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], fields[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Is local process `pid` running (not a zombie) and, if `start` is given, the same process?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    state, started = stat
    if state in ("Z", "X"):
        return False
    return start is None or started == start


def _me() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"host": HOST, "pid": os.getpid(), "start": stat[1] if stat else None, "time": time.time()}


def lock_ids(layout: RunLayout) -> list[int]:
    d = layout.root / LOCKS_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.stem) for p in d.glob("*.lock") if p.stem.isdigit())


class ShardLock:
    """An exclusive claim on one shard: `locks/{shard}.lock`, created with O_CREAT|O_EXCL.

        lock = ShardLock(layout, 7)
        if lock.try_acquire():
            try: ...write the shard...
            finally: lock.release()
    """

    def __init__(self, layout: RunLayout, shard_id: int) -> None:
        self.layout = layout
        self.shard_id = shard_id
        self.path = layout.root / LOCKS_DIR / f"{shard_name(shard_id)}.lock"
        self._content: bytes | None = None

    @property
    def held(self) -> bool:
        return self._content is not None

    def owner(self) -> dict[str, Any] | None:
        """The lock file's content; {} while its creator has not written it yet; None if there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {}

    def try_acquire(self) -> bool:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            content = json.dumps(_me()).encode()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.break_if_stale():
                    continue
                return False
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._content = content
            return True
        return False

    def _is_stale(self, owner: dict[str, Any] | None) -> bool:
        if owner is None:
            return False
        if not owner:  # empty: being written this instant, or its creator died right after creating it
            try:
                return time.time() - self.path.stat().st_mtime > 30
            except FileNotFoundError:
                return False
        if owner.get("host") != HOST:
            return False  # cannot see another host's processes
        return not process_alive(int(owner.get("pid", -1)), owner.get("start"))

    def break_if_stale(self) -> bool:
        """Remove the lock if its owner is dead (checked and removed under the run guard)."""
        if not self.path.exists():
            return False
        with _guard(self.layout.root):
            owner = self.owner()
            if not self._is_stale(owner):
                return False
            self.path.unlink(missing_ok=True)
        _log(self.layout, self.shard_id, "stale-lock-removed", previous=owner)
        return True

    def release(self) -> None:
        if not self.held:
            return
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._content = None

    def __enter__(self) -> "ShardLock":
        if not self.try_acquire():
            raise RuntimeError(f"shard {self.shard_id} is locked by {self.owner()}")
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _log(layout: RunLayout, shard_id: int, event: str, **extra: Any) -> None:
    """Append one line to writers.jsonl (a single O_APPEND write: lines never interleave)."""
    line = json.dumps({"shard": shard_id, "event": event, "host": HOST, "pid": os.getpid(),
                       "time": round(time.time(), 3), **extra}, default=str) + "\n"
    fd = os.open(layout.root / WRITERS_LOG, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_writers_log(root: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(root) / WRITERS_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # cannot happen with single O_APPEND writes, but never fail a summary on it
    return entries


# --- one shard, claimed ----------------------------------------------------------------------------
def produce_claimed(cfg: RunConfig, layout: RunLayout, shard_id: int, pipe, extractor=None,
                    progress: Callable[[int], None] | None = None,
                    generation_gate: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, Any]:
    """Write shard `shard_id` if it is incomplete and this worker can claim it.

    Returns {"shard_id", "status"} with status "written" (plus the shard's stats), "complete"
    (done before), or "busy" (another live worker holds its lock). Partial files of the shard
    (an interrupted or failed earlier attempt) are removed first, so a retry simply redoes it.
    """
    from .produce import produce_shard

    if layout.is_complete(shard_id):
        return {"shard_id": shard_id, "status": "complete"}
    lock = ShardLock(layout, shard_id)
    if not lock.try_acquire():
        return {"shard_id": shard_id, "status": "busy", "owner": lock.owner()}
    try:
        if layout.is_complete(shard_id):  # finished by another worker since we looked
            return {"shard_id": shard_id, "status": "complete"}
        layout.clean_partial(shard_id)
        _log(layout, shard_id, "claimed")
        try:
            stats = produce_shard(cfg, shard_id, pipe, layout.shards_dir, extractor=extractor, progress=progress,
                                  generation_gate=generation_gate)
        except BaseException as e:
            _log(layout, shard_id, "failed", error=f"{type(e).__name__}: {e}")
            raise
        _log(layout, shard_id, "written", accepted=stats.accepted, rejected=stats.rejected)
        return {"status": "written", **shard_row(stats)}
    finally:
        lock.release()


def shard_row(stats: ShardStats) -> dict[str, Any]:
    """One shard's line for summaries and the Prefect table artifact."""
    top = max(stats.reasons.items(), key=lambda kv: kv[1])[0] if stats.reasons else ""
    return {"shard_id": stats.shard_id, "shard": stats.shard, "accepted": stats.accepted,
            "rejected": stats.rejected, "records": stats.records, "tar_bytes": stats.tar_bytes,
            "seconds": round(stats.seconds, 3), "top_reason": top}


# --- pipelines, once per worker process ------------------------------------------------------------
@dataclass
class WorkerPipeline:
    pipe: Any
    # one user at a time: capture processors and feature hooks patch the shared UNet; re-entrant so a
    # bank build can hold it while its support generation takes it again
    lock: threading.RLock


_PIPELINES: dict[tuple[str, str | None, str], WorkerPipeline] = {}
_PIPELINES_LOCK = threading.Lock()
PIPELINE_LOADS = {"count": 0}  # pipelines this process loaded (tests check that a reuse loads none)


def worker_device() -> str:
    """MASKMILL_DEVICE if set; else cuda:LOCAL_RANK (accelerate/torchrun) or cuda; else cpu."""
    import torch

    if os.environ.get("MASKMILL_DEVICE"):
        return os.environ["MASKMILL_DEVICE"]
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def cached_pipeline(model: str, scheduler: str | None = None, device: str | None = None) -> WorkerPipeline:
    """The pipeline for (model, scheduler, device), loaded at most once per process.

    `scheduler=None` keeps the model's own. Shared by the dataset and the prototype tasks.
    """
    from .models import load_pipeline

    key = (model, scheduler, device or worker_device())
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            _PIPELINES[key] = WorkerPipeline(load_pipeline(model, scheduler, key[2]), threading.RLock())
            PIPELINE_LOADS["count"] += 1
        return _PIPELINES[key]


def clear_pipeline_cache() -> None:
    with _PIPELINES_LOCK:
        _PIPELINES.clear()


# --- finishing a run -------------------------------------------------------------------------------
def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Counts over the run's completed shards (their stats files), and what is still missing."""
    layout = RunLayout(run_dir)
    info = read_run_info(layout.root) or {}
    rows, reasons = [], {}
    for sid in layout.completed_shards():
        stats = ShardStats.read(layout.stats_path(sid))
        rows.append(shard_row(stats))
        for r, n in stats.reasons.items():
            reasons[r] = reasons.get(r, 0) + n
    num_shards = info.get("num_shards")
    accepted = sum(r["accepted"] for r in rows)
    planned = info.get("total_samples")
    return {
        "run_dir": str(layout.root),
        "shards_dir": str(layout.shards_dir),
        "fingerprint": info.get("fingerprint"),
        "shards": len(rows),
        "num_shards": num_shards,
        "complete": num_shards is not None and len(rows) == num_shards,
        "planned": planned,
        "accepted": accepted,
        "rejected": sum(r["rejected"] for r in rows),
        "shortfall": (planned - accepted) if planned is not None and num_shards == len(rows) else None,
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "per_shard": rows,
    }


def write_contact_sheet(run_dir: str | os.PathLike, max_samples: int = 64) -> Path:
    from .preview import contact_sheet

    return contact_sheet(run_dir, Path(run_dir) / CONTACT_SHEET, max_samples=max_samples)


# --- the direct runner -----------------------------------------------------------------------------
def run_direct(cfg: RunConfig, config_path: str | os.PathLike | None = None, shard_ids: Iterable[int] | None = None,
               device: str | None = None, progress: bool = True, finalize: bool = True,
               on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """The whole run without Prefect: prepare, produce every pending shard this worker can claim,
    then (with `finalize`, once every shard is complete) validate and write the contact sheet.

    The pipeline is loaded once, and only if there is work. `on_ready` is called after loading
    (tests use it to time kills). Returns `summarize_run`'s dict plus written/busy shard ids,
    `valid`, `contact_sheet` and `seconds`.
    """
    from tqdm.auto import tqdm

    from .extractors import get_extractor
    from .models import load_pipeline
    from .plan import RunPlan

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
        bar = tqdm(total=sum(plan.quota(s) for s in pending), unit="sample", desc=f"{layout.root.name}",
                   disable=not progress, dynamic_ncols=True)

        def tick(n: int = 1) -> None:
            if bar.n + n > bar.total:  # rejected samples are made up from further indices
                bar.total = bar.n + n
            bar.update(n)

        try:
            for sid in pending:
                outcome = produce_claimed(cfg, layout, sid, pipe, extractor, progress=tick)
                (written if outcome["status"] == "written" else busy if outcome["status"] == "busy" else []).append(sid)
                bar.set_postfix_str(f"shard {sid} {outcome['status']}", refresh=False)
        finally:
            bar.close()
    elif on_ready is not None:
        on_ready()
    summary = summarize_run(layout.root)
    summary.update(written=written, busy=busy, valid=None, contact_sheet=None, loaded_pipeline=bool(pending))
    if finalize and summary["complete"]:
        summary.update(finalize_run(layout.root))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def finalize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate a complete run and draw its contact sheet: {"valid", "validation", "contact_sheet"}."""
    from .shards.validate import validate_run

    report = validate_run(run_dir)
    sheet = str(write_contact_sheet(run_dir)) if report.ok and report.samples else None
    return {"valid": report.ok, "validation": report.summary(), "contact_sheet": sheet}


# --- several processes on one machine (accelerate launch / torchrun) --------------------------------
def world_size() -> int:
    """Processes of this launch (WORLD_SIZE, set by `accelerate launch` and torchrun); 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def run_distributed(cfg: RunConfig, config_path: str | os.PathLike, overrides: Iterable[str] = (),
                    use_prefect: bool | None = None) -> dict[str, Any] | None:
    """One rank of a multi-process launch: the pending shards are split between the processes.

    The main process prepares the folder; every rank takes its contiguous slice of the pending
    shard ids (`PartialState().split_between_processes`) and writes them on its own device. Shard
    ids and seeds come from the plan, never from the rank, so the output is the same for any
    process count; the shard locks keep a shard from being written twice anyway. Each rank runs
    the Prefect flow on its slice when a Prefect server is configured (PREFECT_API_URL, or
    `use_prefect=True`), else `run_direct` (several ephemeral Prefect servers would contend for
    one SQLite file). The main process then validates, draws the contact sheet and returns the
    summary; other ranks return None.
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
    if use_prefect is None:
        use_prefect = bool(os.environ.get("PREFECT_API_URL"))
    if mine:
        if use_prefect:
            os.environ["MASKMILL_DEVICE"] = str(state.device)
            from flows.generate_dataset import generate_dataset

            generate_dataset(str(config_path), list(overrides), shard_ids=mine)
        else:
            run_direct(cfg, config_path, shard_ids=mine, device=str(state.device), finalize=False,
                       progress=state.is_local_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = summarize_run(layout.root)
    summary.update(processes=state.num_processes, valid=None, contact_sheet=None)
    if summary["complete"]:
        summary.update(finalize_run(layout.root))
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m maskmill.runner --config C [--set k=v ...] [--shards 0,3] [--ready]`: run_direct, JSON out."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m maskmill.runner", description=main.__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shards", help="comma-separated shard ids (default: all pending)")
    p.add_argument("--ready", action="store_true", help="print READY on stdout once the pipeline is loaded")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-finalize", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.set)
        shard_ids = [int(s) for s in a.shards.split(",")] if a.shards else None
        ready = (lambda: print("READY", flush=True)) if a.ready else None
        summary = run_direct(cfg, a.config, shard_ids=shard_ids, progress=not a.no_progress,
                             finalize=not a.no_finalize, on_ready=ready)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary.pop("per_shard", None)
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
