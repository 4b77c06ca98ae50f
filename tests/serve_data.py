"""A small served corpus for the serve tests: tiny-model store, index and head, built with the real CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import COLORS, make_folder, make_image

from tl_embed.cli import main


@dataclass
class Served:
    images: Path
    store: Path
    index: Path
    head: Path
    audit: Path | None = None


def build(root: Path, tiny_model: str) -> Served:
    """12 images in 3 colour classes, embedded with the tiny model (which caches its OpenVINO IR)."""
    images = make_folder(root / "images", per_class=4)
    store, index, head = root / "s.tle", root / "i.tli", root / "m.tlh"
    assert main(["embed", str(images), "--out", str(store), "--model", tiny_model, "--layer", "features"]) == 0
    assert main(["index", str(store), "--out", str(index)]) == 0
    assert main(["train", str(store), "--out", str(head), "--test-size", "0.25"]) == 0
    return Served(images, store, index, head)


ODD = "train/green/odd.jpg"  # a red image in the green folder: build_audited's planted wrong label
COPY = "train/blue/copy.jpg"  # a copy of test/blue/blue_000.jpg in train: a cross-split duplicate


def build_audited(root: Path, tiny_model: str) -> Served:
    """35 images in train and test splits with a wrong label and a leaking copy planted, and their audit (JSON).

    The tiny model puts images of one colour close together: every train/test pair of a colour is a
    near-duplicate (cosine >= 0.9, lower than the default 0.95 to leave room for other Keras versions'
    random weights), more than a page of the service's (50).
    """
    images = make_folder(root / "images", per_class=8, split="train")
    make_folder(root / "images", per_class=3, split="test", seed=1)
    make_image(images / ODD, COLORS["red"], 4242)
    (images / COPY).write_bytes((images / "test/blue/blue_000.jpg").read_bytes())
    store, index, head, audit = root / "s.tle", root / "i.tli", root / "m.tlh", root / "audit.json"
    assert main(["embed", str(images), "--out", str(store), "--model", tiny_model, "--layer", "features", "-q"]) == 0
    assert main(["index", str(store), "--out", str(index)]) == 0
    assert main(["train", str(store), "--out", str(head)]) == 0
    assert main(["audit", str(store), "--format", "json", "--out", str(audit), "--threshold", "0.9", "-q"]) == 0
    return Served(images, store, index, head, audit)
