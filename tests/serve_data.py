"""A small served corpus for the serve tests: tiny-model store, index and head, built with the real CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import make_folder

from tl_embed.cli import main


@dataclass
class Served:
    images: Path
    store: Path
    index: Path
    head: Path


def build(root: Path, tiny_model: str) -> Served:
    """12 images in 3 colour classes, embedded with the tiny model (which caches its OpenVINO IR)."""
    images = make_folder(root / "images", per_class=4)
    store, index, head = root / "s.tle", root / "i.tli", root / "m.tlh"
    assert main(["embed", str(images), "--out", str(store), "--model", tiny_model, "--layer", "features"]) == 0
    assert main(["index", str(store), "--out", str(index)]) == 0
    assert main(["train", str(store), "--out", str(head), "--test-size", "0.25"]) == 0
    return Served(images, store, index, head)
