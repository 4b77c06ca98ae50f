"""Embed a folder: scan -> plan (new / changed / deleted) -> decode in parallel -> runtime -> store.

Resuming is just planning: committed images are unchanged on the next run, so a killed run continues
where its last committed batch ended. Planning never trusts an absence blindly: images under folders
the scan could not read are kept, and a run that would drop a large share of the store is refused
unless the user says ``prune``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..cpus import cpu_count
from ..errors import StoreDamagedError, StoreError, StoreReadOnlyError, TlEmbedError
from ..wording import count
from . import carried, recipes
from .backbones import (
    BackboneSpec,
    LoadedBackbone,
    check_compatible,
    check_model_options,
    is_custom_model,
    load_backbone,
    sha256_file,
)
from .decode import decode_in_order
from .images import ImageDecodeError
from .pooling import check_scales
from .precision import check_precision, require_runnable
from .ray_engine import RayOptions, embed_with_ray
from .runtime import OpenVINORuntime, Runtime, check_runtime, load_or_convert, make_runtime, read_cached, stream
from .scan import ImageFile, Scan, is_utf8, scan
from .sink import EmbedReport, StoreSink
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


def embed_folder(images: str | os.PathLike, out: str | os.PathLike, model: str = "mobilenet_v2",
                 weights: str = "imagenet", pooling: str = "avg", layer: str | None = None,
                 preprocess: str | None = None, dtype: str = "float32", batch_size: int = 64,
                 workers: int | None = None, runtime: str = "auto", progress: bool = True,
                 loader: Callable[..., LoadedBackbone] = load_backbone, prune: bool = False,
                 engine: str = "local", ray: RayOptions | None = None, tta: str = "none",
                 precision: str = "auto", scales: str = "1") -> EmbedReport:
    """Bring the store at ``out`` up to date with the image folder ``images``.

    ``engine="ray"`` embeds on Ray actors (``ray`` says where and how many) with the same results.
    ``tta="flip"`` stores the mean of each image's and its mirror's embeddings (see :mod:`.tta`); a store
    holds one setting, so updating it with another is refused.  ``scales`` (multi-scale descriptors, see
    :mod:`.pooling`) and ``precision`` likewise (see :mod:`.precision`): ``int8`` quantizes the backbone on
    a sample of the folder and the store carries that model; ``auto`` is the store's own precision when
    updating one.

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
    scales = check_scales(scales)
    asked = None if precision.strip().lower() == "auto" else check_precision(precision)
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
            _check_same_source(store, root, model, pooling, tta, asked or store.spec.precision, scales)
            carried.install(store.spec, carried.read_files(out / carried.FOLDER), f"store {out}")
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
        if p.todo:
            require_runnable(store.spec.precision if store is not None else asked or check_precision("auto"))
        backbone, cached, ov_model = None, None, None
        options = recipes.BackboneOptions(model, weights, pooling, layer, preprocess, scales)
        if p.todo and engine == "local" and loader is load_backbone and check_runtime(runtime) != "keras":
            if store is not None:
                cached = _cached_runtime(store.spec, model, weights, layer, preprocess)
            elif (spec := _recalled(options, tta, asked)) and (cached := _from_cache(spec)):
                store = EmbeddingStore.create(out, spec, dtype=dtype, root=root)
        if p.todo and cached is None:
            loaded = loader(model, weights=weights, pooling=pooling, layer=layer, preprocess=preprocess, scales=scales)
            if loader is load_backbone:
                recipes.remember(options, loaded)
            backbone = backbone_with_tta(loaded, tta)
            if store is None:
                backbone, ov_model, files = _reduce(backbone, asked or check_precision("auto"), p.todo, runtime,
                                                    report, progress)
                store = EmbeddingStore.create(out, backbone.spec, dtype=dtype, root=root, carry=files)
            else:
                backbone = LoadedBackbone(backbone.model, replace(
                    backbone.spec, precision=store.spec.precision, model_sha256=store.spec.model_sha256))
                check_compatible(store.spec, backbone.spec, f"store {out}")
                ov_model = read_cached(store.spec) if store.spec.model_sha256 else None
        if p.new_failures:
            store.record_failures(p.new_failures)
            report.failed.extend(p.new_failures)
        if p.todo:
            report.spec = store.spec
            desc = "embedding (ray)" if engine == "ray" else "embedding"
            with StoreSink(store, p.todo, report, progress, desc) as sink:
                if engine == "ray":
                    embed_with_ray(p.todo, sink, backbone, runtime, batch_size, ray or RayOptions(workers=workers),
                                   ov_model)
                else:
                    run = cached or with_tta(make_runtime(backbone, runtime, model=ov_model), backbone.spec.tta)
                    _run(p.todo, sink, run, store.spec.input_size, batch_size, workers)
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


def _cached_runtime(spec: BackboneSpec, model: str, weights: str, layer: str | None,
                    preprocess: str | None) -> Runtime | None:
    """The store's own converted model from the cache, when the options name exactly that model.

    Adding images to a store needs no TensorFlow import and no Keras build when its backbone's OpenVINO
    IR is cached (any earlier run made it): the IR is keyed by everything that makes the embedding, so it
    computes the store's function.  The files the options name are hashed and compared with the store's
    record, so a changed model or weights file is rebuilt (and refused) as before.
    """
    if is_custom_model(model):
        same = (Path(model).is_file() and sha256_file(model) == spec.weights_sha256 and layer == spec.layer
                and preprocess in (None, spec.preprocessing))
    else:
        same = weights == spec.weights and (weights in ("imagenet", "none")
                                            or sha256_file(weights) == spec.weights_sha256)
    return _from_cache(spec) if same else None


def _recalled(options: recipes.BackboneOptions, tta: str, precision: str | None) -> BackboneSpec | None:
    """A new store's spec without building its backbone: the recipe's (:mod:`.recipes`), with these settings.

    Not for int8: its model is quantized on this folder's images, so it is made anew for every store.
    """
    precision = precision or check_precision("auto")
    spec = recipes.recall(options) if precision != "int8" else None
    return replace(spec, tta=tta, precision=precision) if spec else None


def _from_cache(spec: BackboneSpec) -> Runtime | None:
    """The runtime of ``spec`` from its cached IR (no TensorFlow), or None when it is not cached."""
    try:
        run = OpenVINORuntime.from_cache(spec)
    except ImportError:
        return None
    return with_tta(run, spec.tta) if run is not None else None


def _run(todo: list[ImageFile], sink: StoreSink, run: Runtime, size: int, batch_size: int,
         workers: int | None) -> None:
    """Embed ``todo`` into the sink's store; Ctrl-C ends the run early, keeping every committed batch."""
    sink.report.runtime = run.name
    t_embed = time.perf_counter()
    try:
        _embed_files(todo, sink, run, size, batch_size, workers or cpu_count())
    except KeyboardInterrupt:
        sink.report.interrupted = True
    sink.report.embed_seconds = time.perf_counter() - t_embed


def _reduce(backbone: LoadedBackbone, precision: str, todo: list[ImageFile], runtime: str,
            report: EmbedReport, progress: bool) -> tuple[LoadedBackbone, object, dict[str, bytes] | None]:
    """A new store's backbone in ``precision``: (backbone, OpenVINO model to run or None, files to carry or None).

    int8 quantizes the fp32 model on a sample of ``todo`` and measures it against fp32 on others
    (:mod:`.quantize`); the quantized model is installed in the cache, and read back from there, so the
    store is embedded by exactly the bytes it carries.
    """
    if precision == "fp32":
        return backbone, None, None
    if check_runtime(runtime) == "keras":
        raise TlEmbedError(f"--precision {precision} runs on the openvino runtime; drop --runtime keras")
    spec = replace(backbone.spec, precision=precision)
    if precision == "bf16":
        return LoadedBackbone(backbone.model, spec), None, None
    from .quantize import decode_pixels, fidelity, quantize, split_sample

    fp32_model = load_or_convert(backbone)
    calibration, check = split_sample(todo)
    quantized = quantize(fp32_model, decode_pixels(calibration, spec.input_size), progress)
    files = carried.model_files(quantized)
    spec = replace(spec, model_sha256=carried.files_sha256(files))
    carried.install(spec, files, "the new store")
    int8 = LoadedBackbone(backbone.model, spec)
    model = read_cached(spec)
    pixels = decode_pixels(check, spec.input_size)
    if len(pixels):
        ref = with_tta(OpenVINORuntime(backbone, model=fp32_model), spec.tta)(pixels)
        report.fidelity = fidelity(with_tta(OpenVINORuntime(int8, model=model), spec.tta)(pixels), ref).text()
    return int8, model, files


def _check_same_source(store: EmbeddingStore, root: Path, model: str, pooling: str, tta: str,
                       precision: str, scales: str) -> None:
    """Cheap checks before loading any model: same image folder, backbone name, pooling, scales, TTA, precision."""
    if store.root and store.root != root:
        raise StoreError(f"store {store.path} holds images from {store.root}, not {root}; "
                         "use a new --out for another folder")
    if Path(model).name != store.spec.name and model.lower().replace("-", "_") != store.spec.name:
        raise StoreError(f"store {store.path} was made with {store.spec.describe()}; "
                         f"adding --model {model} would mix backbones (use a new --out)")
    if pooling != store.spec.pooling:
        raise StoreError(f"store {store.path} uses {store.spec.pooling} pooling, not {pooling}")
    if scales != store.spec.scales:
        raise StoreError(f"store {store.path} was embedded with --scales {store.spec.scales}, not --scales {scales}; "
                         f"update it with --scales {store.spec.scales}, or use a new --out (settings are never mixed)")
    if tta != store.spec.tta:
        raise StoreError(f"store {store.path} was embedded with --tta {store.spec.tta}, not --tta {tta}; "
                         f"update it with --tta {store.spec.tta}, or use a new --out (settings are never mixed)")
    if precision != store.spec.precision:
        raise StoreError(f"store {store.path} was embedded with --precision {store.spec.precision}, not "
                         f"--precision {precision}; update it with --precision {store.spec.precision} (or auto), "
                         "or use a new --out (settings are never mixed)")


def _embed_files(todo: list[ImageFile], sink: StoreSink, run: Runtime, size: int, batch_size: int,
                 workers: int) -> None:
    """Decode -> batch -> runtime -> store; each batch is committed as soon as its vectors are back."""

    def batches() -> Iterator[tuple[list[ManifestRow], np.ndarray]]:
        pixels: list[np.ndarray] = []
        rows: list[ManifestRow] = []
        for f, result in decode_in_order(todo, size, workers, lookahead=2 * batch_size):
            if isinstance(result, ImageDecodeError):
                sink.sort(f, reason=result.reason)
            elif row := sink.sort(f, sha256=result.sha256, width=result.width, height=result.height):
                pixels.append(result.pixels)
                rows.append(row)
            if len(rows) >= batch_size:
                sink.flush()
                yield rows, np.stack(pixels)
                pixels, rows = [], []
        sink.flush()
        if rows:
            yield rows, np.stack(pixels)

    for rows, vectors in stream(run, batches()):
        sink.add(rows, vectors)
