"""Pipelines, loaded once per worker process and shared by the dataset and the prototype tasks."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from ..models import load_pipeline


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
    key = (model, scheduler, device or worker_device())
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            _PIPELINES[key] = WorkerPipeline(load_pipeline(model, scheduler, key[2]), threading.RLock())
            PIPELINE_LOADS["count"] += 1
        return _PIPELINES[key]


def clear_pipeline_cache() -> None:
    with _PIPELINES_LOCK:
        _PIPELINES.clear()
