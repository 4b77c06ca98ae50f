"""Start-up without TensorFlow: with the backbone's OpenVINO IR cached, predict, search and embed never import it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, ROOT, make_image
from serve_data import build

PROBE = """
import json, sys
from tl_embed.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    return build(tmp_path_factory.mktemp("startup"), tiny_model)


def probe(*args: str, cache: str) -> dict:
    env = {**os.environ, "TL_EMBED_CACHE": cache, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["predict", "search"])
def test_a_cached_ir_means_no_tensorflow(served, command, converted_model_cache, tmp_path):
    target = served.head if command == "predict" else served.index
    query = str(make_image(tmp_path / "new.jpg", COLORS["red"], 4242))  # not in the store: it must be embedded
    assert list(Path(converted_model_cache).glob("openvino/*/model.xml"))  # embed cached the IR
    cached = probe(command, str(target), query, cache=str(converted_model_cache))
    assert cached == {"rc": 0, "tensorflow": False, "keras": False}
    # the control: the same command does import them when asked for the keras runtime
    assert probe(command, str(target), query, "--runtime", "keras", cache=str(converted_model_cache)) == {
        "rc": 0, "tensorflow": True, "keras": True}


def test_without_a_cached_ir_the_backbone_is_built_and_converted(served, tmp_path):
    query = str(make_image(tmp_path / "new.jpg", COLORS["blue"], 4343))
    cache = tmp_path / "cache"
    first = probe("search", str(served.index), query, cache=str(cache))
    assert first == {"rc": 0, "tensorflow": True, "keras": True}
    assert len(list(cache.glob("openvino/*/model.xml"))) == 1  # converted and cached on the way
    assert probe("search", str(served.index), query, cache=str(cache))["tensorflow"] is False


def test_new_stores_and_added_images_with_a_cached_ir_need_no_tensorflow(tmp_path, tiny_model):
    from conftest import make_folder

    images = make_folder(tmp_path / "images", per_class=3)
    cache = str(tmp_path / "cache")
    embed = ["embed", str(images), "--out", str(tmp_path / "s.tle"), "--model", tiny_model, "--layer", "features",
             "-q"]
    assert probe(*embed, cache=cache) == {"rc": 0, "tensorflow": True, "keras": True}  # built, converted, cached
    another = [*embed[:3], str(tmp_path / "another.tle"), *embed[4:]]  # a new store, the same options
    assert probe(*another, cache=cache) == {"rc": 0, "tensorflow": False, "keras": False}  # the recipe's spec
    make_image(images / "red" / "new.jpg", COLORS["red"], 777)
    assert probe(*embed, cache=cache) == {"rc": 0, "tensorflow": False, "keras": False}
    from tl_embed.embedding.store import EmbeddingStore

    with EmbeddingStore.open(tmp_path / "s.tle") as store, EmbeddingStore.open(tmp_path / "another.tle") as other:
        assert len(store) == 10 and other.spec == store.spec
        np.testing.assert_array_equal(other.embeddings, store.embeddings[[store.position(p) for p in other.paths]])
    # the same image embedded by the freshly built model: the cached IR computes the store's function
    rebuilt = tmp_path / "r.tle"
    assert probe("embed", str(images), "--out", str(rebuilt), "--model", tiny_model, "--layer", "features", "-q",
                 "--runtime", "keras", cache=cache)["rc"] == 0
    with EmbeddingStore.open(tmp_path / "s.tle") as a, EmbeddingStore.open(rebuilt) as b:
        new_a = a.embeddings[a.position("red/new.jpg")]
        new_b = b.embeddings[b.position("red/new.jpg")]
        np.testing.assert_allclose(new_a, new_b, rtol=1e-3, atol=1e-4)
    changed = ["embed", str(images), "--out", str(tmp_path / "s.tle"), "--model", tiny_model, "--layer", "conv",
               "-q"]
    make_image(images / "red" / "newer.jpg", COLORS["red"], 778)
    refused = probe(*changed, cache=cache)
    assert refused["rc"] == 2 and refused["tensorflow"] is True  # another cut: rebuilt, and refused as before
