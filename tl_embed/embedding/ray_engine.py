"""The ``ray`` engine: Ray Data actors decode and embed; the driver scans, plans and commits.

The driver does what the local engine does around the model (scan, incremental plan, store writes),
so both engines give the same store. The backbone is built once, on the driver, and shipped through
the object store as converted OpenVINO IR (or a saved Keras model for the keras runtime): every actor
computes the same function, even with random weights, which a rebuild would draw anew.

Ray is imported here only, lazily: ``pip install "tl_embed[ray]"``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cpus import cpu_count
from ..errors import TlEmbedError
from ..tf_quiet import LOG_LEVEL as TF_LOG_LEVEL
from ..tf_quiet import import_keras
from .backbones import BackboneSpec, LoadedBackbone
from .images import ImageDecodeError, load_image
from .runtime import KerasRuntime, OpenVINORuntime, Runtime, check_runtime, fallback, load_or_convert, stream
from .scan import ImageFile
from .sink import StoreSink
from .tta import with_tta

ACTORS_START_S = 600  # all actors up before any work (a pool that cannot start is an error, not a hang)
HEADROOM = 0.25  # CPUs never reserved by actors: Ray Data's own tasks need some, or the dataset hangs (ray#44687)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` None starts a local Ray with this machine's cores."""

    address: str | None = None
    workers: int | None = None  # actors; default: the cluster's CPUs / cpus_per_worker
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class ShippedModel:
    """The driver's backbone as files: every actor loads exactly these bytes."""

    kind: str  # the runtime that runs it: "openvino" (IR: model.xml + model.bin) or "keras" (model.keras)
    files: dict[str, bytes]
    spec: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files)


def fingerprint(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


def ship_model(backbone: LoadedBackbone, runtime: str, model=None) -> ShippedModel:
    """Convert once on the driver, with the local engine's runtime choice (auto: openvino, else keras).

    ``model``: the OpenVINO model to ship as it is (a quantized one); only fp32 falls back to keras.
    """
    name = check_runtime(runtime)
    if name != "keras":
        try:
            return _files_of("openvino", backbone.spec, _save_ir, model or load_or_convert(backbone))
        except Exception as e:  # noqa: BLE001 - converters raise anything; the reference runtime still works
            if backbone.spec.precision != "fp32":
                raise
            fallback(backbone, name, e)
    return _files_of("keras", backbone.spec, _save_keras, backbone.model)


def _files_of(kind: str, spec: BackboneSpec, save, model) -> ShippedModel:
    with tempfile.TemporaryDirectory(prefix="tl-embed-ship-") as tmp:
        save(model, Path(tmp))
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return ShippedModel(kind, files, spec.to_dict())


def _save_ir(model, folder: Path) -> None:
    import openvino as ov

    ov.save_model(model, folder / "model.xml", compress_to_fp16=False)


def _save_keras(model, folder: Path) -> None:
    model.save(folder / "model.keras")


def load_shipped(shipped: ShippedModel, threads: int) -> Runtime:
    """An actor's runtime from the shipped files (written to a temp folder, read, then deleted), showing the
    model the views of the spec's TTA as the local engine does."""
    spec = BackboneSpec.from_dict(shipped.spec)
    with tempfile.TemporaryDirectory(prefix="tl-embed-model-") as tmp:
        for name, data in shipped.files.items():
            (Path(tmp) / name).write_bytes(data)
        if shipped.kind == "openvino":
            import openvino as ov

            model = ov.Core().read_model(Path(tmp) / "model.xml")
            return with_tta(OpenVINORuntime(LoadedBackbone(None, spec), threads=threads, model=model), spec.tta)
        net = import_keras().models.load_model(Path(tmp) / "model.keras", compile=False)
        return with_tta(KerasRuntime(LoadedBackbone(net, spec), threads=threads), spec.tta)


class Embedder:
    """A Ray Data actor: the shipped model loaded once, then batches of files in, vectors out.

    Each output row says which actor and which model computed it, so the driver can check that
    every actor ran the driver's model.
    """

    def __init__(self, model_ref, threads: int):
        import ray

        shipped: ShippedModel = ray.get(model_ref)
        self.size = int(shipped.spec["input_size"])
        self.dim = int(shipped.spec["dim"])
        self.run = load_shipped(shipped, threads)
        self.model = shipped.fingerprint
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results: list = []

        def decoded() -> Iterator[tuple[int, np.ndarray]]:
            """Each image handed to the model as soon as it is decoded: decoding overlaps inference."""
            for i, r in enumerate(self.pool.map(self._decode, batch["path"])):
                results.append(r)
                if not isinstance(r, ImageDecodeError):
                    yield i, r.pixels[None]

        vectors = np.zeros((len(batch["path"]), self.dim), np.float32)
        for i, vector in stream(self.run, decoded()):
            vectors[i] = vector[0]
        n = len(results)
        good = [None if isinstance(r, ImageDecodeError) else r for r in results]
        return {
            "rel": batch["rel"],
            "reason": np.array([r.reason if isinstance(r, ImageDecodeError) else "" for r in results], object),
            "sha256": np.array([g.sha256 if g else "" for g in good], object),
            "width": np.array([g.width if g else 0 for g in good], np.int64),
            "height": np.array([g.height if g else 0 for g in good], np.int64),
            "vector": vectors,
            "model": np.array([self.model] * n, object),
            "worker": np.array([self.worker] * n, object),
        }

    def _decode(self, path: str):
        try:
            return load_image(path, self.size)
        except ImageDecodeError as e:
            return e


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address``, or start a local Ray; True when this call started or joined it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    package_parent = str(Path(__file__).resolve().parents[2])  # actors import the driver's tl_embed
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)}
    if "TL_EMBED_CACHE" in os.environ:
        env["TL_EMBED_CACHE"] = os.environ["TL_EMBED_CACHE"]
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        kwargs.update(num_cpus=num_cpus or cpu_count(), include_dashboard=False, runtime_env={"env_vars": env})
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise TlEmbedError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0][:200]}") from None
    return True


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise TlEmbedError('--engine ray needs Ray Data: pip install "tl_embed[ray]"') from None
    return ray


def actor_cpus(total: float, workers: int, per_worker: float) -> float:
    """CPUs each actor reserves: as asked, but never all of the cluster's (see :data:`HEADROOM`)."""
    fits = (total - HEADROOM) / workers
    if fits < 0.01:
        raise TlEmbedError(f"--workers {workers} is too many for the {total:g} CPUs Ray has")
    return min(per_worker, fits)


def default_workers(total: float, per_worker: float) -> int:
    return max(1, int(total // per_worker))


def embed_with_ray(todo: list[ImageFile], sink: StoreSink, backbone: LoadedBackbone, runtime: str,
                   batch_size: int, options: RayOptions, model=None) -> None:
    """Embed ``todo`` on Ray actors; each batch is committed on the driver, through ``sink``, as it streams back.

    ``model``: the OpenVINO model every actor runs, when the driver has it already (a quantized one).

    Ctrl-C (or a killed driver) loses only the batches in flight: the next run's plan continues.
    """
    ray = import_ray()
    report = sink.report
    with ThreadPoolExecutor(1, thread_name_prefix="convert") as pool:
        converting = pool.submit(ship_model, backbone, runtime, model)  # overlaps Ray's start-up
        started = start_ray(options.address)
    try:
        shipped = converting.result()
        report.runtime = shipped.kind
        t0 = time.perf_counter()
        try:
            _stream(ray, todo, sink, shipped, batch_size, options)
        except KeyboardInterrupt:
            report.interrupted = True
        report.embed_seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


def _stream(ray, todo: list[ImageFile], sink: StoreSink, shipped: ShippedModel, batch_size: int,
            options: RayOptions) -> None:
    try:
        for batch in dataset(ray, todo, shipped, batch_size, options).iter_batches(batch_size=None,
                                                                                   batch_format="numpy"):
            check_model(batch, shipped.fingerprint)
            commit(batch, sink)
            sink.report.workers.update(batch["worker"])
    except ray.exceptions.GetTimeoutError:
        raise TlEmbedError(f"Ray could not start the workers within {ACTORS_START_S} s: the cluster lacks the CPUs "
                           "or memory; use fewer --workers or a smaller --cpus-per-worker") from None


def dataset(ray, todo: list[ImageFile], shipped: ShippedModel, batch_size: int, options: RayOptions):
    """The files as a Ray dataset, mapped by a fixed pool of :class:`Embedder` actors, in order."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the store's rows in the local engine's order
    ctx.enable_progress_bars = False  # ours counts images
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = ACTORS_START_S  # every actor gets work, and an unschedulable pool fails
    total = float(ray.cluster_resources().get("CPU", 1))
    workers = options.workers or default_workers(total, options.cpus_per_worker)
    items = [{"path": str(f.path), "rel": f.rel} for f in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
    return ds.map_batches(
        Embedder, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model_ref": ray.put(shipped),
                               "threads": max(1, round(options.cpus_per_worker))},
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=actor_cpus(total, workers, options.cpus_per_worker))


def check_model(batch: dict[str, np.ndarray], expected: str) -> None:
    """Every vector must come from the driver's model; anything else would mix two functions in one store."""
    if any(m != expected for m in batch["model"]):
        raise RuntimeError(f"a Ray worker ran model {set(batch['model'])}, not the driver's {expected}")


def commit(batch: dict[str, np.ndarray], sink: StoreSink) -> None:
    """Sort one batch of the actors' results into the store, by the same rule as the local engine."""
    rows, keep = [], []
    for i, rel in enumerate(batch["rel"]):
        row = sink.sort(sink.files[rel], reason=batch["reason"][i], sha256=batch["sha256"][i],
                        width=int(batch["width"][i]), height=int(batch["height"][i]))
        if row is not None:
            rows.append(row)
            keep.append(i)
    sink.flush()
    sink.add(rows, batch["vector"][keep])
