"""The run folder: create or reopen it, refuse another config's run, list the shards to write.

    layout = prepare_run(cfg, "configs/shapes.yaml")   # folder, classes.json, config copy, cleanup
    pending = pending_shards(cfg, layout)              # shard ids without a completion marker

Besides `shards/`, `manifests/`, `stats/` (see shards/layout.py) and `classes.json`, a run folder holds:

    config.yaml   the resolved config (overrides applied, loadable with `load_config`), fingerprint
                  in its header; the flow's shard tasks read this frozen copy
    run.json      {"fingerprint", "identity" (what the fingerprint covers), "model_identity"
                  (`models.model_identity` of the model), "num_shards", ...}

A folder that holds a run of another config fingerprint is refused (`RunConflictError`, naming
both fingerprints and the differing keys) before anything is written; so is a rerun after the
model's weights changed under the same name (e.g. retrained into the same folder). A run that
completed no shard has nothing to protect: prepare_run replaces it (one logged line) unless one of
its shards is being written. Partial shards are cleaned only under their lock, so a shard another
worker is writing is never touched. An output that cannot be created or written is refused first
(`check_output_writable`).

`output` may be a URL (s3://bucket/prefix, gs://, memory://, file://; see maskmill.storage). A
remote run has no lock files: object stores offer no exclusive create, so one direct runner
writes a URL run at a time, and several machines share one through the Prefect fan-out
(flows/fanout.py), where Prefect gives each shard to one flow run. Each shard's partial objects
are removed by the worker about to write it (maskmill.run.claim). On resume, a complete shard
whose files no longer match its stats (size, sha256: `RunLayout.damage`) loses its stats and is
redone.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from .. import __version__
from ..config import ConfigError, RunConfig
from ..models import model_identity
from ..plan import RunPlan
from ..shards.layout import RunLayout
from ..storage import StorageError, check_output, is_url, protocol_of
from .locks import ShardLock, lock_ids, run_guard
from .writers_log import last_write_events, log_event

CONFIG_COPY = "config.yaml"
RUN_INFO = "run.json"
# What RunConfig.fingerprint() leaves out (they do not change the samples).
NOT_FINGERPRINTED = ("output", "batch_size", "license")


log = logging.getLogger(__name__)


class RunConflictError(ConfigError):
    """The run folder holds a run made with another config."""


def check_output_writable(output: str) -> None:
    """Refuse (ConfigError, one line) an output that cannot hold a run: a folder that cannot be
    created or written, or a URL whose protocol, backend or bucket does not work (maskmill.storage)."""
    try:
        check_output(output)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def run_root(cfg: RunConfig) -> Path | str:
    """The run's folder (absolute), or its URL as given (a file:// URL becomes its folder)."""
    if is_url(cfg.output) and protocol_of(cfg.output) != "file":
        return cfg.output.rstrip("/")
    return RunLayout(cfg.output).root.expanduser().resolve()


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
    data = RunLayout(root).read_file(RUN_INFO)
    return None if data is None else json.loads(data)


def check_run_folder(cfg: RunConfig) -> None:
    """Raise RunConflictError if `cfg.output` holds another config's run with a completed shard, ConfigError
    if it cannot be written. Writes nothing (but check_output_writable's probe folder, removed at once)."""
    check_output_writable(cfg.output)
    root = run_root(cfg)
    layout = RunLayout(root)
    info = read_run_info(root)
    mine = cfg.fingerprint()
    strays = layout.strays()
    if strays:
        raise RunConflictError(
            f"refusing to write into {root}: its shards/ folder holds files that are not shard tars "
            f"({', '.join(p.name for p in strays[:3])}{', ...' if len(strays) > 3 else ''}; runs of older maskmill "
            f"versions kept manifests and stats there). Choose another `output` (e.g. --set output={root}-2) "
            f"or remove the folder.")
    if info is None:
        if layout.shard_ids_on_disk():
            raise RunConflictError(
                f"refusing to write into {root}: it holds shards but no {RUN_INFO}, so it cannot be told "
                f"whether they were made with this config (fingerprint {mine}). Choose another `output` "
                f"(e.g. --set output={root}-2) or remove the folder.")
        return
    if not layout.completed_shards():
        return  # another config's run that finished nothing: prepare_run replaces it
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


def _config_yaml(cfg: RunConfig) -> bytes:
    """The resolved config (overrides applied, `output` absolute): what the flow's tasks read, so
    that editing the source config file while a run is going on cannot change it."""
    header = (f"# maskmill {__version__}: resolved config of this run (load_config accepts it; source in {RUN_INFO})\n"
              f"# fingerprint: {cfg.fingerprint()}  (covers every key but {', '.join(NOT_FINGERPRINTED)})\n")
    data = cfg.model_dump(mode="python")
    data["output"] = str(run_root(cfg))
    return (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode()


def resolved_config_path(cfg: RunConfig) -> Path | str:
    """`config.yaml` of the run (a path, or a URL): the frozen, resolved config (written by prepare_run)."""
    layout = RunLayout(run_root(cfg))
    return layout.location_of(layout.root / CONFIG_COPY)


def _guard(layout: RunLayout):
    """Run-wide mutual exclusion while preparing: flock on a folder; none on a URL (see the docstring)."""
    return contextlib.nullcontext() if layout.remote else run_guard(layout.root)


def prepare_run(cfg: RunConfig, config_path: str | os.PathLike | None = None, clean: bool = True) -> RunLayout:
    """Create or reopen the run folder `cfg.output` and make it ready for shard writers.

    Refuses (RunConflictError, before writing anything) a folder holding a run of another
    config fingerprint with a completed shard; with `clean` (a run's start, not a shard worker)
    replaces one that completed none. Writes classes.json, config.yaml and run.json (only if they change),
    then, with `clean`, removes stale locks and the files of every partial shard it can claim.
    Safe to call from several workers at once.
    """
    check_run_folder(cfg)  # read-only first: nothing is created in a foreign folder
    root = run_root(cfg)
    layout = RunLayout(root)
    layout.store.makedirs(layout.root)
    with _guard(layout):
        check_run_folder(cfg)  # again, now that no other worker can be preparing it
        info = read_run_info(root)
        if info is not None and (info.get("fingerprint") != cfg.fingerprint()
                                 or info.get("model_identity") not in (None, model_identity(cfg.model))):
            if not clean:  # a shard worker (tasks/produce.py) of another run: only a run's start replaces one
                raise RunConflictError(f"refusing to write into {root}: it holds a run of another config "
                                       f"(fingerprint {info.get('fingerprint')}, this one {cfg.fingerprint()})")
            _replace_partial_run(cfg, layout, info)
        if not layout.remote:  # our writes happen under the guard: these temporaries are stale
            for leftover in [*layout.root.glob(".*.tmp"), layout.root / "classes.json.tmp"]:
                leftover.unlink(missing_ok=True)
        layout.create()
        names = list(cfg.classes)
        if not layout.has_classes() or layout.read_classes() != names:
            layout.write_classes(names)
        layout.store.write_if_changed(layout.root / CONFIG_COPY, _config_yaml(cfg))
        if read_run_info(root) is None:
            plan = RunPlan(cfg)
            info = {"fingerprint": cfg.fingerprint(), "identity": identity(cfg),
                    "model_identity": model_identity(cfg.model),
                    "config_path": str(config_path) if config_path is not None else None,
                    "num_shards": plan.num_shards, "total_samples": plan.total, "stride": plan.stride,
                    "maskmill": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            layout.store.write_if_changed(layout.root / RUN_INFO,
                                          (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    if clean:
        clean_run(layout)
    return layout


def _replace_partial_run(cfg: RunConfig, layout: RunLayout, info: dict[str, Any]) -> None:
    """Remove another config's run that completed no shard (check_run_folder made sure), under the run guard.

    Refused if one of its shards is being written (a live lock): that run is still going on.
    """
    for sid in ([] if layout.remote else lock_ids(layout)):  # a URL run has no locks
        lock = ShardLock(layout, sid)
        owner = lock.owner()
        if not lock._is_stale(owner):  # break_if_stale would take the run guard we hold
            raise RunConflictError(
                f"refusing to replace the run in {layout.root}: shard {sid} of it is being written "
                f"({owner}); wait for it or choose another `output`")
        lock.path.unlink(missing_ok=True)
    for sid in layout.shard_ids_on_disk():
        layout.clean_partial(sid)
    for name in (RUN_INFO, CONFIG_COPY, layout.classes_path.name):
        layout.store.remove(layout.root / name)
    diffs = config_differences(info.get("identity", {}), identity(cfg))
    why = f"differing keys: {'; '.join(diffs)}" if diffs else "its model's weights changed"
    log.warning(f"replacing the run in {layout.root}: it completed no shard and was made with another config or model "
                f"(fingerprint {info.get('fingerprint')}, now {cfg.fingerprint()}; {why})")


def clean_run(layout: RunLayout) -> dict[str, Any]:
    """Remove stale locks, the stats of complete shards whose files no longer match them (so they
    are redone), and the files of every partial shard nobody is writing. Returns what went.

    A URL run has no locks: its damaged shards lose their stats here, and each partial shard is
    cleaned by the worker that writes it next (maskmill.run.claim), never by another one."""
    damaged: dict[int, str] = {}
    if layout.remote:
        for sid in layout.completed_shards():
            why = layout.damage(sid)
            if why is not None and layout.drop_stats(sid):
                damaged[sid] = why
        return {"stale_locks": [], "damaged": damaged, "removed": []}
    complete = set(layout.completed_shards())
    # a writer killed between its shard's stats and its "written" line: the shard is whole, so log it
    # once, before its lock goes (a kill in between leaves the lock, and the line, for the next run)
    stale = [lock for lock in (ShardLock(layout, sid) for sid in lock_ids(layout)) if lock.stale()]
    last = last_write_events(layout.root) if stale else {}
    for lock in stale:
        sid = lock.shard_id
        if sid in complete and last.get(sid) != "written" and layout.damage(sid) is None:
            log_event(layout.root, sid, "written", recovered=True)
    removed_locks = [lock.shard_id for lock in stale if lock.break_if_stale()]
    cleaned: list[str] = []
    for sid in layout.shard_ids_on_disk():
        paths = layout.shard(sid)
        why = layout.damage(sid) if sid in complete else None
        if sid in complete and why is None and not any(Path(p).exists() for p in paths.temporaries()):
            continue
        lock = ShardLock(layout, sid)
        if lock.try_acquire():  # else: someone is writing it right now
            try:
                if why is not None and layout.drop_stats(sid):
                    damaged[sid] = why
                    log_event(layout.root, sid, "damaged", reason=why)
                cleaned += [str(p) for p in layout.clean_partial(sid)]
            finally:
                lock.release()
    return {"stale_locks": removed_locks, "damaged": damaged, "removed": cleaned}


def check_shard_ids(cfg: RunConfig, shard_ids: Iterable[int] | None) -> list[int]:
    """`shard_ids` (default: all of the run's shards), sorted and unique; ValueError if one is not in the plan."""
    n = RunPlan(cfg).num_shards
    wanted = list(range(n)) if shard_ids is None else sorted(set(int(s) for s in shard_ids))
    bad = [s for s in wanted if not 0 <= s < n]
    if bad:
        raise ValueError(f"shards {bad} are outside this run's {n} shards (0..{n - 1})")
    return wanted


def pending_shards(cfg: RunConfig, layout: RunLayout, shard_ids: Iterable[int] | None = None) -> list[int]:
    """The run's shard ids (or those of `shard_ids`) that are not complete, ascending."""
    complete = set(layout.completed_shards())  # one listing, not two lookups per shard
    return [s for s in check_shard_ids(cfg, shard_ids) if s not in complete]

