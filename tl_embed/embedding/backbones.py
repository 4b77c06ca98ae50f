"""Backbone registry: name -> Keras application, preprocessing, input size and embedding size.

The registry itself is plain data so ``tl-embed models`` and every module that only reads specs start
without TensorFlow; :func:`load_backbone` is the one place that imports Keras and builds a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TlEmbedError, WeightsUnavailableError
from ..tf_quiet import import_keras
from .pooling import check_scales, multiscale, pool, scale_sizes

POOLINGS = ("avg", "max", "gem", "rmac")  # global descriptors of the last feature map (pooling.py)
TTAS = ("none", "flip")  # test-time augmentations (tta.py): the views averaged into an embedding
PRECISIONS = ("fp32", "bf16", "int8")  # what the network computes in (precision.py)
CUSTOM_MODEL_SUFFIXES = (".keras", ".h5")


@dataclass(frozen=True)
class Backbone:
    """One ``keras.applications`` model usable as a frozen feature extractor."""

    name: str  # our CLI name, e.g. "mobilenet_v2"
    keras_name: str  # attribute of keras.applications, e.g. "MobileNetV2"
    module: str  # keras.applications sub-module holding its preprocess_input
    input_size: int
    dim: int  # embedding size with global pooling
    note: str

    @property
    def preprocessing(self) -> str:
        return f"keras.applications.{self.module}.preprocess_input"


def _family(module: str, note: str, *entries: tuple[str, str, int, int]) -> list[Backbone]:
    return [Backbone(n, k, module, s, d, note) for n, k, s, d in entries]


_ENTRIES: list[Backbone] = [
    *_family("mobilenet", "MobileNet v1: small and fast, a good laptop default's older sibling",
             ("mobilenet", "MobileNet", 224, 1024)),
    *_family("mobilenet_v2", "MobileNetV2: fast, strong features; the recommended CPU default",
             ("mobilenet_v2", "MobileNetV2", 224, 1280)),
    *_family("mobilenet_v3", "MobileNetV3 (preprocessing built in): fastest family",
             ("mobilenet_v3_small", "MobileNetV3Small", 224, 576),
             ("mobilenet_v3_large", "MobileNetV3Large", 224, 960)),
    *_family("efficientnet", "EfficientNet (preprocessing built in): accurate, grows with size",
             ("efficientnet_b0", "EfficientNetB0", 224, 1280),
             ("efficientnet_b1", "EfficientNetB1", 240, 1280),
             ("efficientnet_b2", "EfficientNetB2", 260, 1408),
             ("efficientnet_b3", "EfficientNetB3", 300, 1536),
             ("efficientnet_b4", "EfficientNetB4", 380, 1792),
             ("efficientnet_b5", "EfficientNetB5", 456, 2048),
             ("efficientnet_b6", "EfficientNetB6", 528, 2304),
             ("efficientnet_b7", "EfficientNetB7", 600, 2560)),
    *_family("efficientnet_v2", "EfficientNetV2 (preprocessing built in): faster training-era design",
             ("efficientnet_v2_b0", "EfficientNetV2B0", 224, 1280),
             ("efficientnet_v2_b1", "EfficientNetV2B1", 240, 1280),
             ("efficientnet_v2_b2", "EfficientNetV2B2", 260, 1408),
             ("efficientnet_v2_b3", "EfficientNetV2B3", 300, 1536),
             ("efficientnet_v2_s", "EfficientNetV2S", 384, 1280),
             ("efficientnet_v2_m", "EfficientNetV2M", 480, 1280),
             ("efficientnet_v2_l", "EfficientNetV2L", 480, 1280)),
    *_family("resnet", "ResNet (caffe preprocessing): the classic baseline",
             ("resnet50", "ResNet50", 224, 2048),
             ("resnet101", "ResNet101", 224, 2048),
             ("resnet152", "ResNet152", 224, 2048)),
    *_family("resnet_v2", "ResNet v2 (pre-activation)",
             ("resnet50_v2", "ResNet50V2", 224, 2048),
             ("resnet101_v2", "ResNet101V2", 224, 2048),
             ("resnet152_v2", "ResNet152V2", 224, 2048)),
    *_family("inception_v3", "InceptionV3: 299 px input",
             ("inception_v3", "InceptionV3", 299, 2048)),
    *_family("inception_resnet_v2", "InceptionResNetV2: 299 px input, heavy",
             ("inception_resnet_v2", "InceptionResNetV2", 299, 1536)),
    *_family("xception", "Xception: 299 px input",
             ("xception", "Xception", 299, 2048)),
    *_family("densenet", "DenseNet: compact features, slowish on CPU",
             ("densenet121", "DenseNet121", 224, 1024),
             ("densenet169", "DenseNet169", 224, 1664),
             ("densenet201", "DenseNet201", 224, 1920)),
    *_family("vgg16", "VGG16: large and slow, historical reference",
             ("vgg16", "VGG16", 224, 512)),
    *_family("vgg19", "VGG19: large and slow, historical reference",
             ("vgg19", "VGG19", 224, 512)),
    *_family("nasnet", "NASNet: architecture-search models",
             ("nasnet_mobile", "NASNetMobile", 224, 1056),
             ("nasnet_large", "NASNetLarge", 331, 4032)),
    *_family("convnext", "ConvNeXt (preprocessing built in): modern and accurate, heavy on CPU",
             ("convnext_tiny", "ConvNeXtTiny", 224, 768),
             ("convnext_small", "ConvNeXtSmall", 224, 768),
             ("convnext_base", "ConvNeXtBase", 224, 1024),
             ("convnext_large", "ConvNeXtLarge", 224, 1536),
             ("convnext_xlarge", "ConvNeXtXLarge", 224, 2048)),
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in _ENTRIES}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines an embedding; recorded in stores, model files and indexes.

    Two specs with equal :meth:`identity` produce interchangeable embeddings.
    """

    name: str  # registry name, or the custom model file's name
    weights: str  # "imagenet", "random", or the weights/model file given
    weights_sha256: str  # sha256 of the weights file, or "random"
    input_size: int
    preprocessing: str
    pooling: str
    dim: int
    layer: str | None = None  # custom models: layer the features are cut at
    extra: dict[str, Any] = field(default_factory=dict)
    tta: str = "none"  # test-time augmentation: the views averaged into each embedding (see tta.py)
    precision: str = "fp32"  # fp32, bf16 or int8 (see precision.py)
    model_sha256: str = ""  # int8: the quantized model the store carries (carried.py); else empty
    scales: str = "1"  # image scales whose descriptors are combined, e.g. "1,1.414" (pooling.multiscale)

    def model_identity(self) -> tuple:
        """What the fp32 network computes, whatever views it is shown (the converted-model cache's key)."""
        single = () if self.scales == "1" else (self.scales,)  # single-scale keys stay as they were
        return (self.name, self.weights_sha256, self.input_size, self.preprocessing, self.pooling,
                self.dim, self.layer, *single)

    def identity(self) -> tuple:
        return (*self.model_identity(), self.tta, self.precision, self.model_sha256)

    def describe(self) -> str:
        w = "random weights" if self.weights_sha256 == "random" else (
            f"{self.weights} weights sha256:{self.weights_sha256[:12]}")
        cut = f", layer {self.layer}" if self.layer else ""
        tta = f", {self.tta} TTA" if self.tta != "none" else ""
        precision = f", {self.precision}" if self.precision != "fp32" else ""
        scales = f", scales {self.scales}" if self.scales != "1" else ""
        return (f"{self.name} ({w}, {self.input_size}px, {self.pooling} pooling{scales}{cut}, dim {self.dim}"
                f"{tta}{precision})")

    def to_dict(self) -> dict[str, Any]:
        """As recorded in stores, indexes and heads; the later settings only when used, so files without
        them read exactly as before (and older tl_embed versions still read them)."""
        d = asdict(self)
        for key, default in _OMITTED_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(**d)

    def loadable(self) -> tuple[str, str]:
        """(model, weights) arguments that rebuild this backbone with :func:`load_backbone`."""
        if self.weights_sha256 == "random":
            return self.name, "none"
        return self.extra.get("model_path", self.name), self.weights


_OMITTED_DEFAULTS = {"tta": "none", "precision": "fp32", "model_sha256": "", "scales": "1"}


def check_compatible(expected: BackboneSpec, found: BackboneSpec, what: str) -> None:
    """Refuse to mix embeddings from two different backbones, or from two settings of one."""
    def network(spec: BackboneSpec) -> tuple:  # what stays when only the scales differ (the input size follows)
        return spec.name, spec.weights_sha256, spec.preprocessing, spec.pooling, spec.dim, spec.layer

    if network(expected) == network(found) and expected.scales != found.scales:
        raise TlEmbedError(f"{what} was embedded with --scales {expected.scales}, but this uses --scales "
                           f"{found.scales}; descriptors of different image scales cannot be mixed")
    if expected.model_identity() == found.model_identity():
        if expected.tta != found.tta:
            raise TlEmbedError(
                f"{what} was embedded with --tta {expected.tta}, but this uses --tta {found.tta}; "
                "embeddings made with different test-time augmentation cannot be mixed")
        if expected.precision != found.precision:
            raise TlEmbedError(
                f"{what} was embedded with --precision {expected.precision}, but this uses --precision "
                f"{found.precision}; embeddings computed in different precisions cannot be mixed")
        if expected.model_sha256 != found.model_sha256:
            raise TlEmbedError(
                f"{what} was embedded by the int8 model sha256:{expected.model_sha256[:12]}, but this uses "
                f"sha256:{found.model_sha256[:12]} (quantized on other images, or by another version); "
                "they cannot be mixed")
    if expected.identity() != found.identity():
        raise TlEmbedError(
            f"{what} was made with {expected.describe()}, but this uses {found.describe()}; "
            "embeddings from different backbones cannot be mixed")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: ``$KERAS_HOME/models`` (default ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def converted_cache_dir() -> Path:
    """Where converted models live: ``$TL_EMBED_CACHE``, else ``tl_embed/`` beside Keras's cache."""
    env = os.environ.get("TL_EMBED_CACHE")
    return Path(env).expanduser() if env else keras_cache_dir().parent / "tl_embed"


def is_custom_model(model: str) -> bool:
    return model.lower().endswith(CUSTOM_MODEL_SUFFIXES)


def check_model_options(model: str, layer: str | None, preprocess: str | None) -> None:
    """Refuse options that would be silently ignored: built-in backbones have a fixed cut and preprocessing."""
    if is_custom_model(model):
        return
    get_backbone(model)  # an unknown name fails here, before any work
    given = [f"--{name} {value}" for name, value in (("layer", layer), ("preprocess", preprocess)) if value]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise TlEmbedError(f"{' and '.join(given)} only {verb} to a custom model file (--model my_model.keras); "
                           f"{model} is built in, with its own pooled output and preprocessing")


def get_backbone(name: str) -> Backbone:
    key = name.lower().replace("-", "_")
    if key not in BACKBONES:
        close = [n for n in BACKBONES if key[:5] in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TlEmbedError(f"unknown model {name!r}{hint}; `tl-embed models` lists them, or pass "
                           "a saved Keras model file (.keras/.h5)")
    return BACKBONES[key]


@dataclass
class LoadedBackbone:
    """A built Keras model mapping float32 RGB pixels in [0, 255] (N, S, S, 3) to (N, dim)."""

    model: Any
    spec: BackboneSpec
    source: str | None = None  # the file whose sha256 the spec records (recipes.py checks it on recall)


def load_backbone(model: str, weights: str = "imagenet", pooling: str = "avg",
                  layer: str | None = None, preprocess: str | None = None,
                  include_top: bool = False, scales: str = "1") -> LoadedBackbone:
    """Build the frozen feature extractor, preprocessing included in the graph.

    ``model`` is a registry name or a saved Keras model file; ``weights`` is ``imagenet``, ``none``
    or a path to a weights file.  ``include_top`` builds the full ImageNet classifier instead.
    ``scales`` other than ``"1"`` combine the descriptors of the image at several scales (see
    :func:`~tl_embed.embedding.pooling.multiscale`): the model then takes the largest scale's pixels.
    """
    if pooling not in POOLINGS:
        raise TlEmbedError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    check_model_options(model, layer, preprocess)
    scales = check_scales(scales)
    if is_custom_model(model):
        if scales != "1":
            raise TlEmbedError(f"--scales applies to the built-in backbones; {Path(model).name} takes one input "
                               "size of its own (drop --scales)")
        return _load_custom(model, layer, pooling, preprocess)
    if include_top and scales != "1":
        raise TlEmbedError("--scales makes a descriptor, not the ImageNet classifier")
    return _load_application(get_backbone(model), weights, pooling, include_top, scales)


def _load_application(bb: Backbone, weights: str, pooling: str, include_top: bool,
                      scales: str = "1") -> LoadedBackbone:
    keras = import_keras()
    ctor = getattr(keras.applications, bb.keras_name)
    weights_arg, sha = _resolve_weights(weights)
    sizes = scale_sizes(bb.input_size, scales)
    shape = (sizes[-1], sizes[-1], 3)  # the model takes the largest scale; smaller ones are resized in the graph
    several = len(sizes) > 1
    kwargs = dict(include_top=include_top, input_shape=(None, None, 3) if several else shape)
    if not include_top and pooling in ("avg", "max") and not several:  # Keras's own; else on the feature map
        kwargs["pooling"] = pooling
    with keras_downloads(bb.name) as used, warnings.catch_warnings():  # several scales: any size, on purpose
        warnings.filterwarnings("ignore", message=".*input_shape. is undefined or non-square", category=UserWarning)
        try:
            net = ctor(weights=weights_arg, **kwargs)
        except (ValueError, OSError) as e:
            if weights_arg not in (None, "imagenet"):
                raise TlEmbedError(f"cannot load weights {weights} into {bb.name}: {e}") from None
            raise
    if weights_arg == "imagenet":
        sha = sha256_file(used[-1])
    preprocess = getattr(keras.applications, bb.module).preprocess_input
    inputs = keras.Input(shape=shape, dtype="float32", name="rgb_0_255")
    if several:
        outputs = multiscale(inputs, sizes, lambda x: pool(net(preprocess(x), training=False), pooling), pooling)
    else:
        outputs = net(preprocess(inputs), training=False)
        if not include_top and pooling not in ("avg", "max"):
            outputs = pool(outputs, pooling)
    net.trainable = False
    full = keras.Model(inputs, outputs, name=f"tl_embed_{bb.name}")
    dim = int(full.output_shape[-1])
    spec = BackboneSpec(bb.name, "random" if weights_arg is None else weights, sha, sizes[-1], bb.preprocessing,
                        "top" if include_top else pooling, dim, scales=scales)
    return LoadedBackbone(full, spec, used[-1] if weights_arg == "imagenet" else weights_arg)


def _resolve_weights(weights: str) -> tuple[str | None, str]:
    """Map the user's ``weights`` to Keras's argument and (for files) the sha256 identity."""
    w = str(weights).strip()
    if w.lower() in ("none", "random", ""):
        return None, "random"
    if w.lower() == "imagenet":
        return "imagenet", ""  # sha256 filled in from the cache file Keras used
    path = Path(w).expanduser()
    if not path.is_file():
        raise TlEmbedError(f"weights must be 'imagenet', 'none' or an existing file; {w!r} is none")
    return str(path), sha256_file(path)


@contextlib.contextmanager
def keras_downloads(what: str) -> Iterator[list[str]]:
    """Record which cached file Keras loads, and turn a failed download into a clear message.

    Keras applications fetch weights with ``keras.src.utils.file_utils.get_file``; wrapping it
    tells us the exact file (for its sha256) and its canonical cache name (for the error).
    """
    from keras.src.utils import file_utils

    used: list[str] = []
    original = file_utils.get_file

    def get_file(fname=None, origin=None, *args, **kwargs):
        kwargs["cache_dir"] = str(keras_cache_dir().parent)  # Keras reads KERAS_HOME only at import
        try:
            path = original(fname, origin, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any download failure means "not available"
            target = keras_cache_dir() / (fname or os.path.basename(origin or ""))
            raise WeightsUnavailableError(
                f"ImageNet files for {what} are not in the Keras cache and could not be "
                f"downloaded ({type(e).__name__}). Put the file {target.name} at {target} "
                f"(from {origin}), or pass --weights none for random weights") from None
        used.append(path)
        return path

    file_utils.get_file = get_file
    try:
        yield used
    finally:
        file_utils.get_file = original


def _load_custom(path_str: str, layer: str | None, pooling: str,
                 preprocess: str | None) -> LoadedBackbone:
    """A user's saved Keras model, optionally cut at ``layer``, globally pooled if still spatial."""
    keras = import_keras()
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise TlEmbedError(f"model file {path} does not exist")
    try:
        net = keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad file
        raise TlEmbedError(f"cannot load Keras model {path}: {e}") from None
    if layer:
        try:
            out = net.get_layer(layer).output
        except ValueError:
            raise TlEmbedError(f"model {path.name} has no layer {layer!r}") from None
        net = keras.Model(net.inputs, out)
    in_shape = net.input_shape
    size = in_shape[1]
    if size is None or in_shape[1] != in_shape[2]:
        raise TlEmbedError(f"model {path.name} must take square images of fixed size, not {in_shape}")
    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="rgb_0_255")
    x = inputs
    pre = "none (pixels 0-255)"
    if preprocess:
        pre_bb = get_backbone(preprocess)
        x = getattr(keras.applications, pre_bb.module).preprocess_input(x)
        pre = pre_bb.preprocessing
    x = net(x, training=False)
    if len(x.shape) == 4:
        x = pool(x, pooling)
    elif len(x.shape) != 2:
        raise TlEmbedError(f"features of {path.name} have shape {x.shape}; expected (N, D) or (N, H, W, C)")
    net.trainable = False
    full = keras.Model(inputs, x, name="tl_embed_custom")
    spec = BackboneSpec(path.name, str(path), sha256_file(path), int(size), pre, pooling,
                        int(full.output_shape[-1]), layer, extra={"model_path": str(path.resolve())})
    return LoadedBackbone(full, spec, str(path))


