"""Index hardening: any factory string, size checks, one-file atomic format, writer lock, store identity,
damaged indexes and option values, each with the exact one-line error a user sees."""

import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest

from tl_embed.cli import main, pipeline
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.errors import TlEmbedError
from tl_embed.search import index as index_mod
from tl_embed.search.index import DATA_FILE, HEADER, MAGIC, Index

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *_: None}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes (conftest)


def spec(dim):
    return BackboneSpec("synthetic", "random", "random", 32, "none", "avg", dim)


def clustered(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (20, dim))
    return (centers[rng.integers(0, 20, n)] + rng.normal(0, 0.3, (n, dim))).astype(np.float32)


def rows(names):
    return [ManifestRow(n, None, None, "h", 1, 1, 1, 1) for n in names]


def make_store(path, vectors, prefix="img"):
    with EmbeddingStore.create(path, spec(vectors.shape[1]), root=path.parent) as s:
        s.add(rows([f"{prefix}{i:05d}.jpg" for i in range(len(vectors))]), vectors)
    return path


def err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, never a traceback
    return err.rstrip("\n")


def damaged(out) -> str:
    return f"; rebuild it with `tl-embed index STORE --out {out}`"


# ------------------------------------------------------------------ 1. any factory string
@pytest.mark.parametrize("factory", ["PCA64,Flat", "OPQ16,Flat", "PCA32,IVF4,Flat", "OPQ16_64,IVF4,PQ16"])
def test_any_factory_string_builds_searches_and_updates(tmp_path, factory, capsys):
    x = clustered(400, 64)
    store, out = make_store(tmp_path / "s.tle", x), tmp_path / "i.tli"
    argv = ["index", str(store), "--out", str(out), "--type", factory, "--metric", "l2"]
    assert main(argv) == 0
    idx = Index.open(out)
    assert idx.meta["factory"] == factory and len(idx) == 400
    if "IVF" not in factory:  # a rotation or a full-rank PCA keeps L2 distances: still exact
        assert idx.meta["recall_at_10"] == 1.0
        assert [h[0].path.endswith(f"img{i:05d}.jpg") for i, h in enumerate(idx.search_vectors(x[:20], 3))] \
            == [True] * 20
    with EmbeddingStore.open(store, "a") as s:
        s.remove([f"img{i:05d}.jpg" for i in range(10)])
        s.add(rows([f"new{i}.jpg" for i in range(5)]), clustered(5, 64, seed=9))
        s.compact()
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"updated {out}: +5 added, -10 removed (no rebuild)\n")
    idx = Index.open(out)
    names = {h.path.rsplit("/", 1)[-1] for hits in idx.search_vectors(x, 10) for h in hits}
    assert len(idx) == 395 and not names & {f"img{i:05d}.jpg" for i in range(10)}


def test_hnsw_adds_in_place_and_rebuilds_only_to_remove(tmp_path):
    x = clustered(300)
    store, out = make_store(tmp_path / "s.tle", x), tmp_path / "i.tli"
    Index.build(store, out, "hnsw", **QUIET)
    with EmbeddingStore.open(store, "a") as s:
        s.add(rows(["a.jpg"]), clustered(1, seed=3))
    said = []
    assert len(Index.build(store, out, "hnsw", log=said.append)) == 301
    assert said == [f"updated {out}: +1 added, -0 removed (no rebuild)"]
    with EmbeddingStore.open(store, "a") as s:
        s.remove(["a.jpg"])
    said.clear()
    assert len(Index.build(store, out, "hnsw", log=said.append)) == 300
    assert said == [f"rebuilding {out}: HNSW32,Flat cannot be updated in place "
                    "(remove_ids not implemented for this type of index)"]


# ------------------------------------------------------------------ 2. sizes and FAISS errors
@pytest.mark.parametrize("n, args, message", [
    (60, ["--type", "IVF4096,Flat"], "IVF4096 needs at least 4096*39 training vectors; this store has 60: "
                                     "use --type ivf (auto-sized) or flat"),
    (60, ["--type", "PQ8"], "PQ8 needs at least 2^8 = 256 training vectors; this store has 60: "
                            "use --type ivf (auto-sized) or flat"),
    (100, ["--type", "ivfpq"], "PQ4 needs at least 2^8 = 256 training vectors; this store has 100: "
                               "use --type ivf (auto-sized) or flat"),
    (300, ["--max-memory", "1KB"], "--max-memory 1KB is too small for 300 vectors of dimension 16: "
                                   "the smallest index (IVF7,SQ8) takes about 12.5KB; use --max-memory 12.5KB or more"),
    # FAISS's own words, whose assertion text varies between FAISS releases (the part in quotes)
    (16, ["--type", "PCA64,Flat"], "FAISS failed to build the PCA64,Flat index: Error: '*' failed: PCA matrix "
                                   "cannot output 64 dimensions from 16"),
])
def test_sizes_are_checked_before_faiss_and_nothing_is_left_behind(tmp_path, capsys, n, args, message):
    store, out = make_store(tmp_path / "s.tle", clustered(n)), tmp_path / "i.tli"
    assert main(["index", str(store), "--out", str(out), *args]) == 2
    assert fnmatch.fnmatchcase(err_line(capsys), f"tl-embed: error: {message}")
    assert not out.exists()  # a failed first build leaves no empty "index" folder


def test_memory_error_names_the_budget_that_works(tmp_path, capsys):
    store, out = make_store(tmp_path / "s.tle", clustered(2000, 64)), tmp_path / "i.tli"
    assert main(["index", str(store), "--out", str(out), "--max-memory", "50KB"]) == 2
    assert err_line(capsys) == ("tl-embed: error: --max-memory 50KB is too small for 2000 vectors of dimension "
                                "64: the smallest index (IVF51,PQ2) takes about 130.6KB; use --max-memory "
                                "130.6KB or more")
    assert main(["index", str(store), "--out", str(out), "--max-memory", "130.6KB"]) == 0
    assert Index.open(out).meta["factory"] == "IVF51,PQ2"


def test_faiss_errors_during_search_are_one_line(tmp_path):
    out = tmp_path / "i.tli"
    idx = Index.build(make_store(tmp_path / "s.tle", clustered(50)), out, **QUIET)

    class Broken:
        ntotal = 50

        def search(self, *_):
            raise RuntimeError("Error in void faiss::f() at /project/faiss/x.cpp:7: out of luck")

    idx.faiss_index = Broken()
    with pytest.raises(TlEmbedError) as e:
        idx.search_vectors(clustered(1), 3)
    assert str(e.value) == f"FAISS failed to search the Flat index {out}: out of luck"


# ------------------------------------------------------------------ 3. one unit on disk
def test_index_is_one_file_and_old_format_opens_and_converts(tmp_path):
    x = clustered(200)
    store, out = make_store(tmp_path / "s.tle", x), tmp_path / "i.tli"
    idx = Index.build(store, out, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == [".lock", DATA_FILE]
    old = tmp_path / "old.tli"  # as written before index.bin: two files, no store uid, paths in the meta
    old.mkdir()
    faiss.write_index(idx.faiss_index, str(old / "index.faiss"))
    (old / "meta.json").write_text(json.dumps(old_meta(idx)))
    assert Index.open(old).search_vectors(x[5], 1)[0][0].path.endswith("img00005.jpg")
    said = []
    Index.build(store, old, log=said.append)
    assert said == [f"updated {old}: +0 added, -0 removed (no rebuild)"]
    assert sorted(p.name for p in old.iterdir()) == [".lock", DATA_FILE]


def test_readers_never_see_a_half_updated_index(tmp_path):
    x = clustered(300)
    store, out = make_store(tmp_path / "s.tle", x), tmp_path / "i.tli"
    Index.build(store, out, "flat", **QUIET)
    allowed = {str(tmp_path / f"img{i:05d}.jpg") for i in range(300)}
    errors, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                for hits in Index.open(out).search_vectors(x[:20], 5):
                    assert len(hits) == 5 and {h.path for h in hits} <= allowed, hits
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure at all is what this test looks for
                errors.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for it, kind in enumerate(["ivf", "flat", "hnsw", "flat", "ivf", "ivf"]):
            names = [f"r{it}_{i}.jpg" for i in range(10)]
            allowed |= {str(tmp_path / n) for n in names}
            with EmbeddingStore.open(store, "a") as s:
                s.add(rows(names), clustered(10, seed=it + 1))
                s.remove([f"img{i:05d}.jpg" for i in range(it * 10 + 20, it * 10 + 30)])
                s.compact()
            Index.build(store, out, kind, **QUIET)
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and reads[0] >= 6


CHILD_BUILDS = """
import sys
from tl_embed.search.index import Index
store, out = sys.argv[1:]
for n in range(10**6):
    Index.build(store, out, ("flat", "ivf")[n % 2], log=lambda *_: None)
    print(n, flush=True)
"""


def kill_builder(store, out, delay, wait_for_a_save):
    """Run a child that rebuilds ``out`` in a loop; SIGKILL it ``delay`` s later (after its first save)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_BUILDS, str(store), str(out)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    if wait_for_a_save:
        child.stdout.readline()
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()


def test_a_writer_killed_at_any_moment_leaves_the_old_or_the_new_index(tmp_path):
    x = clustered(300)
    store, out = make_store(tmp_path / "s.tle", x), tmp_path / "i.tli"
    expected = [str(tmp_path / f"img{i:05d}.jpg") for i in range(300)]
    rng = np.random.default_rng(1)
    kill_builder(store, out, rng.uniform(0, 1.0), wait_for_a_save=False)  # maybe during the first build
    if (out / DATA_FILE).exists():
        assert sorted(Index.open(out).paths.values()) == expected
    for _ in range(5):
        kill_builder(store, out, rng.uniform(0, 0.4), wait_for_a_save=True)
        idx = Index.open(out)
        assert sorted(idx.paths.values()) == expected
        assert [h[0].path for h in idx.search_vectors(x[:30], 1)] == expected[:30]
    Index.build(store, out, **QUIET)  # the killed writer's lock is gone, its temp file cleaned up
    assert sorted(p.name for p in out.iterdir()) == [".lock", DATA_FILE]


CHILD_HOLDS = """
import sys, time
from tl_embed.search.index import Index
def hold(_):
    print("holding", flush=True)
    time.sleep(60)
Index.build(sys.argv[1], sys.argv[2], log=hold)
"""


def test_a_second_writer_is_refused(tmp_path, capsys):
    store, out = make_store(tmp_path / "s.tle", clustered(100)), tmp_path / "i.tli"
    Index.build(store, out, **QUIET)
    before = (out / DATA_FILE).read_bytes()
    child = subprocess.Popen([sys.executable, "-c", CHILD_HOLDS, str(store), str(out)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "holding\n"  # inside its update, lock held
        assert main(["index", str(store), "--out", str(out)]) == 2
        assert err_line(capsys) == (f"tl-embed: error: index {out} is being written by another tl-embed process; "
                                    "wait for it to finish (only one writer at a time)")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert (out / DATA_FILE).read_bytes() == before


# ------------------------------------------------------------------ 4. store identity
def test_an_index_refuses_updates_from_another_store(tmp_path, capsys):
    store_a = make_store(tmp_path / "a.tle", clustered(80))
    store_b = make_store(tmp_path / "b.tle", clustered(80, seed=1))  # same backbone, other images
    out = tmp_path / "a.tli"
    Index.build(store_a, out, **QUIET)
    before = (out / DATA_FILE).read_bytes()
    assert main(["index", str(store_b), "--out", str(out)]) == 2
    assert err_line(capsys) == (f"tl-embed: error: index {out} belongs to another store ({store_a}); it was left "
                                f"as is: write the index of {store_b} to a new --out, or delete {out} to rebuild it")
    assert (out / DATA_FILE).read_bytes() == before


# ------------------------------------------------------------------ 5. damaged indexes
def old_meta(idx) -> dict:
    """An index's meta as format 1 and earlier wrote it: absolute paths in a JSON list, no store uid."""
    meta = {k: v for k, v in idx.meta.items() if k != "store_uid"}
    return meta | {"paths": sorted(idx.paths.items())}


def repack(path: Path, meta: bytes) -> None:
    """Rewrite index.bin with other meta bytes but a valid header (sizes, checksum)."""
    data = path.read_bytes()
    _, version, meta_len, table_len, blob_len, _ = HEADER.unpack(data[:HEADER.size])
    rest = data[HEADER.size + meta_len:]
    path.write_bytes(HEADER.pack(MAGIC, version, len(meta), table_len, blob_len, zlib.crc32(rest, zlib.crc32(meta)))
                     + meta + rest)


def delete_data(out):
    (out / DATA_FILE).unlink()


def garbage(out):
    (out / DATA_FILE).write_bytes(b"not an index at all " * 50)


def truncate(out):
    data = (out / DATA_FILE).read_bytes()
    (out / DATA_FILE).write_bytes(data[:-100])


def flip_byte(out):
    data = bytearray((out / DATA_FILE).read_bytes())
    data[-10] ^= 0xFF
    (out / DATA_FILE).write_bytes(bytes(data))


def bad_json(out):
    repack(out / DATA_FILE, b"{not json")


def missing_keys(out):
    meta = dict(Index.open(out).meta)
    del meta["factory"], meta["spec"]
    repack(out / DATA_FILE, json.dumps(meta).encode())


def old_format(out, drop=None, meta_text=None):
    idx = Index.open(out)
    faiss.write_index(idx.faiss_index, str(out / "index.faiss"))
    (out / "meta.json").write_text(meta_text or json.dumps(old_meta(idx)))
    (out / DATA_FILE).unlink()
    if drop:
        (out / drop).unlink()


@pytest.mark.parametrize("damage, reason", [
    (delete_data, "index.bin is missing"),
    (garbage, "index.bin is not a tl_embed index file"),
    (truncate, "index.bin has {size} bytes, its header says {full}"),
    (flip_byte, "index.bin fails its checksum"),
    (bad_json, "its meta is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
               "(char 1)"),
    (missing_keys, "its meta lacks spec, factory"),
    (lambda out: old_format(out, drop="index.faiss"), "index.faiss is missing"),
    (lambda out: old_format(out, drop="meta.json"), "meta.json is missing"),
    (lambda out: old_format(out, meta_text="[1, 2"), "its meta is not valid JSON: Expecting ',' delimiter: "
                                                     "line 1 column 6 (char 5)"),
    (lambda out: old_format(out, meta_text='{"spec": {}}'), "its meta lacks factory, metric, store, root, paths"),
])
def test_a_damaged_index_is_one_line_and_a_rebuild_fixes_it(tmp_path, capsys, damage, reason):
    x = clustered(100)
    store, out = make_store(tmp_path / "s.tle", x), tmp_path / "i.tli"
    Index.build(store, out, **QUIET)
    full = (out / DATA_FILE).stat().st_size
    damage(out)
    assert main(["search", str(out), str(tmp_path / "img00003.jpg")]) == 2
    why = reason.format(size=full - 100, full=full)
    assert err_line(capsys) == f"tl-embed: error: index {out} is damaged ({why}){damaged(out)}"
    assert main(["index", str(store), "--out", str(out)]) == 0
    *said, described = capsys.readouterr().out.splitlines()
    assert said == ([] if damage is delete_data else [f"rebuilding {out}: it is damaged ({why})"])
    assert described.startswith(f"{out}: Flat")
    assert Index.open(out).search_vectors(x[3], 1)[0][0].path == str(tmp_path / "img00003.jpg")


def test_a_folder_that_is_no_index(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    assert main(["search", str(tmp_path / "photos"), "q.jpg"]) == 2
    assert err_line(capsys) == (f"tl-embed: error: {tmp_path / 'photos'} is not a tl_embed index; build one with "
                                f"`tl-embed index STORE --out {tmp_path / 'photos'}`")
    store = make_store(tmp_path / "s.tle", clustered(20))
    assert main(["index", str(store), "--out", str(tmp_path / "photos")]) == 2
    assert err_line(capsys) == (f"tl-embed: error: {tmp_path / 'photos'} exists and is not a tl_embed index; "
                                "choose another --out")
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat.jpg"]


# ------------------------------------------------------------------ 6. option values
@pytest.mark.parametrize("argv, message", [
    (["search", "I", "q.jpg", "-k", "0"], "argument -k: must be at least 1, not 0"),
    (["search", "I", "q.jpg", "-k", "-1"], "argument -k: must be at least 1, not -1"),
    (["search", "I", "q.jpg", "--limit", "-1"], "argument --limit: must be at least 1, not -1"),
    (["search", "I", "q.jpg", "--limit", "0"], "argument --limit: must be at least 1, not 0"),
    (["dedup", "S", "--threshold", "2"], "argument --threshold: must be between 0 and 1, not 2"),
    (["index", "S", "--out", "I", "--target-recall", "1.5"], "argument --target-recall: must be between 0 and 1, "
                                                             "not 1.5"),
    (["index", "S", "--out", "I", "--max-memory", "lots"], "argument --max-memory: must be a positive size such "
                                                           "as 500MB or 2GB, not 'lots'"),
])
def test_bad_option_values_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tl-embed {argv[0]}: error: {message} (see `tl-embed {argv[0]} --help`)"]


@pytest.mark.parametrize("argv", [
    ["search", "I", "q.jpg", "--format", "html", "--out", "{tmp}/missing/s.html"],
    ["dedup", "S", "--out", "{tmp}/missing/d.csv"],
    ["index", "S", "--out", "{tmp}/missing/i.tli"],
])
def test_out_into_a_missing_folder_fails_before_any_work(tmp_path, capsys, argv):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    out = argv[argv.index("--out") + 1].format(tmp=tmp_path)
    assert capsys.readouterr().err.splitlines() == [
        f"tl-embed: error: --out {out}: folder {tmp_path}/missing does not exist; create it first or choose "
        "another --out"]


def test_pipeline_validation_accepts_out_folders_it_creates_but_not_others(tmp_path):
    step = ('[[step]]\nname = "d"\nrun = "dedup"\nargs = ["s.tle"]\noutputs = [{outputs}]\n'
            '[step.options]\nout = "{tmp}/new/d.csv"\n')
    path = tmp_path / "p.toml"
    path.write_text(step.format(outputs=f'"{tmp_path}/new/d.csv"', tmp=tmp_path))
    assert pipeline.load(path).steps[0].argv[-1] == f"{tmp_path}/new/d.csv"
    path.write_text(step.format(outputs="", tmp=tmp_path))
    with pytest.raises(TlEmbedError, match=f"--out: folder {tmp_path}/new does not exist"):
        pipeline.load(path)


def test_human_sizes_round_up():
    assert [index_mod.human_size(b) for b in (999, 1000, 19_201, 2.5e9)] == ["999B", "1KB", "19.3KB", "2.5GB"]
