import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.sklearn_embedder import KerasImageEmbedder
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.errors import TlEmbedError
from tl_embed.heads.dense import _steps, _train
from tl_embed.heads.fit import HEADS, fit_head
from tl_embed.heads.graph import Step, forward
from tl_embed.heads.head import Head
from tl_embed.heads.metrics import Metrics
from tl_embed.heads.report import MARGIN, TITLE_SIZE, confusion_png, confusion_title, report_font
from tl_embed.heads.svm import PrimalLinearSVC
from tl_embed.heads.sweep import sweep
from tl_embed.heads.training import choose_split, train_from_store

SPEC = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", 64)


def blobs(n_per_class=60, classes=4, dim=64, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    X = centers[y] + rng.normal(0, spread, (len(y), dim)) * 0.5
    return X.astype(np.float32), np.array([f"c{i}" for i in y])


@pytest.mark.parametrize("head", HEADS)
def test_heads_learn_separable_features(head):
    X, y = blobs()
    Xt, yt = blobs(seed=0, n_per_class=20)[0] + 0.01, blobs(n_per_class=20)[1]
    fitted, info = fit_head(X, y, SPEC, head)
    assert (fitted.predict(Xt) == yt).mean() > 0.95
    proba = fitted.predict_proba(Xt)
    assert proba.shape == (80, 4) and np.allclose(proba.sum(1), 1, atol=1e-6)
    if head == "dense":  # early-stopped on a validation split, then refitted for that many epochs
        assert info["validation_rows"] == 36 and fitted.params["epochs"] >= 1
    else:
        assert info["cv_folds"] == 3 and fitted.params  # a hyper-parameter was chosen by CV


@pytest.mark.parametrize("head", HEADS)
def test_every_head_saves_as_data_and_loads_with_identical_predictions(head, tmp_path):
    X, y = blobs(n_per_class=30, classes=3, spread=2.0)
    fitted, _ = fit_head(X, y, SPEC, head)
    fitted.save(tmp_path / "m.tlh")
    loaded = Head.load(tmp_path / "m.tlh")
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
    assert loaded.params == fitted.params and loaded.head == head


def test_sweep_follows_the_optimum_past_its_start_and_refines_it():
    calls = []

    def score(C):
        calls.append(C)
        return -(np.log10(C) - 1.3) ** 2, 0.0

    best, seen = sweep(score, (-3.0, -2.0, -1.0))
    assert abs(best - 1.3) <= 0.25 and len(calls) == len(seen) == 10  # 6 decades, 2 + 2 refinements


def nuisance_problem(n, seed, d=200):
    """Two classes apart along u, plus a strong noise factor along a direction half-way between u and
    a direction orthogonal to it: a weak penalty overfits 200 features, a strong one keeps the
    mean-difference direction that the noise factor corrupts, so the test accuracy peaks sharply."""
    g = np.random.default_rng(0)
    u = g.normal(0, 1, d)
    u /= np.linalg.norm(u)
    p = g.normal(0, 1, d)
    p -= (p @ u) * u
    v = (u + p / np.linalg.norm(p)) / np.sqrt(2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = np.outer(3 * y - 1.5, u) + rng.normal(0, 1, (n, d)) + 20 * rng.normal(0, 1, (n, 1)) * v
    return X.astype(np.float32), np.array([f"c{i}" for i in y])


def test_regularisation_search_picks_the_known_best_C():
    X, y = nuisance_problem(800, seed=1)
    Xt, yt = nuisance_problem(10_000, seed=2)
    grid = np.arange(-5.0, 1.01, 0.5)  # the truth: test accuracy over log10 C on 10 000 fresh rows
    scaler = StandardScaler().fit(X)
    acc = [(LogisticRegression(C=10 ** e, max_iter=1000).fit(scaler.transform(X), y)
            .predict(scaler.transform(Xt)) == yt).mean() for e in grid]
    best = grid[int(np.argmax(acc))]
    assert max(acc) - acc[0] > 0.2 and max(acc) - acc[-1] > 0.02  # a clear peak inside the grid
    spec = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", 200)
    fitted, info = fit_head(X, y, spec, "logreg", transform="none")
    assert abs(np.log10(fitted.params["C"]) - best) <= 1.0, (fitted.params, best)  # one coarse step
    assert fitted.params["transform"] == "none" and info["cv_folds"] == 3


def test_primal_svm_solves_liblinears_problem():
    X, y = blobs(n_per_class=80, classes=3, spread=3.0)
    X = StandardScaler().fit_transform(X)
    ours = PrimalLinearSVC(C=0.05, tol=1e-6).fit(X, y)
    # liblinear penalises the intercept; a large intercept_scaling makes that penalty negligible
    ref = LinearSVC(C=0.05, intercept_scaling=100, tol=1e-8, max_iter=100_000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-3 * np.abs(ref.coef_).max())
    assert (ours.predict(X) == ref.predict(X)).mean() > 0.99
    binary = PrimalLinearSVC(C=0.05).fit(X[:160], y[:160])
    assert binary.coef_.shape == (1, 64) and binary.decision_function(X[:5]).shape == (5,)


def test_dense_steps_equal_the_keras_model():
    X, y = blobs(n_per_class=30, classes=3)
    idx = np.searchsorted(["c0", "c1", "c2"], y)
    mean, std = X.mean(0), X.std(0)
    model, _ = _train(((X - mean) / std).astype(np.float32), idx, 3, 16, 0, None, None, 5)
    steps = _steps(model, mean, std)
    assert [(s.op, s.attrs["activation"]) for s in steps] == [("dense", "relu"), ("dense", "softmax")]
    keras = model.predict(((X - mean) / std).astype(np.float32), verbose=0)
    np.testing.assert_allclose(forward(steps, X), keras, atol=1e-5)


def test_class_weight_balanced_helps_a_minority_class():
    X, y = blobs(n_per_class=100, classes=2, spread=3.0, seed=1)
    keep = np.r_[np.arange(100), np.arange(100, 110)]  # class c1 has 10 images
    balanced, _ = fit_head(X[keep], y[keep], SPEC, "logreg", class_weight="balanced", params={"C": 0.1})
    plain, _ = fit_head(X[keep], y[keep], SPEC, "logreg", params={"C": 0.1})
    minority = X[100:200]  # all of class c1, mostly unseen
    assert (balanced.predict(minority) == "c1").mean() > (plain.predict(minority) == "c1").mean()


def test_broken_input_fails_loudly():
    X, y = blobs()
    with pytest.raises(TlEmbedError, match="at least 2 classes"):
        fit_head(X, np.full(len(y), "only"), SPEC)
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(TlEmbedError, match="NaN"):
        fit_head(bad, y, SPEC)
    with pytest.raises(TlEmbedError, match="shape"):
        fit_head(X[:, :10], y, SPEC)
    with pytest.raises(TlEmbedError, match="too few images in class"):
        fit_head(X[:61], y[:61], SPEC)  # c1 has one image
    with pytest.raises(TlEmbedError, match="no labelled images"):
        fit_head(X[:0], y[:0], SPEC)


def test_split_uses_store_split_else_stratified_hold_out():
    labels = np.array(["a", "b"] * 10, dtype=object)
    splits = np.array(["train"] * 16 + ["test"] * 4, dtype=object)
    tr, te, how = choose_split(labels, splits, 0.2, 0)
    assert how == "the store's 'test' split" and list(te) == [16, 17, 18, 19]
    tr, te, how = choose_split(labels, np.array([None] * 20, dtype=object), 0.2, 0)
    assert len(te) == 4 and sorted(labels[te]) == ["a", "a", "b", "b"] and "stratified" in how
    with pytest.raises(TlEmbedError, match="only 1 image"):
        choose_split(np.array(["a", "a", "b"], dtype=object), np.array([None] * 3, dtype=object), 0.2, 0)


def make_store(path, X, y, spec=SPEC):
    with EmbeddingStore.create(path, spec) as s:
        s.add([ManifestRow(f"{c}/{i}.jpg", c, None, "h", 1, 1, 1, 1) for i, c in enumerate(y)], X)
    return path


def test_train_from_store_and_save_load_round_trip(tmp_path):
    X, y = blobs()
    res = train_from_store(make_store(tmp_path / "s.tle", X, y), "logreg")
    assert res.metrics.accuracy > 0.95 and res.metrics.n == 48
    res.head.save(tmp_path / "m.tlh")
    loaded = Head.load(tmp_path / "m.tlh")
    np.testing.assert_allclose(loaded.predict_proba(X), res.head.predict_proba(X))
    assert loaded.spec == SPEC and loaded.versions["scikit-learn"] and loaded.metrics["accuracy"] > 0.95
    with pytest.raises(TlEmbedError, match="empty"):
        train_from_store(make_store(tmp_path / "e.tle", X[:0], y[:0]))
    (tmp_path / "junk.tlh").write_bytes(b"not a model")
    with pytest.raises(TlEmbedError, match="not a readable"):
        Head.load(tmp_path / "junk.tlh")


def test_cli_train_predict_evaluate(tmp_path, image_folder, tiny_model, capsys):
    store, model = str(tmp_path / "s.tle"), str(tmp_path / "m.tlh")
    assert main(["embed", str(image_folder), "--out", store, "--model", tiny_model, "-q"]) == 0
    assert main(["train", store, "--out", model, "--head", "knn", "--test-size", "0.34"]) == 0
    out = capsys.readouterr().out
    assert "n_neighbors=" in out and "accuracy 100.00%" in out
    for suffix in (".report.json", ".report.md", ".confusion.png"):
        assert (tmp_path / f"m.tlh{suffix}").stat().st_size > 100
    assert main(["predict", model, str(image_folder / "red"), "--format", "json", "--top-k", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and all(r["label"] == "red" and len(r["top"]) == 2 for r in rows)
    # --min-confidence: a vector halfway between the red and green means gets an unsure answer
    linear = str(tmp_path / "linear.tlh")
    assert main(["train", store, "--out", linear, "--test-size", "0.34"]) == 0
    with EmbeddingStore.open(store) as s:
        x, labels = np.asarray(s.embeddings), s.labels
        red, green = x[labels == "red"].mean(0), x[labels == "green"].mean(0)
        mid = tmp_path / "mid.tle"
        with EmbeddingStore.create(mid, s.spec) as m:
            m.add([ManifestRow(n, None, None, n, 1, 1, 1, 1) for n in ("mid", "red")],
                  np.stack([(red + green) / 2, red]))
    capsys.readouterr()
    assert main(["predict", linear, str(mid), "--format", "json"]) == 0
    answers = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    unsure, sure = answers["mid"]["confidence"], answers["red"]["confidence"]
    assert unsure < sure and answers["red"]["label"] == "red"
    threshold = str((unsure + sure) / 2)
    assert main(["predict", linear, str(mid), "--min-confidence", threshold, "--format", "json"]) == 0
    labelled = {Path(r["path"]).name: r["label"] for r in json.loads(capsys.readouterr().out)}
    assert labelled == {"mid": "unknown", "red": "red"}
    assert main(["evaluate", model, str(image_folder)]) == 0
    assert "accuracy 100.00%" in capsys.readouterr().out
    assert main(["predict", model, store]) == 0  # straight from a store


def test_mismatched_backbone_is_refused(tmp_path, capsys):
    X, y = blobs()
    head, _ = fit_head(X, y, SPEC)
    head.save(tmp_path / "m.tlh")
    other = BackboneSpec("other", "random", "random", 32, "none", "avg", 64)
    make_store(tmp_path / "o.tle", X, y, other)
    assert main(["evaluate", str(tmp_path / "m.tlh"), str(tmp_path / "o.tle")]) == 2
    assert "cannot be mixed" in capsys.readouterr().err


def test_keras_image_embedder_composes_with_sklearn(image_folder, tiny_model):
    paths = sorted(str(p) for p in image_folder.rglob("*.jpg"))
    labels = [p.split("/")[-2] for p in paths]
    pipe = make_pipeline(KerasImageEmbedder(tiny_model), LogisticRegression(max_iter=1000))
    pipe.fit(paths, labels)
    assert (pipe.predict(paths) == np.array(labels)).mean() > 0.9
    assert pipe[0].transform(paths[:2]).shape == (2, 3)


def _confusion(classes: list[str]) -> Metrics:
    n = len(classes)
    cm = (np.eye(n, dtype=int) * 20 + np.roll(np.eye(n, dtype=int), 1, axis=1) * 3).tolist()
    return Metrics(20 / 23, 20 / 23, 0.87, {}, cm, classes, 23 * n)


@pytest.mark.parametrize("classes", [["cat", "dog"], [str(i) for i in range(5)],
                                     [f"species {i:02d} with a long descriptive name" for i in range(50)]])
def test_confusion_png_shows_its_whole_title_and_every_class(classes, tmp_path):
    title = "tl-embed logreg head: classifier.tlh"
    m = _confusion(classes)
    confusion_png(m, tmp_path / "c.png", title)
    img = Image.open(tmp_path / "c.png").convert("L")
    font = report_font(TITLE_SIZE)
    assert img.width >= 2 * MARGIN + max(font.getlength(line) for line in confusion_title(m, title))
    assert img.width >= 400 and img.height >= len(classes) * 24
    right_edge = img.crop((img.width - 3, 0, img.width, img.height))
    assert right_edge.getextrema() == (255, 255)  # nothing runs off the canvas (clipped text would)
    cells = np.asarray(img)[-MARGIN - 24 * len(classes):-MARGIN]
    assert (cells < 200).any()  # the grid and its counts are drawn


def test_confusion_png_wraps_a_title_too_long_for_the_matrix(tmp_path):
    m = _confusion(["cat", "dog"])
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    confusion_png(m, short, "evaluation of m.tlh")
    confusion_png(m, long, "evaluation of " + "a-very-long-model-file-name-" * 8 + ".tlh")
    wrapped, plain = Image.open(long).convert("L"), Image.open(short)
    assert wrapped.width == plain.width and wrapped.height > plain.height  # more lines, not a wider or cut title
    assert wrapped.crop((wrapped.width - 3, 0, wrapped.width, wrapped.height)).getextrema() == (255, 255)


@pytest.mark.parametrize("split_store", [False, True])
def test_evaluate_scores_held_out_rows_by_default_and_flags_training_rows(tmp_path, capsys, split_store):
    """On its own store a head is scored on the rows it never saw; its training rows only when asked, and flagged."""
    X, y = blobs(spread=4.0)  # overlapping classes: training rows score higher than held-out ones
    store = tmp_path / "s.tle"
    with EmbeddingStore.create(store, SPEC) as s:
        splits = ["test" if split_store and i % 4 == 0 else ("train" if split_store else None) for i in range(len(y))]
        rows = enumerate(zip(y, splits, strict=True))
        s.add([ManifestRow(f"{c}/{i}.jpg", c, sp, "h", 1, 1, 1, 1) for i, (c, sp) in rows], X)
    model = tmp_path / "m.tlh"
    res = train_from_store(store, "logreg")
    res.head.save(model)
    n_held = len(y) - res.n_train
    assert main(["evaluate", str(model), str(store), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert f"scored on the {n_held} labelled images held out from training" in out
    assert f"accuracy {res.metrics.accuracy:.2%}" in out and f"({n_held} images)" in out  # what train reported
    assert "held out from training" in (tmp_path / "ev.report.md").read_text()
    if split_store:
        assert main(["evaluate", str(model), str(store), "--split", "train"]) == 0
        assert f"{res.n_train} of them trained the head, so this is NOT a held-out accuracy" in capsys.readouterr().out
        assert main(["evaluate", str(model), str(store), "--split", "tset"]) == 2
        err = capsys.readouterr().err
        assert "has no split 'tset'; its splits are test (60 images), train (180 images)" in err
    # the same rows in another store: nothing there trained the head, so every row is scored
    other = make_store(tmp_path / "other.tle", X, y)
    assert main(["evaluate", str(model), str(other)]) == 0
    assert f"all {len(y)} labelled images (the head was trained on another store)" in capsys.readouterr().out
    # the store changed since training: which rows the head saw is unknown, so nothing is guessed
    with EmbeddingStore.open(store, "a") as s:
        s.add([ManifestRow("c0/new.jpg", "c0", None, "h", 1, 1, 1, 1)], X[:1])
    if not split_store:
        assert main(["evaluate", str(model), str(store)]) == 2
        assert "has changed since the head was trained on it" in capsys.readouterr().err


def test_top_orders_truncates_and_says_unknown_below_min_confidence():
    spec = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", 3)
    softmax = Step("dense", {"W": np.eye(3), "b": np.zeros(3)}, {"activation": "softmax"})
    head = Head([softmax], ["a", "b", "c"], spec, "logreg", {})
    proba = np.array([[0.2, 0.7, 0.1], [0.45, 0.25, 0.3]])
    X = np.log(proba)  # softmax(log p) = p
    sure, unsure = head.top(X, k=2, min_confidence=0.5)
    assert sure.label == "b" and [c for c, _ in sure.top] == ["b", "a"]
    assert unsure.label == "unknown" and unsure.confidence == pytest.approx(0.45)  # still its top class's
    assert [c for c, _ in unsure.top] == ["a", "c"]
    assert all(type(p) is float for _, p in sure.top) and sure.top[0][1] == pytest.approx(0.7)
    assert [c for c, _ in head.top(X[:1], k=10)[0].top] == ["b", "a", "c"]  # k past the classes: all of them
    at = unsure.confidence
    assert head.top(X, min_confidence=at)[1].label == "a"  # exactly at the threshold is confident
    assert head.top(X, min_confidence=np.nextafter(at, 1))[1].label == "unknown"
    assert [p.label for p in head.top(X)] == ["b", "a"] and len(head.top(X)[0].top) == 1  # k=1, no threshold
    assert head.top(np.zeros((0, 3))) == []
    with pytest.raises(ValueError, match="k must be at least 1"):
        head.top(X, k=0)
