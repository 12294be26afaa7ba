"""One progress display for a whole run: a bar on a terminal, periodic one-line reports elsewhere.

    with RunProgress(total=512, name="shapes-demo") as progress:
        progress.update(8)             # samples done (accepted or rejected)

On a terminal (the stream is a TTY) it is one tqdm bar: samples done / planned, images per second,
ETA. Under a scheduler, a CI log or a pipe a bar would print as a wall of carriage returns, so it
prints a line instead every `every_seconds` and at each further 10 % of the run:

    progress shapes-demo: 64/512 samples (12 %), 3.1 images/s, ETA 0:02:24

Rejected samples are replaced by further indices of the same shard, so `total` grows when more
samples are done than were planned.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

PROGRESS_EVERY_SECONDS = 30.0  # a line at least this often when not on a terminal (and at each 10 %)
PROGRESS_STEPS = 10  # ... and a line at each further tenth of the run


def progress_line(name: str, done: int, total: int, seconds: float, initial: int = 0) -> str:
    """`progress NAME: done/total samples (p %), r images/s, ETA h:mm:ss` (ETA '?' before the first sample);
    the rate counts the samples done in `seconds`, i.e. beyond `initial`."""
    rate = (done - initial) / seconds if seconds > 0 else 0.0
    eta = str(timedelta(seconds=round((total - done) / rate))) if rate > 0 else "?"
    pct = 100.0 * done / total if total else 100.0
    return f"progress {name}: {done}/{total} samples ({pct:.0f} %), {rate:.1f} images/s, ETA {eta}"


class RunProgress:
    """Counts a run's samples; draws a bar on a TTY, prints `progress_line`s otherwise (see module doc)."""

    def __init__(self, total: int, name: str, enabled: bool = True, stream: TextIO | None = None,
                 every_seconds: float = PROGRESS_EVERY_SECONDS, clock=time.monotonic, initial: int = 0) -> None:
        """`initial`: samples already done when this display starts (a shard task of a run part-way through)."""
        self.total, self.name, self.done, self.initial = int(total), name, int(initial), int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds, self._clock = every_seconds, clock
        self._t0 = self._last_line = clock()
        self._next_step = 1  # the next step (of PROGRESS_STEPS) that prints a line; integers, no float drift
        self._skip_reached_steps()
        self._bar = None
        self._lines = enabled and not _is_tty(self.stream)
        if enabled and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, unit="img", desc=name, file=self.stream,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done > self.total:  # rejected samples are made up from further indices
            self.total = self.done
            if self._bar is not None:
                self._bar.total = self.total
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            now = self._clock()
            if self._step_reached() or now - self._last_line >= self.every_seconds:
                self._print(now)
                self._skip_reached_steps()

    def _step_reached(self) -> bool:
        return self._next_step <= PROGRESS_STEPS and self.done * PROGRESS_STEPS >= self._next_step * self.total

    def _skip_reached_steps(self) -> None:
        while self._step_reached():
            self._next_step += 1

    def note(self, text: str) -> None:
        """A short status beside the bar (e.g. the shard just finished); lines mode prints nothing extra."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _print(self, now: float) -> None:
        self._last_line = now
        print(progress_line(self.name, self.done, self.total, now - self._t0, self.initial), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:  # lines mode needs no closing line: the 100 % step printed one
            self._bar.close()
        self._bar = None

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
