"""Index at scale, in miniature: held-out recall that holds on fresh queries for every type auto may
choose (and HNSW), re-ranking against the store, the compact id table, and updates of trained types."""

import faiss
import numpy as np
import pytest

from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.search.index import Index

DIM = 32
QUIET = {"log": lambda *_: None}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes (conftest)


def cnn_like(n, seed=0):
    """Non-negative, clustered (ReLU-pooled-feature-like) vectors: 30 classes in a 8-d latent."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(0, 1, (8, DIM))
    centers = np.random.default_rng(98).normal(0, 1, (30, 8))
    x = (centers[rng.integers(0, 30, n)] + 0.5 * rng.normal(0, 1, (n, 8))) @ w + 0.3 * rng.normal(0, 1, (n, DIM))
    return np.maximum(x - 0.2, 0).astype(np.float32)


def make_store(path, vectors, prefix="img"):
    spec = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", DIM)
    with EmbeddingStore.create(path, spec, root=path.parent) as s:
        for start in range(0, len(vectors), 1000):  # several shards, as embed leaves a store
            part = vectors[start:start + 1000]
            s.add([ManifestRow(f"{prefix}{i:05d}.jpg", None, None, "h", 1, 1, 1, 1)
                   for i in range(start, start + len(part))], part)
    return path


def fresh_recall(idx, exact, queries):
    truth = [{h.id for h in hits} for hits in exact.search_vectors(queries, 10)]
    found = [{h.id for h in hits} for hits in idx.search_vectors(queries, 10)]
    return np.mean([len(a & b) / 10 for a, b in zip(found, truth, strict=True)])


@pytest.mark.parametrize("kind, rerank", [("flat", False), ("ivf", False), ("hnsw", False), ("sq8", True),
                                          ("IVF16,PQ8", True), ("IVF16,PQ8", False), ("PCA16,IVF16,SQ8", True)])
def test_printed_recall_holds_on_fresh_queries(tmp_path, kind, rerank):
    store = make_store(tmp_path / "s.tle", cnn_like(4000))
    idx = Index.build(store, tmp_path / "i.tli", kind, target_recall=0.9, rerank=None if rerank else False, **QUIET)
    exact = Index.build(store, tmp_path / "e.tli", "flat", **QUIET)
    assert idx.rerank is rerank and idx.meta["recall_measure"] == "held-out"
    assert idx.meta["recall_queries"] == 400 and len(idx) == 4000  # probes measured, then added
    measured = fresh_recall(Index.open(tmp_path / "i.tli"), exact, cnn_like(400, seed=7))
    assert abs(measured - idx.meta["recall_at_10"]) <= 0.05, (measured, idx.meta)
    if kind != "IVF16,PQ8" or rerank:
        assert idx.meta["recall_at_10"] >= 0.9 and idx.meta["target_reached"]
    assert idx.meta["latency_ms"] > 0 and idx.meta["qps"] > 0 and "queries/s batched" in idx.describe()


def test_reranking_reads_the_store_and_drops_what_it_no_longer_holds(tmp_path):
    x = cnn_like(3000)
    store = make_store(tmp_path / "s.tle", x)
    Index.build(store, tmp_path / "i.tli", "IVF16,PQ4", **QUIET)
    idx = Index.open(tmp_path / "i.tli")
    assert idx.search_vectors(x[5], 1)[0][0].path == str(tmp_path / "img00005.jpg")
    with EmbeddingStore.open(store, "a") as s:
        s.remove(["img00005.jpg"])
    idx = Index.open(tmp_path / "i.tli")  # not updated: the removed image is no longer an answer
    assert all(h.path != str(tmp_path / "img00005.jpg") for h in idx.search_vectors(x[5], 10)[0])


def test_update_of_a_trained_type_answers_like_a_rebuild(tmp_path):
    x = cnn_like(3000)
    store = make_store(tmp_path / "s.tle", x)
    Index.build(store, tmp_path / "u.tli", "sq8", **QUIET)
    with EmbeddingStore.open(store, "a") as s:
        s.remove([f"img{i:05d}.jpg" for i in range(0, 3000, 3)])  # 1000 gone
        s.add([ManifestRow(f"new{i:04d}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(500)], cnn_like(500, 3))
    said = []
    updated = Index.build(store, tmp_path / "u.tli", "sq8", log=said.append)
    assert said == [f"updated {tmp_path / 'u.tli'}: +500 added, -1000 removed (no rebuild)"]
    rebuilt = Index.build(store, tmp_path / "r.tli", "sq8", **QUIET)
    assert sorted(updated.ids) == sorted(rebuilt.ids) and len(updated) == 2500
    queries = cnn_like(100, seed=11)
    for idx in (updated, rebuilt):  # widest search: both must give the exact answer
        idx.set_params({"nprobe": faiss.extract_index_ivf(idx.faiss_index).nlist, "rerank_factor": 16})
    a = [[h.id for h in hits] for hits in updated.search_vectors(queries, 10)]
    b = [[h.id for h in hits] for hits in rebuilt.search_vectors(queries, 10)]
    assert a == b
    reopened = Index.open(tmp_path / "u.tli")
    assert reopened.meta["recall_at_10"] >= 0.95 and reopened.paths[int(updated.ids[-1])].endswith("new0499.jpg")


def test_id_table_resolves_paths_and_stored_queries(tmp_path):
    x = cnn_like(1500)
    store = make_store(tmp_path / "s.tle", x)
    idx = Index.build(store, tmp_path / "i.tli", **QUIET)
    assert idx.table.id_of("img00012.jpg") == int(idx.ids[12]) and idx.table.id_of("img0001") is None
    (query, hits), = idx.search([str(tmp_path / "img00012.jpg")], k=3)
    assert hits[0].path == str(tmp_path / "img00012.jpg") and abs(hits[0].score - 1) < 1e-5
