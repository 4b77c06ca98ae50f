"""One model file to ship: the backbone, its preprocessing and a trained head folded into one graph.

The exported model takes what :func:`tl_embed.embedding.images.load_image` gives, RGB uint8 images
``(N, S, S, 3)`` at the backbone's input size, and returns ``(N, classes)`` probabilities in
``labels.txt`` order.  Each head step becomes built-in Keras layers or ``keras.ops`` (no Lambda, no
custom class), so the ``.keras`` file loads without tl_embed and every converter sees plain ops:

* ``dense`` -> ``Dense`` (feature standardisation is already folded into its weights);
* ``signed_power`` -> ``sign(x) * |x| ** alpha``; ``l2_normalize`` -> ``UnitNormalization``;
* ``sigmoid_calibration`` -> folded into the preceding linear layer as one ``Dense`` with a
  ``log_sigmoid`` activation, then ``Softmax`` over classes (= ``p / sum(p)``) and the mean over
  calibration members (``GlobalAveragePooling1D``);
* ``knn`` -> squared distances as one ``Dense`` over the stored vectors, ``top_k``, and the vote as
  an ``Embedding`` lookup of one-hot labels.

The export folder holds the model, ``labels.txt``, a ``README.md`` saying how to call it, and
``export.json``, which lets ``tl-embed predict DIR`` run it.  TensorFlow is imported here only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import TlEmbedError
from ..files import fsync_dir, umask_mode
from ..kinds import EXPORT, EXPORT_MANIFEST, require_output
from ..tf_quiet import import_tensorflow
from .graph import Step
from .head import Head

FORMATS = {"keras": "model.keras", "savedmodel": "saved_model", "tflite": "model.tflite",
           "onnx": "model.onnx", "openvino": "model.xml"}  # format -> its model file (or folder) in DIR
MANIFEST = EXPORT_MANIFEST
EXPORT_FORMAT = "tl_embed.export/1"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
ONNX_OPSET = 17
DUPLICATE_D2 = 1e-6  # k-NN: a squared distance below this times |x|^2 is an exact match (float32 noise)
EXTRA_HINT = "pip install 'tl_embed[export]'"


@dataclass
class ExportResult:
    out: Path
    fmt: str
    seconds: float
    bytes: int  # the model file(s), labels and README excluded


def check_format(fmt: str) -> str:
    """The format's name, or one line saying what is missing for it."""
    if fmt not in FORMATS:
        raise TlEmbedError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require("tf2onnx", "onnx", "onnxruntime", what="--format onnx")
    return fmt


def export_model(head: Head, fmt: str, out: str | os.PathLike) -> ExportResult:
    """Write ``head`` with its backbone as one ``fmt`` model into the folder ``out``.

    ``out`` must be new, empty, or a previous export (replaced); the export is written into a temp
    sibling first, so a failed export leaves ``out`` as it was.
    """
    check_format(fmt)
    out = Path(out)
    _check_out(out)
    _check_rebuildable(head)
    start = time.perf_counter()
    model = build_classifier(head)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _WRITERS[fmt](model, tmp / FORMATS[fmt], head.spec.input_size)
        size = _size(tmp / FORMATS[fmt]) + (_size(tmp / "model.bin") if fmt == "openvino" else 0)
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in head.classes))
        (tmp / "README.md").write_text(_readme(head, fmt))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(head, fmt), indent=1))
        tmp.chmod(umask_mode())  # a shipped model is readable by others and services, as any folder we make
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, fmt, time.perf_counter() - start, size)


def build_classifier(head: Head):
    """The Keras model uint8 RGB ``(N, S, S, 3)`` -> ``(N, classes)`` probabilities."""
    import_tensorflow()
    import keras

    from ..embedding.backbones import check_compatible, load_backbone
    from ..embedding.tta import backbone_with_tta

    spec = head.spec
    model, weights = spec.loadable()
    backbone = load_backbone(model, weights=weights, pooling=spec.pooling, layer=spec.layer,
                             preprocess=_custom_preprocess(spec))
    backbone = backbone_with_tta(backbone, spec.tta)
    check_compatible(spec, backbone.spec, "the model file")
    size = spec.input_size
    images = keras.Input((size, size, 3), dtype="uint8", name=INPUT_NAME)
    pixels = keras.ops.cast(images, "float32")
    features = backbone.model(pixels)
    if spec.tta == "flip":  # the head was trained on the mean of the image's and its mirror's embeddings
        features = (features + backbone.model(keras.ops.flip(pixels, axis=2))) / 2
    probabilities = keras.layers.Identity(name=OUTPUT_NAME)(head_layers(head.steps, features))
    return keras.Model(images, probabilities, name="tl_embed_classifier")


def head_layers(steps: list[Step], x):
    """Apply ``steps`` to the symbolic features ``x`` as built-in Keras layers and ops."""
    import keras

    pending: tuple[np.ndarray, np.ndarray] | None = None  # a linear layer a calibration may fold into
    for step in steps:
        if step.op == "dense" and step.attrs["activation"] == "linear":
            if pending is not None:
                x = _dense(x, *pending, "linear")
            pending = step.arrays["W"], step.arrays["b"]
            continue
        if step.op == "sigmoid_calibration":
            W, b = pending if pending is not None else (np.eye(x.shape[-1]), np.zeros(x.shape[-1]))
            pending = None
            x = _calibration(x, W, b, step)
            continue
        if pending is not None:
            x, pending = _dense(x, *pending, "linear"), None
        if step.op == "signed_power":
            x = keras.ops.sign(x) * keras.ops.power(keras.ops.abs(x), float(step.attrs["alpha"]))
        elif step.op == "l2_normalize":
            x = keras.layers.UnitNormalization()(x)
        elif step.op == "dense":
            x = _dense(x, step.arrays["W"], step.arrays["b"], str(step.attrs["activation"]))
        elif step.op == "knn":
            x = _knn(x, step)
        else:
            raise TlEmbedError(f"cannot export a head with a {step.op} step")
    return x if pending is None else _dense(x, *pending, "linear")


def _dense(x, W: np.ndarray, b: np.ndarray, activation: str):
    import keras

    layer = keras.layers.Dense(W.shape[1], activation=activation)
    y = layer(x)
    layer.set_weights([W.astype(np.float32), b.astype(np.float32)])
    return y


def _calibration(x, W: np.ndarray, c: np.ndarray, step: Step):
    """scikit-learn's sigmoid calibration of the decision values ``x @ W + c``, averaged over members.

    ``p = sigmoid(u)`` with ``u = -(a d + b)``; per member ``p / sum(p)`` is ``softmax(log p)``, so
    the whole calibration is Dense(log_sigmoid) -> Softmax -> mean, with no division that can be 0/0.
    """
    import keras

    a, b = step.arrays["a"], step.arrays["b"]
    members, classes = int(step.attrs["members"]), int(step.attrs["classes"])
    Wu, bu = W * -a, -(a * c + b)
    if classes == 2:  # one decision value per member: [1 - p, p] = [sigmoid(-u), sigmoid(u)]
        Wu = np.stack([-Wu, Wu], axis=2).reshape(W.shape[0], -1)
        bu = np.stack([-bu, bu], axis=1).ravel()
    log_p = _dense(x, Wu, bu, "log_sigmoid")
    p = keras.layers.Softmax(axis=-1)(keras.layers.Reshape((members, classes))(log_p))
    return keras.layers.GlobalAveragePooling1D()(p)


def _knn(x, step: Step):
    """scikit-learn's k-NN vote: squared distances to every stored vector, the k nearest, their labels."""
    import keras

    ops = keras.ops
    vectors = step.arrays["vectors"].astype(np.float64)
    k, classes = int(step.attrs["k"]), int(step.attrs["classes"])
    # |x - v|^2 = |x|^2 + (|v|^2 - 2 x.v): the bracket is one Dense layer over the stored vectors
    qq = ops.sum(ops.square(x), axis=-1, keepdims=True)
    d2 = ops.maximum(_dense(x, -2 * vectors.T, (vectors * vectors).sum(1), "linear") + qq, 0.0)
    neg_d2, near = ops.top_k(-d2, k)  # ties: the lower index first, as numpy's stable argsort
    vote = keras.layers.Embedding(len(vectors), classes, name="knn_labels")
    one_hot = vote(near)  # (N, k, classes)
    vote.set_weights([np.eye(classes, dtype=np.float32)[step.arrays["labels"]]])
    if step.attrs["weights"] == "distance":  # 1/d; an exact match (d = 0) takes all the weight
        # float32 leaves |x - v|^2 ~1e-7 |x|^2 for x == v, not 0: closer than this counts as a duplicate
        exact = ops.cast(-neg_d2 <= DUPLICATE_D2 * qq, "float32")
        any_exact = ops.max(exact, axis=-1, keepdims=True)
        w = any_exact * exact + (1 - any_exact) / ops.sqrt(ops.maximum(-neg_d2, 1e-30))
        one_hot = one_hot * ops.expand_dims(w, -1)
    votes = ops.sum(one_hot, axis=1)
    return votes / ops.sum(votes, axis=-1, keepdims=True)


# ------------------------------------------------------------------ writers
def _write_keras(model, path: Path, size: int) -> None:
    model.save(path)


def _write_savedmodel(model, path: Path, size: int) -> None:
    model.export(path, format="tf_saved_model", verbose=False)


def _write_tflite(model, path: Path, size: int) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(dir=path.parent) as saved:
        model.export(saved, format="tf_saved_model", verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = tf.lite.TFLiteConverter.from_saved_model(saved).convert()  # fp32, no quantisation
    path.write_bytes(data)


def _write_onnx(model, path: Path, size: int) -> None:
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    for name in ("tensorflow", "tf2onnx"):  # deprecation notices of the TF1 APIs the converter relies on
        logging.getLogger(name).setLevel(logging.ERROR)
    sig = [tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)]
    fn = tf.function(lambda images: model(images, training=False), input_signature=sig)
    # frozen first: from_function leaves some captured constants (EfficientNet's normalisation, ResNet's
    # mean pixel) as extra graph inputs, a model no runtime can feed
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
            output_names=[t.name for t in frozen.outputs], opset=ONNX_OPSET)
    except Exception as e:  # noqa: BLE001 - the converter raises anything on an op it lacks
        raise TlEmbedError(f"tf2onnx could not convert this model ({type(e).__name__}: {_first_line(e)}); "
                           "export it as openvino or savedmodel instead") from None
    if len(proto.graph.input) != 1:
        raise TlEmbedError(f"tf2onnx left {len(proto.graph.input)} inputs in the ONNX model instead of one; "
                           "export it as openvino or savedmodel instead")
    _rename(proto.graph, proto.graph.input[0].name, INPUT_NAME)  # "image:0" -> "image", as the other formats
    _rename(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
    path.write_bytes(proto.SerializeToString())


def _rename(graph, old: str, new: str) -> None:
    """Rename an ONNX graph input/output everywhere it is produced or consumed."""
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _write_openvino(model, path: Path, size: int) -> None:
    import openvino as ov

    with warnings.catch_warnings():  # Keras warns that the converter passes inputs as a list
        warnings.simplefilter("ignore", UserWarning)
        converted = ov.convert_model(model)
    ov.save_model(converted, path, compress_to_fp16=False)


_WRITERS: dict[str, Callable[[Any, Path, int], None]] = {
    "keras": _write_keras, "savedmodel": _write_savedmodel, "tflite": _write_tflite,
    "onnx": _write_onnx, "openvino": _write_openvino}


# ------------------------------------------------------------------ the export folder
def _check_out(out: Path) -> None:
    """Refuse to write over anything but an empty folder or one of our own exports."""
    require_output(out, EXPORT)
    if out.exists() and not out.is_dir():
        raise TlEmbedError(f"--out {out} is a file; export-model writes a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export_dir(out):
        raise TlEmbedError(f"--out {out} is a folder with other files in it; choose a new or empty folder "
                           "(only a previous export is replaced)")


def _check_rebuildable(head: Head) -> None:
    if head.spec.weights_sha256 == "random":
        raise TlEmbedError(f"{head.spec.name} with random weights cannot be rebuilt as the head saw it: "
                           "export needs a head trained on imagenet weights or on a weights/model file")


def _custom_preprocess(spec) -> str | None:
    """For a custom model file: the registry backbone whose preprocessing it was embedded with."""
    from ..embedding.backbones import BACKBONES, is_custom_model

    if not is_custom_model(spec.loadable()[0]):
        return None
    return next((b.name for b in BACKBONES.values() if b.preprocessing == spec.preprocessing), None)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; a previous export there is swapped out, then deleted."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)  # an empty folder at ``out`` is replaced too
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def _manifest(head: Head, fmt: str) -> dict[str, Any]:
    size = head.spec.input_size
    return {"format": EXPORT_FORMAT, "model_format": fmt, "model": FORMATS[fmt], "classes": head.classes,
            "input": {"name": INPUT_NAME, "shape": [None, size, size, 3], "dtype": "uint8", "range": [0, 255],
                      "channels": "RGB", "resize": "whole image, bilinear, no crop"},
            "output": {"name": OUTPUT_NAME, "shape": [None, len(head.classes)], "dtype": "float32"},
            "head": head.head, "backbone": head.spec.to_dict(), "tl_embed": __version__}


_USAGE = {  # format -> (load the model, run it on ``images``)
    "keras": ('import keras\nmodel = keras.saving.load_model("model.keras")',
              "proba = model.predict(images)"),
    "savedmodel": ('import tensorflow as tf\nmodel = tf.saved_model.load("saved_model")',
                   "proba = model.serve(images).numpy()"),
    "tflite": ("from ai_edge_litert.interpreter import Interpreter  # or: Interpreter = tensorflow.lite.Interpreter\n"
               'it = Interpreter("model.tflite")\n'
               'inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]',
               "it.resize_tensor_input(inp, images.shape)\nit.allocate_tensors()\n"
               "it.set_tensor(inp, images)\nit.invoke()\nproba = it.get_tensor(out)"),
    "onnx": ('import onnxruntime as ort\nsession = ort.InferenceSession("model.onnx")',
             'proba = session.run(None, {"image": images})[0]'),
    "openvino": ('import openvino as ov\n'
                 '# f32 as exported: left unstated, a CPU with native bf16 runs bf16 and the probabilities drift\n'
                 'model = ov.Core().compile_model("model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})',
                 "proba = model(images)[0]"),
}


def _readme(head: Head, fmt: str) -> str:
    s, n = head.spec.input_size, len(head.classes)
    load, run = _USAGE[fmt]
    return f"""# Image classifier exported by tl-embed {__version__}

`{FORMATS[fmt]}` ({fmt}): {head.head} head on {head.spec.describe()}, {n} classes.

- **Input** `{INPUT_NAME}`: RGB images, uint8 in 0-255, shape (N, {s}, {s}, 3). Resize the whole image to
  {s}x{s} (bilinear, no crop, after applying its EXIF rotation); the backbone's preprocessing is inside the model.
- **Output** `{OUTPUT_NAME}`: float32 (N, {n}) class probabilities; column i is line i of `labels.txt`.

```python
import numpy as np
from PIL import Image
{load}
images = np.stack([np.asarray(Image.open(p).convert("RGB").resize(({s}, {s}), Image.BILINEAR))
                   for p in ["photo.jpg"]])  # (N, {s}, {s}, 3) uint8
{run}
labels = open("labels.txt").read().splitlines()
print([labels[i] for i in proba.argmax(1)])
```

Run it from this folder. `tl-embed predict THIS_FOLDER photo.jpg` runs it with tl-embed's own image decoding
(EXIF rotation, any image mode, large JPEGs decoded at reduced scale), which is what it was checked against.
"""


# ------------------------------------------------------------------ running an export
def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class ExportedModel:
    """A loaded export: ``model(images)`` maps uint8 (N, S, S, 3) to float32 (N, classes)."""

    fmt: str
    classes: list[str]
    input_size: int
    run: Callable[[np.ndarray], np.ndarray]

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
        fmt_ok = meta["format"] == EXPORT_FORMAT and fmt in FORMATS
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise TlEmbedError(f"{folder} is not a readable tl-embed export ({MANIFEST}: {_first_line(e)})") from None
    if not fmt_ok:
        raise TlEmbedError(f"{folder} is a {meta.get('format')} export of {fmt!r}; this tl_embed reads "
                           f"{EXPORT_FORMAT}: upgrade tl_embed")
    model = folder / FORMATS[fmt]
    if not model.exists():
        raise TlEmbedError(f"{folder} has no {FORMATS[fmt]}: export the model again")
    return ExportedModel(fmt, classes, size, _LOADERS[fmt](model))


def _load_keras(path: Path) -> Callable:
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


def _load_savedmodel(path: Path) -> Callable:
    from ..embedding.runtime import configure_threads

    import_tensorflow()
    configure_threads()
    import tensorflow as tf

    model = tf.saved_model.load(str(path))
    return lambda x: model.serve(tf.constant(x)).numpy()


def _load_tflite(path: Path) -> Callable:
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


def _load_onnx(path: Path) -> Callable:
    _require("onnxruntime", what="running an onnx export")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _load_openvino(path: Path) -> Callable:
    import openvino as ov

    from ..embedding.runtime import openvino_precision

    model = ov.Core().compile_model(path, "CPU", openvino_precision("f32"))
    return lambda x: model(x)[0]


_LOADERS: dict[str, Callable[[Path], Callable]] = {
    "keras": _load_keras, "savedmodel": _load_savedmodel, "tflite": _load_tflite,
    "onnx": _load_onnx, "openvino": _load_openvino}


def _require(*modules: str, what: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TlEmbedError(f"{what} needs {', '.join(missing)}: {EXTRA_HINT}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__
