"""dedup: exact and ANN candidate search find the same planted near-duplicate groups; the CLI report."""

import json

import numpy as np
import pytest

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.search import dedup
from tl_embed.search.dedup import find_duplicates
from tl_embed.wording import count


def make_store(path, vectors):
    spec = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", vectors.shape[1])
    with EmbeddingStore.create(path, spec, root=path.parent) as s:
        s.add([ManifestRow(f"img{i:06d}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(len(vectors))], vectors)
    return path


def planted(n, dim, seed=0):
    """Clustered vectors with planted groups: (vectors, groups as sorted row lists, largest first).

    Copies sit at cosine ~0.999 to their original (~0.9975 to each other), far above any two unrelated vectors.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (40, dim))
    x = (centres[rng.integers(0, 40, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)
    rows = rng.permutation(n)
    groups, at = [], 0
    for size in [7, 5, 3, 3] + [2] * 20:
        g = sorted(int(r) for r in rows[at:at + size])
        at += size
        for r in g[1:]:
            noise = rng.normal(0, 1, dim)
            x[r] = x[g[0]] + 0.05 * np.linalg.norm(x[g[0]]) / np.sqrt(dim) * noise
        groups.append(g)
    return x, sorted(groups, key=lambda g: (-len(g), g[0]))


def rows_of(groups):
    return [[int(p[-10:-4]) for p, _ in g] for g in groups]


def brute_force_groups(x, threshold):
    """Reference: connected components of all pairs at cosine >= threshold, by plain numpy."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    adj = xn @ xn.T >= threshold
    label = -np.ones(len(x), int)
    for start in range(len(x)):
        if label[start] < 0:
            label[start], todo = start, [start]
            while todo:
                for j in np.nonzero(adj[todo.pop()] & (label < 0))[0]:
                    label[j] = start
                    todo.append(j)
    groups = [list(np.nonzero(label == g)[0]) for g in np.unique(label)]
    return sorted((g for g in groups if len(g) > 1), key=lambda g: (-len(g), g[0]))


def test_auto_picks_ann_above_exact_max_and_finds_planted_groups(tmp_path, monkeypatch):
    x, groups = planted(dedup.EXACT_PAIRS_MAX + 1, 32)
    store = make_store(tmp_path / "s.tle", x)
    monkeypatch.setattr(dedup, "_exact_pairs", lambda *a: pytest.fail("auto took the exact path"))
    found = find_duplicates(store, 0.99)
    assert rows_of(found) == groups


@pytest.mark.parametrize("dim", [24, 160])  # 160 > REDUCED_DIM: candidates come from PCA-reduced vectors
def test_ann_and_exact_give_the_same_groups_and_similarities(tmp_path, dim):
    x, groups = planted(3000, dim, seed=dim)
    store = make_store(tmp_path / "s.tle", x)
    exact = find_duplicates(store, 0.99, mode="exact")
    ann = find_duplicates(store, 0.99, mode="ann")
    auto_small = find_duplicates(store, 0.99, exact_max=100)  # auto, forced onto the ANN path
    assert rows_of(exact) == rows_of(ann) == rows_of(auto_small) == groups
    assert np.allclose([s for g in ann for _, s in g], [s for g in exact for _, s in g], atol=1e-5)


def test_groups_and_best_similarity_match_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (400, 4)).astype(np.float32)  # 4-d: many natural pairs above 0.97, chained groups
    store = make_store(tmp_path / "s.tle", x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -1)
    reference = brute_force_groups(x, 0.97)
    assert len(reference) > 10 and max(map(len, reference)) > 3
    for mode in ("exact", "ann"):
        found = find_duplicates(store, 0.97, mode=mode, k=30)
        assert rows_of(found) == reference
        for g in found:
            members = [int(p[-10:-4]) for p, _ in g]
            best = [max(sims[m, o] for o in members if sims[m, o] >= 0.97 - 1e-6) for m in members]
            assert np.allclose([s for _, s in g], best, atol=1e-5)


def test_many_identical_copies_form_one_group_even_with_few_neighbours(tmp_path):
    x, _ = planted(2000, 16)
    x[100:130] = x[99]  # 31 identical vectors (the same file copied), more than k + 1
    groups = find_duplicates(make_store(tmp_path / "s.tle", x), 0.999, mode="ann", k=3)
    assert [len(g) for g in groups][0] == 31
    assert rows_of(groups)[0] == list(range(99, 130))


def test_stores_too_small_to_have_pairs(tmp_path):
    x = np.ones((1, 8), np.float32)
    assert find_duplicates(make_store(tmp_path / "one.tle", x), 0.9, mode="ann") == []
    assert find_duplicates(make_store(tmp_path / "two.tle", np.eye(2, 8, dtype=np.float32)), 0.9) == []


def test_cli_report_formats_are_unchanged(tmp_path, capsys):
    x, groups = planted(600, 16)
    store = str(make_store(tmp_path / "s.tle", x))
    assert main(["dedup", store, "--threshold", "0.99", "--mode", "ann", "-k", "5", "-q"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    groups_text = count(len(groups), "group")
    assert lines[0] == f"{groups_text} of near-duplicates (cosine >= 0.99), {sum(map(len, groups))} images"
    assert lines[1] == "group 1 (7 images)"
    first = lines[2].split("  ")
    assert first[0] == "" and 0.99 <= float(first[1]) <= 1 and first[2] == str(tmp_path / f"img{groups[0][0]:06d}.jpg")
    assert err == ""
    assert main(["dedup", store, "--threshold", "0.99", "--format", "json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [len(g) for g in report] == [len(g) for g in groups] and set(report[0][0]) == {"path", "similarity"}
    out_file = tmp_path / "d.csv"
    assert main(["dedup", store, "--threshold", "0.99", "--format", "csv", "--out", str(out_file), "-q"]) == 0
    assert capsys.readouterr().out == f"{groups_text} of near-duplicates (cosine >= 0.99); wrote {out_file}\n"
    csv_lines = out_file.read_text().splitlines()
    assert csv_lines[0] == "group,size,path,similarity" and csv_lines[1].startswith("1,7,")


def test_bad_mode_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["dedup", "S", "--mode", "fast"])
    assert "argument --mode: invalid choice: 'fast'" in capsys.readouterr().err


def test_auto_stays_exact_up_to_exact_max(tmp_path, monkeypatch):
    x, groups = planted(500, 16)
    monkeypatch.setattr(dedup, "_ann_pairs", lambda *a: pytest.fail("auto took the ANN path"))
    assert rows_of(find_duplicates(make_store(tmp_path / "s.tle", x), 0.99, exact_max=500)) == groups


def test_verification_in_several_bounded_passes_gives_the_same_answer(tmp_path, monkeypatch):
    x, groups = planted(3000, 160, seed=7)
    store = make_store(tmp_path / "s.tle", x)
    whole = find_duplicates(store, 0.99, mode="ann")
    monkeypatch.setattr(dedup, "VERIFY_BYTES", 7 * 160 * 4)  # 7 rows at a time: 3 pairs per pass
    assert find_duplicates(store, 0.99, mode="ann") == whole
    assert rows_of(whole) == groups
