"""Where a shard's wall time goes: generation, capture + extraction, encoding, writing.

    clock = StageClock()                 # started when the shard starts
    with clock.timed("encoding"): ...    # any thread may add to any stage
    clock.split(wall)                    # -> the stats' `time_split`

Stages are wall seconds on the thread doing them. When generation runs on its own thread
beside the rest (produce.judged_samples with overlap), the parts add up to more than the wall
time; `overlapped` is that excess, measured as the generator's busy time minus the time the
rest waited for it. So always:

    generation + capture_extraction + encoding + writing - overlapped + other == seconds

with `other` what is left (planning, bookkeeping, the stats file), small.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

STAGES = ("generation", "capture_extraction", "encoding", "writing")


class StageClock:
    """Seconds per stage of one shard, thread-safe; `waiting` is the consumer's wait for generation."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.busy_generating = 0.0  # generation + capture, on the generating thread
        self.waiting = 0.0  # the extracting/writing thread blocked on the generator
        self.overlapped_run = False
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def add_generation(self, seconds: float, capture_seconds: float) -> None:
        """One batch's generation call, of which `capture_seconds` recorded attention."""
        with self._lock:
            self.seconds["generation"] += seconds - capture_seconds
            self.seconds["capture_extraction"] += capture_seconds
            self.busy_generating += seconds

    def add_wait(self, seconds: float) -> None:
        with self._lock:
            self.waiting += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def split(self, wall: float) -> dict[str, float]:
        """The stats' time split of a shard that took `wall` seconds (see the module docstring)."""
        with self._lock:
            parts = dict(self.seconds)
            overlapped = max(0.0, self.busy_generating - self.waiting) if self.overlapped_run else 0.0
        parts["overlapped"] = overlapped
        parts["other"] = wall - (sum(parts[s] for s in STAGES) - overlapped)
        return {k: round(v, 6) for k, v in parts.items()}
