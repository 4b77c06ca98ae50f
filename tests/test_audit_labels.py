"""Label-error audit: out-of-fold probabilities and confident learning on small synthetic blobs."""

from __future__ import annotations

import numpy as np
import pytest

from tl_embed.audit import oof
from tl_embed.audit.confident import (
    blend,
    confident_joint,
    find_label_issues,
    label_quality,
    neighbour_label_proba,
)
from tl_embed.audit.oof import _sample, choose_folds, out_of_fold_proba
from tl_embed.errors import TlEmbedError


def blobs(per_class: int = 25, k: int = 3, dim: int = 16, spread: float = 0.3,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` Gaussian clusters around random unit-scale centres; ``spread`` sets how much they overlap."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, dim))
    y = np.repeat(np.arange(k), per_class)
    X = centres[y] + rng.normal(0, spread, (len(y), dim))
    return X.astype(np.float32), y


# a hand-made 2-class example: rows 0-4 labelled 0, rows 5-8 labelled 1
HAND_LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
HAND_PROBA = np.array([[.9, .1], [.8, .2], [.7, .3], [.2, .8], [.4, .6],
                       [.1, .9], [.4, .6], [.7, .3], [.5, .5]])


def test_confident_joint_by_hand():
    # thresholds: t0 = mean(.9 .8 .7 .2 .4) = .6, t1 = mean(.9 .6 .3 .5) = .575
    # labelled 0: rows 0-2 reach only t0 -> (0, 0); rows 3, 4 reach only t1 -> (0, 1): [3, 2], sums to 5 already
    # labelled 1: rows 5, 6 -> (1, 1); row 7 -> (1, 0); row 8 reaches neither (not counted): [1, 2] over 3
    # counted rows, calibrated to the 4 labelled 1: [4/3, 8/3], rounded keeping the sum 4: [1, 3]
    assert confident_joint(HAND_LABELS, HAND_PROBA).tolist() == [[3, 2], [1, 3]]


def test_prune_by_noise_rate_by_hand():
    # cell (0, 1) = 2: the two labelled-0 rows with the largest P1 - P0 (rows 3 and 4); cell (1, 0) = 1: row 7.
    # Ranked by self-confidence: row 3 (.2), row 7 (.3), row 4 (.4)
    assert find_label_issues(HAND_LABELS, HAND_PROBA, method="prune_by_noise_rate").tolist() == [3, 7, 4]
    assert np.allclose(label_quality(HAND_LABELS, HAND_PROBA, "self_confidence"),
                       1 - HAND_PROBA[np.arange(9), HAND_LABELS])


def test_margin_flags_as_many_rows_by_normalized_margin():
    # 3 rows (the count above) among those another class beats: rows 3, 4, 7 (row 8's .5/.5 tie is no
    # dispute), by (1 - own + best other) / 2: row 3 .8, row 7 .7, row 4 .6
    margin = label_quality(HAND_LABELS, HAND_PROBA)
    assert np.allclose(margin[[3, 7, 4, 8, 0]], [.8, .7, .6, .5, .1])
    assert find_label_issues(HAND_LABELS, HAND_PROBA).tolist() == [3, 7, 4]
    with pytest.raises(TlEmbedError, match="unknown method"):
        find_label_issues(HAND_LABELS, HAND_PROBA, method="both")


def test_a_flipped_label_is_ranked_first():
    X, y = blobs(per_class=30, spread=0.6)
    X[7] = X[y == 0].mean(0)  # a typical class-0 image (its class's centre) ...
    noisy = y.copy()
    noisy[7] = 2  # ... labelled 2
    proba, classes = out_of_fold_proba(X, noisy)
    assert classes == ["0", "1", "2"]
    assert find_label_issues(noisy, proba)[0] == 7
    assert label_quality(noisy, proba).argmax() == 7


def test_a_few_flips_are_flagged_and_nothing_else():
    X, y = blobs(per_class=30)
    flips = {7: 2, 20: 1, 40: 2, 65: 0}
    noisy = y.copy()
    noisy[list(flips)] = list(flips.values())
    proba, _ = out_of_fold_proba(X, noisy, seed=3)
    assert sorted(find_label_issues(noisy, proba).tolist()) == sorted(flips)


def test_clean_data_flags_only_what_the_thresholds_allow():
    # Every flagged row is one the out-of-fold head disagrees with (a row whose label is its most probable
    # class is never flagged), and at most the confident joint's off-diagonal count: so on well-separated
    # blobs (no out-of-fold error) nothing is flagged, and on overlapping ones no more than the errors
    X, y = blobs(spread=0.3)
    proba, _ = out_of_fold_proba(X, y)
    assert (proba.argmax(1) == y).all()
    assert find_label_issues(y, proba).size == 0
    X, y = blobs(spread=1.2, seed=1)
    proba, _ = out_of_fold_proba(X, y)
    issues = find_label_issues(y, proba)
    errors = np.flatnonzero(proba.argmax(1) != y)
    joint = confident_joint(y, proba)
    assert set(issues) <= set(errors)
    assert len(issues) <= joint.sum() - np.trace(joint)


def test_out_of_fold_rows_come_from_heads_that_never_saw_them():
    X, y = blobs(per_class=20)
    X = np.vstack([X, X[:1]])  # a copy of a class-0 image ...
    y = np.append(y, 1)  # ... labelled 1: a head that saw this row would give it label 1
    for head, most in (("knn", 0.1), ("svm", 0.5)):
        proba, _ = out_of_fold_proba(X, y, head=head, seed=1)
        assert np.allclose(proba.sum(1), 1, atol=1e-5)
        assert proba[-1, 1] < most, head
        assert find_label_issues(y, proba)[0] in (0, len(y) - 1)


def test_past_the_fit_limit_each_fold_trains_on_a_stratified_sample(monkeypatch):
    y = np.array([0] * 100 + [1] * 30 + [2] * 3)
    rows = np.arange(1000, 1000 + len(y))
    kept = _sample(rows, y, 40, np.random.default_rng(0))
    assert (np.diff(kept) > 0).all() and set(kept) <= set(rows)
    assert np.bincount(y[kept - 1000]).tolist() == [30, 9, 2]  # in proportion, never under 2 a class
    assert _sample(rows, y, len(y), np.random.default_rng(0)) is rows
    X, y = blobs(per_class=30, spread=0.6)
    X[7] = X[y == 0].mean(0)
    noisy = y.copy()
    noisy[7] = 2
    whole, _ = out_of_fold_proba(X, noisy, head="logreg")
    read = out_of_fold_proba(lambda r: X[r], noisy, head="logreg")[0]  # rows read by position: the same
    np.testing.assert_array_equal(read, whole)
    monkeypatch.setattr(oof, "FIT_MAX_ROWS", 24)  # each fold's head now sees 24 of its 60 rows
    sampled, _ = out_of_fold_proba(X, noisy, head="logreg")
    assert not np.allclose(sampled, whole) and find_label_issues(noisy, sampled)[0] == 7


def test_progress_bar_goes_to_stderr(capsys):
    X, y = blobs(per_class=10)
    out_of_fold_proba(X, y, head="knn", progress=True)
    captured = capsys.readouterr()
    assert "out-of-fold" in captured.err and captured.out == ""


@pytest.mark.parametrize(("y", "words"), [
    (np.zeros(12, dtype=int), "at least 2 labelled classes"),
    (np.array([0] * 11 + [1]), "'1' (1)"),
    (np.array([0] * 10 + [1] * 2), "at least 3"),
])
def test_bad_labels_are_one_clear_line(y, words):
    X = np.random.default_rng(0).normal(size=(len(y), 16)).astype(np.float32)
    with pytest.raises(TlEmbedError) as e:
        out_of_fold_proba(X, y)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_folds_follow_the_smallest_class():
    assert choose_folds(np.array([0] * 10 + [1] * 10), 3) == 3
    assert choose_folds(np.array([0] * 10 + [1] * 4), 5) == 4
    assert choose_folds(np.array([0] * 10 + [1] * 3), 2) == 3  # 2 folds would train one head on 1 of class 1
    with pytest.raises(TlEmbedError, match="at least 2"):
        choose_folds(np.array([0] * 10 + [1] * 10), 1)


def test_bad_arrays_are_one_clear_line():
    for labels, proba in ((HAND_LABELS[:-1], HAND_PROBA), (HAND_LABELS + 1, HAND_PROBA),
                          (np.zeros(9, dtype=int), HAND_PROBA)):
        with pytest.raises(TlEmbedError) as e:
            find_label_issues(labels, proba)
        assert "\n" not in str(e.value)
    with pytest.raises(TlEmbedError, match="unknown ranking"):
        label_quality(HAND_LABELS, HAND_PROBA, rank_by="loss")


def test_neighbour_labels_are_similarity_weighted_shares():
    labels = np.array([0, 1, 1, 2])
    q = neighbour_label_proba(np.array([[1, 2], [0, 3]]), np.array([[.9, .3], [.5, .5]]), labels, 3)
    assert np.allclose(q, [[0, 1, 0], [.5, 0, .5]])
    none = neighbour_label_proba(np.array([[3, -1], [-1, -1]]), np.array([[.5, np.nan], [-np.inf, np.nan]]),
                                 labels, 3)
    assert np.allclose(none, [[0, 0, 1], [0, 0, 0]])  # missing neighbours count for nothing
    proba = np.array([[.6, .3, .1], [.2, .2, .6]])
    assert np.allclose(blend(proba, none)[1], proba[1])  # ... and a row with none keeps its probabilities
    assert np.allclose(blend(proba, none).sum(1), 1)
    blended = find_label_issues(HAND_LABELS, HAND_PROBA, neighbour_proba=HAND_PROBA)
    assert blended.tolist() == [3, 7, 4]  # blending the same view in changes nothing
