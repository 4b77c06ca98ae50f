import json
import re

import numpy as np
import pytest
from PIL import Image

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.errors import TlEmbedError
from tl_embed.search.choose import Choice, choose
from tl_embed.search.dedup import find_duplicates
from tl_embed.search.index import Index, choose_factory, without_self
from tl_embed.search.sheet import breakable, shown_path

DIM = 32
SPEC = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", DIM)


def clustered(n, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (20, DIM))
    return (centers[rng.integers(0, 20, n)] + rng.normal(0, 0.3, (n, DIM))).astype(np.float32)


def make_store(path, vectors, names=None):
    names = names or [f"img{i:05d}.jpg" for i in range(len(vectors))]
    with EmbeddingStore.create(path, SPEC, root=path.parent) as s:
        s.add([ManifestRow(n, None, None, "h", 1, 1, 1, 1) for n in names], vectors)
    return path


def test_auto_chooses_exact_then_ivf_then_compressed_codes():
    assert choose_factory(20_000, 1280) == "Flat"
    assert choose_factory(50_000, 1280) == "IVF512,Flat"  # exact search of one query would read 256 MB
    assert choose_factory(200_000, 1280) == "IVF1024,Flat"
    assert choose_factory(500_000, 1280) == "IVF1024,SQfp16"  # 2.6 GB raw > the default 2 GB budget
    assert choose(1_000_000, 1280) == Choice("IVF2048,SQ8", rerank=True)  # 1.3 GB
    assert choose(1_000_000, 1280, max_memory=5e8) == Choice("IVF2048,PQ320", rerank=True)
    assert choose(1_000_000, 1280, max_memory=2e8) == Choice("IVF2048,PQ160", rerank=True)
    assert choose(10, 8, "sq8", rerank=False) == Choice("IVF1,SQ8", rerank=False)
    assert choose_factory(10, 8, "HNSW16,Flat") == "HNSW16,Flat"


def test_exact_search_returns_the_query_itself_first(tmp_path):
    x = clustered(500)
    idx = Index.build(make_store(tmp_path / "s.tle", x), tmp_path / "i.tli", log=lambda *_: None)
    assert idx.meta["factory"] == "Flat" and idx.meta["recall_at_10"] == 1.0
    hits = idx.search_vectors(x[:50], k=5)
    assert [h[0].path.endswith(f"img{i:05d}.jpg") for i, h in enumerate(hits)] == [True] * 50
    assert all(abs(h[0].score - 1.0) < 1e-5 for h in hits)
    reopened = Index.open(tmp_path / "i.tli")
    assert [h.path for h in reopened.search_vectors(x[7], 3)[0]] == [h.path for h in hits[7][:3]]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "IVF16,PQ8"])
def test_approximate_indexes_reach_the_recall_they_print(tmp_path, kind):
    data = clustered(3200)
    x, q = data[:3000], data[3000:]  # queries from the same distribution, not indexed
    idx = Index.build(make_store(tmp_path / "s.tle", x), tmp_path / "i.tli", kind, log=lambda *_: None)
    exact = Index.build(tmp_path / "s.tle", tmp_path / "e.tli", "flat", log=lambda *_: None)
    truth = [{h.path for h in hits} for hits in exact.search_vectors(q, 10)]
    found = [{h.path for h in hits} for hits in idx.search_vectors(q, 10)]
    measured = np.mean([len(a & b) / 10 for a, b in zip(found, truth, strict=True)])
    assert measured >= idx.meta["recall_at_10"] - 0.05  # fresh queries: what it printed holds
    if kind != "IVF16,PQ8":
        assert idx.meta["recall_at_10"] >= 0.95


def test_incremental_update_keeps_ids_and_paths_aligned(tmp_path):
    x = clustered(400)
    store = make_store(tmp_path / "s.tle", x)
    Index.build(store, tmp_path / "i.tli", "ivf", log=lambda *_: None)
    with EmbeddingStore.open(store, "a") as s:
        s.remove([f"img{i:05d}.jpg" for i in range(0, 400, 4)])  # 100 gone
        new = clustered(30, seed=5)
        s.add([ManifestRow(f"new{i}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(30)], new)
        s.compact()
    said = []
    idx = Index.build(store, tmp_path / "i.tli", "ivf", log=said.append)
    assert said == ["updated " + str(tmp_path / "i.tli") + ": +30 added, -100 removed (no rebuild)"]
    assert len(idx) == 330
    for i in (1, 2, 399):
        assert idx.search_vectors(x[i], 1)[0][0].path.endswith(f"img{i:05d}.jpg")
    assert idx.search_vectors(new[7], 1)[0][0].path.endswith("new7.jpg")
    removed = idx.search_vectors(x[4], 10)[0]
    assert not any(h.path.endswith("img00004.jpg") for h in removed)
    said.clear()
    Index.build(store, tmp_path / "i.tli", "hnsw", log=said.append)
    assert "rebuilding" in said[0]


def test_mismatched_store_is_refused(tmp_path):
    x = clustered(50)
    Index.build(make_store(tmp_path / "s.tle", x), tmp_path / "i.tli", log=lambda *_: None)
    other = BackboneSpec("other", "random", "random", 32, "none", "avg", DIM)
    with EmbeddingStore.create(tmp_path / "o.tle", other) as s:
        s.add([ManifestRow("a.jpg", None, None, "h", 1, 1, 1, 1)], x[:1])
    with pytest.raises(TlEmbedError, match="cannot be mixed"):
        Index.build(tmp_path / "o.tle", tmp_path / "i.tli")
    with pytest.raises(TlEmbedError, match="bad FAISS factory"):
        Index.build(tmp_path / "s.tle", tmp_path / "j.tli", "NoSuchIndex,Flat")


def test_dedup_groups_planted_duplicates_largest_first(tmp_path):
    x = clustered(100)
    x[10] = x[3] * 1.01  # a 3-image group and a pair
    x[20] = x[3] + 0.001
    x[50] = x[40] * 0.5  # cosine is scale-free
    groups = find_duplicates(make_store(tmp_path / "s.tle", x), 0.999)
    assert [sorted(p.split("/")[-1] for p, _ in g) for g in groups] == [
        ["img00003.jpg", "img00010.jpg", "img00020.jpg"], ["img00040.jpg", "img00050.jpg"]]


def test_cli_index_search_formats(tmp_path, image_folder, tiny_model, capsys):
    store = str(tmp_path / "s.tle")
    main(["embed", str(image_folder), "--out", store, "--model", tiny_model, "--layer", "features", "-q"])
    assert main(["index", store, "--out", str(tmp_path / "i.tli")]) == 0
    assert "recall@10 1.000" in capsys.readouterr().out
    query = image_folder / "red" / "red_002.jpg"
    assert main(["search", str(tmp_path / "i.tli"), str(query), "-k", "3", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [n["rank"] for n in res[0]["neighbours"]] == [1, 2, 3]
    assert str(query.resolve()) not in [n["path"] for n in res[0]["neighbours"]]  # a stored query is left out
    assert all("/red/" in n["path"] for n in res[0]["neighbours"])
    fresh = tmp_path / "q.png"  # not in the store: embedded with the recorded backbone
    Image.open(query).save(fresh)
    html = tmp_path / "sheet.html"
    assert main(["search", str(tmp_path / "i.tli"), str(fresh), "--format", "html", "--out", str(html)]) == 0
    page = html.read_text()
    capsys.readouterr()
    assert page.count("<figure>") == 11 and "data:image/jpeg;base64," in page
    assert main(["dedup", store, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("group,size,path,similarity")


def test_describe_warns_when_compression_misses_the_target(tmp_path):
    x = clustered(2000)
    store = make_store(tmp_path / "s.tle", x)
    lossy = Index.build(store, tmp_path / "pq.tli", "IVF8,PQ2", target_recall=0.99, log=lambda *_: None,
                        rerank=False)
    assert lossy.meta["recall_at_10"] < 0.99 and lossy.describe().endswith(
        "WARNING: recall@10 stays below the target 0.99 even at the widest search; drop --no-rerank, or use a "
        "less compressed type (--type sq8 or ivf)")
    reranked = Index.build(store, tmp_path / "pqr.tli", "IVF8,PQ2", target_recall=0.99, log=lambda *_: None)
    assert reranked.meta["recall_at_10"] >= 0.99 and "WARNING" not in reranked.describe()
    exact = Index.build(store, tmp_path / "flat.tli", "flat", log=lambda *_: None)
    assert "WARNING" not in exact.describe()


def test_a_stored_query_is_not_its_own_neighbour_and_k_others_are_returned(tmp_path):
    x = clustered(300)
    idx = Index.build(make_store(tmp_path / "s.tle", x), tmp_path / "i.tli", log=lambda *_: None)
    query = str(tmp_path / "img00012.jpg")
    (_, with_self), = idx.search([query], k=6)
    assert with_self[0].path == query  # by default a stored image finds itself first
    (_, hits), = idx.search([query], k=5, exclude_self=True)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and query not in [h.path for h in hits]
    assert [(h.id, h.path) for h in hits] == [(h.id, h.path) for h in with_self[1:]]
    own = int(idx.ids[12])
    assert [h.id for h in idx.search_vectors(x[12], 5, exclude=[own])[0]] == [h.id for h in hits]
    assert idx.search_vectors(x[12], 5, exclude=[None])[0][0].id == own  # None: nothing left out
    assert without_self([(3, 1.0), (7, 0.9), (5, 0.8)], 3, 1) == [(7, 0.9)]
    assert without_self([(3, 1.0), (7, 0.9)], None) == [(3, 1.0), (7, 0.9)]


def test_cli_search_leaves_a_stored_query_out_in_every_format(tmp_path, capsys):
    x = clustered(80)
    names = [f"{'cats' if i % 2 else 'dogs'}/img{i:05d}.jpg" for i in range(80)]
    index = str(tmp_path / "i.tli")
    Index.build(make_store(tmp_path / "s.tle", x, names), index, log=lambda *_: None)
    query = tmp_path / "cats" / "img00007.jpg"
    (_, hits), = Index.open(index).search([str(query)], k=5)
    expected = [h.path for h in hits[1:]]  # what an exact search lists after the query itself
    capsys.readouterr()

    assert main(["search", index, str(query), "-k", "4", "--format", "json"]) == 0
    assert [n["path"] for n in json.loads(capsys.readouterr().out)[0]["neighbours"]] == expected
    assert main(["search", index, str(query), "-k", "4", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "query,rank,path,similarity" and [r.split(",")[2] for r in rows[1:]] == expected
    assert main(["search", index, str(query), "-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query {query}" and [line.split()[-1] for line in lines[1:]] == expected

    sheet = tmp_path / "sheet.html"
    assert main(["search", index, str(query), "-k", "4", "--format", "html", "--out", str(sheet)]) == 0
    page = sheet.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    shown = [re.sub(r"<b>.*?</b> ", "", c) for c in captions]
    relative = [p.removeprefix(str(tmp_path) + "/").replace("/", "/<wbr>") for p in expected]
    assert shown == ["cats/<wbr>img00007.jpg", *relative]  # the query once, then 4 others, relative to the root
    assert "break-all" not in page  # captions wrap at '/', not inside a name


def test_sheet_paths_are_relative_inside_the_root_and_absolute_outside(tmp_path):
    root = tmp_path / "images"
    assert shown_path(root / "cats" / "a.jpg", root) == "cats/a.jpg"
    assert shown_path(tmp_path / "elsewhere" / "b.jpg", root) == str(tmp_path / "elsewhere" / "b.jpg")
    assert shown_path(tmp_path / "c.jpg", None) == str(tmp_path / "c.jpg")
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    assert shown_path(tmp_path / "link" / "d.jpg", root) == "d.jpg"  # reached through a link to the root
    assert breakable("a<b/c d/e.jpg") == "a&lt;b/<wbr>c d/<wbr>e.jpg"
