"""export-model: one model from uint8 images to probabilities, equal to `embed` + the head's own predict."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from conftest import make_folder, make_image

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.embedding.images import load_image
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import TlEmbedError
from tl_embed.heads import export
from tl_embed.heads.export import export_model
from tl_embed.heads.exported import FORMATS, MANIFEST, load_export
from tl_embed.heads.fit import fit_head
from tl_embed.heads.graph import Step
from tl_embed.heads.head import Head

ATOL = 1e-4  # fp32 end to end (TFLite included: it is exported without quantisation)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A store of training images, a store of other images (one a copy of a training image), and heads."""
    root = tmp_path_factory.mktemp("export")
    train, query = make_folder(root / "train", per_class=6), make_folder(root / "query", per_class=2, seed=7)
    shutil.copy(train / "red" / "red_000.jpg", query / "red" / "duplicate.jpg")
    for folder in (train, query):
        assert main(["embed", str(folder), "--out", str(folder) + ".tle", "--model", tiny_model,
                     "--layer", "features", "-q"]) == 0
    with EmbeddingStore.open(str(train) + ".tle") as s:
        X, y, spec = np.asarray(s.embeddings), s.labels, s.spec
    with EmbeddingStore.open(str(query) + ".tle") as s:
        Xq, paths = np.asarray(s.embeddings), [s.absolute_path(p) for p in s.paths]
    images = np.stack([load_image(p, spec.input_size).pixels for p in paths])
    heads = {name: fit_head(X, y, spec, name)[0] for name in ("logreg", "svm", "knn")}
    heads["chain"] = chain_head(spec, sorted(set(y)))
    return {"root": root, "spec": spec, "Xq": Xq, "images": images, "paths": paths, "heads": heads}


def chain_head(spec: BackboneSpec, classes: list[str]) -> Head:
    """Every other operation: signed power, L2, a relu layer, and a calibration with no linear layer before it."""
    rng = np.random.default_rng(1)
    members = 2
    return Head([Step("signed_power", attrs={"alpha": 0.5}), Step("l2_normalize"),
                 Step("dense", {"W": rng.normal(0, 3, (spec.dim, members * len(classes))),
                                "b": rng.normal(0, 0.5, members * len(classes))}, {"activation": "relu"}),
                 Step("sigmoid_calibration", {"a": rng.normal(-2, 0.5, members * len(classes)),
                                              "b": rng.normal(0, 0.3, members * len(classes))},
                      {"members": members, "classes": len(classes)})],
                classes, spec, "chain", {})


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_head_exports_to_every_format(world, fmt):
    for name, head in world["heads"].items():
        out = world["root"] / f"{name}-{fmt}"
        res = export_model(head, fmt, out)
        assert res.bytes > 1000 and (out / FORMATS[fmt]).exists()
        assert (out / "labels.txt").read_text().splitlines() == head.classes
        readme = (out / "README.md").read_text()
        assert "uint8" in readme and f"(N, {world['spec'].input_size}, {world['spec'].input_size}, 3)" in readme
        model = load_export(out)
        got, expected = model(world["images"]), head.predict_proba(world["Xq"])
        assert got.shape == expected.shape and got.dtype == np.float32
        assert (got.argmax(1) == expected.argmax(1)).all(), (name, fmt)
        np.testing.assert_allclose(got, expected, atol=ATOL, err_msg=f"{name} as {fmt}")


def test_binary_calibration_and_duplicates_in_knn(world):
    """A 2-class calibration (one decision value per member), and a k-NN query equal to a stored image."""
    spec, rng = world["spec"], np.random.default_rng(2)
    binary = Head([Step("dense", {"W": rng.normal(0, 1, (spec.dim, 3)), "b": rng.normal(0, 1, 3)},
                        {"activation": "linear"}),
                   Step("sigmoid_calibration", {"a": rng.normal(-1, 0.3, 3), "b": rng.normal(0, 0.3, 3)},
                        {"members": 3, "classes": 2})], ["no", "yes"], spec, "binary", {})
    np.testing.assert_allclose(load_export(export_model(binary, "keras", world["root"] / "binary").out)(
        world["images"]), binary.predict_proba(world["Xq"]), atol=ATOL)
    knn = world["heads"]["knn"]
    assert knn.steps[-1].attrs["weights"] == "distance"
    dup = [i for i, p in enumerate(world["paths"]) if p.name == "duplicate.jpg"]
    assert knn.predict_proba(world["Xq"][dup]).max() == pytest.approx(1.0, abs=1e-6)  # all weight, as scikit-learn
    exported = load_export(world["root"] / "knn-keras")(world["images"][dup])
    assert exported[0, knn.classes.index("red")] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("fmt", ["openvino", "tflite"])
def test_predict_from_export_equals_predict_from_model_file(world, fmt, capsys):
    model = world["root"] / "svm.tlh"
    world["heads"]["svm"].save(model)
    query = str(world["root"] / "query")
    answers = []
    for source in (model, world["root"] / f"svm-{fmt}"):
        assert main(["predict", str(source), query, "--format", "json", "--top-k", "3"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    from_file, from_export = answers
    assert [r["path"] for r in from_file] == [r["path"] for r in from_export] and len(from_file) == 7
    for a, b in zip(from_file, from_export, strict=True):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert abs(a["confidence"] - b["confidence"]) < ATOL


def test_cli_export_and_its_refusals(world, tmp_path, capsys):
    model = tmp_path / "m.tlh"
    world["heads"]["logreg"].save(model)
    out = tmp_path / "export"
    assert main(["export-model", str(model), "--format", "keras", "--out", str(out)]) == 0
    assert "uint8" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model_format"] == "keras" and manifest["classes"] == ["blue", "green", "red"]
    # a previous export is replaced whole: no model.keras left beside the new model.onnx
    assert main(["export-model", str(model), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", MANIFEST, "labels.txt", "model.onnx"]
    # anything else is never written over
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mine.jpg").write_bytes(b"x")
    for target, why in ((tmp_path / "photos", "other files in it"), (model, "is a model file")):
        assert main(["export-model", str(model), "--format", "keras", "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1
    assert (tmp_path / "photos" / "mine.jpg").read_bytes() == b"x" and model.stat().st_size > 100
    # predicting a store's embeddings from an export is refused: it takes images
    assert main(["predict", str(out), str(world["root"] / "query.tle")]) == 2
    assert "takes images" in capsys.readouterr().err


def test_failed_export_leaves_the_previous_one(world, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_model(world["heads"]["logreg"], "keras", out)
    before = sorted(p.name for p in out.iterdir())

    def broken(model, path, size):
        path.write_bytes(b"half a model")
        raise TlEmbedError("converter failed")

    monkeypatch.setitem(export._WRITERS, "onnx", broken)
    with pytest.raises(TlEmbedError, match="converter failed"):
        export_model(world["heads"]["logreg"], "onnx", out)
    assert sorted(p.name for p in out.iterdir()) == before and load_export(out).fmt == "keras"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left behind


def test_what_cannot_be_exported_is_refused_in_one_line(world, tmp_path, monkeypatch):
    random_spec = BackboneSpec("mobilenet_v2", "random", "random", 224, "x", "avg", 16)
    head = world["heads"]["logreg"]
    with pytest.raises(TlEmbedError, match="random weights cannot be rebuilt"):
        export_model(Head(head.steps, head.classes, random_spec, "logreg", {}), "keras", tmp_path / "a")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else find_spec(name))
    with pytest.raises(TlEmbedError, match=r"needs tf2onnx: pip install 'tl_embed\[export\]'"):
        export_model(head, "onnx", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / MANIFEST).write_text(json.dumps({"format": "tl_embed.export/9", "model_format": "onnx",
                                              "classes": ["a"], "input": {"shape": [None, 32, 32, 3]}}))
    with pytest.raises(TlEmbedError, match="upgrade tl_embed"):
        load_export(newer)


def test_predict_from_export_skips_unreadable_images(world, tmp_path, capsys):
    folder = tmp_path / "mixed"
    make_image(folder / "ok.png", (220, 30, 30), 3)
    (folder / "broken.jpg").write_bytes(b"not an image")
    assert main(["predict", str(world["root"] / "logreg-openvino"), str(folder), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2 and "ok.png" in captured.out
    assert "skipped" in captured.err and "broken.jpg" in captured.err


def test_a_head_on_flip_tta_embeddings_exports_the_mean_of_both_views(world, tiny_model):
    """--tta flip stores the mean of an image's and its mirror's embeddings: the export computes the same."""
    root = world["root"]
    for folder in ("train", "query"):
        assert main(["embed", str(root / folder), "--out", str(root / f"{folder}-flip.tle"), "--model", tiny_model,
                     "--layer", "features", "--tta", "flip", "-q"]) == 0
    with EmbeddingStore.open(root / "train-flip.tle") as s:
        head = fit_head(np.asarray(s.embeddings), s.labels, s.spec, "logreg")[0]
    with EmbeddingStore.open(root / "query-flip.tle") as s:
        Xq = np.asarray(s.embeddings)
        assert [s.absolute_path(p) for p in s.paths] == world["paths"]
    assert head.spec.tta == "flip" and not np.allclose(Xq, world["Xq"])
    for fmt in FORMATS:
        got = load_export(export_model(head, fmt, root / f"flip-{fmt}").out)(world["images"])
        np.testing.assert_allclose(got, head.predict_proba(Xq), atol=ATOL, err_msg=fmt)


def test_an_export_folder_follows_the_umask(world, tmp_path):
    """A shipped model must be readable by other users and services: no 0700 folder from mkdtemp."""
    old = os.umask(0o022)
    try:
        out = export_model(world["heads"]["logreg"], "keras", tmp_path / "shipped").out
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in out.iterdir())


def test_openvino_export_runs_in_f32_as_its_readme_says(world, monkeypatch):
    """OpenVINO picks bf16 by default on a CPU with native bf16: the loader and the README's snippet must
    both state f32, so every CPU runs the export at the precision it was checked in."""
    import re

    import openvino as ov

    folder = world["root"] / "svm-openvino"
    if not folder.exists():
        export_model(world["heads"]["svm"], "openvino", folder)
    configs = []
    compile_model = ov.Core.compile_model
    monkeypatch.setattr(ov.Core, "compile_model",
                        lambda self, model, device, config=None: configs.append(config) or compile_model(
                            self, model, device, config or {}))
    expected = load_export(folder)(world["images"])
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    snippet = snippet.replace('["photo.jpg"]', repr([str(p) for p in world["paths"]]))
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(snippet, scope)  # the README's own code, run as a user would from the export folder
    assert [c.get("INFERENCE_PRECISION_HINT") for c in configs] == ["f32", "f32"]
    assert (scope["proba"].argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(scope["proba"], expected, atol=ATOL)
