"""``embed --precision``: an int8 store carries its quantized model, and every query path embeds with exactly it
(on another machine too: a fresh cache); precisions are never mixed; bf16 is refused where the CPU lacks it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from tl_embed.cli import main
from tl_embed.embedding import carried, precision
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.query import embed_for
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import TlEmbedError


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory, tiny_model) -> tuple[Path, Path, str]:
    """(images, store, fidelity line) of a store embedded in int8 (quantized once for the module)."""
    root = tmp_path_factory.mktemp("int8")
    images = make_folder(root / "images", per_class=12)
    report = embed_folder(images, root / "s.tle", model=tiny_model, layer="features", progress=False,
                          precision="int8")
    return images, root / "s.tle", report.text()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """Another machine, as far as converted models go: an empty cache."""
    cache = tmp_path / "other-machine-cache"
    monkeypatch.setenv("TL_EMBED_CACHE", str(cache))
    return cache


def test_int8_store_records_and_carries_its_model(int8_store, tiny_model, tmp_path):
    images, store, text = int8_store
    with EmbeddingStore.open(store) as s:
        spec = s.spec
        assert len(s) == 36
    assert spec.precision == "int8"
    files = carried.read_files(store / carried.FOLDER)
    assert files is not None and carried.files_sha256(files) == spec.model_sha256
    assert "int8 vs fp32 on 32 of your images: cosine median" in text
    median = float(text.split("cosine median ")[1].split(",")[0])
    assert 0.9 < median <= 1.0
    # quantization is a function of the model and the sample: a second store gets the same weights, vectors
    # and identity (OpenVINO numbers its nodes' names per process: the names are not part of the identity)
    embed_folder(images, tmp_path / "again.tle", model=tiny_model, layer="features", progress=False,
                 precision="int8")
    again = carried.read_files(tmp_path / "again.tle" / carried.FOLDER)
    assert again["model.bin"] == files["model.bin"]
    with EmbeddingStore.open(tmp_path / "again.tle") as s, EmbeddingStore.open(store) as first:
        np.testing.assert_array_equal(np.asarray(s.embeddings), np.asarray(first.embeddings))
        assert s.spec.model_sha256 == spec.model_sha256
    other = {**files, "model.bin": files["model.bin"][:-4] + bytes(4)}  # other weights: another identity
    assert carried.files_sha256(other) != spec.model_sha256


def test_int8_differs_from_fp32_and_stays_close(int8_store, tiny_model, tmp_path):
    images, store, _ = int8_store
    embed_folder(images, tmp_path / "fp32.tle", model=tiny_model, layer="features", progress=False)
    with EmbeddingStore.open(store) as a, EmbeddingStore.open(tmp_path / "fp32.tle") as b:
        assert b.spec.precision == "fp32" and "precision" not in b.spec.to_dict()  # older readers read it
        x, y = np.asarray(a.embeddings), np.asarray(b.embeddings)
        assert list(a.paths) == list(b.paths)
    cos = np.sum(x * y, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert not np.array_equal(x, y)
    assert np.median(cos) > 0.9


def test_queries_use_the_carried_model_on_another_machine(int8_store, tmp_path, fresh_cache, capsys, monkeypatch):
    images, store, _ = int8_store
    copy = tmp_path / "moved.tle"
    shutil.copytree(store, copy)  # the store alone travels
    with EmbeddingStore.open(copy) as s:
        spec, first, row = s.spec, str(images / s.paths[0]), np.array(s.embeddings[0])
    carried.install(spec, carried.read_files(copy / carried.FOLDER), "store")
    got = embed_for(spec, [first]).vectors[0]
    np.testing.assert_allclose(got, row, rtol=1e-5, atol=1e-6)

    assert main(["train", str(copy), "--out", str(tmp_path / "h.tlh")]) == 0
    assert main(["index", str(copy), "--out", str(tmp_path / "s.tli")]) == 0
    capsys.readouterr()
    for other in ("cache-b", "cache-c"):  # the head and the index each carry the model on their own
        monkeypatch.setenv("TL_EMBED_CACHE", str(tmp_path / other))
        cmd = (["predict", str(tmp_path / "h.tlh"), first] if other == "cache-b"
               else ["search", str(tmp_path / "s.tli"), first, "-k", "1"])
        assert main(cmd) == 0
        assert any((tmp_path / other / "openvino").iterdir())
    out = capsys.readouterr().out
    assert "1.0000" in out or "0.99" in out
    # an exported model would compute fp32 with Keras: refused in one line, nothing written
    export = ["export-model", str(tmp_path / "h.tlh"), "--format", "keras", "--out", str(tmp_path / "exported")]
    assert main(export) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on int8 embeddings" in err[0]
    assert not (tmp_path / "exported").exists()


def test_damaged_carried_model_is_refused(int8_store, tmp_path, fresh_cache):
    _, store, _ = int8_store
    copy = tmp_path / "damaged.tle"
    shutil.copytree(store, copy)
    bin_file = copy / carried.FOLDER / "model.bin"
    data = bytearray(bin_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bin_file.write_bytes(bytes(data))
    with EmbeddingStore.open(copy) as s:
        spec = s.spec
    with pytest.raises(TlEmbedError, match="sha256 differs"):
        carried.install(spec, carried.read_files(copy / carried.FOLDER), f"store {copy}")


def test_precisions_are_never_mixed(int8_store, tiny_model, tmp_path, capsys):
    images, store, _ = int8_store
    copy = tmp_path / "s.tle"
    shutil.copytree(store, copy)
    args = ["embed", str(images), "--out", str(copy), "--model", tiny_model, "--layer", "features", "-q"]
    assert main([*args, "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision int8, not --precision fp32" in err[0]
    (images / "red" / "extra.jpg").write_bytes((images / "red" / "red_000.jpg").read_bytes())
    try:
        assert main(args) == 0  # auto: the store's own precision, run from the model it carries
    finally:
        (images / "red" / "extra.jpg").unlink()
    with EmbeddingStore.open(copy) as s:
        assert len(s) == 37 and s.spec.precision == "int8"


def test_keras_runtime_refuses_int8(int8_store, tiny_model, tmp_path, capsys):
    images, _, _ = int8_store
    args = ["embed", str(images), "--out", str(tmp_path / "k.tle"), "--model", tiny_model, "--layer", "features",
            "-q", "--precision", "int8", "--runtime", "keras"]
    assert main(args) == 2
    assert "drop --runtime keras" in capsys.readouterr().err
    assert not (tmp_path / "k.tle").exists()


def test_bf16_is_refused_without_native_support(image_folder, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    args = ["embed", str(image_folder), "--out", str(tmp_path / "b.tle"), "--model", tiny_model,
            "--layer", "features", "-q", "--precision", "bf16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CPU with native bf16" in err[0]
    assert not (tmp_path / "b.tle").exists()
    notes: list[str] = []
    assert precision.compile_hint("bf16", notes.append) == "f32" and "no native bf16" in notes[0]
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.compile_hint("bf16") == "bf16"
    assert precision.compile_hint("int8") == precision.compile_hint("fp32") == "f32"


def test_unknown_precision_is_one_line():
    with pytest.raises(TlEmbedError, match="choose one of auto, fp32, bf16, int8"):
        precision.check_precision("fp8")
    assert precision.check_precision("auto") == precision.AUTO
