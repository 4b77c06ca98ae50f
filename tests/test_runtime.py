"""Runtimes: openvino computes what the keras reference computes, caches its conversion, falls back."""

import numpy as np
import pytest
from conftest import make_folder

from tl_embed import cpus
from tl_embed.cli import main
from tl_embed.embedding import runtime as rt
from tl_embed.embedding.backbones import load_backbone
from tl_embed.embedding.embed import embed_folder
from tl_embed.embedding.store import EmbeddingStore
from tl_embed.errors import TlEmbedError


@pytest.fixture(scope="module")
def tiny_backbone(tiny_model):
    return load_backbone(tiny_model, layer="features")


def pixels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_openvino_matches_keras(tiny_backbone):
    x = pixels(19)
    ref = rt.KerasRuntime(tiny_backbone)(x)
    got = rt.make_runtime(tiny_backbone, "openvino")(x)
    assert got.shape == ref.shape == (19, 16) and got.dtype == np.float32
    assert min_cosine(got, ref) >= 0.9999
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_stream_keeps_order_across_streams(tiny_backbone):
    run = rt.make_runtime(tiny_backbone, "openvino")
    batches = [(f"b{i}", pixels(n, seed=i)) for i, n in enumerate([5, 1, 8, 0, 3, 7, 2])]
    out = list(rt.stream(run, iter(batches)))
    assert [tag for tag, _ in out] == [tag for tag, _ in batches]
    keras = rt.KerasRuntime(tiny_backbone)
    for (_, vectors), (_, x) in zip(out, batches, strict=True):
        np.testing.assert_allclose(vectors, keras(x), rtol=1e-4, atol=1e-4)


def test_conversion_is_cached_by_backbone_identity(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_EMBED_CACHE", str(tmp_path))
    first = rt.make_runtime(tiny_backbone, "openvino")(pixels(4))
    assert len(list((tmp_path / "openvino").glob("*/model.xml"))) == 1

    def no_conversion(_):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(rt, "convert", no_conversion)
    again = rt.make_runtime(tiny_backbone, "openvino")(pixels(4))
    np.testing.assert_array_equal(first, again)


def test_random_weights_are_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_EMBED_CACHE", str(tmp_path))
    backbone = load_backbone("mobilenet_v3_small", weights="none")
    assert rt.cache_key(backbone.spec) is None  # a rebuild has other random weights: a cache would lie


def test_auto_falls_back_to_keras_with_one_line(tiny_backbone, monkeypatch):
    def broken(_):
        raise RuntimeError("unsupported op Foo\nlong converter trace")

    monkeypatch.setattr(rt, "convert", broken)
    monkeypatch.setenv("TL_EMBED_CACHE", "/nonexistent-cache-never-written")
    notices = []
    run = rt.make_runtime(tiny_backbone, "auto", notify=notices.append)
    assert run.name == "keras"
    assert len(notices) == 1 and "unsupported op Foo" in notices[0] and "keras" in notices[0]
    assert "\n" not in notices[0]
    with pytest.raises(TlEmbedError, match="unsupported op Foo"):
        rt.make_runtime(tiny_backbone, "openvino")


def test_runtime_names():
    assert rt.check_runtime(" OpenVINO ") == "openvino"
    with pytest.raises(TlEmbedError, match="not shipped"):
        rt.check_runtime("onnx")
    with pytest.raises(TlEmbedError, match="unknown runtime"):
        rt.check_runtime("cuda")
    assert rt.available_runtimes() == ["keras", "openvino"]


def test_cli_rejects_a_bad_runtime_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", str(tmp_path / "missing"), "--out", str(tmp_path / "s.tle"), "--runtime", "tflite"])
    assert e.value.code == 2
    assert "not shipped" in capsys.readouterr().err


def test_embed_folder_with_each_runtime_gives_the_same_store(tmp_path, tiny_model):
    images = make_folder(tmp_path / "images", per_class=5)
    stores = {}
    for name in ("keras", "openvino"):
        report = embed_folder(images, tmp_path / f"{name}.tle", model=tiny_model, layer="features",
                              runtime=name, batch_size=4, progress=False)
        assert report.runtime == name and report.embedded == 15
        with EmbeddingStore.open(tmp_path / f"{name}.tle") as s:
            stores[name] = (list(s.paths), np.array(s.embeddings))
    assert stores["keras"][0] == stores["openvino"][0]
    assert min_cosine(stores["keras"][1], stores["openvino"][1]) >= 0.9999


def test_concurrent_streams_on_one_runtime_never_swap_results(tiny_backbone):
    """A service streams from several threads through one runtime: each caller gets its own vectors."""
    import threading

    run = rt.make_runtime(tiny_backbone, "openvino")
    inputs = {t: [pixels(n, seed=100 * t + i) for i, n in enumerate([3, 1, 4, 2, 5, 3])] for t in range(4)}
    expected = {t: [run(x) for x in xs] for t, xs in inputs.items()}
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(5):
                got[t] = [v for _, v in run.stream((None, x) for x in inputs[t])]
                for v, e in zip(got[t], expected[t], strict=True):
                    np.testing.assert_allclose(v, e, rtol=1e-5, atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in inputs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[0]
    assert sorted(got) == sorted(inputs)


def test_abandoned_stream_leaves_no_results_behind(tiny_backbone):
    run = rt.make_runtime(tiny_backbone, "openvino")
    it = run.stream((None, pixels(4, seed=i)) for i in range(6))
    next(it)
    it.close()  # the caller stops early (an exception, a client that went away)
    assert run._outputs == {}
    np.testing.assert_allclose(run(pixels(2, seed=9)), rt.KerasRuntime(tiny_backbone)(pixels(2, seed=9)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(cpus, "_own_cgroups", lambda: [""])
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpus.cgroup_cpu_quota(tmp_path) == expected


def test_cpu_count_is_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "_own_cgroups", lambda: [""])
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda _: set(range(64)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cpu_count(tmp_path) == 2  # 1.5 CPUs of quota: two threads keep it busy
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cpu_count(tmp_path) == 64
