"""Running an export folder, so ``tl-embed predict DIR`` checks a shipped model as its users will run it.

This module also fixes what an export folder is (its manifest, format tag and model file per format),
since the reader decides what it accepts; :mod:`tl_embed.heads.export` writes to that layout.  Each
format's runtime (openvino, onnxruntime or TensorFlow) is imported only when a folder of that format is
opened: predicting with an openvino or onnx export never imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TlEmbedError, first_line
from ..kinds import EXPORT_MANIFEST
from ..tf_quiet import import_tensorflow

FORMATS = {"keras": "model.keras", "savedmodel": "saved_model", "tflite": "model.tflite",
           "onnx": "model.onnx", "openvino": "model.xml"}  # format -> its model file (or folder) in DIR
FORMAT_PRECISIONS = {fmt: ("fp32", "int8") if fmt == "openvino" else ("fp32",) for fmt in FORMATS}  # what each can hold
PRECISIONS = ("auto", "fp32", "int8")  # export-model --precision: auto is the head's own
MANIFEST = EXPORT_MANIFEST
EXPORT_FORMAT = "tl_embed.export/1"
EXTRA_HINT = "pip install 'tl_embed[export]'"


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class ExportedModel:
    """A loaded export: ``model(images)`` maps uint8 (N, S, S, 3) to float32 (N, classes)."""

    fmt: str
    classes: list[str]
    input_size: int
    run: Callable[[np.ndarray], np.ndarray]
    precision: str = "fp32"  # what the model computes in: fp32, or int8 (openvino only)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32)
        return np.asarray(self.run(np.ascontiguousarray(images, dtype=np.uint8)), dtype=np.float32)


def load_export(path: str | os.PathLike) -> ExportedModel:
    """Open an export folder with its format's runtime (openvino, onnxruntime or TensorFlow)."""
    folder = Path(path)
    try:
        meta = json.loads((folder / MANIFEST).read_text())
        fmt, classes, size = meta["model_format"], [str(c) for c in meta["classes"]], int(meta["input"]["shape"][1])
        precision = str(meta.get("precision", "fp32"))  # exports before int8 ones were all fp32
        fmt_ok = meta["format"] == EXPORT_FORMAT and fmt in FORMATS and precision in FORMAT_PRECISIONS[fmt]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise TlEmbedError(f"{folder} is not a readable tl-embed export ({MANIFEST}: {first_line(e)})") from None
    if not fmt_ok:
        raise TlEmbedError(f"{folder} is a {meta.get('format')} export of {fmt!r} ({precision}); this tl_embed reads "
                           f"{EXPORT_FORMAT}: upgrade tl_embed")
    model = folder / FORMATS[fmt]
    if not model.exists():
        raise TlEmbedError(f"{folder} has no {FORMATS[fmt]}: export the model again")
    run = _load_openvino(model, precision) if fmt == "openvino" else _LOADERS[fmt](model)
    return ExportedModel(fmt, classes, size, run, precision)


def require_modules(*modules: str, what: str) -> None:
    """Refuse in one line, naming the extra to install, when an optional converter or runtime is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TlEmbedError(f"{what} needs {', '.join(missing)}: {EXTRA_HINT}")


def _load_keras(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ..embedding.runtime import configure_threads

    import_tensorflow()
    configure_threads()
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(path, compile=False)
    size = model.input_shape[1]
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True,  # traced once, as KerasRuntime
                     input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    return lambda x: fn(tf.constant(x)).numpy()


def _load_savedmodel(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ..embedding.runtime import configure_threads

    import_tensorflow()
    configure_threads()
    import tensorflow as tf

    model = tf.saved_model.load(str(path))
    return lambda x: model.serve(tf.constant(x)).numpy()


def _load_tflite(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ..cpus import cpu_count

    import_tensorflow()
    with warnings.catch_warnings():  # tf.lite.Interpreter's notice that LiteRT is its new home
        warnings.simplefilter("ignore")
        import tensorflow as tf

        it = tf.lite.Interpreter(model_path=str(path), num_threads=cpu_count())
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(it.get_input_details()[0]["shape"]) != x.shape:
            it.resize_tensor_input(inp, x.shape)
            it.allocate_tensors()
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out).copy()

    it.allocate_tensors()
    return run


def _load_onnx(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    require_modules("onnxruntime", what="running an onnx export")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _load_openvino(path: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """Compiled with the hint ``predict`` gives a backbone of ``precision`` (f32 for fp32 and int8: int8 layers
    run int8 whatever the hint, the rest must not drift to bf16 on a CPU that has it)."""
    import openvino as ov

    from ..embedding.precision import compile_hint
    from ..embedding.runtime import openvino_precision

    model = ov.Core().compile_model(path, "CPU", openvino_precision(compile_hint(precision)))
    return lambda x: model(x)[0]


_LOADERS: dict[str, Callable[[Path], Callable[[np.ndarray], np.ndarray]]] = {  # openvino: by precision, above
    "keras": _load_keras, "savedmodel": _load_savedmodel, "tflite": _load_tflite, "onnx": _load_onnx}
