"""The HTTP service's routes and every kind of bad input, through FastAPI's TestClient (tiny model)."""

from __future__ import annotations

import io
import re
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, make_image
from PIL import Image
from serve_data import build
from starlette.testclient import TestClient

from tl_embed.serve.app import create_app, load_service

MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    return build(tmp_path_factory.mktemp("served"), tiny_model)


@pytest.fixture(scope="module")
def service(served):
    return load_service(served.index, [str(served.head)])


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, max_upload=MAX_UPLOAD)) as c:  # unhandled errors fail the test
        yield c


def jpeg(color: str, seed: int, tmp_path: Path) -> bytes:
    return make_image(tmp_path / f"q{seed}.jpg", COLORS[color], seed).read_bytes()


def upload(client, route: str, data: bytes, **fields):
    return client.post(route, files={"image": ("q.jpg", data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]
    return body["error"]


# ------------------------------------------------------------------ happy paths
def test_healthz_and_info(client, served):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert "tiny.keras" in info["backbone"] and info["spec"]["dim"] == 16
    assert info["index"]["type"] == "Flat" and info["index"]["vectors"] == 12
    assert 0.0 < info["index"]["recall_at_10"] <= 1.0
    assert info["store"]["images"] == 12 and info["store"]["labels"] == {"red": 4, "green": 4, "blue": 4}
    assert info["heads"][0]["name"] == "m" and info["heads"][0]["classes"] == ["blue", "green", "red"]
    assert info["runtime"] == "openvino"


def test_search_upload_finds_the_same_colour(client, tmp_path):
    r = upload(client, "/search", jpeg("red", 999, tmp_path), k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["kind"] == "upload" and body["query"]["width"] == 48
    hits = body["neighbours"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert [h["label"] for h in hits] == ["red"] * 3
    assert all(h["path"].startswith("red/") and h["thumbnail"] == f"/images/{h['id']}?size=256" for h in hits)
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True) and 0.5 < sims[0] <= 1.0


def test_search_by_stored_id_path_and_vector_agree(client, service):
    cat = service.catalog
    ident = int(cat.ids[0])
    by_id = client.post("/search", json={"id": ident, "k": 4}).json()
    by_path = client.post("/search", json={"path": cat.paths[0], "k": 4}).json()
    by_abs = client.post("/search", json={"path": str(cat.absolute(cat.paths[0])), "k": 4}).json()
    assert by_id["query"] == {"kind": "stored", "id": ident, "path": cat.paths[0], "label": cat.labels[0]}
    assert by_id["neighbours"] == by_path["neighbours"] == by_abs["neighbours"]
    assert ident not in [h["id"] for h in by_id["neighbours"]]  # not its own neighbour
    vec = client.post("/search", json={"vector": cat.vector(ident).tolist(), "k": 5}).json()
    assert vec["neighbours"][0]["id"] == ident and vec["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert [h["id"] for h in vec["neighbours"][1:]] == [h["id"] for h in by_id["neighbours"]]


def test_label_filter_is_exact(client, service, tmp_path):
    r = upload(client, "/search", jpeg("red", 5, tmp_path), k=10, label="green").json()
    assert [h["label"] for h in r["neighbours"]] == ["green"] * 4  # all 4 greens, though red ones are closer
    stored = client.post("/search", json={"id": int(service.catalog.ids[0]), "label": "blue", "k": 2}).json()
    assert [h["label"] for h in stored["neighbours"]] == ["blue", "blue"]


def test_predict_labels_with_each_head(client, tmp_path):
    r = upload(client, "/predict", jpeg("blue", 77, tmp_path), k=2)
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["head"] == "m" and pred["label"] == "blue" and len(pred["top"]) == 2
    assert pred["top"][0]["probability"] >= pred["top"][1]["probability"]
    by_id = client.post("/predict", json={"path": "green/green_001.jpg"}).json()
    assert by_id["predictions"][0]["label"] == "green"


def test_predict_says_unknown_below_the_threshold(served, tmp_path):
    strict = load_service(served.index, [str(served.head)], min_confidence=1.0)
    with TestClient(create_app(strict)) as c:
        pred = upload(c, "/predict", jpeg("blue", 78, tmp_path)).json()["predictions"][0]
    assert pred["label"] == "unknown" and pred["top"][0]["label"] == "blue" and pred["confidence"] < 1.0


def test_predict_without_heads_is_404(served, tmp_path):
    with TestClient(create_app(load_service(served.index))) as c:
        assert "--head" in error_of(upload(c, "/predict", jpeg("red", 1, tmp_path)), 404)
        assert c.get("/info").json()["heads"] == []


def test_images_and_thumbnails(client, service):
    cat = service.catalog
    ident = int(cat.ids[3])
    r = client.get(f"/images/{ident}")
    assert r.status_code == 200 and r.content == cat.absolute(cat.paths[3]).read_bytes()
    assert r.headers["content-type"] == "image/jpeg"
    thumb = client.get(f"/images/{ident}?size=24")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 24


def test_page_docs_and_static_assets_need_no_internet(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("/static/app.js", "/static/app.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "https://" not in r.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/predict", "/images/{image_id}", "/healthz", "/info"} <= set(spec["paths"])
    assert set(spec["paths"]["/search"]["post"]["requestBody"]["content"]) == {"multipart/form-data",
                                                                              "application/json"}



def test_favicon_is_served(client):
    r = client.get("/favicon.ico")  # browsers ask for it whatever the page links
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content
    icon = re.search(r'<link rel="icon" href="([^"]+)"', client.get("/").text)
    assert icon and client.get(icon.group(1)).content == r.content


def test_a_stored_query_filtered_by_its_own_label_leaves_itself_out(client, service):
    cat = service.catalog
    ident, label = int(cat.ids[0]), cat.labels[0]
    found = client.post("/search", json={"id": ident, "label": label, "k": 3}).json()["neighbours"]
    assert len(found) == 3 and ident not in [h["id"] for h in found]  # the other 3 of its label
    assert {h["label"] for h in found} == {label}

# ------------------------------------------------------------------ bad input
def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.mark.parametrize("route", ["/search", "/predict"])
def test_bad_uploads_are_4xx_json(client, route, tmp_path):
    good = jpeg("red", 3, tmp_path)
    assert "not a recognised image" in error_of(upload(client, route, b"just some text, not an image"), 415)
    assert "truncated" in error_of(upload(client, route, good[: len(good) // 2]), 422)
    assert "empty" in error_of(upload(client, route, b""), 422)
    assert "too large" in error_of(upload(client, route, _png_claiming(20_000, 20_000)), 413)
    assert "limit" in error_of(upload(client, route, b"\xff" * (MAX_UPLOAD + 1)), 413)
    r = client.post(route, files={"picture": ("q.jpg", good, "image/jpeg")})
    assert "'image'" in error_of(r, 422)
    assert client.get("/healthz").status_code == 200  # still serving


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"x" * (MAX_UPLOAD // 5)

    r = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "limit" in error_of(r, 413)


@pytest.mark.parametrize("body, words", [
    ({"k": 3}, "exactly one of"),
    ({"id": 1, "path": "red/red_000.jpg"}, "exactly one of"),
    ({"id": 1, "colour": "red"}, "colour"),
    ({"id": "one"}, "id"),
    ({"vector": [0.5] * 3}, "16 finite float32 numbers"),
    ({"vector": [3.5e38] * 16}, "16 finite float32 numbers"),
    ({"id": 1, "label": None}, "label must not be null"),
    ({"id": 1, "k": 0}, "between 1 and 100"),
    ({"id": 1, "k": 101}, "between 1 and 100"),
])
def test_bad_json_queries_are_422(client, service, body, words):
    if body.get("id") == 1:
        body = {**body, "id": int(service.catalog.ids[0])}
    assert words in error_of(client.post("/search", json=body), 422)


def test_unknown_things_are_404_and_odd_requests_4xx(client, tmp_path):
    assert "id 987654" in error_of(client.post("/search", json={"id": 987654}), 404)
    assert "path" in error_of(client.post("/search", json={"path": "/etc/passwd"}), 404)
    assert "purple" in error_of(client.post("/search", json={"vector": [0.1] * 16, "label": "purple"}), 404)
    assert "whole number" in error_of(upload(client, "/search", jpeg("red", 4, tmp_path), k="many"), 422)
    error_of(client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert "multipart" in error_of(client.post("/search", content=b"hello", headers={"content-type": "text/plain"}),
                                   415)
    error_of(client.get("/search"), 405)


def test_images_never_leave_the_store(client, service, tmp_path):
    assert "987654" in error_of(client.get("/images/987654"), 404)
    error_of(client.get("/images/not-a-number"), 422)
    error_of(client.get("/images/1?size=5"), 422)
    for path in ("/images/../../etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/../app.py",
                 "/static/%2e%2e/app.py"):
        r = client.get(path)
        assert r.status_code == 404 and b"root:" not in r.content and b"import" not in r.content


def test_manifest_paths_outside_the_root_and_vanished_files_are_404(served, tmp_path):
    svc = load_service(served.index)
    cat = svc.catalog
    secret = cat.root.parent / "secret.jpg"
    make_image(secret, COLORS["red"], 1)
    cat.paths[0] = "../secret.jpg"  # as if the manifest had been edited by hand
    cat.paths[1] = "red/gone.jpg"
    with TestClient(create_app(svc)) as c:
        assert "outside" in error_of(c.get(f"/images/{int(cat.ids[0])}"), 404)
        assert "outside" in error_of(c.get(f"/images/{int(cat.ids[0])}?size=64"), 404)
        assert "gone" in error_of(c.get(f"/images/{int(cat.ids[1])}"), 404)


def test_token_guards_every_route(service, tmp_path):
    with TestClient(create_app(service, token="s3cret"), follow_redirects=False) as c:
        for path in ("/", "/healthz", "/info", "/docs", "/openapi.json", "/static/app.js", "/static/audit.js",
                     "/images/1", "/audit", "/audit/outliers"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert c.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert "token" in error_of(upload(c, "/search", jpeg("red", 6, tmp_path)), 401)
        auth = {"authorization": "Bearer s3cret"}
        assert c.get("/healthz", headers=auth).status_code == 200
        assert c.post("/search", json={"id": int(service.catalog.ids[0])}, headers=auth).status_code == 200
        assert c.get("/?token=wrong").status_code == 401
        r = c.get("/?token=s3cret")  # the browser's way in: a cookie, then the page without the token in the URL
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        assert c.get("/").status_code == 200 and c.get("/info").status_code == 200


def test_concurrent_uploads_share_batches_and_get_their_own_answers(served, tmp_path):
    svc = load_service(served.index, max_batch=8, max_wait=0.05)
    colours = ["red", "green", "blue"] * 4
    images = [jpeg(c, 100 + i, tmp_path) for i, c in enumerate(colours)]
    with TestClient(create_app(svc)) as c:
        alone = [upload(c, "/search", data, k=12).json()["neighbours"] for data in images]
        batches_before = svc.batcher.batches
        ids = [int(i) for i in svc.catalog.ids]
        by_id = {i: c.post("/search", json={"id": i, "k": 5}).json()["neighbours"] for i in ids}
        searches_before = svc.searcher.batches
        together: dict[int, list] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(
            i, c.post("/search", json={"id": i, "k": 5}).json()["neighbours"])) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in ids:  # a batched search answers as a lone one does, up to rounding (which may swap exact ties)
            assert {h["id"] for h in together[i]} == {h["id"] for h in by_id[i]}
            np.testing.assert_allclose([h["similarity"] for h in together[i]], [h["similarity"] for h in by_id[i]],
                                       atol=1e-5)
        assert svc.searcher.batches - searches_before < len(ids)
        results: dict[int, list] = {}

        def ask(i: int) -> None:
            results[i] = upload(c, "/search", images[i], k=12).json()["neighbours"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert svc.batcher.batches - batches_before < len(images)  # some requests shared a batch
    assert svc.searcher.images >= 2 * len(images)  # every search went through the search batcher
    for i, colour in enumerate(colours):
        assert {h["id"] for h in results[i][:4]} == {h["id"] for h in alone[i][:4]}  # its colour; ties may swap
        np.testing.assert_allclose([h["similarity"] for h in results[i]], [h["similarity"] for h in alone[i]],
                                   atol=1e-5)
        assert results[i][0]["label"] == colour


def test_the_service_never_writes_to_the_store(served, tmp_path):
    def snapshot() -> dict:  # SQLite's -shm is where every WAL reader (even mode=ro) keeps its read marks
        return {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
                for p in sorted(served.store.rglob("*")) if not p.name.endswith("-shm")}

    before = snapshot()
    with TestClient(create_app(load_service(served.index, [str(served.head)]))) as c:
        upload(c, "/search", jpeg("red", 8, tmp_path))
        upload(c, "/predict", jpeg("red", 9, tmp_path))
        c.post("/search", json={"path": "red/red_000.jpg"})
        c.get("/images/1?size=64")
    assert snapshot() == before


def test_a_head_of_another_backbone_is_named_the_right_way_round(served, tmp_path):
    """The head's backbone is what the head was made with; the index's is what the service uses."""
    from dataclasses import replace

    from tl_embed.errors import TlEmbedError
    from tl_embed.heads.head import Head

    head = Head.load(served.head)
    head.spec = replace(head.spec, weights_sha256="random")
    head.save(tmp_path / "random.tlh")
    index_spec = Head.load(served.head).spec
    with pytest.raises(TlEmbedError) as e:
        load_service(served.index, [str(tmp_path / "random.tlh")])
    made, uses = str(e.value).split(" was made with ")[1].split(", but this uses ")
    assert made.startswith(head.spec.describe()) and uses.startswith(index_spec.describe())


@pytest.fixture
def live(service):
    """A client whose lifespan starts the service again (tests above stop it when their own client closes)."""
    with TestClient(create_app(service, max_upload=MAX_UPLOAD)) as c:
        yield c


@pytest.mark.parametrize("body", [{"id": True}, {"id": "7"}, {"id": 7.0}, {"id": 1, "k": True}, {"id": 1, "k": "3"},
                                  {"vector": [True] * 16}, {"vector": ["0.5"] * 16}])
def test_integers_and_numbers_are_exactly_that(live, body):
    error_of(live.post("/search", json=body), 422)


@pytest.mark.parametrize("k", ["１０", "+3", "1_0", " 3x"])
def test_a_form_k_is_ascii_digits(live, tmp_path, k):
    assert "whole number" in error_of(upload(live, "/search", jpeg("red", 5, tmp_path), k=k), 422)


@pytest.mark.parametrize("ident", ["1_0", "+1", "１", "0x1", "-1"])
def test_image_ids_are_plain_digits(live, ident):
    assert live.get(f"/images/{ident}").status_code in (404, 422)
    assert live.get("/images/1").status_code == 200


def test_head_answers_where_get_does(live):
    for url in ("/healthz", "/images/1"):
        r = live.head(url)
        assert r.status_code == 200 and r.content == b""


def test_vector_queries_depend_on_direction_only(live, service):
    """float32 norms overflow from ~1e19 and underflow below ~1e-19: the service must not care."""
    v = np.asarray(service.catalog.vector(2), np.float64)
    v = v / np.abs(v).max()
    answers = []
    for scale in (1.0, 3e38, 1e18, 1e-14, 1e-30):
        r = live.post("/search", json={"vector": [float(x) for x in (v * scale).astype(np.float32)], "k": 5})
        assert r.status_code == 200, (scale, r.text)
        answers.append([(n["id"], round(n["similarity"], 4)) for n in r.json()["neighbours"]])
    assert all(a == answers[0] for a in answers), answers
    assert answers[0][0][1] == pytest.approx(1.0, abs=1e-3)
    assert "all zeros" in error_of(live.post("/search", json={"vector": [0.0] * 16}), 422)


def test_only_the_formats_we_read_reach_a_decoder(live, monkeypatch):
    """An EPS/PS upload never reaches Pillow's EPS plugin (which runs Ghostscript where installed)."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    for data in (eps, b"\xc5\xd0\xd3\xc6" + b"\0" * 28 + eps):  # plain and DOS-binary EPS
        r = live.post("/search", files={"image": ("picture.jpg", data, "image/jpeg")})
        assert "not a recognised image format" in error_of(r, 415)
    assert opened == []
