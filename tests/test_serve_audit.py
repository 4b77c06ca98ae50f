"""``serve --audit``: an audit's findings through the API (tiny model, a planted wrong label and copy)."""

from __future__ import annotations

import json

import pytest
from serve_data import COPY, ODD, build_audited
from starlette.testclient import TestClient
from test_serve_api import error_of

from tl_embed.cli.main import main
from tl_embed.errors import TlEmbedError
from tl_embed.serve.app import create_app, load_service
from tl_embed.serve.routes_audit import PAGE_MAX


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    return build_audited(tmp_path_factory.mktemp("audited"), tiny_model)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(load_service(served.index, audit=served.audit))) as c:
        yield c


def test_the_planted_wrong_label_comes_first_with_its_images_by_id(client, served):
    info = client.get("/info").json()["audit"]
    summary = client.get("/audit").json()
    assert info["path"] == str(served.audit) == summary["path"]
    assert {s["key"]: s["count"] for s in summary["sections"]} == info["findings"]
    assert summary["shape"]["counts"] == {"blue": 12, "green": 12, "red": 11} and summary["not_served"] == 0
    page = client.get("/audit/label-issues").json()
    first = page["findings"][0]
    assert (first["rank"], first["path"], first["label"], first["suggested"]) == (1, ODD, "green", "red")
    assert first["split"] == "train" and 0.5 < first["confidence"] <= 1
    image = client.get(first["thumbnail"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    found = client.post("/search", json={"id": first["id"], "k": 1}).json()
    assert found["query"]["path"] == ODD  # the id is the store's
    assert first["evidence"] and {e["label"] for e in first["evidence"]} == {"red"}
    for e in first["evidence"]:
        assert client.post("/search", json={"id": e["id"], "k": 1}).json()["query"]["path"] == e["path"]


def test_the_leaking_copy_is_listed_with_its_original_as_evidence(client):
    page = client.get(f"/audit/cross-split?limit={PAGE_MAX}").json()
    pairs = {(f["path"], f["evidence"][0]["path"]): f for f in page["findings"]}
    copy = pairs[(COPY, "test/blue/blue_000.jpg")]
    assert copy["score"] == copy["evidence"][0]["similarity"] > 0.999
    assert (copy["split"], copy["evidence"][0]["split"]) == ("train", "test")


def test_pages_follow_each_other_and_bad_pages_are_4xx(client):
    whole = client.get(f"/audit/cross-split?limit={PAGE_MAX}").json()
    assert whole["total"] == len(whole["findings"]) > 10
    pieces = [client.get(f"/audit/cross-split?offset={o}&limit=7").json() for o in range(0, whole["total"], 7)]
    assert [f for p in pieces for f in p["findings"]] == whole["findings"]
    assert [f["rank"] for f in whole["findings"]] == list(range(1, whole["total"] + 1))
    beyond = client.get(f"/audit/cross-split?offset={whole['total']}").json()
    assert beyond["findings"] == [] and beyond["total"] == whole["total"]
    assert "label-issues" in error_of(client.get("/audit/nonsense"), 422)
    error_of(client.get(f"/audit/outliers?limit={PAGE_MAX + 1}"), 422)
    error_of(client.get("/audit/outliers?offset=-1"), 422)


def test_without_an_audit_the_routes_say_how_to_load_one(served):
    with TestClient(create_app(load_service(served.index))) as c:
        assert "--audit" in error_of(c.get("/audit"), 404)
        assert "--audit" in error_of(c.get("/audit/label-issues"), 404)
        assert c.get("/info").json()["audit"] is None


def test_findings_of_images_the_index_lacks_have_no_id(served, tmp_path):
    report = json.loads(served.audit.read_text())
    report["label_issues"].append({**report["label_issues"][0], "path": "train/red/added_later.jpg", "score": 0.01})
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(report))
    with TestClient(create_app(load_service(served.index, audit=edited))) as c:
        assert c.get("/audit").json()["not_served"] == 1
        last = c.get("/audit/label-issues").json()["findings"][-1]
        assert last["path"] == "train/red/added_later.jpg" and last["id"] is None and last["thumbnail"] is None


def test_an_audit_of_other_images_or_no_audit_is_refused_in_one_line(served, tmp_path):
    report = json.loads(served.audit.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**report, "root": str(tmp_path / "elsewhere")}))
    with pytest.raises(TlEmbedError, match="audit the index's store"):
        load_service(served.index, audit=other)
    html = tmp_path / "a.html"
    html.write_text("<!doctype html><html></html>")
    not_audit = tmp_path / "x.json"
    not_audit.write_text('{"neighbours": []}')
    nan = tmp_path / "nan.json"
    nan.write_text(served.audit.read_text().replace('"score": ', '"score": NaN, "x": ', 1))
    for path, words in ((html, "not an audit's JSON report"), (not_audit, "not an audit report"),
                        (nan, "not an audit's JSON report"),
                        (tmp_path / "missing.json", "does not exist")):
        with pytest.raises(TlEmbedError, match=words):
            load_service(served.index, audit=path)


def test_the_cli_refuses_a_store_given_as_the_audit(served, capsys):
    assert main(["serve", str(served.index), "--audit", str(served.store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a report" in err[0] and f"tl-embed audit {served.store} --format json" in err[0]
