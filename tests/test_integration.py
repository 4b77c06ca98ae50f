"""Real photos through the genuine ImageNet MobileNetV2 (offline, via a temporary KERAS_HOME)."""

import numpy as np
import pytest
from conftest import shared_dataset

from tl_embed.embedding.backbones import sha256_file
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import WeightsUnavailableError


@pytest.fixture(scope="module")
def hymenoptera_store(tmp_path_factory, keras_home):
    mp = pytest.MonkeyPatch()
    mp.setenv("KERAS_HOME", str(keras_home))
    out = tmp_path_factory.mktemp("real") / "hym.tle"
    report = embed_folder(shared_dataset("hymenoptera"), out, model="mobilenet_v2", progress=False)
    mp.undo()
    return out, report


def test_real_photos_embed_with_genuine_weights(hymenoptera_store, keras_home, monkeypatch):
    from tl_embed.embedding.recipes import BackboneOptions, recall

    out, report = hymenoptera_store
    assert report.embedded == 398 and not report.failed
    weights = keras_home / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert report.spec.weights_sha256 == sha256_file(weights)
    monkeypatch.setenv("KERAS_HOME", str(keras_home))  # the recipe is of the ImageNet file in this Keras cache
    assert recall(BackboneOptions("mobilenet_v2")) == report.spec
    with EmbeddingStore.open(out) as s:
        x, labels, splits = np.asarray(s.embeddings), s.labels, s.splits
    # ImageNet features separate ants from bees: nearest class centroid gets most val images right
    train, val = splits == "train", splits == "val"
    names = sorted(set(labels))
    centroids = np.stack([x[train & (labels == n)].mean(0) for n in names])
    pred = np.array(names)[np.argmin(((x[val, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert (pred == labels[val]).mean() > 0.85


def test_missing_imagenet_weights_say_which_file(tmp_path, monkeypatch):
    from tl_embed.embedding.backbones import load_backbone

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="mobilenet_1_0_224_tf_no_top.h5 at "):
        load_backbone("mobilenet")


def test_logreg_head_on_real_embeddings(hymenoptera_store):
    from tl_embed.heads.training import train_from_store

    res = train_from_store(hymenoptera_store[0], "logreg")
    assert res.split == "the store's 'val' split" and res.metrics.n == 153
    assert res.metrics.accuracy > 0.9  # ants vs bees from ImageNet MobileNetV2 features


def test_classify_with_the_full_imagenet_model(use_keras_home):
    from tl_embed.embedding.classify import classify

    cats = sorted((shared_dataset("pets3") / "test" / "Abyssinian").glob("*.jpg"))[:8]
    results = classify(cats, "mobilenet_v2", top_k=3)
    cat_words = ("cat", "tabby", "lynx", "cougar")
    hits = sum(any(w in name for name, _ in preds for w in cat_words) for _, preds in results)
    assert hits >= 6, results


def test_openvino_store_matches_the_keras_reference_on_real_photos(hymenoptera_store, use_keras_home):
    """The store was written by the auto (openvino) runtime; Keras recomputes 96 photos from scratch."""
    from tl_embed.embedding.backbones import load_backbone
    from tl_embed.embedding.images import load_image
    from tl_embed.embedding.runtime import KerasRuntime

    out, report = hymenoptera_store
    assert report.runtime == "openvino"
    with EmbeddingStore.open(out) as s:
        picked = np.arange(0, len(s), 4)[:96]
        stored = np.asarray(s.embeddings)[picked]
        files = [s.absolute_path(s.rows[i].path) for i in picked]
    keras_run = KerasRuntime(load_backbone("mobilenet_v2"))
    reference = keras_run(np.stack([load_image(f, 224).pixels for f in files]))
    cos = (stored * reference).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= 0.9999
