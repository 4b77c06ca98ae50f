import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import COLORS, make_folder, make_image

from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.scan import label_and_split
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import StoreError


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
