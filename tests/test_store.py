import numpy as np
import pytest

from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, Failure, ManifestRow
from tl_embed.errors import StoreError

SPEC = BackboneSpec("test", "random", "random", 32, "none", "avg", 4)


def rows(names, label="a"):
    return [ManifestRow(n, label, None, f"sha-{n}", 10, 1, 5, 6) for n in names]


def test_add_reopen_compact_and_memmap(tmp_path):
    path = tmp_path / "s.tle"
    with EmbeddingStore.create(path, SPEC) as s:
        s.add(rows(["a.jpg", "b.jpg"]), np.ones((2, 4)))
        s.add(rows(["c.jpg"], "b"), np.full((1, 4), 2.0))
        s.refresh()
        assert len(s) == 3 and s.summary()["shards"] == 2
        s.compact()
    r = EmbeddingStore.open(path)
    assert list(r.paths) == ["a.jpg", "b.jpg", "c.jpg"] and list(r.labels) == ["a", "a", "b"]
    assert isinstance(r.embeddings, np.memmap) and r.embeddings.dtype == np.float32
    np.testing.assert_array_equal(r.embeddings[2], [2, 2, 2, 2])
    assert len(list((path / "shards").glob("*.npy"))) == 1
    r.close()


def test_replacing_a_path_replaces_its_row_and_float16(tmp_path):
    with EmbeddingStore.create(tmp_path / "s.tle", SPEC, dtype="float16") as s:
        s.add(rows(["a.jpg", "b.jpg"]), np.ones((2, 4)))
        s.add(rows(["a.jpg"]), np.full((1, 4), 3.0))
        s.refresh()
        assert sorted(s.paths) == ["a.jpg", "b.jpg"]
        assert s.embeddings.dtype == np.float16
        np.testing.assert_array_equal(s.embeddings[s.position("a.jpg")], [3, 3, 3, 3])
        assert s.remove(["b.jpg"]) == 1
        s.compact()
        assert list(s.paths) == ["a.jpg"] and s.embeddings.shape == (1, 4)


def test_one_writer_at_a_time(tmp_path):
    s = EmbeddingStore.create(tmp_path / "s.tle", SPEC)
    with pytest.raises(StoreError, match="another tl-embed process"):
        EmbeddingStore.open(tmp_path / "s.tle", "a")
    EmbeddingStore.open(tmp_path / "s.tle").close()  # readers are fine
    s.close()
    EmbeddingStore.open(tmp_path / "s.tle", "a").close()  # lock released


def test_orphan_shards_of_a_crashed_writer_are_removed(tmp_path):
    path = tmp_path / "s.tle"
    with EmbeddingStore.create(path, SPEC) as s:
        s.add(rows(["a.jpg"]), np.ones((1, 4)))
    np.save(path / "shards" / "00000099.npy", np.zeros((5, 4)))  # written, never committed
    (path / "shards" / ".00000100.npy.123.tmp").write_bytes(b"partial")
    with EmbeddingStore.open(path, "a") as s:
        assert len(s) == 1
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["00000001.npy"]


def test_refuses_bad_input(tmp_path):
    with EmbeddingStore.create(tmp_path / "s.tle", SPEC) as s:
        with pytest.raises(StoreError, match="non-finite"):
            s.add(rows(["a.jpg"]), np.full((1, 4), np.nan))
        with pytest.raises(StoreError, match="expected 1 x 4"):
            s.add(rows(["a.jpg"]), np.ones((1, 3)))
        assert len(s) == 0
    with pytest.raises(StoreError, match="already holds a store"):
        EmbeddingStore.create(tmp_path / "s.tle", SPEC)
    with pytest.raises(StoreError, match="not a tl_embed store"):
        EmbeddingStore.open(tmp_path / "missing.tle")


def test_failures_and_export(tmp_path):
    with EmbeddingStore.create(tmp_path / "s.tle", SPEC) as s:
        s.add(rows(["a.jpg", "b.jpg"]), np.arange(8).reshape(2, 4))
        s.record_failures([Failure("bad.jpg", "truncated", 3, 4)])
        assert [f.reason for f in s.failures] == ["truncated"]
        s.export(tmp_path / "e.npy", tmp_path / "e.csv")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy")[1], [4, 5, 6, 7])
    lines = (tmp_path / "e.csv").read_text().splitlines()
    assert lines[0].startswith("row,path,label") and lines[2].startswith("1,b.jpg,a")
