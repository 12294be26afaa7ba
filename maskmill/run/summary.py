"""Finishing a run: counts over its completed shards, validation, the contact sheet and the dataset card."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..card import write_dataset_card
from ..preview import contact_sheet
from ..shards.layout import RunLayout
from ..shards.validate import invalid_run_message, validate_run
from .claim import shard_row
from .folder import read_run_info

CONTACT_SHEET = "contact_sheet.png"


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Counts over the run's completed shards (their stats files), and what is still missing."""
    layout = RunLayout(run_dir)
    info = read_run_info(layout.location) or {}
    rows, reasons = [], {}
    for sid in layout.completed_shards():
        stats = layout.read_stats(sid)
        rows.append(shard_row(stats))
        for r, n in stats.reasons.items():
            reasons[r] = reasons.get(r, 0) + n
    num_shards = info.get("num_shards")
    accepted = sum(r["accepted"] for r in rows)
    planned = info.get("total_samples")
    return {
        "run_dir": str(layout.location),
        "shards_dir": str(layout.location_of(layout.shards_dir)),
        "manifests_dir": str(layout.location_of(layout.manifests_dir)),
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


def write_contact_sheet(run_dir: str | os.PathLike, max_samples: int = 64) -> Path | str:
    """Draw the run's contact sheet into the run (folder or URL); returns where it went."""
    layout = RunLayout(run_dir)
    return contact_sheet(run_dir, layout.location_of(layout.root / CONTACT_SHEET), max_samples=max_samples)


def finalize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate a complete run, draw its contact sheet and write its dataset card (README.md):
    {"valid", "validation", "contact_sheet", "card", "problem"} (sheet and card None, and `problem`
    one line for the user, when it does not validate)."""
    report = validate_run(run_dir)
    sheet = str(write_contact_sheet(run_dir)) if report.ok and report.samples else None
    card = str(write_dataset_card(run_dir)) if report.ok else None
    return {"valid": report.ok, "validation": report.summary(), "contact_sheet": sheet, "card": card,
            "problem": None if report.ok else invalid_run_message(run_dir, report)}
