"""`tl-embed audit` on stores where the answer is known: planted wrong labels, near-copies and outliers."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tl_embed.audit.run import audit_store
from tl_embed.cli.main import main
from tl_embed.embedding import BackboneSpec, EmbeddingStore, ManifestRow
from tl_embed.heads.training import train_from_store
from tl_embed.search.neighbours import nearest_neighbours

DIM = 24
SPEC = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", DIM)


def clustered(classes=4, per_class=40, seed=0, spread=0.6):
    """Well-separated classes: unit-norm centres plus small noise; every fifth image in the test split."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, DIM))
    y = np.repeat(np.arange(classes), per_class)
    X = centres[y] + rng.normal(0, spread, (len(y), DIM))
    labels = [f"c{c}" for c in y]
    splits = ["test" if i % 5 == 0 else "train" for i in range(len(y))]
    return X.astype(np.float32), labels, splits


def make_store(path, X, labels, splits=None):
    splits = splits or [None] * len(X)
    with EmbeddingStore.create(path, SPEC) as s:
        s.add([ManifestRow(f"{lab or 'none'}/{i:04d}.jpg", lab, sp, f"h{i}", 1, 1, 1, 1)
               for i, (lab, sp) in enumerate(zip(labels, splits, strict=True))], X)
    return path


def test_neighbours_exact_and_approximate_agree_and_never_include_self(tmp_path):
    X, labels, _ = clustered(classes=8, per_class=60)
    with EmbeddingStore.open(make_store(tmp_path / "s.tle", X, labels)) as store:
        exact_s, exact_i = nearest_neighbours(store, 5)
        approx_s, approx_i = nearest_neighbours(store, 5, exact_max=0)  # the ANN path
    rows = np.arange(len(X))[:, None]
    assert (exact_i != rows).all() and (approx_i != rows).all()
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    truth = Xn @ Xn.T
    np.fill_diagonal(truth, -np.inf)
    np.testing.assert_allclose(exact_s, -np.sort(-truth, axis=1)[:, :5], atol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact_i, approx_i, strict=True)])
    assert recall > 0.95
    np.testing.assert_allclose(np.take_along_axis(truth, approx_i, 1), approx_s, atol=1e-5)  # exact scores
    with EmbeddingStore.open(make_store(tmp_path / "t.tle", X[:3], labels[:3])) as tiny:
        s, i = nearest_neighbours(tiny, 5)
    assert i.shape == (3, 5) and (i[:, 2:] == -1).all() and np.isneginf(s[:, 2:]).all()


def test_a_flipped_label_is_the_first_suspect_with_the_true_class_suggested(tmp_path):
    X, labels, splits = clustered()
    labels[7] = "c3"  # really c0
    audit = audit_store(make_store(tmp_path / "s.tle", X, labels, splits), head="logreg")
    first = audit.label_issues[0]
    assert (first.path, first.given, first.suggested) == ("c3/0007.jpg", "c3", "c0")
    assert first.neighbours and all(n.label == "c0" for n in first.neighbours[:3])
    assert audit.shape.counts["c3"] == 41 and audit.shape.oof_accuracy > 0.95
    assert ("c3", "c0", 1) in audit.shape.confused


def test_clean_separable_data_has_nothing_to_report(tmp_path):
    X, labels, splits = clustered()
    audit = audit_store(make_store(tmp_path / "s.tle", X, labels, splits), head="logreg")
    assert audit.label_issues == [] and audit.duplicates == []
    assert len(audit.outliers) <= 2  # a 3.5 modified z-score: rare on Gaussian clusters, not impossible
    assert set(audit.settings["seconds"]) == {"neighbours", "duplicates", "labels", "findings"}


def test_near_copies_across_splits_and_with_other_labels_are_found(tmp_path):
    X, labels, splits = clustered()
    rng = np.random.default_rng(1)
    X[1] = X[0] + rng.normal(0, 1e-3, DIM)  # 0 is a test image, 1 a training near-copy of it
    X[42] = X[41] + rng.normal(0, 1e-3, DIM)  # both train, different labels below
    labels[42] = "c0"  # 41 is c1
    audit = audit_store(make_store(tmp_path / "s.tle", X, labels, splits), head="logreg")
    cross = [d for d in audit.duplicates if d.kind == "cross-split"]
    conflict = [d for d in audit.duplicates if d.kind == "label-conflict"]
    assert [(d.path, d.other, d.split, d.other_split) for d in cross] == [
        ("c0/0001.jpg", "c0/0000.jpg", "train", "test")]  # the training copy is the one to leave out
    assert len(conflict) == 1 and {conflict[0].path, conflict[0].other} == {"c1/0041.jpg", "c0/0042.jpg"}
    assert conflict[0].path == "c0/0042.jpg"  # the copy whose label the predictions support less
    assert conflict[0].similarity > 0.99


def test_past_the_exact_limit_the_graph_finds_the_same_duplicates(tmp_path, monkeypatch):
    X, labels, splits = clustered()
    X[1] = X[0] * 1.01  # a training copy of test image 0
    X[42] = X[41] * 0.99
    labels[42] = "c0"
    store = make_store(tmp_path / "s.tle", X, labels, splits)
    exact = audit_store(store, head="logreg").duplicates
    monkeypatch.setattr("tl_embed.audit.run.EXACT_PAIRS_MAX", 10)
    assert audit_store(store, head="logreg").duplicates == exact
    assert sorted(d.kind for d in exact) == ["cross-split", "label-conflict"]


def test_a_planted_outlier_is_found_and_an_unlabelled_store_gets_what_applies(tmp_path):
    X, labels, _ = clustered()
    X[5] = -10 * X[5]  # points away from every class
    audit = audit_store(make_store(tmp_path / "s.tle", X, [None] * len(X)))
    assert audit.outliers and audit.outliers[0].path == "none/0005.jpg" and audit.outliers[0].score > 3.5
    assert audit.label_issues == [] and any("label checks need labels" in n for n in audit.notes)
    one = audit_store(make_store(tmp_path / "o.tle", X, ["a"] * len(X)))
    assert any("at least 2 classes" in n for n in one.notes)
    X3, labels3, _ = clustered(classes=3, per_class=20)
    labels3[:2] = ["tiny", "tiny"]
    small = audit_store(make_store(tmp_path / "t.tle", X3, labels3), head="logreg")
    assert any("tiny have fewer than 3 images" in n for n in small.notes)


def test_audit_csv_feeds_train_exclude_and_the_held_out_rows_stay(tmp_path, capsys):
    X, labels, splits = clustered()
    labels[7], labels[13] = "c3", "c2"
    store = make_store(tmp_path / "s.tle", X, labels, splits)
    assert main(["audit", str(store), "--out", str(tmp_path / "a.csv"), "--head", "logreg", "-q"]) == 0
    out = capsys.readouterr().out
    assert "likely wrong label" in out and f"wrote {tmp_path / 'a.csv'}" in out
    with open(tmp_path / "a.csv", newline="") as f:
        flagged = {r["path"] for r in csv.DictReader(f)}
    assert {"c3/0007.jpg", "c2/0013.jpg"} <= flagged
    plain = train_from_store(store, "logreg")
    assert main(["train", str(store), "--out", str(tmp_path / "m.tlh"), "--head", "logreg",
                 "--exclude", str(tmp_path / "a.csv")]) == 0
    assert "left out by --exclude" in capsys.readouterr().out
    from tl_embed.heads.head import Head

    trained = Head.load(tmp_path / "m.tlh").metrics
    assert trained["trained_on"]["excluded"] == len(flagged & {f"{lab}/{i:04d}.jpg" for i, (lab, sp) in
                                                              enumerate(zip(labels, splits, strict=True))
                                                              if sp == "train"})
    assert trained["n"] == plain.metrics.n  # the same held-out rows, so the accuracies compare
    assert trained["trained_on"]["train_rows"] == plain.head.metrics["trained_on"]["train_rows"]


def test_relabel_changes_training_and_scoring_labels(tmp_path, capsys):
    X, labels, splits = clustered()
    labels[7] = "c3"
    store = make_store(tmp_path / "s.tle", X, labels, splits)
    (tmp_path / "fix.csv").write_text("path,label\nc3/0007.jpg,c0\n")
    res = train_from_store(store, "logreg", relabel={"c3/0007.jpg": "c0"})
    assert res.head.metrics["trained_on"]["relabelled"] == 1
    assert main(["evaluate", str(tmp_path / "none.tlh"), str(store)]) == 2  # sanity: a missing model is one line
    capsys.readouterr()
    res.head.save(tmp_path / "m.tlh")
    assert main(["evaluate", str(tmp_path / "m.tlh"), str(store), "--relabel", str(tmp_path / "fix.csv")]) == 0
    (tmp_path / "bad.csv").write_text("file,class\nx,y\n")
    assert main(["train", str(store), "--out", str(tmp_path / "n.tlh"), "--relabel", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'path' and 'label'" in err
    (tmp_path / "elsewhere.csv").write_text("path\nother/1.jpg\n")
    assert main(["train", str(store), "--out", str(tmp_path / "n.tlh"),
                 "--exclude", str(tmp_path / "elsewhere.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of its 1 paths is in the store" in err


def test_audit_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    X, labels, splits = clustered(classes=2, per_class=10)
    store = make_store(tmp_path / "s.tle", X, labels, splits)
    assert main(["audit", str(store), "--out", str(store)]) == 2  # a report over the store it audits
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would destroy it" in err
    with pytest.raises(SystemExit) as e:
        main(["audit", str(store), "-k", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("tl-embed audit: error:")
