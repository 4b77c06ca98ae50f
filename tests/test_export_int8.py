"""export-model of a head trained on int8 embeddings: the quantized backbone it was trained with, in OpenVINO only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from tl_embed.cli import main
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.query import embed_for
from tl_embed.heads.export import as_fp32, export_model
from tl_embed.heads.exported import MANIFEST, load_export
from tl_embed.heads.head import Head

# The export runs the head in float32 on the carried IR's embeddings; predict runs the same IR and the head
# in float64: the same top-1, probabilities within float32 rounding of the head.
ATOL = 1e-5  # measured: 1.4e-7 at most (tiny model here; MobileNetV2 on real photos alike)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> dict:
    """An int8 store (quantized once for the module) with and without --tta flip, heads on both, query images."""
    root = tmp_path_factory.mktemp("export-int8")
    train, query = make_folder(root / "train", per_class=12), make_folder(root / "query", per_class=3, seed=7)
    heads = {}
    for tta in ("none", "flip"):
        embed_folder(train, root / f"{tta}.tle", model=tiny_model, layer="features", progress=False,
                     precision="int8", tta=tta)
        assert main(["train", str(root / f"{tta}.tle"), "--out", str(root / f"{tta}.tlh")]) == 0
        heads[tta] = root / f"{tta}.tlh"
    return {"root": root, "query": query, "heads": heads}


def _predict(source: Path, query: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", str(source), str(query), "--format", "json", "--top-k", "3"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_an_int8_head_exports_the_model_predict_runs(world, tta, capsys):
    model, out = world["heads"][tta], world["root"] / f"{tta}-openvino"
    assert main(["export-model", str(model), "--format", "openvino", "--out", str(out)]) == 0  # auto: int8
    assert " as openvino int8 " in capsys.readouterr().out
    head = Head.load(model)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["precision"] == "int8" and "head_trained_on" not in manifest
    backbone = manifest["backbone"]
    assert backbone["model_sha256"] == head.spec.model_sha256 and backbone.get("tta", "none") == tta
    assert "**Precision**: int8" in (out / "README.md").read_text()
    assert "FakeQuantize" in (out / "model.xml").read_text()  # the quantized backbone, not an fp32 one
    from_file, from_export = _predict(model, world["query"], capsys), _predict(out, world["query"], capsys)
    assert len(from_file) == len(from_export) == 9
    for a, b in zip(from_file, from_export, strict=True):
        assert a["path"] == b["path"] and [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert abs(a["confidence"] - b["confidence"]) < ATOL
    # the whole probability rows, exactly as predict computes them: the carried backbone, then the head
    exported = load_export(out)
    paths = [Path(r["path"]) for r in from_file]
    images = np.stack([_pixels(p, exported.input_size) for p in paths])
    expected = head.predict_proba(embed_for(head.spec, paths).vectors)
    assert exported.precision == "int8"
    np.testing.assert_allclose(exported(images), expected, atol=ATOL)


def test_an_int8_head_exports_fp32_only_when_asked(world, tmp_path, capsys):
    model, query = world["heads"]["none"], world["query"]
    out = tmp_path / "fp32"
    assert main(["export-model", str(model), "--format", "openvino", "--precision", "fp32", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["precision"] == "fp32" and manifest["head_trained_on"] == "int8"
    assert "precision" not in manifest["backbone"] and "model_sha256" not in manifest["backbone"]
    assert "trained on int8 embeddings" in (out / "README.md").read_text()
    assert "FakeQuantize" not in (out / "model.xml").read_text()
    fp32 = [r["confidence"] for r in _predict(out, query, capsys)]
    int8 = [r["confidence"] for r in _predict(world["root"] / "none-openvino", query, capsys)]
    assert fp32 != int8  # another function: the fp32 backbone


@pytest.mark.parametrize("argv, why", [
    (["--format", "tflite"], "trained on int8 embeddings, and --format tflite computes fp32"),
    (["--format", "keras", "--precision", "int8"], "int8 export is only for --format openvino"),
])
def test_an_int8_head_is_refused_where_it_would_be_fp32(world, tmp_path, argv, why, capsys):
    out = tmp_path / "refused"
    assert main(["export-model", str(world["heads"]["none"]), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_fp32_head_is_not_quantized_at_export(world, tmp_path, capsys):
    """Quantizing at export would make a model the head never saw: retrain on an int8 store instead."""
    model = tmp_path / "fp32.tlh"
    as_fp32(Head.load(world["heads"]["none"])).save(model)
    assert main(["export-model", str(model), "--format", "openvino", "--precision", "int8",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "embed its store with --precision int8 and train again" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.tlh"]
    with pytest.raises(Exception, match="unknown export precision 'bf16'"):
        export_model(Head.load(model), "openvino", tmp_path / "out", "bf16")


def _pixels(path: Path, size: int) -> np.ndarray:
    from tl_embed.embedding.images import load_image

    return load_image(path, size).pixels
