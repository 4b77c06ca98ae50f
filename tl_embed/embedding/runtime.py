"""How a backbone runs: a batch of RGB uint8 images in, a batch of float32 embeddings out.

Two runtimes compute the same function:

* ``keras``: the reference.  The model traced once into a ``tf.function`` with a fixed signature,
  which skips ``model.predict``'s per-call dataset/callback machinery.
* ``openvino``: the Keras model converted once to OpenVINO IR (fp32, weights not compressed) and
  run by OpenVINO's CPU plugin; faster than the reference end to end (both are timed by
  ``benchmarks/embed_throughput.py``).  Converted models are cached under :func:`converted_cache_dir`
  keyed by the backbone's identity (name, weights sha256, input size, preprocessing, pooling, layer).

ONNX Runtime and TFLite were measured too and are not shipped: ONNX Runtime matched OpenVINO at best
(MobileNetV2) and its converter failed on EfficientNet and ResNet; TFLite was slower than Keras.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from ..cpus import cpu_count
from ..errors import TlEmbedError, first_line
from ..tf_quiet import import_tensorflow
from . import carried
from .backbones import BackboneSpec, LoadedBackbone, converted_cache_dir
from .precision import compile_hint

RUNTIMES = ("auto", "keras", "openvino")
NOT_SHIPPED = {
    "onnx": "ONNX Runtime was measured no faster than openvino here (export-model --format onnx writes an ONNX model)",
    "tflite": "TFLite (XNNPACK) was measured slower than keras here",
}
IR_FORMAT = 1  # bump when the conversion below changes what it writes
Tag = TypeVar("Tag")


class Runtime(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, D) float32."""


def openvino_precision(precision: str = "f32") -> dict[str, str]:
    """The config that pins OpenVINO's inference precision: left unstated, a CPU with native bf16
    (AVX512_BF16, AMX) runs bf16 by default, and results drift from fp32 behind the user's back."""
    return {"INFERENCE_PRECISION_HINT": precision}


def configure_threads(intra_op: int | None = None, inter_op: int = 1) -> None:
    """Pin TensorFlow's thread pools before the first op runs.

    One inter-op thread (a CNN is a chain of ops) and intra-op threads = cores: decoding threads
    mostly wait on Pillow's GIL-free C code, so they share the cores without oversubscription.
    """
    tf = import_tensorflow()

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op or cpu_count())
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass  # TensorFlow already initialised in this process: keep its settings


def stream(run: Runtime, batches: Iterable[tuple[Tag, np.ndarray]]) -> Iterator[tuple[Tag, np.ndarray]]:
    """Embed ``(tag, batch)`` pairs, yielding ``(tag, vectors)`` in order.

    A runtime with its own ``stream`` keeps several batches in flight, so the caller decodes the next
    batch and commits the previous one while the model runs; others run one batch at a time.
    """
    own = getattr(run, "stream", None)
    if own is not None:
        yield from own(batches)
        return
    for tag, batch in batches:
        yield tag, run(batch)


class KerasRuntime:
    """Reference runtime: the Keras model, traced once as a tf.function."""

    name = "keras"

    def __init__(self, backbone: LoadedBackbone, threads: int | None = None):
        if backbone.spec.precision != "fp32":
            raise TlEmbedError(f"the keras runtime computes fp32 only, and this backbone is {backbone.spec.precision}; "
                               "use --runtime openvino (or auto)")
        configure_threads(threads)
        tf = import_tensorflow()
        model = backbone.model
        size = backbone.spec.input_size
        self.dim = backbone.spec.dim
        self._fn = tf.function(
            lambda x: model(tf.cast(x, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:  # oneDNN convolutions reject an empty batch
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._fn(batch), dtype=np.float32)


class OpenVINORuntime:
    """The backbone converted to OpenVINO IR, run fp32 on the CPU.

    The CPU plugin's throughput mode runs independent single-threaded streams, one per core, and
    each request carries a single image: small requests keep a layer's activations in the core's
    cache, where a 64-image request's spill to memory, and independent streams tolerate the decode
    threads sharing the cores better than one request whose threads wait on each other at every layer.
    """

    name = "openvino"

    def __init__(self, backbone: LoadedBackbone, threads: int | None = None, images_per_request: int = 1,
                 model=None):
        """``model``: an already converted model (a Ray worker gets the driver's), else converted here."""
        model = load_or_convert(backbone) if model is None else model
        self._compile(model, backbone.spec, threads, images_per_request)

    @classmethod
    def from_cache(cls, spec: BackboneSpec, threads: int | None = None,
                   images_per_request: int = 1) -> OpenVINORuntime | None:
        """The runtime straight from the cached IR of ``spec``, or None when it is not cached.

        Needs neither TensorFlow nor Keras: starting from the cache skips their import and the
        model build, which is most of a one-image ``predict`` or ``search`` (benchmarks/startup.py).
        OpenVINO also keeps the compiled model beside the IR (its ``CACHE_DIR``), so it compiles faster next time.
        An int8 model is found here once its carrier installed it (:mod:`.carried`).
        """
        xml = cached_ir(spec)
        if xml is None or not xml.is_file():
            return None
        blobs = xml.parent / "compiled"
        writable = os.access(xml.parent, os.W_OK)
        self = cls.__new__(cls)
        try:
            self._compile(str(xml), spec, threads, images_per_request,
                          {"CACHE_DIR": str(blobs)} if writable or blobs.is_dir() else {})
        except RuntimeError:
            return None  # unreadable IR (e.g. damaged by hand): the caller converts again
        return self

    def _compile(self, model, spec: BackboneSpec, threads: int | None, images_per_request: int,
                 extra: dict | None = None) -> None:
        import openvino as ov

        threads = threads or cpu_count()
        compiled = ov.Core().compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "THROUGHPUT",
            **openvino_precision(compile_hint(spec.precision, _notice)),
            "INFERENCE_NUM_THREADS": threads,
            # A process given fewer threads than the machine's cores (a Ray actor) shares the machine
            # with others: pinned, every such process puts its threads on the same first cores (two
            # one-thread actors on 2 cores would share the first one and leave the second idle).
            "ENABLE_CPU_PINNING": threads >= cpu_count(),
            **(extra or {}),
        })
        self.streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.images_per_request = images_per_request
        self.dim = spec.dim
        self._queue = ov.AsyncInferQueue(compiled, 2 * self.streams)  # the next request waits ready
        self._outputs: dict[int, np.ndarray] = {}
        self._queue.set_callback(_collector(self._outputs))  # no bound method: no cycle keeping us alive
        self._submit = threading.Lock()  # one thread at a time hands requests to the queue
        self._ids = count()  # request ids unique across concurrent streams

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return next(self.stream([(None, batch)]))[1]

    def stream(self, batches: Iterable[tuple[Tag, np.ndarray]]) -> Iterator[tuple[Tag, np.ndarray]]:
        """Every batch split into requests, all streams busy; results yielded in submission order.

        Safe to call from several threads at once (a service's concurrent requests): each request
        carries an id no other stream uses, so results are never swapped between callers.
        """
        pending: deque[tuple[Tag, list[int]]] = deque()  # each batch's request ids
        try:
            for tag, batch in batches:
                batch = np.ascontiguousarray(batch, dtype=np.uint8)
                ids = []
                for i in range(0, len(batch), self.images_per_request):
                    with self._submit:
                        rid = next(self._ids)
                        self._queue.start_async(batch[i:i + self.images_per_request], rid)  # waits for a free one
                    ids.append(rid)
                pending.append((tag, ids))
                while pending and all(r in self._outputs for r in pending[0][1]):
                    yield self._gather(*pending.popleft())
            while pending:
                tag, ids = pending[0]
                self._wait_for(ids)
                yield self._gather(*pending.popleft())
        finally:
            for _, ids in pending:  # an abandoned stream: drop its results when they arrive
                self._wait_for(ids)
                for r in ids:
                    self._outputs.pop(r, None)

    def _wait_for(self, ids: list[int]) -> None:
        if not all(r in self._outputs for r in ids):
            self._queue.wait_all()  # every request handed over so far has finished after this
        if not all(r in self._outputs for r in ids):
            raise RuntimeError("OpenVINO finished a request without delivering its result")

    def _gather(self, tag: Tag, ids: list[int]) -> tuple[Tag, np.ndarray]:
        if not ids:  # an empty batch
            return tag, np.zeros((0, self.dim), np.float32)
        return tag, np.concatenate([self._outputs.pop(r) for r in ids]).astype(np.float32, copy=False)


def _collector(outputs: dict[int, np.ndarray]) -> Callable:
    def collect(request, seq: int) -> None:
        outputs[seq] = request.get_output_tensor(0).data.copy()

    return collect


def cache_key(spec: BackboneSpec) -> str | None:
    """Identity of a conversion, or None when the weights are random (a rebuild gives other weights)."""
    if spec.weights_sha256 == "random":
        return None
    import openvino as ov

    blob = json.dumps([list(spec.model_identity()), ov.__version__, IR_FORMAT]).encode()
    return f"{spec.name}-{spec.input_size}px-{hashlib.sha256(blob).hexdigest()[:20]}"


def cached_ir(spec: BackboneSpec) -> Path | None:
    """Where the converted model of ``spec`` is (or would be) cached; None when it cannot be cached.

    A quantized model is cached under its own sha256; for any other the fp32 conversion serves (a bf16
    model is the fp32 one, compiled with another hint).
    """
    if spec.model_sha256:
        return carried.cache_path(spec)
    key = cache_key(spec)
    return converted_cache_dir() / "openvino" / key / "model.xml" if key else None


def read_cached(spec: BackboneSpec):
    """The cached OpenVINO model of ``spec``, or None (not cached, or unreadable: convert again)."""
    import openvino as ov

    xml = cached_ir(spec)
    if xml is None or not xml.is_file():
        return None
    try:
        return ov.Core().read_model(xml)
    except RuntimeError:
        return None  # e.g. damaged by hand


def load_or_convert(backbone: LoadedBackbone):
    """The OpenVINO model of ``backbone``: from the cache, else converted (and cached when cacheable).

    A quantized model cannot be converted again: it comes only from the cache its carrier installed it in.
    """
    model = read_cached(backbone.spec)
    if model is None and backbone.spec.model_sha256:
        raise TlEmbedError(f"the {backbone.spec.precision} model sha256:{backbone.spec.model_sha256[:12]} is not "
                           "installed; open the store, index or model file that carries it")
    if model is not None:
        return model
    model = convert(backbone)
    xml = cached_ir(backbone.spec)
    if xml is not None:
        _save_atomically(model, xml)
    return model


def convert(backbone: LoadedBackbone):
    """Keras model -> OpenVINO model taking uint8 NHWC pixels, as the Keras runtime does."""
    import openvino as ov

    with warnings.catch_warnings():  # Keras warns that the converter passes inputs as a list
        warnings.simplefilter("ignore", UserWarning)
        model = ov.convert_model(backbone.model)
    ppp = ov.preprocess.PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8)  # exact u8 -> f32 conversion inside the graph
    return ppp.build()


def _save_atomically(model, xml: Path) -> None:
    """Write IR into a temp folder beside its final place, then rename: readers never see half a model."""
    import openvino as ov

    xml.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=xml.parent.parent))
    try:
        ov.save_model(model, tmp / xml.name, compress_to_fp16=False)
        try:
            os.rename(tmp, xml.parent)
        except OSError:
            pass  # another process cached it first; ours is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _notice(msg: str) -> None:
    print(f"tl-embed: {msg}", file=sys.stderr)


def check_runtime(name: str) -> str:
    """Normalise a runtime name, or raise with the reason it is not available."""
    key = name.strip().lower()
    if key in NOT_SHIPPED:
        raise TlEmbedError(f"runtime {key!r} is not shipped: {NOT_SHIPPED[key]}; "
                           f"choose one of {', '.join(RUNTIMES)}")
    if key not in RUNTIMES:
        raise TlEmbedError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return key


def make_runtime(backbone: LoadedBackbone, name: str = "auto",
                 notify: Callable[[str], None] = _notice, model=None) -> Runtime:
    """Build the runtime ``name``; ``auto`` prefers openvino and falls back to keras with a notice.

    ``model``: the OpenVINO model to run, already converted (or quantized); else converted here.
    Only fp32 falls back: a reduced precision is OpenVINO's, and the keras runtime would compute another function.
    """
    name = check_runtime(name)
    if name == "keras":
        return KerasRuntime(backbone)
    try:
        return OpenVINORuntime(backbone, model=model)
    except Exception as e:  # noqa: BLE001 - converters raise anything; the reference runtime still works
        if backbone.spec.precision != "fp32":
            raise
        fallback(backbone, name, e, notify)
    return KerasRuntime(backbone)


def fallback(backbone: LoadedBackbone, name: str, e: Exception, notify: Callable[[str], None] = _notice) -> None:
    """OpenVINO failed with ``e``: an error when it was asked for by name, a notice with ``auto``."""
    if isinstance(e, ImportError):
        why = "openvino is not installed (pip install openvino)"
    else:
        why = f"openvino could not convert {backbone.spec.name}: {type(e).__name__}: {first_line(e)}"
    if name == "openvino":
        raise TlEmbedError(why) from None
    notify(f"{why}; using the keras runtime")


def available_runtimes() -> list[str]:
    """Runtimes usable in this environment, reference first."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["keras"]
    return ["keras", "openvino"]
