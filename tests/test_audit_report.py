"""The audit's reports: a self-contained HTML page (also opened in a real chromium), JSON and CSV for scripts.

The audit is built by hand over generated images, one of them unreadable and one named with HTML's
special characters, so what is checked here is the writing, not the analysis.
"""

from __future__ import annotations

import csv
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import COLORS, make_folder, make_image
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tl_embed.audit import report
from tl_embed.audit.findings import Audit, DatasetShape, Duplicate, LabelIssue, Neighbour, Outlier
from tl_embed.audit.report import read_json, thumbnail, write_csv, write_html, write_json, write_report
from tl_embed.errors import TlEmbedError

CHROMIUM = "/usr/bin/chromium"
HOSTILE = 'train/red/<b>&"x.jpg'
BROKEN = "train/green/broken.jpg"
SECTIONS = ("summary", "label-issues", "cross-split", "label-conflict", "outliers", "shape")


def _audit(root: Path) -> Audit:
    make_folder(root, per_class=3, split="train")
    make_folder(root, per_class=2, split="val", seed=1)
    make_image(root / HOSTILE, COLORS["green"], 99)
    (root / BROKEN).write_bytes(b"not a picture at all")

    def near(*paths: str) -> tuple[Neighbour, ...]:
        return tuple(Neighbour(p, p.split("/")[1], 0.95 - 0.05 * i) for i, p in enumerate(paths))

    greens = near("train/green/green_000.jpg", "train/green/green_001.jpg", "val/green/green_000.jpg")
    return Audit(
        store="/data/stores/S.tle", root=str(root), backbone="efficientnet_b0",
        shape=DatasetShape(rows=17, labelled=17, counts={"red": 6, "green": 6, "blue": 5},
                           splits={"train": 12, "val": 5}, tiny=["blue"], imbalance=1.2,
                           confused=[("red", "green", 2), ("green", "blue", 1)], failed=1, oof_accuracy=0.82),
        label_issues=[
            LabelIssue("train/red/red_001.jpg", "red", "green", 0.7, 0.6, greens, "train"),
            LabelIssue(HOSTILE, "red", '<script>alert("x")</script>', 0.9, 0.95, greens, "train"),
            LabelIssue(BROKEN, "green", "blue", 0.5, 0.4, near("train/blue/blue_000.jpg"), "train"),
        ],
        duplicates=[
            Duplicate("cross-split", "val/red/red_000.jpg", "train/red/red_000.jpg", 0.991, "red", "red",
                      "val", "train"),
            Duplicate("label-conflict", "train/blue/blue_001.jpg", "train/green/green_002.jpg", 0.97, "blue", "green",
                      "train", "train"),
        ],
        outliers=[Outlier("val/blue/blue_001.jpg", "blue", 4.2, 0.61, "green", near("train/green/green_002.jpg"))],
        notes=["near-duplicates with the same label and split were not reported"],
        settings={"k": 10, "folds": 5, "head": "logistic", "seconds": {"label issues": 1.234, "duplicates": 0.25}},
    )


@pytest.fixture
def audit(tmp_path) -> Audit:
    return _audit(tmp_path / "images")


class _Page(HTMLParser):
    """The tags a check needs: every <img>'s src, every link, every element's id, the grey placeholders."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: list[str] = []
        self.missing = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.images += [a["src"]] if tag == "img" else []
        self.links += [a["href"]] if tag == "a" else []
        self.ids += [a["id"]] if "id" in a else []
        self.missing += "missing" in (a.get("class") or "").split()


def test_html_has_every_section_embeds_thumbnails_and_escapes_names(audit, tmp_path):
    (tmp_path / "report").mkdir()
    out = write_html(audit, tmp_path / "report" / "audit.html")
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    assert set(SECTIONS) <= set(page.ids)
    for heading in ("Likely wrong labels", "Near-duplicates across splits", "Near-duplicates with different labels",
                    "Outliers", "Dataset shape", "Summary"):
        assert f"<h2>{heading}" in text
    assert page.images and all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    assert page.missing == 1 and "not a recognised image format" in text  # the broken file: a grey box, a reason
    assert not re.search(r'https?:|(src|href)="//|url\(', text)  # nothing to fetch from anywhere
    assert "<script" not in text and '<b>&"x' not in text
    assert "&lt;b&gt;&amp;&quot;x.jpg" in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    files = [unquote(h) for h in page.links if not h.startswith("#")]
    assert files and all((out.parent / f).resolve().is_file() for f in files)  # relative links to the images
    assert any(f.endswith('<b>&"x.jpg') for f in files)
    assert "efficientnet_b0" in text and "1.23" in text and "were not reported" in text  # the summary
    assert ">6</span>" in text and "0.820" in text  # a class's bar, the out-of-fold accuracy
    assert len(set(page.images)) == 11  # 12 images shown (some twice), the broken one as a placeholder


def test_html_says_how_many_findings_are_not_shown(audit, tmp_path):
    text = write_html(audit, tmp_path / "audit.html", limit=1).read_text(encoding="utf-8")
    assert "… and 2 more not shown" in text
    assert text.index("&lt;b&gt;") < text.index('id="cross-split"')  # the highest score is the one shown
    assert "red_001.jpg" not in text


def test_json_round_trips(audit, tmp_path):
    data = json.loads(write_json(audit, tmp_path / "audit.json").read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(audit.to_dict()))
    assert (len(data["label_issues"]), len(data["duplicates"]), len(data["outliers"])) == (3, 2, 1)
    assert data["label_issues"][1]["path"] == HOSTILE
    assert read_json(tmp_path / "audit.json") == audit  # what serve --audit reads back: the same findings


def test_csv_has_a_row_per_finding_with_its_path(audit, tmp_path):
    with write_csv(audit, tmp_path / "audit.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert [r["kind"] for r in rows] == ["label", "label", "label", "cross-split", "label-conflict", "outlier"]
    assert [r["path"] for r in rows[:3]] == [HOSTILE, "train/red/red_001.jpg", BROKEN]  # by score
    assert rows[3]["other"] == "train/red/red_000.jpg" and float(rows[3]["similarity"]) == 0.991
    assert rows[5]["suggested"] == "green" and rows[0]["split"] == "train" and rows[5]["split"] == ""


def test_report_format_from_the_option_or_the_suffix(audit, tmp_path):
    assert json.loads(write_report(audit, tmp_path / "a.JSON").read_text())["backbone"] == "efficientnet_b0"
    assert write_report(audit, tmp_path / "a.txt", fmt="csv").read_text().startswith("kind,path,")
    assert write_report(audit, tmp_path / "a.htm").read_text().startswith("<!doctype html>")
    with pytest.raises(TlEmbedError, match="choose html, json or csv"):
        write_report(audit, tmp_path / "a.xml")
    with pytest.raises(TlEmbedError, match="'pdf'"):
        write_report(audit, tmp_path / "a.html", fmt="pdf")
    assert not (tmp_path / "a.xml").exists()


def test_thumbnail_upright_small_and_never_raises(tmp_path, monkeypatch):
    photo = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (400, 200), "red").save(photo, exif=exif)
    _, w, h = thumbnail(photo, 64)
    assert (w, h) == (32, 64)
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "empty.jpg").touch()
    assert "named pipe" in thumbnail(tmp_path / "pipe.jpg", 64)  # refused, not waited on
    assert "empty" in thumbnail(tmp_path / "empty.jpg", 64)
    assert "missing" in thumbnail(tmp_path / "gone.jpg", 64)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[:400])
    assert thumbnail(cut, 64).startswith("cannot be decoded")
    monkeypatch.setattr(report, "THUMB_PIXELS", 100)
    assert thumbnail(make_image(tmp_path / "big.png", COLORS["red"], 1, (20, 10)), 64) == "too large to preview (20x10)"


NOT_DECODED = "[...document.images].filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt)"


def test_report_renders_in_a_real_browser(audit, tmp_path):
    out = write_html(audit, tmp_path / "audit.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # CI runs as root
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            fetched: list[str] = []
            page.on("request", lambda r: fetched.append(r.url) if not r.url.startswith(("data:", "file:")) else None)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("img").count() >= 12
            assert page.evaluate(NOT_DECODED) == []  # every thumbnail decoded
            for heading in ("Summary", "Likely wrong labels", "Near-duplicates across splits",
                            "Near-duplicates with different labels", "Outliers", "Dataset shape"):
                expect(page.get_by_role("heading", name=heading)).to_be_visible()
            expect(page.locator(".missing")).to_contain_text("not a recognised image format")
            shot = tmp_path / "audit.png"
            page.screenshot(path=str(shot), full_page=True)

            page.set_viewport_size({"width": 360, "height": 740})
            assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling on a phone
        finally:
            browser.close()
    assert fetched == [] and errors == []
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert im.height > 900 and colours and len(colours) > 100  # not blank: text, bars and pictures
