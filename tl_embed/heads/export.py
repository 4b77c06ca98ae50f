"""Writing an export folder: a trained head and its backbone as one model file to ship, in the format asked.

The model is :func:`tl_embed.heads.keras_head.build_classifier`'s Keras graph, saved or converted here to
keras, savedmodel, tflite, onnx or openvino; a head trained on int8 embeddings exports, to openvino only,
the quantized backbone it was trained with (:mod:`.int8_export`), since Keras would compute fp32.  Next to
the model go ``labels.txt``, a ``README.md`` saying how to call it, and ``export.json``, which lets
``tl-embed predict DIR`` run it (:mod:`tl_embed.heads.exported` reads it).  The folder is built in a temp
sibling and swapped in, so a failed export leaves the old one.  TensorFlow and the converters are imported
inside the writers: importing this module costs nothing.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import TlEmbedError, first_line
from ..files import fsync_dir, umask_mode
from ..kinds import EXPORT, require_output
from .exported import EXPORT_FORMAT, FORMAT_PRECISIONS, FORMATS, MANIFEST, PRECISIONS, is_export_dir, require_modules
from .head import Head
from .int8_export import int8_classifier
from .keras_head import INPUT_NAME, OUTPUT_NAME, build_classifier

ONNX_OPSET = 17


@dataclass
class ExportResult:
    out: Path
    fmt: str
    seconds: float
    bytes: int  # the model file(s), labels and README excluded
    precision: str  # what the exported model computes in: fp32 or int8


def check_format(fmt: str) -> str:
    """The format's name, or one line saying what is missing for it."""
    if fmt not in FORMATS:
        raise TlEmbedError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_modules("tf2onnx", "onnx", "onnxruntime", what="--format onnx")
    return fmt


def check_precision(head: Head, fmt: str, asked: str = "auto") -> str:
    """What a ``fmt`` export of ``head`` computes in (``auto``: the head's own precision), or one line why not.

    An int8 head's quantized backbone runs only in OpenVINO; any other format would silently compute the
    fp32 backbone instead, which the head was not trained on, so that takes an explicit ``--precision fp32``.
    """
    own = head.spec.precision
    if asked not in PRECISIONS:
        raise TlEmbedError(f"unknown export precision {asked!r}; choose one of {', '.join(PRECISIONS)}")
    if asked == "int8" and fmt != "openvino":
        raise TlEmbedError(f"int8 export is only for --format openvino; --format {fmt} computes fp32 "
                           "(ask for --precision fp32, or export as openvino)")
    if asked == "int8" and own != "int8":
        raise TlEmbedError(f"--precision int8 exports the int8 backbone a head was trained on, and this head was "
                           f"trained on {own} embeddings: embed its store with --precision int8 and train again")
    if asked == "fp32":
        return "fp32"
    if own in FORMAT_PRECISIONS[fmt]:
        return own
    where = "only --format openvino exports its int8 backbone; " if own == "int8" else ""
    raise TlEmbedError(f"this head was trained on {own} embeddings, and --format {fmt} computes fp32: "
                       f"{where}ask for --precision fp32 to export the fp32 backbone anyway")


def export_model(head: Head, fmt: str, out: str | os.PathLike, precision: str = "auto") -> ExportResult:
    """Write ``head`` with its backbone as one ``fmt`` model into the folder ``out``, in ``precision``.

    ``out`` must be new, empty, or a previous export (replaced); the export is written into a temp
    sibling first, so a failed export leaves ``out`` as it was.
    """
    check_format(fmt)
    precision = check_precision(head, fmt, precision)
    out = Path(out)
    _check_out(out)
    inside = head if precision == "int8" else as_fp32(head)  # the head on the backbone the export computes
    if precision == "fp32":
        _check_rebuildable(inside)
    start = time.perf_counter()
    model = int8_classifier(inside) if precision == "int8" else build_classifier(inside)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _WRITERS[fmt](model, tmp / FORMATS[fmt], head.spec.input_size)
        size = _size(tmp / FORMATS[fmt]) + (_size(tmp / "model.bin") if fmt == "openvino" else 0)
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in head.classes))
        (tmp / "README.md").write_text(_readme(inside, fmt, head.spec.precision))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(inside, fmt, head.spec.precision), indent=1))
        tmp.chmod(umask_mode())  # a shipped model is readable by others and services, as any folder we make
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, fmt, time.perf_counter() - start, size, precision)


def as_fp32(head: Head) -> Head:
    """``head`` on the fp32 backbone: itself, or (asked for explicitly) a reduced-precision head's steps on it."""
    if head.spec.precision == "fp32":
        return head
    return replace(head, spec=replace(head.spec, precision="fp32", model_sha256=""), backbone=None)


# ------------------------------------------------------------------ writers
def _write_keras(model: Any, path: Path, size: int) -> None:
    model.save(path)


def _write_savedmodel(model: Any, path: Path, size: int) -> None:
    model.export(path, format="tf_saved_model", verbose=False)


def _write_tflite(model: Any, path: Path, size: int) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(dir=path.parent) as saved:
        model.export(saved, format="tf_saved_model", verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = tf.lite.TFLiteConverter.from_saved_model(saved).convert()  # fp32, no quantisation
    path.write_bytes(data)


def _write_onnx(model: Any, path: Path, size: int) -> None:
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
        raise TlEmbedError(f"tf2onnx could not convert this model ({type(e).__name__}: {first_line(e)}); "
                           "export it as openvino or savedmodel instead") from None
    if len(proto.graph.input) != 1:
        raise TlEmbedError(f"tf2onnx left {len(proto.graph.input)} inputs in the ONNX model instead of one; "
                           "export it as openvino or savedmodel instead")
    _rename(proto.graph, proto.graph.input[0].name, INPUT_NAME)  # "image:0" -> "image", as the other formats
    _rename(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
    path.write_bytes(proto.SerializeToString())


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename an ONNX graph input/output everywhere it is produced or consumed."""
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _write_openvino(model: Any, path: Path, size: int) -> None:
    """Convert the Keras model, or save the OpenVINO one :mod:`.int8_export` built, as is."""
    import openvino as ov

    if not isinstance(model, ov.Model):
        with warnings.catch_warnings():  # Keras warns that the converter passes inputs as a list
            warnings.simplefilter("ignore", UserWarning)
            model = ov.convert_model(model)
    ov.save_model(model, path, compress_to_fp16=False)


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


def _manifest(head: Head, fmt: str, trained_on: str) -> dict[str, Any]:
    """``head`` as exported (its spec is what the model computes); ``trained_on``: the precision it was trained on."""
    size, precision = head.spec.input_size, head.spec.precision
    other = {"head_trained_on": trained_on} if trained_on != precision else {}
    return {"format": EXPORT_FORMAT, "model_format": fmt, "model": FORMATS[fmt], "classes": head.classes,
            "input": {"name": INPUT_NAME, "shape": [None, size, size, 3], "dtype": "uint8", "range": [0, 255],
                      "channels": "RGB", "resize": "whole image, bilinear, no crop"},
            "output": {"name": OUTPUT_NAME, "shape": [None, len(head.classes)], "dtype": "float32"},
            "precision": precision, **other, "head": head.head, "backbone": head.spec.to_dict(),
            "tl_embed": __version__}


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
                 '# f32 as predict runs it: unstated, a CPU with native bf16 runs bf16 and the probabilities drift\n'
                 'model = ov.Core().compile_model("model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})',
                 "proba = model(images)[0]"),
}


def _precision_note(head: Head, trained_on: str) -> str:
    if head.spec.precision == "int8":
        return (f"int8: the backbone is the NNCF-quantized model the head was trained with (sha256:"
                f"{head.spec.model_sha256[:12]}), the head fp32; it runs on OpenVINO only")
    if trained_on != "fp32":
        return (f"fp32, asked for explicitly: the head was trained on {trained_on} embeddings, so its answers "
                "can differ a little from `tl-embed predict` with its model file")
    return "fp32"


def _readme(head: Head, fmt: str, trained_on: str) -> str:
    s, n = head.spec.input_size, len(head.classes)
    load, run = _USAGE[fmt]
    return f"""# Image classifier exported by tl-embed {__version__}

`{FORMATS[fmt]}` ({fmt}): {head.head} head on {head.spec.describe()}, {n} classes.

- **Precision**: {_precision_note(head, trained_on)}.
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
