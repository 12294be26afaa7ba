"""The `generate_dataset` flow: plan -> produce shards (mapped) -> validate -> preview -> card -> summary.

    from flows.generate_dataset import generate_dataset
    summary = generate_dataset("configs/shapes.yaml", overrides=["steps=10"])
    print(summary["shards_dir"], summary["contact_sheet"])

One task run per shard (never per image); each worker process loads the pipeline once. The
shard tasks read the run folder's frozen config.yaml (written by the plan task), so an edit of
the source config during the run changes nothing. A rerun continues an interrupted run
(complete shards are kept, partial ones redone); a rerun with another config (or other model
weights) into the same `output` is refused before any work. `shard_ids` restricts
the run to some shards (accelerate ranks, several workers splitting one run): validation and
the contact sheet then wait for the run to be complete.

Artifacts (keys from the run folder's name, e.g. "maskmill-shapes-demo-..."):
- `...-progress`: percentage of the run complete: by planned samples after every batch (shards
  written by this process), by shards as fan-out slices finish;
- `...-shards`: table of per-shard stats (accepted, rejected, records, bytes, seconds, top reason);
- `...-summary`: markdown with the totals and where the shards and the contact sheet are.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prefect import flow, get_run_logger, unmapped  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from maskmill.config import load_config  # noqa: E402
from maskmill.plan import RunPlan  # noqa: E402
from maskmill.run.folder import resolved_config_path, run_root  # noqa: E402
from maskmill.shards.validate import RunInvalidError  # noqa: E402
from tasks import (  # noqa: E402
    plan_run,
    produce_shard_task,
    summarize_run,
    task_tags,
    validate_run_task,
    write_card,
    write_preview,
)


def artifact_key(run_dir: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(run_dir).name.lower()).strip("-") or "run"
    return f"maskmill-{slug}-{what}"


def _percent(done: int, total: int) -> float:
    return 100.0 if total == 0 else round(100.0 * done / total, 2)


@flow(name="generate-dataset", log_prints=True,
      # One shard at a time per process: the pipeline is shared and attention capture patches it.
      # Scale out with processes (accelerate ranks, Prefect workers), not threads.
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_dataset(config_path: str, overrides: list[str] | None = None,
                     shard_ids: list[int] | None = None, fan_out: str | None = None,
                     slice_shards: int = 2) -> dict[str, Any]:
    """Generate the dataset a config describes, as WebDataset shards; returns a summary dict.

    The summary holds `shards_dir`, `contact_sheet` (None until the run is complete),
    `accepted`, `rejected`, `shards` (complete shards), `num_shards`, `planned`, `shortfall`,
    `written` / `busy` (shard ids of this flow run), `complete`, `valid`, `fingerprint`.

    `fan_out` names a `produce-shards` deployment on a work pool (e.g. "produce-shards/maskmill"):
    the pending shards then go out in slices of `slice_shards` as child flow runs that the pool's
    workers take (flows/fanout.py), and `slices` in the summary says which worker ran which.
    Without it, this flow's own process writes every shard.
    """
    log = get_run_logger()
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)  # a bad config fails here, before any task
    run_dir = str(run_root(cfg))
    plan = RunPlan(cfg)
    num_shards = plan.num_shards
    considered_ids = list(range(num_shards)) if shard_ids is None else sorted(set(shard_ids))
    considered = len(considered_ids)

    pending = plan_run(config_path, overrides, shard_ids)
    log.info("%s: %d of %d shards to write", run_dir, len(pending), considered)
    planned = sum(plan.quota(s) for s in considered_ids)
    finished = [s for s in considered_ids if s not in pending]  # by planned samples, as the shard tasks report

    def percent_done() -> float:
        return _percent(sum(plan.quota(s) for s in finished), planned)

    progress_id = create_progress_artifact(
        progress=percent_done(), key=artifact_key(run_dir, "progress"),
        description=f"Planned samples of {run_dir} done ({considered} shards considered)")

    # Shard tasks read the run's frozen, resolved config.yaml (written by plan_run), not the
    # source file: editing configs/... while this run goes on cannot change it halfway.
    frozen = str(resolved_config_path(cfg))
    outcomes: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    slices: list[dict[str, Any]] = []
    if fan_out and pending:
        from flows.fanout import run_slices, split_slices

        def slice_done(run) -> None:
            finished.extend(run.shard_ids)
            outcomes.update({sid: {"status": "written"} for sid in run.shard_ids})
            update_progress_artifact(progress_id, progress=percent_done())

        report = run_slices(fan_out, frozen, split_slices(pending, slice_shards), on_done=slice_done,
                            log=log.info)
        slices = report.rows()
        for index, why in report.failed.items():
            failed.update({sid: why for sid in split_slices(pending, slice_shards)[index]})
    else:
        tags = task_tags()  # MASKMILL_TASK_TAGS=gpu: for a tag-based task concurrency limit
        produce = produce_shard_task.with_options(tags=tags) if tags else produce_shard_task
        progress_to = {"artifact_id": str(progress_id), "shard_ids": considered_ids}
        futures = produce.map(frozen, unmapped([]), pending, progress_to=unmapped(progress_to))
        shard_of = {id(f): sid for f, sid in zip(futures, pending)}
        for fut in as_completed(futures):
            sid = shard_of[id(fut)]
            try:
                outcomes[sid] = fut.result()
            except Exception as e:  # after its retries; the other shards still finish
                failed[sid] = f"{type(e).__name__}: {e}"
                log.error("shard %d failed: %s", sid, failed[sid])
                continue
            if outcomes[sid]["status"] in ("written", "complete"):
                finished.append(sid)
            update_progress_artifact(progress_id, progress=percent_done())

    summary = summarize_run(run_dir)
    this_run = {sid: o["status"] for sid, o in outcomes.items()}
    rows = [{**row, "this_run": this_run.get(row["shard_id"], "kept")} for row in summary["per_shard"]]
    if rows:
        create_table_artifact(table=rows, key=artifact_key(run_dir, "shards"),
                              description=f"Per-shard stats of {run_dir}")
    if failed:
        by_error: dict[str, list[int]] = {}
        for sid, err in sorted(failed.items()):
            by_error.setdefault(err, []).append(sid)
        listed = "; ".join(f"shards {ids}: {err}" for err, ids in by_error.items())
        raise RuntimeError(f"{len(failed)} shard(s) failed after retries ({listed}); rerun to redo them")

    valid, sheet, card = None, None, None
    if summary["complete"]:
        report = validate_run_task(run_dir)
        valid = report["ok"]
        if not valid:
            get_run_logger().error(report["summary"])
            raise RunInvalidError(report["problem"])
        sheet = write_preview(run_dir) if report["samples"] else None
        card = write_card(run_dir)
    result = {
        "run_dir": run_dir, "shards_dir": summary["shards_dir"], "contact_sheet": sheet, "card": card,
        "accepted": summary["accepted"], "rejected": summary["rejected"], "shards": summary["shards"],
        "num_shards": summary["num_shards"], "planned": summary["planned"], "shortfall": summary["shortfall"],
        "reasons": summary["reasons"], "complete": summary["complete"], "valid": valid,
        "fingerprint": summary["fingerprint"],
        "written": sorted(s for s, st in this_run.items() if st == "written"),
        "busy": sorted(s for s, st in this_run.items() if st == "busy"),
        "slices": slices,
    }
    create_markdown_artifact(
        key=artifact_key(run_dir, "summary"),
        markdown=(f"### maskmill run `{Path(run_dir).name}`\n\n"
                  f"- shards: `{result['shards_dir']}` ({result['shards']}/{result['num_shards']} complete)\n"
                  f"- samples: {result['accepted']} accepted, {result['rejected']} rejected "
                  f"(planned {result['planned']})\n"
                  f"- contact sheet: `{sheet}`\n- dataset card: `{card}`\n- written by this flow run: {result['written']}\n"),
        description="Where the shards and the contact sheet are")
    return result
