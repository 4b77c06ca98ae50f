"""A new store made with options seen before takes its spec from the recipe, not from a Keras build, and
only while the file the spec names is unchanged (the no-TensorFlow start itself: test_serve_startup.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tl_embed.embedding import backbones
from tl_embed.embedding.backbones import BackboneSpec, LoadedBackbone, sha256_file
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.recipes import BackboneOptions, recall, remember
from tl_embed.embedding.store import EmbeddingStore


@pytest.fixture
def builds(monkeypatch, tmp_path) -> list[str]:
    """The custom models Keras builds from here on, in a cache of this test's own."""
    monkeypatch.setenv("TL_EMBED_CACHE", str(tmp_path / "cache"))
    built: list[str] = []
    original = backbones._load_custom

    def counted(path, *args, **kwargs):
        built.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(backbones, "_load_custom", counted)
    return built


def embed(images, out, model, **kw) -> EmbeddingStore:
    embed_folder(images, out, model=model, layer="features", progress=False, **kw)
    return EmbeddingStore.open(out)


def test_a_second_store_with_the_same_options_is_not_built(tmp_path, image_folder, tiny_model, builds):
    with embed(image_folder, tmp_path / "a.tle", tiny_model) as a:
        assert len(builds) == 1
        with embed(image_folder, tmp_path / "b.tle", tiny_model) as b:
            assert len(builds) == 1  # spec from the recipe, vectors from the cached IR
            assert b.spec == a.spec
            np.testing.assert_array_equal(np.asarray(b.embeddings), np.asarray(a.embeddings))
        with embed(image_folder, tmp_path / "flip.tle", tiny_model, tta="flip") as flip:
            assert len(builds) == 1 and flip.spec.tta == "flip"
            assert flip.spec.model_identity() == a.spec.model_identity()
    with embed(image_folder, tmp_path / "keras.tle", tiny_model, runtime="keras"):
        assert len(builds) == 2  # the Keras runtime runs the built model itself
    with embed(image_folder, tmp_path / "max.tle", tiny_model, pooling="max") as other:
        assert len(builds) == 3 and other.spec.pooling == "max"  # other options: another recipe


def test_a_changed_model_file_is_built_again(tmp_path, image_folder, tiny_model, builds):
    import keras

    model = tmp_path / "m.keras"
    shutil.copy(tiny_model, model)
    with embed(image_folder, tmp_path / "a.tle", str(model)) as a:
        first = a.spec
    net = keras.models.load_model(model, compile=False)
    net.set_weights([w * 2 for w in net.get_weights()])
    net.save(model)  # the same path and options, other bytes
    with embed(image_folder, tmp_path / "b.tle", str(model)) as b:
        assert len(builds) == 2
        assert b.spec.weights_sha256 == sha256_file(model) != first.weights_sha256


def test_a_damaged_or_missing_recipe_means_a_build(tmp_path, image_folder, tiny_model, builds):
    options = BackboneOptions(tiny_model, layer="features")
    embed(image_folder, tmp_path / "a.tle", tiny_model).close()
    assert recall(options) is not None
    options.path().write_text("{not json")
    assert recall(options) is None
    embed(image_folder, tmp_path / "b.tle", tiny_model).close()
    assert len(builds) == 2 and recall(options) is not None  # rewritten by the build
    options.path().unlink()
    assert recall(options) is None


def test_random_weights_leave_no_recipe_and_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_EMBED_CACHE", str(tmp_path / "cache"))
    options = BackboneOptions("mobilenet_v2", weights="none")
    spec = BackboneSpec("mobilenet_v2", "random", "random", 224, "p", "avg", 1280)
    remember(options, LoadedBackbone(None, spec))
    assert not options.path().exists()
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"weights")
    spec = BackboneSpec("mobilenet_v2", str(weights), sha256_file(weights), 224, "p", "avg", 1280)
    options = BackboneOptions("mobilenet_v2", weights=str(weights))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "recipes").write_text("a file where the folder would go")
    remember(options, LoadedBackbone(None, spec, str(weights)))  # nothing written, nothing raised
    assert recall(options) is None
    (tmp_path / "cache" / "recipes").unlink()
    remember(options, LoadedBackbone(None, spec, str(weights)))
    assert recall(options) == spec
    weights.write_bytes(b"other weights")
    assert recall(options) is None
