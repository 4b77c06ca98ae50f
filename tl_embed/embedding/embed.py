"""Embed a folder: scan -> plan (new / changed / deleted) -> decode in parallel -> runtime -> store.

Resuming is just planning: committed images are unchanged on the next run, so a killed run continues
where its last committed batch ended.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StoreDamagedError, StoreError, StoreReadOnlyError, TlEmbedError
from .backbones import (
    BackboneSpec,
    LoadedBackbone,
    check_compatible,
    check_model_options,
    load_backbone,
)
from .images import DecodedImage, ImageDecodeError, load_image
from .runtime import Runtime, cpu_count, make_runtime, stream
from .scan import ImageFile, scan
from .store import MANIFEST, EmbeddingStore, Failure, ManifestRow


@dataclass
class Plan:
    """What a run must do to bring the store up to date with the folder."""

    todo: list[ImageFile]
    unchanged: int
    known_failures: list[Failure]  # failed before and not modified since: not retried
    deleted: list[str]


def plan(files: list[ImageFile], store: EmbeddingStore | None) -> Plan:
    if store is None:
        return Plan(list(files), 0, [], [])
    todo, unchanged, known = [], 0, []
    failures = {f.path: f for f in store.failures}
    for f in files:
        row = store.row_for(f.rel)
        if row and (row.size, row.mtime_ns, row.label, row.split) == (f.size, f.mtime_ns, f.label, f.split):
            unchanged += 1
        elif (fail := failures.get(f.rel)) and (fail.size, fail.mtime_ns) == (f.size, f.mtime_ns):
            known.append(fail)
        else:
            todo.append(f)
    present = {f.rel for f in files}
    deleted = [r.path for r in store.rows if r.path not in present]
    deleted += [p for p in failures if p not in present]
    return Plan(todo, unchanged, known, deleted)


@dataclass
class EmbedReport:
    store: Path
    spec: BackboneSpec | None
    embedded: int = 0
    unchanged: int = 0  # includes files whose mtime changed but content did not
    removed: int = 0
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0  # decode + inference only, excluding model loading
    total: int = 0
    interrupted: bool = False
    runtime: str | None = None  # which runtime ran the model, when one was needed
    repaired: int = 0  # rows forgotten because their shard was lost (embedded again in this run)

    def text(self) -> str:
        rate = (f" ({self.embedded / self.embed_seconds:.1f} images/s with the {self.runtime} runtime)"
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
        if self.interrupted:
            msg += " Everything committed so far is kept; run the same command again to continue."
        if self.failed:
            shown = "; ".join(f"{f.path}: {f.reason}" for f in self.failed[:10])
            more = f"; and {len(self.failed) - 10} more (`tl-embed info`)" if len(self.failed) > 10 else ""
            msg += f" Failed: {shown}{more}."
        return msg


def embed_folder(images: str | os.PathLike, out: str | os.PathLike, model: str = "mobilenet_v2",
                 weights: str = "imagenet", pooling: str = "avg", layer: str | None = None,
                 preprocess: str | None = None, dtype: str = "float32", batch_size: int = 64,
                 workers: int | None = None, runtime: str = "auto", progress: bool = True,
                 loader: Callable[..., LoadedBackbone] = load_backbone) -> EmbedReport:
    """Bring the store at ``out`` up to date with the image folder ``images``."""
    t0 = time.perf_counter()
    if batch_size < 1:
        raise TlEmbedError("--batch-size must be at least 1")
    if workers is not None and workers < 1:
        raise TlEmbedError("--workers must be at least 1")
    check_model_options(model, layer, preprocess)  # bad names and options fail before any scanning
    root = Path(images).expanduser().resolve()
    files = scan(root)
    out = Path(out)
    report = EmbedReport(out, None)
    store = _open_existing(out, report) if (out / MANIFEST).exists() else None
    try:
        if store is not None:
            report.spec = store.spec
            _check_same_source(store, root, model, pooling)
        p = plan(files, store)
        if store is not None and not store.writable and (p.todo or p.deleted):
            raise StoreReadOnlyError(f"store {out} is read-only, and {len(p.todo)} new or changed and "
                                     f"{len(p.deleted)} deleted image(s) would change it; copy it somewhere "
                                     "writable or use a new --out")
        report.unchanged, report.failed = p.unchanged, list(p.known_failures)
        if store is not None and p.deleted:
            report.removed = store.remove(p.deleted)
        if p.todo:
            backbone = loader(model, weights=weights, pooling=pooling, layer=layer, preprocess=preprocess)
            if store is None:
                if not files:
                    raise TlEmbedError(f"no images found under {root} "
                                       "(jpg, jpeg, png, bmp, gif, webp, tif, tiff)")
                store = EmbeddingStore.create(out, backbone.spec, dtype=dtype, root=root)
            else:
                check_compatible(store.spec, backbone.spec, f"store {out}")
            report.spec = backbone.spec
            run = make_runtime(backbone, runtime)
            report.runtime = run.name
            t_embed = time.perf_counter()
            try:
                _embed_files(p.todo, store, run, backbone.spec.input_size, batch_size,
                             workers or cpu_count(), report, progress)
            except KeyboardInterrupt:
                report.interrupted = True
            report.embed_seconds = time.perf_counter() - t_embed
        elif store is None:
            raise TlEmbedError(f"no images found under {root} (jpg, jpeg, png, bmp, gif, webp, tif, tiff)")
        if not report.interrupted and store.writable:
            store.compact()
        store.refresh()
        report.total = len(store)
    finally:
        if store is not None:
            store.close()
    report.seconds = time.perf_counter() - t0
    return report


def _open_existing(out: Path, report: EmbedReport) -> EmbeddingStore:
    """The store as its writer; mended first if shards were lost; read-only if it lies on read-only media."""
    try:
        return EmbeddingStore.open(out, "a")
    except StoreReadOnlyError:
        return EmbeddingStore.open(out, "r")  # fine while there is nothing to change
    except StoreDamagedError as e:
        if not e.repairable:
            raise
    report.repaired = EmbeddingStore.repair(out)
    return EmbeddingStore.open(out, "a")


def _check_same_source(store: EmbeddingStore, root: Path, model: str, pooling: str) -> None:
    """Cheap checks before loading any model: same image folder, same backbone name and pooling."""
    if store.root and store.root != root:
        raise StoreError(f"store {store.path} holds images from {store.root}, not {root}; "
                         "use a new --out for another folder")
    if Path(model).name != store.spec.name and model.lower().replace("-", "_") != store.spec.name:
        raise StoreError(f"store {store.path} was made with {store.spec.describe()}; "
                         f"adding --model {model} would mix backbones (use a new --out)")
    if pooling != store.spec.pooling:
        raise StoreError(f"store {store.path} uses {store.spec.pooling} pooling, not {pooling}")


_Result = tuple[ImageFile, "DecodedImage | ImageDecodeError"]


def decode_in_order(todo: list[ImageFile], size: int, workers: int, lookahead: int) -> Iterator[_Result]:
    """Decode in a thread pool (Pillow releases the GIL), in order, at most ``lookahead`` ahead."""

    def work(f: ImageFile) -> _Result:
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


def _embed_files(todo: list[ImageFile], store: EmbeddingStore, run: Runtime, size: int, batch_size: int,
                 workers: int, report: EmbedReport, progress: bool) -> None:
    """Decode -> batch -> runtime -> store; each batch is committed as soon as its vectors are back."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc="embedding", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    failures: list[Failure] = []
    touched: list[tuple[str, int, int]] = []

    def record_skipped() -> None:
        """Failures and touched-but-unchanged files, committed together rather than one by one."""
        if failures:
            store.record_failures(failures)
            report.failed.extend(failures)
        if touched:
            store.touch(touched)
            report.unchanged += len(touched)
        bar.update(len(failures) + len(touched))
        failures.clear(), touched.clear()

    def batches() -> Iterator[tuple[list[ManifestRow], np.ndarray]]:
        pixels: list[np.ndarray] = []
        rows: list[ManifestRow] = []
        for f, result in decode_in_order(todo, size, workers, lookahead=2 * batch_size):
            if isinstance(result, ImageDecodeError):
                failures.append(Failure(f.rel, result.reason, f.size, f.mtime_ns))
                continue
            old = store.row_for(f.rel)
            if old and old.sha256 == result.sha256 and (old.label, old.split) == (f.label, f.split):
                touched.append((f.rel, f.size, f.mtime_ns))  # touched, not changed
                continue
            pixels.append(result.pixels)
            rows.append(ManifestRow(f.rel, f.label, f.split, result.sha256, f.size, f.mtime_ns,
                                    result.width, result.height))
            if len(rows) >= batch_size:
                record_skipped()
                yield rows, np.stack(pixels)
                pixels, rows = [], []
        record_skipped()
        if rows:
            yield rows, np.stack(pixels)

    try:
        for rows, vectors in stream(run, batches()):
            store.add(rows, vectors)
            report.embedded += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
