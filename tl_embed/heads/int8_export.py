"""An int8 head's export: the quantized backbone it was trained on and the head, as one OpenVINO model.

An int8 head's embeddings came from the model its store quantized with NNCF on the store's own images
(carried in the head's file, :mod:`tl_embed.embedding.carried`).  That model cannot be rebuilt from Keras,
so this export is not :mod:`.keras_head`'s graph converted: it is the carried IR itself, the very bytes
``predict`` runs, with the head's layers (:func:`.keras_head.head_layers`, converted by OpenVINO) wired to
its output.  With ``--tta flip`` the mirrored images go through the backbone in the same batch and the two
embeddings are averaged, as :class:`~tl_embed.embedding.tta.TTARuntime` does.  Only OpenVINO runs it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import TlEmbedError
from ..tf_quiet import import_tensorflow
from .head import Head
from .keras_head import INPUT_NAME, OUTPUT_NAME, head_layers


def int8_classifier(head: Head) -> Any:
    """The OpenVINO model uint8 RGB ``(N, S, S, 3)`` -> ``(N, classes)`` of a head trained on int8 embeddings."""
    import openvino as ov

    from ..embedding.carried import install
    from ..embedding.runtime import read_cached

    install(head.spec, head.backbone, "this head")  # checks the carried bytes against the head's spec
    backbone = read_cached(head.spec)
    if backbone is None:
        raise TlEmbedError(f"the int8 model sha256:{head.spec.model_sha256[:12]} this head was trained with is "
                           "not readable from the model cache: load the head from its model file")
    image = backbone.get_parameters()[0]
    features = backbone.get_results()[0].input_value(0)
    if head.spec.tta == "flip":
        features = _mean_of_both_views(image, features, head.spec.dim)
    classifier = _head_model(head)
    for target in classifier.get_parameters()[0].output(0).get_target_inputs():
        target.replace_source_output(features)
    model = ov.Model(classifier.get_results(), [image], "tl_embed_classifier")
    model.input(0).get_tensor().set_names({INPUT_NAME})
    model.output(0).get_tensor().set_names({OUTPUT_NAME})
    return model


def _head_model(head: Head) -> Any:
    """The head alone, embeddings ``(N, D)`` -> probabilities, as an OpenVINO model (computed in fp32)."""
    import openvino as ov

    import_tensorflow()
    import keras

    features = keras.Input((head.spec.dim,), dtype="float32", name="features")
    probabilities = keras.layers.Identity(name=OUTPUT_NAME)(head_layers(head.steps, features))
    with warnings.catch_warnings():  # Keras warns that the converter passes inputs as a list
        warnings.simplefilter("ignore", UserWarning)
        return ov.convert_model(keras.Model(features, probabilities))


def _mean_of_both_views(image: Any, features: Any, dim: int) -> Any:
    """Feed the backbone ``[images, mirrored images]`` and return the mean of each image's two embeddings."""
    import openvino.opset13 as ops

    consumers = image.output(0).get_target_inputs()  # taken before the mirror below consumes the image too
    width = image.get_partial_shape()[2].get_length()
    mirrored = ops.gather(image, ops.constant(np.arange(width - 1, -1, -1, dtype=np.int64)), ops.constant(2))
    views = ops.concat([image, mirrored], 0)
    for target in consumers:
        target.replace_source_output(views.output(0))
    pairs = ops.reshape(features, ops.constant(np.array([2, -1, dim], np.int64)), False)
    return ops.reduce_mean(pairs, ops.constant(0), False).output(0)
