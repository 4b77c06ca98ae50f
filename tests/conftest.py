"""Shared fixtures: generated images, a tiny saved Keras model, and the genuine weights in ../shared."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_image(path: Path, color, seed: int, size=(48, 40), fmt: str | None = None) -> Path:
    """A noisy image of ``color``: distinct per class, different per seed."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_folder(root: Path, per_class: int = 6, classes=("red", "green", "blue"), split: str | None = None,
                seed: int = 0) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            base = root / split if split else root
            make_image(base / c / f"{c}_{i:03d}.jpg", COLORS[c], seed * 1000 + ci * 100 + i)
    return root


@pytest.fixture(scope="session", autouse=True)
def converted_model_cache(tmp_path_factory) -> Path:
    """Converted models go to a temporary cache, never the user's ~/.keras."""
    path = tmp_path_factory.mktemp("tl_embed_cache")
    os.environ["TL_EMBED_CACHE"] = str(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A small saved Keras model (32 px in, 16-d out): a custom backbone that loads in a second."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(x)
    x = keras.layers.Conv2D(16, 3, name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    keras.Model(inputs, out).save(path)
    return str(path)


@pytest.fixture(scope="session")
def keras_home(tmp_path_factory) -> Path:
    """A temporary KERAS_HOME whose models/ links to the genuine weights in ../shared/weights."""
    weights = SHARED / "weights"
    if not weights.is_dir():
        pytest.skip(f"{weights} is absent: the genuine ImageNet weights are needed for this test")
    home = tmp_path_factory.mktemp("keras_home")
    (home / "models").mkdir()
    for f in weights.iterdir():
        if f.suffix in (".h5", ".json"):
            (home / "models" / f.name).symlink_to(f.resolve())
    return home


@pytest.fixture
def use_keras_home(keras_home, monkeypatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    return keras_home


def shared_dataset(name: str) -> Path:
    path = SHARED / "datasets" / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: this test needs the shared photo sets")
    return path


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS without OpenMP threads for a module: its indexes are tiny, and threads spinning on a shared
    2-core machine only cost time."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
