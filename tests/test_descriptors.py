"""``--pooling gem|rmac``: the retrieval literature's descriptors, computed inside the converted model, recorded in
the store and enforced on queries, heads and indexes."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

from tl_embed.cli import main
from tl_embed.embedding.backbones import check_compatible, load_backbone
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.pooling import EPS, rmac_regions
from tl_embed.embedding.query import embed_for
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import TlEmbedError


def numpy_gem(maps: np.ndarray, p: float = 3.0) -> np.ndarray:
    return np.mean(np.maximum(maps, EPS) ** p, axis=(1, 2)) ** (1 / p)


def numpy_rmac(maps: np.ndarray) -> np.ndarray:
    total = np.zeros((len(maps), maps.shape[-1]))
    for top, left, size in rmac_regions(maps.shape[1], maps.shape[2]):
        region = maps if size == -1 else maps[:, top:top + size, left:left + size]
        v = region.max(axis=(1, 2))
        total += v / (np.linalg.norm(v, axis=1, keepdims=True) + EPS)
    return total


def test_rmac_regions_follow_the_papers_grid():
    # a 7 x 7 map (MobileNetV2 at 224 px): the whole map, level 1 (the whole map again), 2 x 2 regions of 4,
    # 3 x 3 regions of 3 - cirtorch's layout, 40% overlap
    expected = [(0, 0, 7), (0, 0, 7)] + [(t, left, 4) for t in (0, 3) for left in (0, 3)] + \
               [(t, left, 3) for t in (0, 2, 4) for left in (0, 2, 4)]
    assert rmac_regions(7, 7) == expected
    wide = rmac_regions(7, 10)  # an oblong map gets more regions along its long side
    assert wide[0] == (0, 0, -1) and len(wide) > len(expected)
    assert all(t + s <= 7 and left + s <= 10 for t, left, s in wide[1:])


def test_gem_with_p_1_is_average_pooling_and_p_3_is_the_formula():
    import keras

    from tl_embed.embedding.pooling import gem, pool

    maps = np.random.default_rng(0).random((3, 5, 6, 4)).astype("float32")
    inputs = keras.Input((5, 6, 4))
    avg, gem1, gem3, rmac = keras.Model(inputs, [pool(inputs, "avg"), gem(inputs, 1.0), pool(inputs, "gem"),
                                                 pool(inputs, "rmac")]).predict(maps, verbose=0)
    np.testing.assert_allclose(gem1, avg, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gem3, numpy_gem(maps), rtol=1e-5)
    np.testing.assert_allclose(rmac, numpy_rmac(maps), rtol=1e-5)


@pytest.mark.parametrize("pooling", ["gem", "rmac"])
def test_store_holds_the_descriptor_computed_by_openvino(pooling, image_folder, tiny_model, tmp_path):
    import keras

    report = embed_folder(image_folder, tmp_path / "s.tle", model=tiny_model, layer="features", pooling=pooling,
                          progress=False, runtime="openvino")
    assert report.runtime == "openvino"
    with EmbeddingStore.open(tmp_path / "s.tle") as s:
        assert s.spec.pooling == pooling and f"{pooling} pooling" in s.spec.describe()
        paths, stored = [image_folder / p for p in s.paths], np.array(s.embeddings)
    # the reference: the feature map from Keras, pooled in numpy
    from tl_embed.embedding.images import load_image

    net = keras.models.load_model(tiny_model)
    cut = keras.Model(net.inputs, net.get_layer("features").output)
    pixels = np.stack([load_image(p, 32).pixels for p in paths]).astype("float32")
    maps = cut.predict(pixels, verbose=0)
    expected = numpy_gem(maps) if pooling == "gem" else numpy_rmac(maps)
    np.testing.assert_allclose(stored, expected, rtol=2e-4, atol=2e-5)
    # queries are embedded with the store's descriptor
    spec = load_backbone(tiny_model, pooling=pooling, layer="features").spec
    np.testing.assert_allclose(embed_for(spec, [paths[0]]).vectors[0], stored[0], rtol=1e-5, atol=1e-6)


def test_descriptors_are_never_mixed(image_folder, tiny_model, tmp_path, capsys):
    embed_folder(image_folder, tmp_path / "gem.tle", model=tiny_model, layer="features", pooling="gem",
                 progress=False)
    assert main(["embed", str(image_folder), "--out", str(tmp_path / "gem.tle"), "--model", tiny_model,
                 "--layer", "features", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uses gem pooling, not avg" in err[0]
    with EmbeddingStore.open(tmp_path / "gem.tle") as s:
        gem_spec = s.spec
    with pytest.raises(TlEmbedError, match="avg pooling"):
        check_compatible(gem_spec, replace(gem_spec, pooling="avg"), "the index")
    # a head trained on an avg store is refused on the gem store, and the other way round
    embed_folder(image_folder, tmp_path / "avg.tle", model=tiny_model, layer="features", progress=False)
    assert main(["train", str(tmp_path / "avg.tle"), "--out", str(tmp_path / "avg.tlh")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "avg.tlh"), str(tmp_path / "gem.tle")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "avg pooling" in err[0] and "gem pooling" in err[0]


def test_scales_are_checked_and_written_one_way():
    from tl_embed.embedding.pooling import check_scales, scale_sizes

    assert check_scales("1.414, 1") == "1,1.414" == check_scales("1,1.414,1")
    assert scale_sizes(224, "1,1.414") == [224, 317]
    for bad in ("", "0", "1,x", "5", "1,1.2,1.4,1.6,1.8"):
        with pytest.raises(TlEmbedError, match="--scales takes"):
            check_scales(bad)


def test_one_scale_leaves_the_spec_as_it_was(tiny_model):
    spec = load_backbone(tiny_model, pooling="gem", layer="features").spec
    assert spec.scales == "1" and "scales" not in spec.to_dict() and len(spec.model_identity()) == 7
    with pytest.raises(TlEmbedError, match="built-in backbones"):
        load_backbone(tiny_model, layer="features", scales="1,1.414")


def test_multiscale_store_holds_cirtorchs_combination_computed_by_openvino(image_folder, tmp_path):
    """Each scale's GeM from Keras's feature map, L2-normalised, then their power mean with p = 3."""
    import keras

    from tl_embed.embedding.images import load_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_backbone("mobilenet_v3_small", weights="none", pooling="gem", scales="1.414,1")
    assert not [w for w in caught if "input_shape" in str(w.message)]  # expected, so never shown to the user
    spec = loaded.spec
    assert (spec.scales, spec.input_size) == ("1,1.414", 317) and "gem pooling, scales 1,1.414" in spec.describe()
    report = embed_folder(image_folder, tmp_path / "s.tle", model="mobilenet_v3_small", weights="none", pooling="gem",
                          scales="1,1.414", loader=lambda *_a, **_k: loaded, progress=False, runtime="openvino")
    assert report.runtime == "openvino"
    with EmbeddingStore.open(tmp_path / "s.tle") as s:
        assert s.spec == spec and s.spec.to_dict()["scales"] == "1,1.414"
        paths, stored = [image_folder / p for p in s.paths[:4]], np.array(s.embeddings[:4])
    net = next(layer for layer in loaded.model.layers if isinstance(layer, keras.Model))  # the shared backbone
    pixels = np.stack([load_image(p, 317).pixels for p in paths]).astype("float32")
    per_scale = []
    for x in (keras.ops.convert_to_numpy(keras.ops.image.resize(pixels, (224, 224))), pixels):
        d = numpy_gem(net.predict(x, verbose=0))
        per_scale.append(d / (np.linalg.norm(d, axis=1, keepdims=True) + EPS))
    expected = np.mean([d ** 3 for d in per_scale], axis=0) ** (1 / 3)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-5)


def test_scales_are_never_mixed(image_folder, tmp_path, capsys):
    args = ["embed", str(image_folder), "--out", str(tmp_path / "ms.tle"), "--model", "mobilenet_v3_small",
            "--weights", "none", "--scales", "1,1.414", "-q"]
    assert main(args) == 0
    assert main(args[:-3] + ["-q"]) == 2  # the same store, one scale
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scales 1,1.414, not --scales 1" in err[0]
    with EmbeddingStore.open(tmp_path / "ms.tle") as s:
        multi = s.spec
    single = replace(multi, scales="1", input_size=224)
    with pytest.raises(TlEmbedError, match="--scales 1,1.414, but this uses --scales 1;"):
        check_compatible(multi, single, "the index")
