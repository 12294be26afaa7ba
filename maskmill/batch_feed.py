"""Generated batches, one batch ahead: the generator works on batch k+1 while batch k is judged and written.

    feed = BatchFeed(make_batch, budget, ahead=True)
    for batch in feed:            # the consumer's thread: extract, judge, encode, write
        for sample in batch: ...; budget.judged(accepted)
    feed.close()                  # also on errors: stops and joins the generating thread

`make_batch(size)` generates a batch of `size` candidates (None when the candidates are used up).
Which size, and whether to generate at all, is the `Budget`'s answer, which it gives only when
it is certain: the batch the serial loop would generate next depends on how many samples are
still missing, so a batch is started ahead only while, even if every sample not yet judged were
accepted, at least a full batch would still be missing. Otherwise the generator waits for the
verdicts. The batches, and so the output bytes, are the serial loop's.

Memory: at most two batches of maps exist (the one being judged and the one being generated):
a batch's slot is released when the consumer asks for the next batch.
"""
from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

B = TypeVar("B")

_DONE = object()


class Budget:
    """Samples still missing and samples generated but not yet judged, shared by both threads."""

    def __init__(self, need: int, batch_size: int):
        self.need = need
        self.batch_size = batch_size
        self.pending = 0
        self.stopped = False
        self._cond = threading.Condition()

    def next_size(self) -> int:
        """The serial loop's next batch size (0: no more batches); waits until the verdicts decide it."""
        with self._cond:
            while not self.stopped:
                if self.pending == 0:
                    size = max(0, min(self.batch_size, self.need))
                    break
                if self.need - self.pending >= self.batch_size:
                    size = self.batch_size  # a full batch is missing whatever the pending verdicts
                    break
                self._cond.wait()
            else:
                return 0
            self.pending += size
            return size

    def took(self, asked: int, got: int) -> None:
        """The candidates ran out: only `got` of the `asked` samples were generated."""
        if got < asked:
            with self._cond:
                self.pending -= asked - got
                self._cond.notify_all()

    def judged(self, accepted: bool) -> None:
        with self._cond:
            self.pending -= 1
            self.need -= int(accepted)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


class BatchFeed(Generic[B]):
    """Iterates over generated batches; with `ahead`, they are generated on a thread of their own.

    on_wait(seconds): told how long the consumer waited for each batch (time not hidden by overlap).
    """

    def __init__(self, make_batch: Callable[[int], B | None], budget: Budget, ahead: bool = True,
                 on_wait: Callable[[float], None] | None = None):
        self.make_batch = make_batch
        self.budget = budget
        self.ahead = ahead
        self.on_wait = on_wait
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots, not by its size
        self._slots = threading.Semaphore(2)
        self._thread: threading.Thread | None = None
        self._holding = False

    def __iter__(self) -> Iterator[B]:
        if not self.ahead:
            while (batch := self._next_batch()) is not None:
                yield batch
            return
        # the generating thread sees this thread's context variables (e.g. Prefect's run context for the gate)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._generate,),
                                        name="maskmill-generate", daemon=True)
        self._thread.start()
        while True:
            self._release()
            started = time.perf_counter()
            item = self._queue.get()
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - started)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            self._holding = True
            yield item

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._slots.release()

    def _next_batch(self) -> B | None:
        size = self.budget.next_size()
        if not size:
            return None
        batch = self.make_batch(size)
        self.budget.took(size, 0 if batch is None else len(batch))
        return batch

    def _generate(self) -> None:
        try:
            while True:
                self._slots.acquire()
                batch = self._next_batch()
                if batch is None:
                    break
                self._queue.put(batch)
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(_Failure(e))
            return
        self._queue.put(_DONE)

    def close(self) -> None:
        """Stop generating (the batch under way is finished) and wait for the thread."""
        self.budget.stop()
        if self._thread is None:
            return
        self._slots.release()  # a generator waiting for a slot wakes, sees the stop and ends
        self._thread.join()
        self._thread = None
        while not self._queue.empty():  # drop the maps of batches nobody will judge
            self._queue.get_nowait()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
