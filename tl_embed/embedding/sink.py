"""Where both engines' results go: one rule for what a decoded image becomes, one commit path, one report.

The local engine and the Ray engine differ only in where images are decoded and embedded; everything
that decides what the store holds afterwards lives here, so "the same store whichever engine" holds by
construction: a failure is recorded with its reason, a touched-but-unchanged file only gets its new size
and time, and anything else becomes a new row committed with its vector.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backbones import BackboneSpec
from .scan import ImageFile
from .store import EmbeddingStore, Failure, ManifestRow


@dataclass
class EmbedReport:
    """What one `embed` run did, for the user: counts, failures, speed, and the store it left."""

    store: Path
    spec: BackboneSpec | None
    embedded: int = 0
    unchanged: int = 0  # includes files whose mtime changed but content did not
    removed: int = 0
    failed: list[Failure] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # folders not read; their embeddings kept
    seconds: float = 0.0
    embed_seconds: float = 0.0  # decode + inference only, excluding model loading
    total: int = 0
    interrupted: bool = False
    runtime: str | None = None  # which runtime ran the model, when one was needed
    repaired: int = 0  # rows forgotten because their shard was lost (embedded again in this run)
    workers: set[str] = field(default_factory=set)  # ray engine: the actors (host:pid) that embedded images
    fidelity: str | None = None  # a reduced precision's closeness to fp32 on the user's images (quantize.py)

    def text(self) -> str:
        n = len(self.workers)
        on = f" on {n} Ray worker{'s' if n != 1 else ''}" if n else ""
        rate = (f" ({self.embedded / self.embed_seconds:.1f} images/s with the {self.runtime} runtime{on})"
                if self.embedded and self.embed_seconds else "")
        parts = [f"{self.embedded} embedded{rate}", f"{self.unchanged} unchanged (skipped)"]
        if self.removed:
            parts.append(f"{self.removed} removed (deleted from the folder)")
        parts.append(f"{len(self.failed)} failed")
        if self.repaired:
            parts.append(f"{self.repaired} lost to a damaged shard (forgotten, so embedded again)")
        head = "Interrupted: " if self.interrupted else "Done: "
        msg = (f"{head}{', '.join(parts)} in {self.seconds:.1f} s. Store {self.store} holds "
               f"{self.total} embeddings")
        msg += f" from {self.spec.describe()}." if self.spec else "."
        if self.fidelity:
            msg += f" {self.fidelity}."
        if self.interrupted:
            msg += " Everything committed so far is kept; run the same command again to continue."
        if self.failed:
            shown = "; ".join(f"{f.path}: {f.reason}" for f in self.failed[:10])
            more = f"; and {len(self.failed) - 10} more (`tl-embed info`)" if len(self.failed) > 10 else ""
            msg += f" Failed: {shown}{more}."
        if self.unreadable:
            shown = "; ".join(f"{k}: {v}" for k, v in list(self.unreadable.items())[:10])
            more = f"; and {len(self.unreadable) - 10} more" if len(self.unreadable) > 10 else ""
            msg += (f" Could not read {len(self.unreadable)} of its folders and links (anything the store holds "
                    f"under them is kept): {shown}{more}.")
        return msg


class StoreSink:
    """Sorts each decoded image into failed / touched / new, and commits them to the store with progress.

    Failures and touched files wait in the sink until :meth:`flush`, so they are committed together with
    the batch around them rather than one transaction per file.
    """

    def __init__(self, store: EmbeddingStore, todo: list[ImageFile], report: EmbedReport, progress: bool,
                 desc: str = "embedding"):
        from tqdm import tqdm

        self.store, self.report = store, report
        self.files = {f.rel: f for f in todo}
        self.previous = {f.rel: row for f in todo if (row := store.row_for(f.rel))}  # read once, not per commit
        self.failures: list[Failure] = []
        self.touched: list[tuple[str, int, int]] = []
        self.bar = tqdm(total=len(todo), unit="img", desc=desc, disable=not progress, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)

    def sort(self, f: ImageFile, reason: str = "", sha256: str = "", width: int = 0,
             height: int = 0) -> ManifestRow | None:
        """The row to embed for ``f``, or None when it failed (``reason``) or only its time changed."""
        old = self.previous.get(f.rel)
        if reason:
            self.failures.append(Failure(f.rel, reason, f.size, f.mtime_ns))
        elif old and old.sha256 == sha256 and (old.label, old.split) == (f.label, f.split):
            self.touched.append((f.rel, f.size, f.mtime_ns))  # touched, not changed
        else:
            return ManifestRow(f.rel, f.label, f.split, sha256, f.size, f.mtime_ns, width, height)
        return None

    def flush(self) -> None:
        """Commit the waiting failures and touched files, and count them."""
        if self.failures:
            self.store.record_failures(self.failures)
            self.report.failed.extend(self.failures)
        if self.touched:
            self.store.touch(self.touched)
            self.report.unchanged += len(self.touched)
        self.bar.update(len(self.failures) + len(self.touched))
        self.failures, self.touched = [], []

    def add(self, rows: list[ManifestRow], vectors: np.ndarray) -> None:
        """Commit new rows with their vectors (one store transaction)."""
        if rows:
            self.store.add(rows, vectors)
            self.report.embedded += len(rows)
            self.bar.update(len(rows))

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> StoreSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
