"""The search page in a real browser: Debian's chromium driven by Playwright against the real server.

Upload an image, see its neighbours and the head's label, click a neighbour (by keyboard) and see its
neighbours; dropped and pasted images; the page at phone width; the Audit tab of ``serve --audit``.
Screenshots are saved in the tests' tmp folders.
"""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest
import uvicorn
from conftest import COLORS, make_image
from playwright.sync_api import expect, sync_playwright
from serve_data import COPY, ODD, build, build_audited

from tl_embed.serve.app import create_app, load_service

CHROMIUM = "/usr/bin/chromium"


def serving(app):
    """The real uvicorn server of ``app`` on a free loopback port, in a thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    served = build(tmp_path_factory.mktemp("browser"), tiny_model)
    yield from serving(create_app(load_service(served.index, [str(served.head)])))


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_model):
    served = build_audited(tmp_path_factory.mktemp("audited"), tiny_model)
    yield from serving(create_app(load_service(served.index, [str(served.head)], audit=served.audit)))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # CI runs as root
        yield b
        b.close()


def test_upload_see_neighbours_click_one(server, browser, tmp_path):
    query = make_image(tmp_path / "query.jpg", COLORS["green"], 4711)
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
    page.goto(server)
    expect(page.locator("#info")).to_contain_text("12 images")
    page.fill("#k", "5")
    page.set_input_files("#file", str(query))
    results = page.locator("#results button")
    expect(results).to_have_count(5)
    expect(results.first.locator(".label")).to_have_text("green")
    expect(page.locator("#predictions")).to_contain_text("m: green")
    expect(page.locator("#status")).to_contain_text("5 neighbours")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)")
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)

    clicked = results.nth(1)
    clicked_id = clicked.get_attribute("data-id")
    clicked_path = clicked.get_attribute("title")
    clicked.focus()
    page.keyboard.press("Enter")  # usable by keyboard: a result is a button
    expect(page.locator("#query-caption")).to_contain_text(clicked_path)
    expect(page.locator(f"#results button[data-id='{clicked_id}']")).to_have_count(0)  # not its own neighbour
    expect(results).to_have_count(5)
    expect(page.locator("#query-img")).to_have_attribute("src", f"/images/{clicked_id}?size=512")
    page.wait_for_function("document.getElementById('query-img').naturalWidth > 0")
    page.screenshot(path=str(tmp_path / "clicked.png"), full_page=True)
    assert (tmp_path / "clicked.png").stat().st_size > 5_000
    assert errors == []


NO_BROKEN_IMAGES = """() => [...document.images].filter((i) =>
  (i.checkVisibility() || i.getAttribute("src")) && !(i.complete && i.naturalWidth > 0)).map((i) => i.id || i.src)"""


def test_page_before_any_query_shows_no_empty_query_and_formats_recall(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.url}: {r.status}") if r.status >= 400 else None)
    page.goto(server)
    expect(page.locator("#info")).to_contain_text("recall@10 1.000")  # three decimals, not "1"
    for hidden in ("#query", "#query-title", "#query-img", "#query-caption"):
        expect(page.locator(hidden)).to_be_hidden()
    assert page.evaluate("getComputedStyle(document.getElementById('query')).display") == "none"
    assert page.evaluate(NO_BROKEN_IMAGES) == []  # nothing shown as a broken-image icon
    icon = page.evaluate("document.querySelector('link[rel=icon]').href")
    assert page.request.get(icon).ok and page.request.get(f"{server}/favicon.ico").ok
    page.fill("#k", "3")
    page.set_input_files("#file", str(make_image(tmp_path / "q.jpg", COLORS["blue"], 8)))
    expect(page.locator("#query")).to_be_visible()
    expect(page.locator("#query-title")).to_be_visible()
    expect(page.locator("#results button")).to_have_count(3)
    page.wait_for_function("[...document.images].every((i) => i.complete && i.naturalWidth > 0)")
    assert page.evaluate(NO_BROKEN_IMAGES) == []
    assert failed == []

def test_readable_at_phone_width_and_errors_shown(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    page.goto(server)
    expect(page.locator("#info")).to_contain_text("12 images")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image at all")
    page.set_input_files("#file", str(not_an_image))
    expect(page.locator("#status")).to_contain_text("not a recognised image format")
    page.set_input_files("#file", str(make_image(tmp_path / "q.jpg", COLORS["red"], 5)))
    expect(page.locator("#results button")).to_have_count(12)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    box = page.locator("#results button").first.bounding_box()
    assert 120 <= box["width"] <= 180  # two columns of thumbnails


DELIVER = """async ([how, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], "given.jpg", { type: "image/jpeg" }));
  if (how === "drop") {
    document.getElementById("drop").dispatchEvent(
      new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
  } else {
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
  }
}"""


@pytest.mark.parametrize("how, colour", [("drop", "blue"), ("paste", "red")])
def test_dropped_and_pasted_images_are_searched(server, browser, tmp_path, how, colour):
    image = make_image(tmp_path / "given.jpg", COLORS[colour], 31)
    page = browser.new_page()
    page.goto(server)
    expect(page.locator("#info")).to_contain_text("12 images")
    page.fill("#k", "3")
    page.evaluate(DELIVER, [how, base64.b64encode(image.read_bytes()).decode()])
    expect(page.locator("#query-caption")).to_have_text("given.jpg")
    expect(page.locator("#results .label")).to_have_text([colour] * 3)


def test_audit_tab_shows_the_suspects_and_a_click_searches_one(audited, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.url}: {r.status}") if r.status >= 400 else None)
    page.goto(audited)
    expect(page.locator("#tab-audit")).to_contain_text("Audit (")
    expect(page.locator("#audit-view")).to_be_hidden()
    page.click("#tab-audit")
    expect(page.locator("#search-view")).to_be_hidden()
    expect(page.locator("#audit-sections button").first).to_have_attribute("aria-pressed", "true")
    first = page.locator("#audit-findings > li").first
    expect(first.locator(".thumb.suspect")).to_have_attribute("title", ODD)
    expect(first.locator(".facts")).to_contain_text("green → red")
    expect(page.locator("#audit-info")).to_contain_text("35 images, 3 classes")
    page.wait_for_function("[...document.querySelectorAll('#audit-findings > li:first-child img')]"
                           ".every((i) => i.complete && i.naturalWidth > 0)")  # the rest load lazily
    page.screenshot(path=str(tmp_path / "audit.png"), full_page=True)

    page.locator("#audit-sections button", has_text="across splits").click()
    expect(page.locator("#audit-what")).to_contain_text("evaluation image")
    copy = page.locator("#audit-findings > li", has=page.locator(f".thumb.suspect[title='{COPY}']"))
    expect(copy.first.locator(".evidence .thumb")).to_have_attribute("title", "test/blue/blue_000.jpg")
    expect(page.locator("#audit-status")).to_contain_text("shown")

    neighbour = copy.first.locator(".evidence .thumb")
    ident = neighbour.get_attribute("data-id")
    neighbour.focus()
    page.keyboard.press("Enter")  # a finding's image is a button: it searches its neighbours
    expect(page.locator("#search-view")).to_be_visible()
    expect(page.locator("#tab-search")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#query-caption")).to_contain_text("test/blue/blue_000.jpg")
    expect(page.locator(f"#results button[data-id='{ident}']")).to_have_count(0)
    expect(page.locator("#results button").first).to_be_visible()
    assert errors == []


def test_audit_tab_at_phone_width_and_its_more_button(audited, browser):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    page.goto(audited)
    page.click("#tab-audit")
    page.locator("#audit-sections button", has_text="across splits").click()
    findings = page.locator("#audit-findings > li")
    expect(findings).to_have_count(50)  # a page at a time
    total = int(page.locator("#audit-sections button", has_text="across splits").inner_text().split("(")[1][:-1])
    assert total > 50
    page.click("#audit-more")
    shown = min(total, 100)
    expect(findings).to_have_count(shown)
    more = expect(page.locator("#audit-more"))
    more.to_be_visible() if shown < total else more.to_be_hidden()
    expect(page.locator("#audit-status")).to_have_text(f"{shown} of {total} shown")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
