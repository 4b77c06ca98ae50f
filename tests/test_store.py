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


def _shard_files(path):
    return {p.name: p.stat().st_ino for p in (path / "shards").glob("*.npy")}


@pytest.fixture
def large_store_rules(monkeypatch):
    """Treat every store as 'large', so the size-tiered rules apply to a small test store."""
    from tl_embed.embedding import store as store_mod

    monkeypatch.setattr(store_mod, "CONSOLIDATE_BYTES", 0)
    return store_mod


def test_adding_to_a_large_store_leaves_its_big_shard_alone(tmp_path, large_store_rules):
    path = tmp_path / "s.tle"
    big = np.random.default_rng(0).normal(size=(5000, 4)).astype(np.float32)
    with EmbeddingStore.create(path, SPEC) as s:
        s.add(rows([f"{i:05d}.jpg" for i in range(5000)]), big)
        s.consolidate()
    before = _shard_files(path)
    with EmbeddingStore.open(path, "a") as s:
        for b in range(20):  # a run of 20 batches of 8
            s.add(rows([f"new_{b}_{i}.jpg" for i in range(8)]), np.full((8, 4), b, np.float32))
        s.consolidate()
        assert s._rows_cache is None, "adding and consolidating must not read every row"
    after = _shard_files(path)
    assert set(before) <= set(after) and all(after[n] == ino for n, ino in before.items())  # untouched
    assert len(after) - len(before) <= 2 * large_store_rules.TIER_FANOUT
    r = EmbeddingStore.open(path)
    assert len(r) == 5160
    np.testing.assert_array_equal(r.embeddings[r.position("03333.jpg")], big[3333])
    np.testing.assert_array_equal(r.embeddings[r.position("new_7_3.jpg")], [7, 7, 7, 7])
    r.close()


def test_tiers_merge_once_full(tmp_path, large_store_rules):
    fan = large_store_rules.TIER_FANOUT
    with EmbeddingStore.create(tmp_path / "s.tle", SPEC) as s:
        for b in range(fan - 1):
            s.add(rows([f"{b}_{i}.jpg" for i in range(10)]), np.full((10, 4), b, np.float32))
        s.consolidate()
        assert s.summary()["shards"] == fan - 1  # not full yet: nothing rewritten
        s.add(rows([f"last_{i}.jpg" for i in range(10)]), np.ones((10, 4)))
        s.consolidate()
        assert s.summary()["shards"] == 1 and len(s) == 10 * fan


def test_a_mostly_deleted_shard_is_rewritten_alone(tmp_path, large_store_rules):
    path = tmp_path / "s.tle"
    with EmbeddingStore.create(path, SPEC) as s:
        s.add(rows([f"a{i}.jpg" for i in range(100)]), np.arange(400, dtype=np.float32).reshape(100, 4))
        s.add(rows([f"b{i}.jpg" for i in range(100)]), np.ones((100, 4)))
        s.consolidate()
        keep = _shard_files(path)
        s.remove([f"a{i}.jpg" for i in range(60)])
        s.consolidate()
        files = _shard_files(path)
        assert len(files) == 2 and sorted(keep)[1] in files  # the b shard was not rewritten
        sizes = sorted(np.load(path / "shards" / f, mmap_mode="r").shape[0] for f in files)
        assert sizes == [40, 100]
        np.testing.assert_array_equal(s.embeddings[s.position("a75.jpg")], [300, 301, 302, 303])


def test_iter_chunks_covers_every_row_in_order_with_bounded_chunks(tmp_path):
    with EmbeddingStore.create(tmp_path / "s.tle", SPEC) as s:
        for b in range(5):
            s.add(rows([f"{b}_{i}.jpg" for i in range(7)]), np.random.default_rng(b).normal(size=(7, 4)))
        s.refresh()
        chunks = list(s.iter_chunks(rows=3))
        assert max(len(v) for _, _, v in chunks) <= 3
        assert [start for start, _, _ in chunks] == list(np.cumsum([0] + [len(v) for _, _, v in chunks[:-1]]))
        np.testing.assert_array_equal(np.concatenate([v for _, _, v in chunks]), s.embeddings)
        np.testing.assert_array_equal(np.concatenate([i for _, i, _ in chunks]), s.ids)
        s.consolidate()  # small store: one shard, one memory map
        assert isinstance(s.embeddings, np.memmap) and s.summary()["shards"] == 1


def test_take_gathers_rows_across_shards(tmp_path):
    with EmbeddingStore.create(tmp_path / "s.tle", SPEC, dtype="float16") as s:
        for b in range(3):
            s.add(rows([f"{b}_{i}.jpg" for i in range(5)]), np.full((5, 4), b + np.arange(5)[:, None] / 10))
        s.refresh()
        pick = np.array([0, 4, 5, 9, 14])
        got = s.take(pick)
        assert got.dtype == np.float32 and got.shape == (5, 4)
        np.testing.assert_array_equal(got, np.asarray(s.embeddings, np.float32)[pick])
        assert s.take(np.array([], dtype=np.int64)).shape == (0, 4)


def _mapped_shard_kb() -> int:
    """Resident kB of this process's memory maps of store shards (from /proc/self/smaps)."""
    total, in_shard = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            in_shard = "/shards/" in line
        elif in_shard and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_long_passes_do_not_keep_the_store_resident(tmp_path):
    # a pass over a store larger than memory must not show as that much RSS: pages are let go after use
    spec = BackboneSpec("test", "random", "random", 32, "none", "avg", 256)
    vectors = np.random.default_rng(0).random((16_384, 256), dtype=np.float32)  # 16 MB
    with EmbeddingStore.create(tmp_path / "s.tle", spec) as s:
        s.add(rows([f"{i}.jpg" for i in range(len(vectors))]), vectors)
        s.consolidate()
    with EmbeddingStore.open(tmp_path / "s.tle") as s:
        assert sum(len(v) for _, _, v in s.iter_chunks(rows=4096)) == len(vectors)
        assert _mapped_shard_kb() < 1024
        np.testing.assert_array_equal(s.take(np.arange(len(vectors))), vectors)
        assert _mapped_shard_kb() > 8 * 1024  # take alone keeps what it read mapped ...
        s.release_pages()
        assert _mapped_shard_kb() < 1024  # ... until the reader lets go
        np.testing.assert_array_equal(s.take(np.array([5, 16_000])), vectors[[5, 16_000]])  # still readable


def test_a_store_from_an_earlier_version_is_upgraded_on_its_first_write(tmp_path):
    import sqlite3

    path = tmp_path / "s.tle"
    with EmbeddingStore.create(path, SPEC) as s:
        s.add(rows(["a.jpg", "b.jpg"]), np.ones((2, 4)))
    conn = sqlite3.connect(path / "manifest.sqlite")  # as tl_embed 0.1 wrote it: no dead counts, no index
    conn.execute("DROP INDEX items_by_shard")
    conn.execute("ALTER TABLE shards DROP COLUMN dead")
    conn.commit()
    conn.close()
    with EmbeddingStore.open(path) as r:  # readers need neither
        assert sorted(r.paths) == ["a.jpg", "b.jpg"]
    with EmbeddingStore.open(path, "a") as w:
        w.remove(["a.jpg"])
        w.consolidate()
        assert list(w.paths) == ["b.jpg"] and w.summary()["shards"] == 1
