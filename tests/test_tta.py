"""Test-time augmentation: what ``--tta flip`` stores, that a store keeps one setting, and that queries,
heads, indexes and the Ray engine embed with the store's setting."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec, check_compatible
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.query import embed_for
from tl_embed.embedding.runtime import cache_key
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.embedding.tta import TTARuntime, views, with_tta
from tl_embed.errors import TlEmbedError

SIZE = 32  # the tiny model's input: no resize, so a mirrored file decodes to exactly the mirrored pixels
N = 8


def rel(i: int) -> str:
    return f"{'ab'[i % 2]}/img{i}.png"


def png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def noise(seed: int, width: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, width, 3), dtype=np.uint8)


def embed(images: Path, out: Path, tiny_model: str, **kw) -> dict[str, np.ndarray]:
    embed_folder(images, out, model=tiny_model, layer="features", progress=False, batch_size=3, **kw)
    with EmbeddingStore.open(out) as s:
        return {str(p): np.array(v) for p, v in zip(s.paths, s.embeddings, strict=True)}


@pytest.fixture
def folder(tmp_path) -> Path:
    """Asymmetric images in two classes (PNG: lossless, so a mirrored copy is the exact mirror)."""
    root = tmp_path / "images"
    for i in range(N):
        png(root / rel(i), noise(i))
    return root


def test_flip_is_the_mean_of_the_image_and_its_mirror(tmp_path, folder, tiny_model):
    pairs = tmp_path / "pairs"
    for i in range(N):
        pixels = np.asarray(Image.open(folder / rel(i)))
        png(pairs / f"img{i}.png", pixels)
        png(pairs / f"img{i}_mirror.png", pixels[:, ::-1])
    plain = embed(pairs, tmp_path / "pairs.tle", tiny_model)
    flipped = embed(folder, tmp_path / "flip.tle", tiny_model, tta="flip")
    for i in range(N):
        got = flipped[rel(i)]
        a, b = plain[f"img{i}.png"], plain[f"img{i}_mirror.png"]
        assert np.abs(a - b).max() > 1e-3  # the model sees a difference: the test could fail
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-6)


def test_a_symmetric_image_gives_the_same_vector_with_and_without_tta(tmp_path, tiny_model):
    half = noise(7, SIZE // 2)
    png(tmp_path / "sym" / "s.png", np.concatenate([half, half[:, ::-1]], axis=1))
    plain = embed(tmp_path / "sym", tmp_path / "plain.tle", tiny_model)
    flipped = embed(tmp_path / "sym", tmp_path / "flip.tle", tiny_model, tta="flip")
    np.testing.assert_allclose(flipped["s.png"], plain["s.png"], rtol=1e-5, atol=1e-6)


def test_runtime_wrapper_batches_views_and_keeps_order():
    calls = []

    class Sum:
        name = "fake"

        def __call__(self, batch):
            calls.append(len(batch))
            return batch[:, 0, :, 0].astype(np.float32)  # the first row's red values: mirrors differ

    batch = np.arange(3 * 2 * 4 * 3, dtype=np.uint8).reshape(3, 2, 4, 3)
    got = with_tta(Sum(), "flip")(batch)
    assert calls == [6]  # one trip through the runtime for every view of the batch
    np.testing.assert_allclose(got, (batch[:, 0, :, 0] + batch[:, 0, ::-1, 0]) / 2)
    assert with_tta(Sum(), "none").__class__ is Sum
    assert views(batch, "flip").shape == (6, 2, 4, 3) and isinstance(with_tta(Sum(), "flip"), TTARuntime)
    assert with_tta(Sum(), "flip")(batch[:0]).shape == (0, 4)


def test_a_store_never_mixes_tta_settings(tmp_path, folder, tiny_model):
    out = tmp_path / "s.tle"
    before = embed(folder, out, tiny_model, tta="flip")
    png(folder / "a" / "new.png", noise(99))
    with pytest.raises(TlEmbedError, match=r"embedded with --tta flip, not --tta none; update it with --tta flip"):
        embed_folder(folder, out, model=tiny_model, layer="features", progress=False)
    with EmbeddingStore.open(out) as s:
        assert len(s) == N and s.spec.tta == "flip"  # nothing was added
    after = embed(folder, out, tiny_model, tta="flip")
    assert len(after) == N + 1 and all(np.array_equal(after[k], v) for k, v in before.items())
    with pytest.raises(TlEmbedError, match="unknown test-time augmentation 'crops'"):
        embed_folder(folder, tmp_path / "other.tle", model=tiny_model, layer="features", tta="crops")


def test_specs_with_other_tta_are_incompatible_and_old_records_read_as_none():
    spec = BackboneSpec("m", "imagenet", "ab" * 32, 224, "p", "avg", 8)
    flip = replace(spec, tta="flip")
    with pytest.raises(TlEmbedError, match=r"^the model was embedded with --tta flip, but this uses --tta none;"):
        check_compatible(flip, spec, "the model")
    assert "tta" not in spec.to_dict() and flip.to_dict()["tta"] == "flip"  # files without TTA read as before
    assert BackboneSpec.from_dict(spec.to_dict()).tta == "none"
    assert BackboneSpec.from_dict(flip.to_dict()) == flip
    assert "flip TTA" in flip.describe() and "TTA" not in spec.describe()
    assert cache_key(flip) == cache_key(spec)  # one converted model serves both settings


def test_queries_heads_and_indexes_use_the_store_tta(tmp_path, folder, tiny_model):
    from tl_embed.heads.head import Head
    from tl_embed.heads.training import train_from_store
    from tl_embed.search.index import Index

    store = tmp_path / "s.tle"
    stored = embed(folder, store, tiny_model, tta="flip")
    with EmbeddingStore.open(store) as s:
        spec = s.spec
    outside = shutil.copytree(folder, tmp_path / "copies")  # not the stored paths: embedded as queries
    for runtime in ("auto", "keras"):  # the cached converted model, and the rebuilt Keras model
        q = embed_for(spec, [outside], runtime)
        for path, vector in zip(q.paths, q.vectors, strict=True):
            np.testing.assert_allclose(vector, stored[path.relative_to(outside).as_posix()], rtol=1e-5, atol=1e-5)
    plain = embed_for(replace(spec, tta="none"), [outside])
    assert np.abs(plain.vectors - q.vectors).max() > 1e-3

    result = train_from_store(store, test_size=0.5)
    result.head.save(tmp_path / "m.tlh")
    assert Head.load(tmp_path / "m.tlh").spec.tta == "flip"
    index = Index.build(store, tmp_path / "s.tli", log=lambda *_: None)
    assert Index.open(tmp_path / "s.tli").spec.tta == "flip"
    [(_, hits)] = index.search([outside / "a" / "img0.png"], k=1)
    assert hits[0].path.endswith("a/img0.png") and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_cli_embed_tta_flip_and_info(tmp_path, folder, tiny_model, capsys):
    args = ["embed", str(folder), "--out", str(tmp_path / "s.tle"), "--model", tiny_model, "--layer", "features",
            "-q"]
    assert main([*args, "--tta", "flip"]) == 0
    assert "flip TTA" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s.tle")]) == 0
    assert "dim 16, flip TTA)" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was embedded with --tta flip, not --tta none" in err[0]


def test_ray_engine_stores_what_the_local_engine_stores_with_tta(tmp_path, folder, tiny_model):
    """Every actor shows the model the spec's views (one small case: Ray takes seconds to start)."""
    from test_ray_engine import deadline

    from tl_embed.embedding import ray_engine
    from tl_embed.embedding.ray_engine import RayOptions

    local = embed(folder, tmp_path / "local.tle", tiny_model, tta="flip")
    assert ray_engine.start_ray(None, num_cpus=2)
    try:
        with deadline(120):
            remote = embed(folder, tmp_path / "ray.tle", tiny_model, tta="flip", engine="ray", ray=RayOptions())
    finally:
        import ray

        ray.shutdown()
    assert remote.keys() == local.keys()
    for k, v in local.items():
        np.testing.assert_allclose(remote[k], v, rtol=1e-5, atol=1e-6)
    with EmbeddingStore.open(tmp_path / "ray.tle") as s:
        assert s.spec.tta == "flip"


def test_pipeline_steps_take_tta_and_check_its_value(tmp_path):
    from tl_embed.cli import pipeline

    step = '[vars]\nimages = "x"\n\n[[step]]\nname = "e"\nrun = "embed"\nargs = ["{images}"]\n' \
           '[step.options]\nout = "x.tle"\ntta = "%s"\n'
    (tmp_path / "p.toml").write_text(step % "flip")
    [loaded] = pipeline.load(tmp_path / "p.toml").steps
    assert loaded.argv[-2:] == ["--tta", "flip"]
    (tmp_path / "p.toml").write_text(step % "mirror")
    with pytest.raises(TlEmbedError, match=r"p.toml:4: step 'e': argument --tta: invalid choice: 'mirror'"):
        pipeline.load(tmp_path / "p.toml")
