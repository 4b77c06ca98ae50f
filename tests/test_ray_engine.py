"""The ray engine against the local one: same store, failures, incremental re-runs, a killed driver resumes.

One local Ray (2 CPUs) for the module; runs that would hang (actors starving Ray Data) fail on a timer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import ray  # the test extra installs it: these tests run in CI, never skip
from conftest import ROOT, make_folder

from tl_embed.embedding import ray_engine
from tl_embed.embedding.backbones import BackboneSpec, LoadedBackbone
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.ray_engine import RayOptions, actor_cpus, check_model, default_workers
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import TlEmbedError


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs, started as the CLI starts it (actors import this checkout's tl_embed)."""
    assert ray_engine.start_ray(None, num_cpus=2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a dataset whose actors hold every CPU never finishes)."""
    def fail(*_):
        raise TimeoutError(f"the ray engine did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def folder_with_broken_files(root: Path) -> Path:
    make_folder(root, per_class=6)
    (root / "red" / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "blue" / "empty.png").write_bytes(b"")
    return root


def same_store(a: Path, b: Path) -> None:
    with EmbeddingStore.open(a) as x, EmbeddingStore.open(b) as y:
        assert x.rows == y.rows  # paths, labels, splits, sha256, sizes, mtimes, image sizes, in order
        np.testing.assert_allclose(x.embeddings, y.embeddings, rtol=1e-5, atol=1e-6)
        assert [(f.path, f.reason) for f in x.failures] == [(f.path, f.reason) for f in y.failures]
        assert x.spec == y.spec


def test_ray_store_equals_local_and_reruns_embed_nothing(local_ray, tmp_path, tiny_model):
    images = folder_with_broken_files(tmp_path / "images")
    opts = dict(model=tiny_model, layer="features", progress=False, batch_size=4)  # openvino; keras: below
    local = embed_folder(images, tmp_path / "local.tle", **opts)
    with deadline(120):  # default sizing: 2 actors on 2 CPUs, each reserving less than 1
        report = embed_folder(images, tmp_path / "ray.tle", engine="ray", ray=RayOptions(), **opts)
    assert (report.embedded, len(report.failed), report.total) == (18, 2, 18) == (
        local.embedded, len(local.failed), local.total)
    assert {f.path: f.reason for f in report.failed} == {
        "red/not_an_image.jpg": "not a recognised image format (JPEG, PNG, WebP, GIF, BMP or TIFF)",
        "blue/empty.png": "empty file (0 bytes)"}
    assert report.runtime == local.runtime and len(report.workers) == 2
    assert f"with the {report.runtime} runtime on 2 Ray workers)" in report.text()
    assert "Ray worker" not in local.text()
    same_store(tmp_path / "local.tle", tmp_path / "ray.tle")
    again = embed_folder(images, tmp_path / "ray.tle", engine="ray", ray=RayOptions(), **opts)
    assert (again.embedded, again.unchanged, len(again.failed)) == (0, 18, 2)
    os.utime(images / "red" / "red_000.jpg")  # touched, not changed: recognised by its sha256
    touched = embed_folder(images, tmp_path / "ray.tle", engine="ray", ray=RayOptions(workers=1), **opts)
    assert (touched.embedded, touched.unchanged) == (0, 18)


def random_tiny_model(*_args, **_kwargs) -> LoadedBackbone:
    """Like ``--weights none``: every build draws new weights, so actors must never build their own."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3)(keras.layers.Rescaling(1 / 255.0)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    spec = BackboneSpec("random_tiny", "random", "random", 32, "none (pixels 0-255)", "avg", 8)
    return LoadedBackbone(model, spec)


def test_random_weights_are_built_once_and_shipped_to_every_actor(local_ray, tmp_path):
    images = tmp_path / "images"
    original = make_folder(images, per_class=1, classes=("red",)) / "red" / "red_000.jpg"
    for i in range(11):  # the same bytes at 12 paths, spread over 6 batches and both actors
        shutil.copy(original, images / "red" / f"copy_{i:02d}.jpg")
    with deadline(120):
        report = embed_folder(images, tmp_path / "s.tle", model="mobilenet_v3_small", loader=random_tiny_model,
                              runtime="keras", batch_size=2, progress=False, engine="ray",
                              ray=RayOptions(workers=2, cpus_per_worker=0.5))
    assert report.runtime == "keras" and report.embedded == 12 and len(report.workers) == 2  # a saved Keras model
    with EmbeddingStore.open(tmp_path / "s.tle") as s:
        vectors = s.embeddings
    assert np.abs(vectors).max() > 0
    np.testing.assert_allclose(vectors, np.broadcast_to(vectors[0], vectors.shape), rtol=1e-6, atol=1e-7)


def test_a_batch_from_another_model_is_refused():
    batch = {"model": np.array(["aaaa", "bbbb"], object)}
    check_model({"model": np.array(["aaaa", "aaaa"], object)}, "aaaa")
    with pytest.raises(RuntimeError, match="not the driver's aaaa"):
        check_model(batch, "aaaa")


def test_actors_never_reserve_every_cpu():
    assert default_workers(2, 1.0) == 2 and default_workers(16, 4) == 4 and default_workers(1, 2) == 1
    assert actor_cpus(2, 2, 1.0) * 2 <= 2 - ray_engine.HEADROOM
    assert actor_cpus(64, 8, 2.0) == 2.0  # room to spare: as asked
    with pytest.raises(TlEmbedError, match="too many"):
        actor_cpus(2, 1000, 1.0)


def test_cli_refuses_ray_options_with_the_local_engine(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tl_embed.cli", "embed", str(tmp_path), "--out",
                          str(tmp_path / "s.tle"), "--address", "auto"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "tl-embed: error: --address and --cpus-per-worker apply only to --engine ray"


def test_driver_killed_mid_run_resumes_to_the_same_store(local_ray, tmp_path, tiny_model):
    images = folder_with_broken_files(tmp_path / "images")
    make_folder(images, per_class=14, classes=("green", "yellow"), seed=1)  # 40 images, 2 broken
    cmd = [sys.executable, "-m", "tl_embed.cli", "embed", str(images), "--out", str(tmp_path / "ray.tle"),
           "--model", tiny_model, "--layer", "features", "--batch-size", "2", "--engine", "ray",
           "--address", local_ray, "--workers", "1", "--cpus-per-worker", "0.5", "-q"]
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    committed = wait_for_rows(tmp_path / "ray.tle", driver, at_least=4)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    opts = dict(model=tiny_model, layer="features", progress=False, batch_size=2)
    with deadline(120):
        resumed = embed_folder(images, tmp_path / "ray.tle", engine="ray", ray=RayOptions(workers=1), **opts)
    assert 0 < resumed.embedded <= 40 - committed and resumed.total == 40
    embed_folder(images, tmp_path / "local.tle", **opts)
    same_store_by_path(tmp_path / "local.tle", tmp_path / "ray.tle")


def wait_for_rows(store: Path, driver: subprocess.Popen, at_least: int, timeout: float = 90) -> int:
    """Rows committed by the running driver, once there are ``at_least``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if driver.poll() is not None:
            pytest.fail(f"the driver ended before it was killed: {driver.stdout.read().decode()[-2000:]}")
        if (store / "manifest.sqlite").exists():
            with EmbeddingStore.open(store) as s:
                if len(s) >= at_least:
                    return len(s)
        time.sleep(0.2)
    driver.kill()
    pytest.fail("the driver committed nothing in time")


def same_store_by_path(a: Path, b: Path) -> None:
    """A resumed store holds the same rows, perhaps in another order (the batches committed before the kill first)."""
    with EmbeddingStore.open(a) as x, EmbeddingStore.open(b) as y:
        xi, yi = np.argsort(x.paths), np.argsort(y.paths)
        assert [x.rows[i] for i in xi] == [y.rows[i] for i in yi]
        np.testing.assert_allclose(x.embeddings[xi], y.embeddings[yi], rtol=1e-5, atol=1e-6)
        assert sorted((f.path, f.reason) for f in x.failures) == sorted((f.path, f.reason) for f in y.failures)


def test_int8_store_on_ray_runs_the_drivers_quantized_model(local_ray, tmp_path, tiny_model):
    from tl_embed.embedding import carried

    images = make_folder(tmp_path / "images", per_class=8)
    opts = dict(model=tiny_model, layer="features", progress=False, batch_size=4, precision="int8")
    embed_folder(images, tmp_path / "local.tle", **opts)
    with deadline(180):
        report = embed_folder(images, tmp_path / "ray.tle", engine="ray", ray=RayOptions(), **opts)
    assert report.embedded == 24 and len(report.workers) == 2 and report.fidelity
    local, shipped = (carried.read_files(tmp_path / name / carried.FOLDER) for name in ("local.tle", "ray.tle"))
    assert local["model.bin"] == shipped["model.bin"]  # the same quantization
    with EmbeddingStore.open(tmp_path / "local.tle") as x, EmbeddingStore.open(tmp_path / "ray.tle") as y:
        assert x.rows == y.rows and y.spec.precision == "int8"
        assert y.spec.model_sha256 == carried.files_sha256(shipped) == x.spec.model_sha256
        np.testing.assert_allclose(x.embeddings, y.embeddings, rtol=1e-5, atol=1e-6)
