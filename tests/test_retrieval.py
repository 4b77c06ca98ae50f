"""Better search from the same vectors: whitening, αQE, αDBA and evaluate-search, on small synthetic stores.

The hand-made examples live in two or three dimensions, where every similarity is the cosine of an angle
and the expected rankings can be worked out on paper (the comments give the angles and the sums).
"""

from __future__ import annotations

import json
import types
import zlib

import numpy as np
import pytest
from starlette.testclient import TestClient

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.errors import IndexDamagedError, TlEmbedError
from tl_embed.search import Index, evaluate_search
from tl_embed.search.evaluate import average_precision
from tl_embed.search.expand import weighted_sum
from tl_embed.search.index import HEADER
from tl_embed.search.storage import HEADER_V3
from tl_embed.search.whiten import fit

QUIET = {"log": lambda *_: None}


def spec(dim: int) -> BackboneSpec:
    return BackboneSpec("synthetic", "random", "random", 32, "none", "avg", dim)


def store_of(path, vectors, labels=None, names=None):
    vectors = np.asarray(vectors, np.float32)
    labels = labels or [None] * len(vectors)
    names = names or [f"img{i:05d}.jpg" for i in range(len(vectors))]
    with EmbeddingStore.create(path, spec(vectors.shape[1]), root=path.parent) as s:
        s.add([ManifestRow(n, lab, None, "h", 1, 1, 1, 1) for n, lab in zip(names, labels, strict=True)], vectors)
    return path


def at(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at these angles."""
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


def correlated(n: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    """Non-negative vectors with strongly correlated, unequal-variance dimensions (like pooled CNN features)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (8, dim)) * rng.lognormal(0, 1, dim)
    return np.maximum(rng.normal(0, 1, (n, 8)) @ mix + rng.normal(0, 0.3, (n, dim)) + 1, 0).astype(np.float32)


def order(hits) -> list[str]:
    return [h.path.rsplit("/", 1)[-1] for h in hits]


# ------------------------------------------------------------------ whitening
def test_whitening_makes_the_covariance_the_identity_up_to_its_shrinkage():
    x = correlated(3000)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cov = np.cov(x, rowvar=False)
    values = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    plain = fit(x, shrinkage=0.0)
    y = (x - plain.mean) @ plain.projection
    assert np.allclose(np.cov(y, rowvar=False), np.eye(24), atol=1e-3)
    shrunk = fit(x)  # eigenvalue + 0.1 x mean eigenvalue: component i keeps variance l_i / (l_i + 0.1 mean)
    y = (x - shrunk.mean) @ shrunk.projection
    assert np.allclose(np.cov(y, rowvar=False), np.diag(values / (values + 0.1 * values.mean())), atol=1e-3)
    reduced = fit(x, dim=6, power=0.0)  # power 0: centring and an orthonormal projection onto 6 components
    assert reduced.dim == 6 and np.allclose(reduced.projection.T @ reduced.projection, np.eye(6), atol=1e-5)


def test_fewer_vectors_than_dimensions_keep_only_the_sample_rank():
    assert fit(correlated(10)).dim == 9


@pytest.mark.parametrize("options", [{"whiten": True}, {"whiten_dim": 8}, {"whiten_power": 0.0}])
def test_stored_and_query_vectors_are_mapped_identically(tmp_path, options):
    x = correlated(400)
    store = store_of(tmp_path / "s.tle", x)
    idx = Index.build(store, tmp_path / "i.tli", **options, **QUIET)
    ids = idx.ids[:20]
    assert np.allclose(idx.queries(x[:20]), idx.vectors_of(ids), atol=1e-6)
    for reopened in (idx, Index.open(tmp_path / "i.tli")):
        hits = reopened.search_vectors(x[:20], k=3)
        assert [h[0].id for h in hits] == list(ids)
        assert all(abs(h[0].score - 1.0) < 1e-5 for h in hits)  # its own stored row, to float precision
        by_path = reopened.search([str(tmp_path / "img00003.jpg")], k=3)[0][1]  # the stored vector, read back
        assert [h.id for h in by_path] == [h.id for h in hits[3]]


def test_a_whitened_index_survives_save_and_open(tmp_path):
    x = correlated(300)
    idx = Index.build(store_of(tmp_path / "s.tle", x), tmp_path / "i.tli", whiten_dim=10, **QUIET)
    data = (tmp_path / "i.tli" / "index.bin").read_bytes()
    assert HEADER_V3.unpack(data[:HEADER_V3.size])[1] == 3  # arrays written: format 3
    back = Index.open(tmp_path / "i.tli")
    assert back.dim == 10 and back.faiss_index.d == 10 and back.meta["whiten"]["dim"] == 10
    assert np.array_equal(back.space.whitening.projection, idx.space.whitening.projection)
    assert "PCA-whitened 24 -> 10 dims" in back.describe()
    q = correlated(5, seed=9)
    assert ([[h.id for h in r] for r in back.search_vectors(q, 5)]
            == [[h.id for h in r] for r in idx.search_vectors(q, 5)])


def test_the_checksum_covers_the_whitening(tmp_path):
    Index.build(store_of(tmp_path / "s.tle", correlated(100)), tmp_path / "i.tli", whiten=True, **QUIET)
    path = tmp_path / "i.tli" / "index.bin"
    data = bytearray(path.read_bytes())
    _, _, meta_len, table_len, arrays_len, _, _ = HEADER_V3.unpack(data[:HEADER_V3.size])
    data[HEADER_V3.size + meta_len + table_len + arrays_len // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexDamagedError, match="checksum|arrays"):
        Index.open(tmp_path / "i.tli")


def test_plain_indexes_keep_the_old_format_and_open_and_search_as_before(tmp_path):
    x = correlated(200)
    Index.build(store_of(tmp_path / "s.tle", x), tmp_path / "i.tli", **QUIET)
    data = (tmp_path / "i.tli" / "index.bin").read_bytes()
    _, version, meta_len, *_ = HEADER.unpack(data[:HEADER.size])
    meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
    assert version == 2 and "whiten" not in meta and "dba" not in meta  # what releases before these options wrote
    back = Index.open(tmp_path / "i.tli")
    assert back.space.whitening is None and back.options.describe() == ""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, ids = back.search_scored(x[:10], 5)
    exact = np.argsort(-(u[:10] @ u.T), axis=1)[:, :5]
    assert np.array_equal(ids, back.ids[exact])
    assert np.allclose(scores, -np.sort(-(u[:10] @ u.T), 1)[:, :5], atol=1e-5)


def test_l2_with_whitening_or_dba_is_refused_in_one_line(tmp_path, capsys):
    store = store_of(tmp_path / "s.tle", correlated(50))
    with pytest.raises(TlEmbedError, match="cosine"):
        Index.build(store, tmp_path / "i.tli", metric="l2", whiten=True, **QUIET)
    assert main(["index", str(store), "--out", str(tmp_path / "j.tli"), "--metric", "l2", "--dba", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--whiten and --dba work on cosine" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "i.tli").exists() and not (tmp_path / "j.tli").exists()


def test_dba_with_a_reranked_lossy_index_is_refused(tmp_path):
    with pytest.raises(TlEmbedError, match="--no-rerank"):
        Index.build(store_of(tmp_path / "s.tle", correlated(300)), tmp_path / "i.tli", "IVF4,SQ8", dba=1, **QUIET)


def test_updates_keep_the_whitening_and_rebuild_dba(tmp_path):
    x = correlated(300)
    store = store_of(tmp_path / "s.tle", x)
    first = Index.build(store, tmp_path / "w.tli", "ivf", whiten=True, **QUIET)
    Index.build(store, tmp_path / "d.tli", "ivf", dba=1, **QUIET)
    with EmbeddingStore.open(store, "a") as s:
        s.add([ManifestRow(f"new{i}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(10)], correlated(10, seed=4))
    said: list[str] = []
    updated = Index.build(store, tmp_path / "w.tli", "ivf", whiten=True, log=said.append)
    assert said[-1].startswith("updated") and len(updated) == 310
    assert np.array_equal(updated.space.whitening.mean, first.space.whitening.mean)  # kept, not refitted
    Index.build(store, tmp_path / "d.tli", "ivf", dba=1, log=said.append)
    assert "rebuilding" in said[-1] and "DBA" in said[-1]
    Index.build(store, tmp_path / "w.tli", "ivf", log=said.append)  # options dropped: rebuilt plain
    assert said[-1].startswith("rebuilding") and "plain vectors" in said[-1]


# ------------------------------------------------------------------ αQE and αDBA by hand
def test_query_expansion_gives_the_hand_computed_ranking(tmp_path):
    # A at 16.70 deg, B at -30.96 deg, C at 34.99 deg (normalised (1, .3), (1, -.6), (1, .7)); the query at 0 deg.
    db = np.array([[1, 0.3], [1, -0.6], [1, 0.7]], np.float32)
    idx = Index.build(store_of(tmp_path / "s.tle", db, names=["A.jpg", "B.jpg", "C.jpg"]), tmp_path / "i.tli",
                      **QUIET)
    q = np.array([[1, 0]], np.float32)
    assert order(idx.search_vectors(q, 3)[0]) == ["A.jpg", "B.jpg", "C.jpg"]  # cosines .958, .857, .819
    # αQE with 1: q' = q + .958^3 A = (1, 0) + .8789 (.9578, .2873) = (1.8418, .2525), at 7.81 deg:
    # A 8.89 deg away (.988), C 27.18 (.890), B 38.77 (.780)
    hits = idx.search_vectors(q, 3, qe=1)[0]
    assert order(hits) == ["A.jpg", "C.jpg", "B.jpg"]
    expected = np.array([1.8418, 0.2525]) / np.hypot(1.8418, 0.2525)
    assert np.allclose(idx.queries(q, qe=1)[0], expected, atol=1e-3)
    assert np.allclose([h.score for h in hits], [0.988, 0.890, 0.780], atol=2e-3)
    # a stored image's own vector is not used to expand it: A's own query expands with C, its nearest other
    a_id = int(idx.ids[0])
    assert np.allclose(idx.queries(db[:1], qe=1, exclude=[a_id])[0],
                       weighted_sum(idx.queries(db[:1]), np.array([[np.cos(np.radians(34.99 - 16.70))]]),
                                    idx.vectors_of(idx.ids[2:3])[None, :, :])[0], atol=1e-5)


def test_database_side_augmentation_gives_the_hand_computed_ranking(tmp_path):
    db = at(0, 30, 90)  # P, Q, R
    store = store_of(tmp_path / "s.tle", db, names=["P.jpg", "Q.jpg", "R.jpg"])
    q = at(55)
    plain = Index.build(store, tmp_path / "plain.tli", **QUIET)
    assert order(plain.search_vectors(q, 3)[0]) == ["Q.jpg", "R.jpg", "P.jpg"]  # 25, 35, 55 deg away
    idx = Index.build(store, tmp_path / "dba.tli", dba=1, **QUIET)
    # each row + cos^3 x its nearest other: P + .866^3 Q = (1.5625, .3248) at 11.74 deg,
    # Q + .866^3 P = (1.5155, .5) at 18.26 deg, R + .5^3 Q = (.1083, 1.0625) at 84.18 deg
    expected = np.array([[1.5625, 0.3248], [1.5155, 0.5], [0.1083, 1.0625]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(idx.vectors_of(idx.ids), expected, atol=1e-3)
    # the query at 55 deg is now 29.18 deg from R', 36.74 from Q', 43.26 from P'
    hits = idx.search_vectors(q, 3)[0]
    assert order(hits) == ["R.jpg", "Q.jpg", "P.jpg"]
    assert np.allclose([h.score for h in hits], np.cos(np.radians([29.18, 36.74, 43.26])), atol=1e-3)
    assert "DBA with 1 neighbours" in Index.open(tmp_path / "dba.tli").describe()


# ------------------------------------------------------------------ evaluate-search by hand
def test_average_precision_by_hand():
    assert average_precision(np.array([False, True, False, True]), 2) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision(np.array([True, False]), 3) == pytest.approx(1 / 3)  # two never retrieved


def test_evaluate_search_gives_the_hand_computed_map(tmp_path, capsys):
    # a1 at 0 deg, a2 at 50, b1 at 30, b2 at 90; each against the others:
    # a1: b1 (30), a2 (50), b2 (90) -> AP 1/2;  a2: b1 (20), b2 (40), a1 (50) -> AP 1/3
    # b1: a2 (20), a1 (30), b2 (60) -> AP 1/3;  b2: a2 (40), b1 (60), a1 (90) -> AP 1/2
    store = store_of(tmp_path / "s.tle", at(0, 50, 30, 90), labels=["a", "a", "b", "b"])
    idx = Index.build(store, tmp_path / "i.tli", **QUIET)
    scores = evaluate_search(idx)
    assert scores.mean_ap == pytest.approx(5 / 12) and scores.queries == 4 and scores.skipped == 0
    assert scores.recall == {1: 0.0, 5: 1.0, 10: 1.0}
    # a separate query store: one "a" image at 75 deg -> b2 (15), a2 (25), b1 (45), a1 (75): AP (1/2 + 2/4) / 2
    (tmp_path / "q").mkdir()
    queries = store_of(tmp_path / "q" / "q.tle", at(75), labels=["a"])
    assert evaluate_search(tmp_path / "i.tli", queries).mean_ap == pytest.approx(0.5)
    assert main(["evaluate-search", str(tmp_path / "i.tli"), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_ap"] == pytest.approx(5 / 12) and out["recall"]["1"] == 0.0
    assert main(["evaluate-search", str(tmp_path / "i.tli"), "--queries", str(queries), "--qe", "1"]) == 0
    assert "mAP" in capsys.readouterr().out


def test_evaluate_search_without_labels_says_what_to_do(tmp_path):
    idx = Index.build(store_of(tmp_path / "s.tle", correlated(20)), tmp_path / "i.tli", **QUIET)
    with pytest.raises(TlEmbedError, match="label the images"):
        evaluate_search(idx)


def test_qe_reaches_the_search_command(tmp_path, capsys):
    db = np.array([[1, 0.3], [1, -0.6], [1, 0.7], [1, 0]], np.float32)
    store = store_of(tmp_path / "s.tle", db, names=["A.jpg", "B.jpg", "C.jpg", "Q.jpg"])
    assert main(["index", str(store), "--out", str(tmp_path / "i.tli"), "--whiten-power", "0"]) == 0
    assert "centred and PCA-projected" in capsys.readouterr().out
    for qe, expected in ((0, ["A.jpg", "B.jpg", "C.jpg"]), (1, ["A.jpg", "C.jpg", "B.jpg"])):
        Index.build(store, tmp_path / "i.tli", **QUIET)  # plain again, so that the angles above hold
        assert main(["search", str(tmp_path / "i.tli"), str(tmp_path / "Q.jpg"), "-k", "3", "--qe", str(qe),
                     "--format", "json"]) == 0
        found = json.loads(capsys.readouterr().out)[0]["neighbours"]
        assert [n["path"].rsplit("/", 1)[-1] for n in found] == expected


# ------------------------------------------------------------------ the service
@pytest.fixture
def client(tmp_path):
    from tl_embed.serve.app import create_app
    from tl_embed.serve.catalog import Catalog
    from tl_embed.serve.service import Service

    db = np.array([[1, 0.3], [1, -0.6], [1, 0.7], [1, 0]], np.float32)
    store = store_of(tmp_path / "s.tle", db, labels=["x", "y", "x", "y"], names=["A.jpg", "B.jpg", "C.jpg", "Q.jpg"])
    Index.build(store, tmp_path / "i.tli", **QUIET)
    service = Service(Catalog(tmp_path / "i.tli"), types.SimpleNamespace(name="none"))  # JSON queries embed nothing
    with TestClient(create_app(service)) as c:
        yield c


def test_the_service_takes_qe_on_search_only(client):
    def names(r):
        assert r.status_code == 200, r.text
        return [n["path"] for n in r.json()["neighbours"]]

    assert names(client.post("/search", json={"path": "Q.jpg", "k": 3})) == ["A.jpg", "B.jpg", "C.jpg"]
    assert names(client.post("/search", json={"path": "Q.jpg", "k": 3, "qe": 1})) == ["A.jpg", "C.jpg", "B.jpg"]
    assert names(client.post("/search", json={"vector": [1, 0], "k": 2, "qe": 1})) == ["Q.jpg", "A.jpg"]
    assert names(client.post("/search", json={"path": "Q.jpg", "k": 3, "qe": 1, "label": "x"})) == ["A.jpg", "C.jpg"]
    for bad in (-1, 101, "2", True):
        assert client.post("/search", json={"path": "Q.jpg", "qe": bad}).status_code == 422
    api = client.get("/openapi.json").json()["paths"]
    body = api["/search"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["qe"]["maximum"] == 100
    assert body["multipart/form-data"]["schema"]["properties"]["qe"]["pattern"] == "^(0|[1-9][0-9]{0,1}|100)$"
    assert "qe" not in api["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_a_whitened_index_is_served_in_its_own_space(tmp_path):
    from tl_embed.serve.catalog import Catalog

    x = correlated(200)
    store_of(tmp_path / "s.tle", x, labels=["a", "b"] * 100)
    idx = Index.build(tmp_path / "s.tle", tmp_path / "i.tli", whiten=True, **QUIET)
    catalog = Catalog(tmp_path / "i.tli")
    assert [i for i, _ in catalog.search_batch(x[:1])[0][:5]] == [h.id for h in idx.search_vectors(x[:1], 5)[0]]
    a = idx.ids[::2]  # the rows labelled "a", compared exactly in the whitened space
    want = a[np.argsort(-(idx.vectors_of(a) @ idx.queries(x[:1])[0]))[:3]]
    assert [i for i, _ in catalog.labelled(x[0], "a", 3)] == list(want)
    crc = zlib.crc32((tmp_path / "i.tli" / "index.bin").read_bytes())
    catalog.labelled(x[0], "a", 3, qe=2, exclude=int(idx.ids[0]))  # reading vectors back writes nothing
    assert zlib.crc32((tmp_path / "i.tli" / "index.bin").read_bytes()) == crc
