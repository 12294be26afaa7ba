"""Finishing tasks: validate the shards, draw the contact sheet, summarise the stats."""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from maskmill.card import write_dataset_card
from maskmill.run import summary as run_summary
from maskmill.shards.validate import invalid_run_message, validate_run


@task(name="validate-run", cache_policy=NO_CACHE)
def validate_run_task(run_dir: str) -> dict[str, Any]:
    """Read every shard of `run_dir` to its end; {"ok", "samples", "records", "rejected", "summary", "errors",
    "problem"} (`problem`: one line when it does not validate)."""
    report = validate_run(run_dir)
    return {"ok": report.ok, "samples": report.samples, "records": report.records, "rejected": report.rejected,
            "summary": report.summary(), "errors": report.errors[:20],
            "problem": None if report.ok else invalid_run_message(run_dir, report)}


@task(name="write-preview", cache_policy=NO_CACHE)
def write_preview(run_dir: str, max_samples: int = 64) -> str:
    """Write `run_dir/contact_sheet.png` (images with mask overlays and class names); returns its path or URL."""
    return str(run_summary.write_contact_sheet(run_dir, max_samples=max_samples))


@task(name="write-card", cache_policy=NO_CACHE)
def write_card(run_dir: str) -> str:
    """Write `run_dir/README.md`, the run's dataset card (maskmill.card); returns its path."""
    return str(write_dataset_card(run_dir))


@task(name="summarize-run", cache_policy=NO_CACHE)
def summarize_run(run_dir: str) -> dict[str, Any]:
    """Totals and per-shard rows from the completed shards' stats files (see maskmill.run.summary.summarize_run)."""
    return run_summary.summarize_run(run_dir)
