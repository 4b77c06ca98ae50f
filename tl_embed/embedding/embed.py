"""Embed a folder: scan -> plan (new / changed / deleted) -> decode in parallel -> runtime -> store.

Resuming is just planning: committed images are unchanged on the next run, so a killed run continues
where its last committed batch ended. Planning never trusts an absence blindly: images under folders
the scan could not read are kept, and a run that would drop a large share of the store is refused
unless the user says ``prune``.
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

from ..cpus import cpu_count
from ..errors import StoreDamagedError, StoreError, StoreReadOnlyError, TlEmbedError
from ..wording import count
from .backbones import (
    BackboneSpec,
    LoadedBackbone,
    check_compatible,
    check_model_options,
    load_backbone,
)
from .images import DecodedImage, ImageDecodeError, load_image
from .ray_engine import RayOptions, embed_with_ray
from .runtime import Runtime, make_runtime, stream
from .scan import ImageFile, Scan, is_utf8, scan
from .store import MANIFEST, EmbeddingStore, Failure, ManifestRow
from .tta import backbone_with_tta, check_tta, with_tta

PRUNE_FREE = 10  # removals always allowed without --prune (a few deleted photos) ...
PRUNE_SHARE = 0.10  # ... and any removal up to this share of the store; but never all of it
ENGINES = ("local", "ray")
FORMATS = "jpg, jpeg, png, bmp, gif, webp, tif, tiff"


@dataclass
class Plan:
    """What a run must do to bring the store up to date with the folder."""

    todo: list[ImageFile]
    unchanged: int
    known_failures: list[Failure]  # failed before and not modified since: not retried
    new_failures: list[Failure]  # found broken by the scan (links, pipes, names): recorded, not decoded
    deleted: list[str]  # images and failure records gone from the folder
    lost: int = 0  # embeddings this run would drop: deleted images, and embedded ones now broken


def plan(found: Scan, store: EmbeddingStore | None) -> Plan:
    if store is None:
        return Plan(list(found.files), 0, [], list(found.failures), [])
    todo, unchanged, known, new = [], 0, [], []
    failures = {f.path: f for f in store.failures}
    for f in found.files:
        row = store.row_for(f.rel)
        if row and (row.size, row.mtime_ns, row.label, row.split) == (f.size, f.mtime_ns, f.label, f.split):
            unchanged += 1
        elif (fail := failures.get(f.rel)) and (fail.size, fail.mtime_ns) == (f.size, f.mtime_ns):
            known.append(fail)
        else:
            todo.append(f)
    for f in found.failures:
        if (old := failures.get(f.path)) and (old.size, old.mtime_ns) == (f.size, f.mtime_ns):
            known.append(old)
        else:
            new.append(f)
    present = {f.rel for f in found.files} | {f.path for f in found.failures}
    gone = [r.path for r in store.rows if r.path not in present and not found.under_unreadable(r.path)]
    gone_failures = [p for p in failures if p not in present and not found.under_unreadable(p)]
    lost = len(gone) + sum(store.row_for(f.path) is not None for f in new)
    return Plan(todo, unchanged, known, new, gone + gone_failures, lost)


def check_prune(store: EmbeddingStore, p: Plan, root: Path) -> None:
    """Refuse to drop much of a store at once: an unmounted, emptied or half-copied folder looks like that."""
    total = len(store)
    if p.lost and (p.lost == total or (p.lost > PRUNE_FREE and p.lost > PRUNE_SHARE * total)):
        raise TlEmbedError(f"this run would remove {p.lost} of the {total} embeddings in {store.path} "
                           f"(their images are gone from {root} or no longer readable); nothing was changed. "
                           "If the folder is complete and mounted, run again with --prune to remove them")


@dataclass
class EmbedReport:
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

    def record_skipped(self, store: EmbeddingStore, failures: list[Failure],
                       touched: list[tuple[str, int, int]]) -> None:
        """Commit a batch's failures and touched-but-unchanged files together, and count them (both engines)."""
        if failures:
            store.record_failures(failures)
            self.failed.extend(failures)
        if touched:
            store.touch(touched)
            self.unchanged += len(touched)

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


def embed_folder(images: str | os.PathLike, out: str | os.PathLike, model: str = "mobilenet_v2",
                 weights: str = "imagenet", pooling: str = "avg", layer: str | None = None,
                 preprocess: str | None = None, dtype: str = "float32", batch_size: int = 64,
                 workers: int | None = None, runtime: str = "auto", progress: bool = True,
                 loader: Callable[..., LoadedBackbone] = load_backbone, prune: bool = False,
                 engine: str = "local", ray: RayOptions | None = None, tta: str = "none") -> EmbedReport:
    """Bring the store at ``out`` up to date with the image folder ``images``.

    ``engine="ray"`` embeds on Ray actors (``ray`` says where and how many) with the same results.
    ``tta="flip"`` stores the mean of each image's and its mirror's embeddings (see :mod:`.tta`); a store
    holds one setting, so updating it with another is refused.

    ``prune`` allows removing more than :data:`PRUNE_FREE` and :data:`PRUNE_SHARE` of the store (or all
    of it) when images are gone; without it such a run is refused before anything changes.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise TlEmbedError("--batch-size must be at least 1")
    if workers is not None and workers < 1:
        raise TlEmbedError("--workers must be at least 1")
    if engine not in ENGINES:
        raise TlEmbedError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    check_tta(tta)
    check_model_options(model, layer, preprocess)  # bad names and options fail before any scanning
    root = Path(images).expanduser().resolve()
    out = Path(out)
    exists = (out / MANIFEST).exists()
    _check_root(root, out if exists else None)
    found = scan(root)
    report = EmbedReport(out, None, unreadable=dict(found.unreadable))
    store = _open_existing(out, report) if exists else None
    try:
        if store is not None:
            report.spec = store.spec
            _check_same_source(store, root, model, pooling, tta)
        p = plan(found, store)
        if store is None and not p.todo:
            raise TlEmbedError(_nothing_found(root, found))
        if store is not None and not prune:
            check_prune(store, p, root)
        if store is not None and not store.writable and (p.todo or p.deleted or p.new_failures):
            raise StoreReadOnlyError(f"store {out} is read-only, and {len(p.todo)} new or changed and "
                                     f"{count(len(p.deleted), 'deleted image')} would change it; copy it somewhere "
                                     "writable or use a new --out")
        report.unchanged, report.failed = p.unchanged, list(p.known_failures)
        if store is not None and p.deleted:
            report.removed = store.remove(p.deleted)
        backbone = None
        if p.todo:
            backbone = backbone_with_tta(
                loader(model, weights=weights, pooling=pooling, layer=layer, preprocess=preprocess), tta)
            if store is None:
                store = EmbeddingStore.create(out, backbone.spec, dtype=dtype, root=root)
            else:
                check_compatible(store.spec, backbone.spec, f"store {out}")
        if p.new_failures:
            store.record_failures(p.new_failures)
            report.failed.extend(p.new_failures)
        if backbone is not None:
            if engine == "ray":
                _run_ray(p.todo, store, backbone, runtime, batch_size, ray or RayOptions(workers=workers), report,
                         progress)
            else:
                _run(p.todo, store, backbone, runtime, batch_size, workers, report, progress)
        if not report.interrupted and store.writable:
            store.consolidate()
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


def _check_root(root: Path, store: Path | None) -> None:
    """A missing folder is an error, never "every image was deleted"; its path must fit the manifest."""
    if not root.is_dir():
        kept = f"; store {store} was not changed" if store else ""
        raise TlEmbedError(f"image folder {root} does not exist or is not a folder "
                           f"(moved, renamed or not mounted?){kept}")
    if not is_utf8(str(root)):
        raise TlEmbedError(f"the image folder's path {root} is not valid UTF-8; rename it")


def _nothing_found(root: Path, found: Scan) -> str:
    msg = f"no images found under {root} ({FORMATS})"
    if found.failures:
        f = found.failures[0]
        msg += f"; {len(found.failures)} could not be read, e.g. {f.path}: {f.reason}"
    return msg


def _run(todo: list[ImageFile], store: EmbeddingStore, backbone: LoadedBackbone, runtime: str, batch_size: int,
         workers: int | None, report: EmbedReport, progress: bool) -> None:
    """Embed ``todo`` into ``store``; Ctrl-C ends the run early, keeping every committed batch."""
    report.spec = backbone.spec
    run = with_tta(make_runtime(backbone, runtime), backbone.spec.tta)
    report.runtime = run.name
    t_embed = time.perf_counter()
    try:
        _embed_files(todo, store, run, backbone.spec.input_size, batch_size, workers or cpu_count(), report,
                     progress)
    except KeyboardInterrupt:
        report.interrupted = True
    report.embed_seconds = time.perf_counter() - t_embed


def _run_ray(todo: list[ImageFile], store: EmbeddingStore, backbone: LoadedBackbone, runtime: str,
             batch_size: int, options: RayOptions, report: EmbedReport, progress: bool) -> None:
    report.spec = backbone.spec
    embed_with_ray(todo, store, backbone, runtime, batch_size, options, report, progress)


def _check_same_source(store: EmbeddingStore, root: Path, model: str, pooling: str, tta: str) -> None:
    """Cheap checks before loading any model: same image folder, backbone name, pooling and TTA."""
    if store.root and store.root != root:
        raise StoreError(f"store {store.path} holds images from {store.root}, not {root}; "
                         "use a new --out for another folder")
    if Path(model).name != store.spec.name and model.lower().replace("-", "_") != store.spec.name:
        raise StoreError(f"store {store.path} was made with {store.spec.describe()}; "
                         f"adding --model {model} would mix backbones (use a new --out)")
    if pooling != store.spec.pooling:
        raise StoreError(f"store {store.path} uses {store.spec.pooling} pooling, not {pooling}")
    if tta != store.spec.tta:
        raise StoreError(f"store {store.path} was embedded with --tta {store.spec.tta}, not --tta {tta}; "
                         f"update it with --tta {store.spec.tta}, or use a new --out (settings are never mixed)")


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
    previous = {f.rel: row for f in todo if (row := store.row_for(f.rel))}  # read once, not after every commit

    def record_skipped() -> None:
        report.record_skipped(store, failures, touched)
        bar.update(len(failures) + len(touched))
        failures.clear(), touched.clear()

    def batches() -> Iterator[tuple[list[ManifestRow], np.ndarray]]:
        pixels: list[np.ndarray] = []
        rows: list[ManifestRow] = []
        for f, result in decode_in_order(todo, size, workers, lookahead=2 * batch_size):
            if isinstance(result, ImageDecodeError):
                failures.append(Failure(f.rel, result.reason, f.size, f.mtime_ns))
                continue
            old = previous.get(f.rel)
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
