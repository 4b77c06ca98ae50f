"""Start-up without TensorFlow: with the backbone's OpenVINO IR cached, predict and search never import it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
