"""The public Python API: what ``import tl_embed`` offers, the heads as a scikit-learn estimator, the verbs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

import tl_embed
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.heads.estimator import HeadClassifier

SPEC = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", 16)


def blobs(labels=(2, 10, 33), n=40, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (len(labels), dim))
    idx = np.repeat(np.arange(len(labels)), n)
    return (centers[idx] + rng.normal(0, 0.3, (len(idx), dim))).astype(np.float32), np.asarray(labels)[idx]


def test_import_is_light_and_every_public_name_resolves():
    code = ("import sys, tl_embed; heavy = [m for m in ('tensorflow', 'keras', 'faiss', 'sklearn') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import importlib

    for package in ("tl_embed", "tl_embed.embedding", "tl_embed.heads", "tl_embed.search", "tl_embed.serve"):
        module = importlib.import_module(package)
        assert module.__all__ and sorted(set(module.__all__)) == sorted(module.__all__)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018


def test_head_classifier_keeps_the_label_type_and_order():
    X, y = blobs()
    clf = HeadClassifier(kind="logreg").fit(X, y)
    assert clf.classes_.tolist() == [2, 10, 33]  # numeric order, not the text order "10" < "2"
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert (clf.predict(X) == y).mean() > 0.95 and clf.predict(X).dtype == y.dtype
    assert clf.classes_[proba.argmax(1)].tolist() == clf.predict(X).tolist()
    assert clf.score(X, y) > 0.95 and clf.n_features_in_ == 16


def test_head_classifier_in_pipeline_and_grid_search():
    X, y = blobs(n=30)
    pipe = make_pipeline(Normalizer(), HeadClassifier(kind="logreg", cv=2))
    assert cross_val_score(pipe, X, y, cv=3).mean() > 0.9
    search = GridSearchCV(HeadClassifier(cv=2), {"kind": ["logreg", "knn"]}, cv=3).fit(X, y)
    assert search.best_params_["kind"] in ("logreg", "knn") and search.best_score_ > 0.9
    cloned = clone(HeadClassifier(kind="knn", transform="auto", spec=SPEC))
    assert cloned.get_params()["kind"] == "knn" and cloned.spec == SPEC


def test_head_classifier_unfitted_raises_and_saves_what_train_saves(tmp_path):
    X, y = blobs(labels=("cat", "dog"))
    with pytest.raises(NotFittedError):
        HeadClassifier().predict(X)
    clf = HeadClassifier(kind="svm", spec=SPEC).fit(X, y)
    clf.save(tmp_path / "m.tlh")
    loaded = tl_embed.Head.load(tmp_path / "m.tlh")
    assert loaded.spec == SPEC and loaded.head == "svm" and loaded.classes == ["cat", "dog"]
    np.testing.assert_allclose(loaded.predict_proba(X), clf.predict_proba(X), atol=1e-6)
    again = HeadClassifier.from_head(tmp_path / "m.tlh")
    assert again.predict(X).tolist() == clf.predict(X).tolist()


def test_keras_image_embedder_refuses_transform_before_fit(image_folder, tiny_model):
    paths = sorted(str(p) for p in image_folder.rglob("*.jpg"))[:3]
    embedder = tl_embed.KerasImageEmbedder(tiny_model, tta="flip")
    with pytest.raises(NotFittedError):
        embedder.transform(paths)
    embedder.fit()
    assert embedder.spec_.tta == "flip" and embedder.transform(paths).shape == (3, 3)


def test_the_verbs_chain_from_folder_to_index(tmp_path, image_folder, tiny_model):
    store, model = tmp_path / "s.tle", tmp_path / "m.tlh"
    report = tl_embed.embed_folder(image_folder, store, model=tiny_model, progress=False)
    assert report.embedded == 18 and isinstance(report, tl_embed.EmbedReport)
    head = tl_embed.train(store, model, head="logreg")
    assert model.is_file() and head.metrics["accuracy"] > 0.9 and "trained_on" in head.metrics
    metrics = tl_embed.evaluate(model, store)
    assert isinstance(metrics, tl_embed.Metrics) and metrics.n == head.metrics["n"]
    index = tl_embed.build_index(store, tmp_path / "s.tli", quiet=True)
    [(query, hits)] = index.search([str(image_folder / "red" / "red_000.jpg")], k=3)
    assert hits[0].path.endswith("red/red_000.jpg") and all(isinstance(h, tl_embed.SearchHit) for h in hits)
    groups = tl_embed.find_duplicates(store, threshold=0.9999)
    assert isinstance(groups, list)
