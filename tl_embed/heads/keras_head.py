"""A trained head and its backbone rebuilt as one Keras model, the graph every export format converts.

The model takes what :func:`tl_embed.embedding.images.load_image` gives, RGB uint8 images
``(N, S, S, 3)`` at the backbone's input size, and returns ``(N, classes)`` probabilities in the head's
class order.  Each head step becomes built-in Keras layers or ``keras.ops`` (no Lambda, no custom
class), so the ``.keras`` file loads without tl_embed and every converter sees plain ops:

* ``dense`` -> ``Dense`` (feature standardisation is already folded into its weights);
* ``signed_power`` -> ``sign(x) * |x| ** alpha``; ``l2_normalize`` -> ``UnitNormalization``;
* ``sigmoid_calibration`` -> folded into the preceding linear layer as one ``Dense`` with a
  ``log_sigmoid`` activation, then ``Softmax`` over classes (= ``p / sum(p)``) and the mean over
  calibration members (``GlobalAveragePooling1D``);
* ``knn`` -> squared distances as one ``Dense`` over the stored vectors, ``top_k``, and the vote as
  an ``Embedding`` lookup of one-hot labels.

Keras is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..embedding.backbones import BackboneSpec
from ..errors import TlEmbedError
from ..tf_quiet import import_tensorflow
from .graph import Step
from .head import Head

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
DUPLICATE_D2 = 1e-6  # k-NN: a squared distance below this times |x|^2 is an exact match (float32 noise)


def build_classifier(head: Head) -> Any:
    """The Keras model uint8 RGB ``(N, S, S, 3)`` -> ``(N, classes)`` probabilities."""
    import_tensorflow()
    import keras

    from ..embedding.backbones import check_compatible, load_backbone
    from ..embedding.tta import backbone_with_tta

    spec = head.spec
    if spec.precision != "fp32":  # the exported graph is Keras's fp32 backbone: another function
        raise TlEmbedError(f"this head was trained on {spec.precision} embeddings, and an exported model computes "
                           "fp32; train it on a --precision fp32 store to export it")
    model, weights = spec.loadable()
    backbone = load_backbone(model, weights=weights, pooling=spec.pooling, layer=spec.layer,
                             preprocess=_custom_preprocess(spec), scales=spec.scales)
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


def head_layers(steps: list[Step], x: Any) -> Any:
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


def _dense(x: Any, W: np.ndarray, b: np.ndarray, activation: str) -> Any:
    import keras

    layer = keras.layers.Dense(W.shape[1], activation=activation)
    y = layer(x)
    layer.set_weights([W.astype(np.float32), b.astype(np.float32)])
    return y


def _calibration(x: Any, W: np.ndarray, c: np.ndarray, step: Step) -> Any:
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


def _knn(x: Any, step: Step) -> Any:
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


def _custom_preprocess(spec: BackboneSpec) -> str | None:
    """For a custom model file: the registry backbone whose preprocessing it was embedded with."""
    from ..embedding.backbones import BACKBONES, is_custom_model

    if not is_custom_model(spec.loadable()[0]):
        return None
    return next((b.name for b in BACKBONES.values() if b.preprocessing == spec.preprocessing), None)
