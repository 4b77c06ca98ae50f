import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, make_folder, make_image

from tl_embed.embedding.embed import Plan, check_prune, embed_folder
from tl_embed.embedding.scan import label_and_split
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import StoreError, TlEmbedError


def test_labels_and_splits_follow_the_keras_convention():
    assert label_and_split("cat/1.jpg") == ("cat", None)
    assert label_and_split("train/cat/1.jpg") == ("cat", "train")
    assert label_and_split("Validation/dog/x/1.jpg") == ("dog", "val")
    assert label_and_split("1.jpg") == (None, None)
    assert label_and_split("test/1.jpg") == (None, "test")


def embed(images, out, model, **kw):
    return embed_folder(images, out, model=model, progress=False, batch_size=4, **kw)


def test_incremental_add_change_delete_touch(tmp_path, image_folder, tiny_model):
    out = tmp_path / "s.tle"
    r = embed(image_folder, out, tiny_model)
    assert (r.embedded, r.unchanged, r.total) == (18, 0, 18)
    before = EmbeddingStore.open(out)
    old = {p: before.embeddings[i].copy() for i, p in enumerate(before.paths)}
    before.close()

    make_image(image_folder / "red" / "new.jpg", COLORS["red"], 999)
    make_image(image_folder / "green" / "green_000.jpg", COLORS["blue"], 5)  # content changed
    (image_folder / "blue" / "blue_000.jpg").unlink()
    os.utime(image_folder / "red" / "red_001.jpg", ns=(1, 10**18))  # touched, same bytes
    r = embed(image_folder, out, tiny_model)
    assert (r.embedded, r.removed, r.unchanged, r.total) == (2, 1, 16, 18)

    with EmbeddingStore.open(out) as s:
        assert "blue/blue_000.jpg" not in set(s.paths) and "red/new.jpg" in set(s.paths)
        for i, p in enumerate(s.paths):
            if p not in ("red/new.jpg", "green/green_000.jpg"):
                np.testing.assert_array_equal(s.embeddings[i], old[p])  # nothing recomputed
        assert not np.allclose(s.embeddings[s.position("green/green_000.jpg")], old["green/green_000.jpg"])
        assert s.row_for("red/red_001.jpg").mtime_ns == 10**18
    r = embed(image_folder, out, tiny_model)
    assert (r.embedded, r.unchanged) == (0, 18)


def test_broken_files_are_skipped_and_reported(tmp_path, image_folder, tiny_model):
    (image_folder / "red" / "empty.jpg").write_bytes(b"")
    (image_folder / "red" / "notes.txt").write_text("ignored: not an image")
    (image_folder / "red" / ".hidden.jpg").write_bytes(b"ignored: hidden")
    jpeg = (image_folder / "green" / "green_001.jpg").read_bytes()
    (image_folder / "green" / "trunc.jpg").write_bytes(jpeg[:200])
    r = embed(image_folder, tmp_path / "s.tle", tiny_model)
    assert r.embedded == 18 and sorted(f.path for f in r.failed) == ["green/trunc.jpg", "red/empty.jpg"]
    assert "red/empty.jpg: empty file" in r.text()
    r = embed(image_folder, tmp_path / "s.tle", tiny_model)  # known failures are not retried
    assert r.embedded == 0 and len(r.failed) == 2
    make_image(image_folder / "red" / "empty.jpg", COLORS["red"], 1)  # fixed by the user
    r = embed(image_folder, tmp_path / "s.tle", tiny_model)
    assert r.embedded == 1 and len(r.failed) == 1
    with EmbeddingStore.open(tmp_path / "s.tle") as s:
        assert [f.path for f in s.failures] == ["green/trunc.jpg"]


def test_refuses_other_backbone_and_other_folder(tmp_path, image_folder, tiny_model):
    out = tmp_path / "s.tle"
    embed(image_folder, out, tiny_model)
    with pytest.raises(StoreError, match="mix backbones"):
        embed(image_folder, out, "mobilenet_v2", weights="none")
    other = make_folder(tmp_path / "other", per_class=1)
    with pytest.raises(StoreError, match="holds images from"):
        embed(other, out, tiny_model)


def test_custom_model_layer_cut(tmp_path, image_folder, tiny_model):
    r = embed(image_folder, tmp_path / "s.tle", tiny_model, layer="conv", pooling="max")
    assert r.spec.dim == 16 and r.spec.layer == "conv" and r.spec.pooling == "max"


def test_missing_image_folder_is_an_error_and_changes_nothing(tmp_path, image_folder, tiny_model):
    out = tmp_path / "s.tle"
    embed(image_folder, out, tiny_model)
    image_folder.rename(tmp_path / "renamed")
    with pytest.raises(TlEmbedError, match="does not exist .*moved, renamed or not mounted.*was not changed"):
        embed(image_folder, out, tiny_model)
    with EmbeddingStore.open(out) as s:
        assert len(s) == 18


def test_emptied_folder_is_refused_unless_pruned(tmp_path, image_folder, tiny_model):
    out = tmp_path / "s.tle"
    embed(image_folder, out, tiny_model)
    shutil.rmtree(image_folder)
    image_folder.mkdir()  # an unmounted drive leaves an empty mount point
    with pytest.raises(TlEmbedError, match="would remove 18 of the 18 embeddings .*nothing was changed.*--prune"):
        embed(image_folder, out, tiny_model)
    with EmbeddingStore.open(out) as s:
        assert len(s) == 18
    r = embed(image_folder, out, tiny_model, prune=True)
    assert (r.removed, r.total) == (18, 0)
    with EmbeddingStore.open(out) as s:
        assert len(s) == 0 and len(s.embeddings) == 0


def test_mass_deletion_needs_prune_a_few_deletions_do_not(tmp_path, tiny_model):
    images = make_folder(tmp_path / "images", per_class=12)  # 36 images
    out = tmp_path / "s.tle"
    embed(images, out, tiny_model)
    for i in range(3):
        (images / "red" / f"red_{i:03d}.jpg").unlink()
    r = embed(images, out, tiny_model)
    assert (r.removed, r.total) == (3, 33) and "3 removed" in r.text()
    shutil.rmtree(images / "green")  # 12 of 33: more than 10 and more than 10%
    with pytest.raises(TlEmbedError, match="would remove 12 of the 33 embeddings"):
        embed(images, out, tiny_model)
    r = embed(images, out, tiny_model, prune=True)
    assert (r.removed, r.total) == (12, 21)


class _Sized:
    path = "s.tle"

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("total, lost, refused", [(1000, 100, False), (1000, 101, True), (50, 10, False),
                                                  (50, 11, True), (10, 9, False), (10, 10, True), (1, 1, True)])
def test_prune_rule(total, lost, refused):
    """Refused: all of the store, or more than 10 and more than 10% of it."""
    p = Plan([], 0, [], [], [], lost)
    if refused:
        with pytest.raises(TlEmbedError, match=f"would remove {lost} of the {total} "):
            check_prune(_Sized(total), p, Path("/photos"))
    else:
        check_prune(_Sized(total), p, Path("/photos"))


def test_unreadable_folder_and_broken_folder_link_keep_their_rows(tmp_path, image_folder, tiny_model, monkeypatch):
    out = tmp_path / "s.tle"
    embed(image_folder, out, tiny_model)
    shutil.move(image_folder / "green", tmp_path / "usb")
    (image_folder / "green").symlink_to(tmp_path / "unmounted")  # the folder now lives on a missing drive
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("/red"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    r = embed(image_folder, out, tiny_model)
    assert (r.removed, r.unchanged, r.total) == (0, 6, 18)
    assert r.unreadable == {"green": f"broken link: its target {tmp_path / 'unmounted'} does not exist",
                            "red": "unreadable: Permission denied"}
    assert "Could not read 2 of its folders and links (anything the store holds under them is kept): " in r.text()
    with EmbeddingStore.open(out) as s:
        assert len(s) == 18


def test_broken_links_pipes_and_non_utf8_names_are_recorded_and_not_retried(tmp_path, image_folder, tiny_model):
    (image_folder / "red" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (image_folder / "green" / "a.jpg").symlink_to("b.jpg")
    (image_folder / "green" / "b.jpg").symlink_to("a.jpg")
    os.mkfifo(image_folder / "blue" / "wait.jpg")
    jpeg = (image_folder / "red" / "red_000.jpg").read_bytes()
    fd = os.open(os.fsencode(image_folder / "red") + b"/caf\xe9.jpg", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, jpeg)  # a fine image with a name SQLite cannot hold
    os.close(fd)
    out = tmp_path / "s.tle"
    r = embed(image_folder, out, tiny_model)
    assert r.embedded == 18 and r.total == 18
    assert {f.path: f.reason for f in r.failed} == {
        "blue/wait.jpg": "not a regular file (a named pipe)",
        "green/a.jpg": "symlink loop (the link leads back to itself)",
        "green/b.jpg": "symlink loop (the link leads back to itself)",
        "red/caf\\xe9.jpg": "file name is not valid UTF-8; rename it",
        "red/dangling.jpg": f"broken link: its target {tmp_path / 'gone.jpg'} does not exist"}
    with sqlite3.connect(out / "manifest.sqlite") as c:  # raises if a path is not valid UTF-8
        stored = [p for (p,) in c.execute("SELECT path FROM items UNION ALL SELECT path FROM failures")]
    assert len(stored) == 23 and all(p.encode("utf-8") for p in stored)
    r = embed(image_folder, out, tiny_model)  # known failures: not retried, nothing removed
    assert (r.embedded, r.unchanged, r.removed, len(r.failed), r.total) == (0, 18, 0, 5, 18)
    (image_folder / "red" / "dangling.jpg").unlink()
    (image_folder / "red" / "dangling.jpg").symlink_to("red_001.jpg")  # fixed by the user
    (image_folder / "blue" / "wait.jpg").unlink()
    (image_folder / "blue" / "wait.jpg").symlink_to("nowhere.jpg")  # broken another way
    r = embed(image_folder, out, tiny_model)
    assert (r.embedded, r.removed, r.total) == (1, 0, 19)
    with EmbeddingStore.open(out) as s:
        reasons = {f.path: f.reason for f in s.failures}
        assert len(s) == 19 and "red/dangling.jpg" not in reasons and len(reasons) == 4
        assert reasons["blue/wait.jpg"].startswith("broken link: its target")


def test_folder_link_to_parent_embeds_each_image_once(tmp_path, image_folder, tiny_model):
    (image_folder / "red" / "up").symlink_to("..")
    r = embed(image_folder, tmp_path / "s.tle", tiny_model)
    assert (r.embedded, r.total, r.failed) == (18, 18, [])


def _count_rows(path) -> int:
    try:
        with sqlite3.connect(f"file:{path}/manifest.sqlite?mode=ro", uri=True) as c:
            return c.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path, tiny_model):
    images = make_folder(tmp_path / "images", per_class=60)  # 180 images
    cmd = [sys.executable, "-m", "tl_embed.cli", "embed", str(images), "--model", tiny_model,
           "--layer", "features", "--batch-size", "4", "--workers", "1", "-q"]
    killed = tmp_path / "killed.tle"
    proc = subprocess.Popen([*cmd, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count_rows(killed) < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_at_kill = _count_rows(killed)
    assert 20 <= n_at_kill < 180, "the run must be killed part-way"
    with EmbeddingStore.open(killed) as s:  # valid right after the kill
        assert len(s) == n_at_kill and s.embeddings.shape == (n_at_kill, 16)
        assert np.isfinite(s.embeddings).all()

    resumed = subprocess.run([*cmd, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{180 - n_at_kill} embedded" in resumed.stdout and f"{n_at_kill} unchanged" in resumed.stdout
    clean = tmp_path / "clean.tle"
    subprocess.run([*cmd, "--out", str(clean)], check=True, capture_output=True, timeout=300)
    with EmbeddingStore.open(killed) as a, EmbeddingStore.open(clean) as b:
        assert sorted(a.paths) == sorted(b.paths) and len(set(a.paths)) == 180
        order = [b.position(p) for p in a.paths]
        np.testing.assert_allclose(a.embeddings, b.embeddings[order], rtol=1e-5, atol=1e-6)
        assert [r.sha256 for r in a.rows] == [b.rows[i].sha256 for i in order]
    assert len(list((killed / "shards").glob("*"))) == 1  # orphans gone, compacted
