"""The dynamic batcher: requests from many threads share batches, each gets its own answer, errors reach all."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tl_embed.serve.batching import Batcher, BatcherClosed


class Recorder:
    """A fake runtime: the embedding of an image is its first pixel; records every batch size."""

    name = "fake"

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.sizes: list[int] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return batch[:, 0, 0, :1].astype(np.float32)


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_concurrent_requests_share_batches_and_get_their_own_results():
    run = Recorder(delay=0.02)
    batcher = Batcher(run, max_batch=8, max_wait=0.01)
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda v: batcher.embed(image(v), timeout=10), range(64)))
    finally:
        batcher.close()
    assert [float(r[0]) for r in results] == list(range(64))
    assert sum(run.sizes) == 64 and max(run.sizes) <= 8
    assert len(run.sizes) < 32  # shared: far fewer trips than requests
    assert batcher.batches == len(run.sizes) and batcher.images == 64


def test_a_lone_request_waits_only_max_wait():
    run = Recorder()
    batcher = Batcher(run, max_batch=8, max_wait=0.005)
    try:
        t = time.perf_counter()
        assert float(batcher.embed(image(7), timeout=5)[0]) == 7
        assert time.perf_counter() - t < 0.5
    finally:
        batcher.close()
    assert run.sizes == [1]


def test_a_failing_batch_fails_each_waiter_and_the_batcher_goes_on():
    run = Recorder(delay=0.01, fail=True)
    batcher = Batcher(run, max_batch=4, max_wait=0.01)
    try:
        futures = [batcher.submit(image(v)) for v in range(6)]
        for f in futures:
            with pytest.raises(RuntimeError, match="model exploded"):
                f.result(timeout=5)
        run.fail = False
        assert float(batcher.embed(image(3), timeout=5)[0]) == 3
    finally:
        batcher.close()


def test_close_fails_what_still_waits_and_refuses_new_work():
    gate = threading.Event()

    class Slow(Recorder):
        def __call__(self, batch):
            gate.wait(5)
            return super().__call__(batch)

    batcher = Batcher(Slow(), max_batch=1, max_wait=0.0)
    first = batcher.submit(image(1))
    time.sleep(0.05)  # the worker holds the first image
    waiting = batcher.submit(image(2))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.set()
    closer.join(5)
    assert float(first.result(timeout=5)[0]) == 1
    with pytest.raises(BatcherClosed):
        waiting.result(timeout=5)
    with pytest.raises(BatcherClosed):
        batcher.submit(image(3)).result(timeout=1)
