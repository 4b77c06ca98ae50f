"""Decode image files in a thread pool, in order: what embedding a folder and embedding queries share.

Its own module so that embedding a few query images does not import the folder pipeline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .images import DecodedImage, ImageDecodeError, load_image
from .scan import ImageFile

Decoded = tuple[ImageFile, "DecodedImage | ImageDecodeError"]


def decode_in_order(todo: list[ImageFile], size: int, workers: int, lookahead: int) -> Iterator[Decoded]:
    """Decode in a thread pool (Pillow releases the GIL), in order, at most ``lookahead`` ahead."""

    def work(f: ImageFile) -> Decoded:
        try:
            return f, load_image(f.path, size)
        except ImageDecodeError as e:
            return f, e

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        it = iter(todo)
        try:
            for f in it:
                pending.append(pool.submit(work, f))
                if len(pending) >= lookahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
