"""Dynamic batching: concurrent one-image requests share one trip through the runtime (or the index).

Each request hands its pixels (or query vector) to :meth:`Batcher.submit` and gets a future.  One worker
thread takes the first waiting item, gathers whatever else arrives within ``max_wait`` seconds (up to
``max_batch``) and runs them as one batch; requests arriving while that batch runs form the next one.
At one client this adds at most ``max_wait`` to a request; under load, batches fill the runtime's
streams instead of queueing single images one by one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from ..embedding.runtime import Runtime


class BatcherClosed(RuntimeError):
    """The batcher was stopped; no more images are embedded."""


class Batcher:
    """Collects single items into small batches for ``run`` (a runtime, or a batched search), from any thread."""

    def __init__(self, run: Runtime | Callable[[np.ndarray], Sequence], max_batch: int = 8, max_wait: float = 0.002):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.batches = 0  # counters for /info and tests: how well requests are shared
        self.images = 0
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tl-embed-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        """Queue one item (an (S, S, 3) uint8 image); the future's result is its row of ``run``'s answer."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(BatcherClosed("the service is shutting down"))
            return fut
        self._queue.put((pixels, fut))
        return fut

    def embed(self, pixels: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Blocking :meth:`submit`."""
        return self.submit(pixels).result(timeout)

    def close(self) -> None:
        """Finish the batch in flight, fail the ones still waiting, stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(BatcherClosed("the service is shutting down"))

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None or self._closed:  # closing: what still waits is failed, not run
                if first is not None:
                    first[1].set_exception(BatcherClosed("the service is shutting down"))
                return
            batch = [first]
            deadline = time.perf_counter() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        live = [(p, f) for p, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            vectors = self.run(np.stack([p for p, _ in live]))
        except Exception as e:  # noqa: BLE001 - every waiter must hear of the failure, not hang
            for _, f in live:
                f.set_exception(e)
            return
        self.batches += 1
        self.images += len(live)
        for (_, f), v in zip(live, vectors, strict=True):
            f.set_result(v)
