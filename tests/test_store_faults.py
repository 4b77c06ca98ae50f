"""Faults a store must survive: crashes mid-creation or mid-compaction, damage, a full disk, read-only
media, concurrent writers and readers.  Each test asserts the exact outcome: the store opens and holds
what it should, or the user sees one line saying what went wrong."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, make_image

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
from tl_embed.errors import StoreDamagedError

SPEC = BackboneSpec("test", "random", "random", 32, "none", "avg", 4)
CLI = [sys.executable, "-m", "tl_embed.cli"]


def rows(names):
    return [ManifestRow(n, "a", None, f"sha-{n}", 10, 1, 5, 6) for n in names]


def two_shard_store(path: Path) -> Path:
    with EmbeddingStore.create(path, SPEC) as s:
        s.add(rows(["a.jpg", "b.jpg"]), np.ones((2, 4)))
        s.add(rows(["c.jpg"]), np.full((1, 4), 2.0))
    return path


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tl-embed: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def store_vectors(path: Path) -> dict[str, np.ndarray]:
    with EmbeddingStore.open(path) as s:
        return {p: np.array(v) for p, v in zip(s.paths, s.embeddings, strict=True)}


def big_folder(root: Path, n: int) -> Path:
    names = list(COLORS)
    for i in range(n):
        make_image(root / names[i % 4] / f"img_{i:04d}.png", COLORS[names[i % 4]], i)
    return root


def embed_cmd(images: Path, out: Path, tiny_model: str, *extra: str) -> list[str]:
    return [*CLI, "embed", str(images), "--out", str(out), "--model", tiny_model, "--layer", "features",
            "-q", *extra]


# ------------------------------------------------------------------ creation
@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_creation_is_all_or_nothing(tmp_path, monkeypatch, fault):
    real_connect = sqlite3.connect

    def failing_connect(*a, **k):
        conn = real_connect(*a, **k)
        conn.close()
        raise fault

    monkeypatch.setattr(sqlite3, "connect", failing_connect)
    with pytest.raises(type(fault)):
        EmbeddingStore.create(tmp_path / "s.tle", SPEC)
    assert sorted(os.listdir(tmp_path)) == []  # neither the store nor its temp folder
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    EmbeddingStore.create(tmp_path / "s.tle", SPEC).close()
    assert EmbeddingStore.open(tmp_path / "s.tle").meta["uid"]


def test_temp_folder_of_a_killed_creation_is_cleaned_up(tmp_path):
    dead = tmp_path / ".s.tle.creating-999999999"  # no such pid
    (dead / "shards").mkdir(parents=True)
    EmbeddingStore.create(tmp_path / "s.tle", SPEC).close()
    assert not dead.exists()


def test_store_path_with_uri_characters(tmp_path):
    path = two_shard_store(tmp_path / "we#ird?na%me 1.tle")
    with EmbeddingStore.open(path) as s:
        assert sorted(s.paths) == ["a.jpg", "b.jpg", "c.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["we#ird?na%me 1.tle"]  # no stray file from a bad URI
    assert main(["info", str(path)]) == 0


# -------------------------------------------------------------------- damage
def _garbage_manifest(p: Path) -> None:
    for f in p.glob("manifest.sqlite*"):
        f.unlink()
    (p / "manifest.sqlite").write_bytes(np.random.default_rng(0).bytes(8192))


def _sql(p: Path, statement: str) -> None:
    conn = sqlite3.connect(p / "manifest.sqlite")
    with conn:
        conn.execute(statement)
    conn.close()


def _shard(p: Path) -> Path:
    return sorted((p / "shards").glob("*.npy"))[0]


DAMAGE = {
    "manifest of random bytes": (_garbage_manifest, "manifest"),
    "shard deleted": (lambda p: _shard(p).unlink(), "missing"),
    "shard truncated": (lambda p: _shard(p).write_bytes(_shard(p).read_bytes()[:100]), "shard"),
    "shard of random bytes": (lambda p: _shard(p).write_bytes(os.urandom(200)), "unreadable"),
    "spec row missing": (lambda p: _sql(p, "DELETE FROM meta WHERE key = 'spec'"), "backbone record"),
    "spec row half-written": (lambda p: _sql(p, "UPDATE meta SET value = substr(value, 1, 25) WHERE key = 'spec'"),
                              "backbone record"),
    "format row missing": (lambda p: _sql(p, "DELETE FROM meta WHERE key = 'format_version'"), "format"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_store_is_one_line_not_a_traceback(tmp_path, damage):
    path = two_shard_store(tmp_path / "s.tle")
    harm, word = DAMAGE[damage]
    harm(path)
    with pytest.raises(StoreDamagedError, match=word):
        EmbeddingStore.open(path).embeddings  # noqa: B018 - opening is the point
    r = subprocess.run([*CLI, "info", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    one_error_line(r.stderr, f"store {path} is damaged")


@pytest.mark.parametrize("damage", ["shard deleted", "shard truncated"])
def test_embed_mends_a_lost_shard_by_embedding_again(tmp_path, image_folder, tiny_model, damage, capsys):
    out = tmp_path / "s.tle"
    assert main(["embed", str(image_folder), "--out", str(out), "--model", tiny_model, "--layer", "features",
                 "-q"]) == 0
    before = store_vectors(out)
    DAMAGE[damage][0](out)
    capsys.readouterr()
    assert main(["embed", str(image_folder), "--out", str(out), "--model", tiny_model, "--layer", "features",
                 "-q"]) == 0
    done = capsys.readouterr().out
    assert "18 embedded" in done and "18 lost to a damaged shard" in done
    after = store_vectors(out)
    assert sorted(after) == sorted(before)
    for p, v in before.items():
        np.testing.assert_allclose(after[p], v, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- compaction
COMPACT_CRASH = """
import os, sys
from pathlib import Path
from tl_embed.embedding import store as m
point = sys.argv[2]
real_replace, real_unlink = m.EmbeddingStore._replace_shards, Path.unlink
if point == "after-new-shard":  # the merged shard is durable, the manifest not yet repointed
    m.EmbeddingStore._replace_shards = lambda *a, **k: os._exit(9)
else:  # after the commit, before the old shards are unlinked
    def replace_then_die(self, *a, **k):
        Path.unlink = lambda self, missing_ok=False: os._exit(9)
        real_replace(self, *a, **k)
    m.EmbeddingStore._replace_shards = replace_then_die
with m.EmbeddingStore.open(sys.argv[1], "a") as s:
    s.compact()
"""


@pytest.mark.parametrize("point", ["after-new-shard", "after-commit"])
def test_kill_during_compaction_keeps_the_store(tmp_path, point):
    path = two_shard_store(tmp_path / "s.tle")
    before = store_vectors(path)
    r = subprocess.run([sys.executable, "-c", COMPACT_CRASH, str(path), point], capture_output=True, timeout=60)
    assert r.returncode == 9, r.stderr
    assert store_vectors(path).keys() == before.keys()  # valid right after the crash
    for p, v in store_vectors(path).items():
        np.testing.assert_array_equal(v, before[p])
    with EmbeddingStore.open(path, "a") as s:  # the next writer clears orphans and compacts
        s.compact()
    assert len(list((path / "shards").glob("*.npy"))) == 1
    for p, v in store_vectors(path).items():
        np.testing.assert_array_equal(v, before[p])


def test_compaction_waits_for_a_reader_mapping_its_snapshot(tmp_path, monkeypatch):
    """The exact race: a writer compacts while a reader maps the shards its snapshot names. The writer's
    unlink waits for the reader's mapping, so the reader gets its snapshot whole."""
    import threading

    path = two_shard_store(tmp_path / "s.tle")
    real_map = EmbeddingStore._map_shard
    state: dict = {}

    def compact() -> None:
        with EmbeddingStore.open(path, "a") as w:
            w.compact()
        state["compacted_at"] = time.monotonic()

    def map_while_compacting(self, name, n):
        if "writer" not in state and self._lock_fd is None:
            state["writer"] = threading.Thread(target=compact)
            state["writer"].start()
            time.sleep(0.5)  # the writer has committed and now waits to unlink these very shards
            state["mapped_at"] = time.monotonic()
        return real_map(self, name, n)

    monkeypatch.setattr(EmbeddingStore, "_map_shard", map_while_compacting)
    with EmbeddingStore.open(path) as r:
        assert len(r) == 3
        np.testing.assert_array_equal(r.embeddings[r.position("c.jpg")], [2, 2, 2, 2])
    state["writer"].join(timeout=30)
    assert state["compacted_at"] > state["mapped_at"]
    with EmbeddingStore.open(path) as r:
        assert len(r._shards) == 1 and len(r) == 3


def read_while_running(proc: subprocess.Popen, path: Path, dim: int) -> tuple[int, list[str]]:
    """Read the store's embeddings in a loop until ``proc`` exits: (reads, failures seen)."""
    errors: list[str] = []
    reads = 0
    try:
        while proc.poll() is None:
            if not (path / "manifest.sqlite").exists():
                time.sleep(0.01)
                continue
            try:
                with EmbeddingStore.open(path) as s:
                    x = np.asarray(s.embeddings)
                    assert x.shape == (len(s), dim) and np.isfinite(x).all()
                reads += 1
            except Exception as e:  # noqa: BLE001 - any failure is what the callers look for
                errors.append(f"{type(e).__name__}: {e}")
    except BaseException:
        proc.kill()
        raise
    return reads, errors


_WRITER = """
import sys
import numpy as np
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
for i in range(int(sys.argv[2])):
    with EmbeddingStore.open(sys.argv[1], "a") as s:
        s.add([ManifestRow(f"{i}-{j}.jpg", None, None, "h", 1, 1, 1, 1) for j in range(2)], np.full((2, 4), i))
        if i:
            s.remove([f"{i - 1}-0.jpg"])
        s.compact()
print("done")
"""


def test_readers_never_fail_under_continuous_compaction(tmp_path, monkeypatch):
    """A reader looping on the embeddings while 150 write + compact sessions run back to back on the store:
    every session unlinks the shard the previous one made, the heaviest churn a store sees.  The reader
    gets one attempt per open, so what holds is the lock, not luck in retrying."""
    monkeypatch.setattr(EmbeddingStore._load, "__defaults__", (1,))
    path = two_shard_store(tmp_path / "s.tle")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "150"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    reads, errors = read_while_running(proc, path, 4)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == "done", err
    assert not errors, (len(errors), reads, errors[:3])
    assert reads > 50


def test_readers_never_fail_while_embed_writes_and_compacts(tmp_path, tiny_model):
    images = big_folder(tmp_path / "images", 160)
    out = tmp_path / "s.tle"
    proc = subprocess.Popen(embed_cmd(images, out, tiny_model, "--batch-size", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads, errors = read_while_running(proc, out, 16)
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()
    assert not errors, errors[:3]
    assert reads > 10
    assert main(["info", str(out)]) == 0


def test_second_writer_is_refused_with_one_line(tmp_path, tiny_model):
    """While another process holds the writer lock, `embed` refuses with one line and changes nothing.

    This test process holds the lock itself, so the refusal does not depend on how long a real writer
    happens to run (a racing writer could finish before the second one starts)."""
    images = big_folder(tmp_path / "images", 8)
    out = tmp_path / "s.tle"
    assert subprocess.run(embed_cmd(images, out, tiny_model), capture_output=True, timeout=120).returncode == 0
    before = store_vectors(out)
    big_folder(tmp_path / "images", 12)  # four new images: the second run has work to do
    with EmbeddingStore.open(out, "a"):
        second = subprocess.run(embed_cmd(images, out, tiny_model), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    one_error_line(second.stderr, "being written by another tl-embed process")
    assert store_vectors(out).keys() == before.keys()
    assert subprocess.run(embed_cmd(images, out, tiny_model), capture_output=True, timeout=120).returncode == 0
    assert len(store_vectors(out)) == 12


def test_a_forked_child_does_not_keep_the_writer_lock(tmp_path):
    """Libraries fork (multiprocessing; OpenVINO's telemetry sender during a model conversion) and the
    child shares the lock's open file: once the writer closes the store, the next writer must get it."""
    path = tmp_path / "s.tle"
    EmbeddingStore.create(path, SPEC).close()
    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    with EmbeddingStore.open(path, "a"):
        child = fork.Process(target=_signal_then_sleep, args=(running,), daemon=True)
        child.start()
        assert running.wait(30)  # the child is past fork and into its own code
    try:
        with EmbeddingStore.open(path, "a") as again:
            assert again.writable
    finally:
        child.terminate()
        child.join()


def _signal_then_sleep(running) -> None:
    running.set()
    time.sleep(60)


# ------------------------------------------------- full disk, read-only media
def private_mount_shell(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a private mount namespace (root: plain ``unshare -m``; else a user namespace),
    so tmpfs and read-only bind mounts never touch the host's mount table."""
    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed for the full-disk and read-only tests"
    flags = ["-m"] if os.geteuid() == 0 else ["-rm"]
    return subprocess.run([unshare, *flags, "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=timeout)


def test_full_disk_never_leaves_a_broken_store(tmp_path, tiny_model):
    """A 1 MB tmpfs with a filler leaving only a little room: each run either finishes or ends with one
    line, and any store it leaves opens, holds correct vectors, and completes once space is freed."""
    images = big_folder(tmp_path / "images", 60)
    reference = tmp_path / "reference.tle"
    subprocess.run(embed_cmd(images, reference, tiny_model), check=True, capture_output=True, timeout=300)
    expected = store_vectors(reference)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join(f"'{a}'" for a in embed_cmd(images, mnt / "s.tle", tiny_model, "--batch-size", "4"))
    outcomes = {}
    for free_kb in (4, 100):
        copy = tmp_path / f"after-{free_kb}kb"
        script = f"""set -u
mount -t tmpfs -o size=1m tmpfs '{mnt}' || exit 97
dd if=/dev/zero of='{mnt}/filler' bs=1k count=$((1024 - {free_kb})) 2>/dev/null
{cmd} > '{tmp_path}/out-{free_kb}' 2> '{tmp_path}/err-{free_kb}'; echo $? > '{tmp_path}/rc-{free_kb}'
mkdir '{copy}'; cp -a '{mnt}/.' '{copy}/'; rm -f '{copy}/filler'
rm '{mnt}/filler'
{cmd} > /dev/null 2> '{tmp_path}/err2-{free_kb}'; echo $? > '{tmp_path}/rc2-{free_kb}'
cp -a '{mnt}/s.tle' '{copy}-freed'
"""
        r = private_mount_shell(script)
        assert r.returncode == 0, r.stderr
        rc = int((tmp_path / f"rc-{free_kb}").read_text())
        err = (tmp_path / f"err-{free_kb}").read_text()
        assert rc in (0, 2) and "Traceback" not in err, err
        if rc == 2:
            one_error_line(err)
            assert "disk is full" in err or "full" in err, err
        outcomes[free_kb] = rc
        if (copy / "s.tle").exists():  # whatever was left is a valid store holding correct vectors
            got = store_vectors(copy / "s.tle")
            assert set(got) <= set(expected)
            for p, v in got.items():
                np.testing.assert_allclose(v, expected[p], rtol=1e-5, atol=1e-6)
        else:
            assert sorted(os.listdir(copy)) == [], "no half-made store or temp folder may be left"
        assert int((tmp_path / f"rc2-{free_kb}").read_text()) == 0, (tmp_path / f"err2-{free_kb}").read_text()
        got = store_vectors(Path(f"{copy}-freed"))
        assert sorted(got) == sorted(expected)
    assert outcomes[4] == 2, "4 KB cannot hold a store: the run must say the disk is full"


def test_read_only_store_can_be_read_but_not_changed(tmp_path, image_folder, tiny_model):
    out = tmp_path / "s.tle"
    assert main(["embed", str(image_folder), "--out", str(out), "--model", tiny_model, "--layer", "features",
                 "-q"]) == 0
    ro = tmp_path / "ro.tle"
    ro.mkdir()
    make_image(tmp_path / "new" / "red" / "extra.jpg", COLORS["red"], 999)
    cli = " ".join(CLI)
    read_py = f"from tl_embed import EmbeddingStore; s = EmbeddingStore.open('{ro}'); print(s.embeddings.shape)"
    script = f"""set -u
mount --bind '{out}' '{ro}' && mount -o remount,ro,bind '{ro}' || exit 97
touch '{ro}/probe' 2>/dev/null && exit 98
{cli} info '{ro}' > '{tmp_path}/info' 2>&1; echo $? > '{tmp_path}/rc-info'
{cli} embed '{image_folder}' --out '{ro}' --model '{tiny_model}' --layer features -q > '{tmp_path}/same' 2>&1
echo $? > '{tmp_path}/rc-same'
{sys.executable} -c "{read_py}" > '{tmp_path}/py' 2>&1; echo $? > '{tmp_path}/rc-py'
{cli} export '{ro}' --out '{tmp_path}/e' > /dev/null 2>&1; echo $? > '{tmp_path}/rc-export'
cp -a '{image_folder}/.' '{tmp_path}/new/'
"""
    r = private_mount_shell(script)
    assert r.returncode == 0, r.stdout + r.stderr
    rc = {name: int((tmp_path / f"rc-{name}").read_text()) for name in ("info", "same", "py", "export")}
    assert rc == {"info": 0, "same": 0, "py": 0, "export": 0}, {n: (tmp_path / n).read_text()
                                                                  for n in ("info", "same", "py") if rc.get(n)}
    assert "embedded   18" in (tmp_path / "info").read_text()
    assert "0 embedded, 18 unchanged" in (tmp_path / "same").read_text()
    assert "(18, 16)" in (tmp_path / "py").read_text()
    assert np.load(tmp_path / "e.npy").shape == (18, 16)
    # a run that would change the read-only store says so in one line (the new image is in another folder,
    # so point a read-only copy of a store at a folder with one more image)
    script = f"""set -u
mount --bind '{out}' '{ro}' && mount -o remount,ro,bind '{ro}' || exit 97
mount --bind '{tmp_path}/new' '{image_folder}' || exit 96
{cli} embed '{image_folder}' --out '{ro}' --model '{tiny_model}' --layer features -q > '{tmp_path}/more' 2>&1
echo $? > '{tmp_path}/rc-more'
"""
    r = private_mount_shell(script)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int((tmp_path / "rc-more").read_text()) == 2
    one_error_line((tmp_path / "more").read_text(), "read-only", "1 new or changed")
    assert len(store_vectors(out)) == 18  # untouched


_MERGE_ON_A_FULL_DISK = """
import errno, os, sys
import numpy as np
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.store import EmbeddingStore, ManifestRow
path = sys.argv[1] + "/s.tle"
spec = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", 256)
with EmbeddingStore.create(path, spec) as s:
    for part in range(2):
        s.add([ManifestRow(f"{part}-{i}.jpg", None, None, "h", 1, 1, 1, 1) for i in range(400)],
              np.full((400, 256), part, np.float32))
st = os.statvfs(sys.argv[1])
with open(sys.argv[1] + "/filler", "wb") as f:  # leave 100 KB: less than the 800 KB merged shard
    f.write(bytes(st.f_bavail * st.f_frsize - 100_000))
try:
    with EmbeddingStore.open(path, "a") as s:
        s.compact()
except OSError as e:
    print("errno", e.errno)
os.remove(sys.argv[1] + "/filler")
with EmbeddingStore.open(path) as s:
    print("rows", len(s), float(np.asarray(s.embeddings).sum()))
"""


def test_a_merge_on_a_full_disk_is_an_error_not_a_bus_error(tmp_path):
    """Writing through a memory map into a sparse file on a full disk raises SIGBUS: the merged shard's
    space is reserved first, so a full disk is an ENOSPC like everywhere else and the store stays whole."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "merge.py"
    script.write_text(_MERGE_ON_A_FULL_DISK)
    r = private_mount_shell(f"mount -t tmpfs -o size=2m tmpfs '{mnt}' || exit 97\n"
                            f"'{sys.executable}' '{script}' '{mnt}'")
    assert r.returncode == 0, (r.returncode, r.stderr)  # a bus error is -7 / 135
    assert r.stdout.splitlines() == [f"errno {errno.ENOSPC}", f"rows 800 {400 * 256 * 1.0}"], r.stdout


@pytest.mark.parametrize("size", ["48k", "56k", "64k", "96k"])
def test_a_store_created_on_a_full_disk_is_all_or_nothing(tmp_path, tiny_model, size):
    """Whatever a tiny file system lets creation get to, the user gets one line, and what is left at --out
    is nothing or a store that the next run, with room, completes."""
    images = big_folder(tmp_path / "images", 6)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join(f"'{a}'" for a in embed_cmd(images, mnt / "s.tle", tiny_model))
    r = private_mount_shell(f"""mount -t tmpfs -o size={size} tmpfs '{mnt}' || exit 97
{cmd} > /dev/null 2> '{tmp_path}/err'; echo $? > '{tmp_path}/rc'
cp -a '{mnt}/.' '{tmp_path}/left'
""")
    assert r.returncode == 0, r.stderr
    err, rc = (tmp_path / "err").read_text(), (tmp_path / "rc").read_text().strip()
    assert rc in ("0", "2"), err
    if rc == "2":
        one_error_line(err, "the disk is full")
    left = tmp_path / "left"
    assert sorted(os.listdir(left)) in ([], ["s.tle"]), os.listdir(left)
    assert subprocess.run(embed_cmd(images, left / "s.tle", tiny_model), capture_output=True,
                          timeout=300).returncode == 0
    assert len(store_vectors(left / "s.tle")) == 6
