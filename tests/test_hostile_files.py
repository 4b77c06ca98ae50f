"""A generated folder of broken, strange and adversarial files and names, embedded in one run.

The run must end with exit status 0, embed every good image exactly once, record every bad one with
its reason, keep the store readable, and a re-run must embed nothing new and remove nothing.
"""

import io
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tl_embed.cli import main
from tl_embed.embedding.store import EmbeddingStore

GOOD_NAMES = [
    "plain.jpg", "with space.jpg", "trailing space .jpg", "emoji 😀🐱.png", "rtl שלום עולם.jpg",
    "rtl-override \u202egnp.jpg", "hash#1.jpg", "question?.jpg", "percent%41%%.jpg", "-leading-dash.jpg",
    "--prune.jpg", "x" * 220 + ".jpg", "é" * 120 + ".png", "new\nline.jpg", "tab\there.jpg",
    "carriage\rreturn.jpg", "UPPER.JPG", "Mixed.JpEg", "quote'\"back\\slash.jpg", "café nfc.jpg",
    "cafe\u0301 nfd.jpg", "CON.jpg", "star*.jpg", "semi;colon|pipe.jpg",
    "folder.jpg/inside.png",  # a folder named like an image
    "inner/deep.jpg", "ünïcödé 🙂 folder/nested.jpg",
]
FAILURES = {  # relative path -> what the recorded reason must say
    "zero.jpg": r"^empty file \(0 bytes\)$",
    "truncated.jpg": r"^(truncated|corrupt): ",
    "truncated.png": r"^(truncated|corrupt): ",
    "jpeg-header-only.jpg": r"^(truncated|corrupt|not a recognised image format)",
    "png-signature-only.png": r"^(truncated|corrupt|not a recognised image format)",
    "random.jpg": r"^not a recognised image format \(JPEG, PNG, WebP, GIF, BMP or TIFF\)$",
    "text.png": r"^not a recognised image format \(JPEG, PNG, WebP, GIF, BMP or TIFF\)$",
    "html.jpg": r"^not a recognised image format \(JPEG, PNG, WebP, GIF, BMP or TIFF\)$",
    "bomb.png": r"^too large: 16000x16000 pixels",
    "bomb.gif": r"^too large: ",
    "dangling.jpg": r"^broken link: its target .*nowhere\.jpg does not exist$",
    "loop_a.jpg": r"^symlink loop",
    "loop_b.jpg": r"^symlink loop",
    "caf\\xe9.jpg": r"^file name is not valid UTF-8; rename it$",
    "wait.jpg": r"^not a regular file \(a named pipe\)$",
    "device.jpg": r"^not a regular file \(a character device\)$",
}
UNREADABLE = {"gone_folder": r"^broken link", "self_loop": r"^symlink loop"}
FOUND_BROKEN_BY_SCAN = {"dangling.jpg", "loop_a.jpg", "loop_b.jpg", "caf\\xe9.jpg", "wait.jpg", "device.jpg"}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int, fmt: str = "JPEG", **kw) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), fmt, **kw)


def corrupt_exif_jpeg() -> bytes:
    """A fine JPEG whose APP1 Exif segment is garbage (and whose JFIF dpi keeps Pillow from pre-reading it)."""
    jpeg = photo(99, dpi=(72, 72))
    payload = b"Exif\x00\x00" + bytes(range(200))
    i = jpeg.index(b"\xff\xdb")
    return jpeg[:i] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[i:]


def build_corpus(root: Path) -> set[str]:
    """Write the hostile folder; returns the relative paths of the images that must embed."""
    good = set(GOOD_NAMES)
    for i, name in enumerate(GOOD_NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(photo(i, "PNG" if name.endswith(".png") else "JPEG"))
    extra = {"png-inside.jpg": photo(50, "PNG"), "corrupt-exif.jpg": corrupt_exif_jpeg(),
             "good.gif": photo(51, "GIF"), "good.bmp": photo(52, "BMP"), "good.webp": photo(53, "WEBP"),
             "good.tiff": photo(54, "TIFF")}
    for name, data in extra.items():
        (root / name).write_bytes(data)
    good |= set(extra)
    (root / "inner" / "up").symlink_to("..")  # a folder link to the parent: scanned once, not 40 times
    (root / "inner" / "here").symlink_to(".")

    jpeg, png = photo(60), photo(61, "PNG")
    broken = {"zero.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) * 6 // 10], "truncated.png": png[: len(png) // 2],
              "jpeg-header-only.jpg": b"\xff\xd8\xff\xe0" + os.urandom(64), "png-signature-only.png": png[:8],
              "random.jpg": np.random.default_rng(0).bytes(5000), "text.png": b"this is not a PNG\n",
              "html.jpg": b"<html><body>404 not found</body></html>",
              "bomb.png": encode(Image.new("1", (16_000, 16_000)), "PNG"),
              "bomb.gif": b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00,"  # 4.3 GP, 29 bytes
                          + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00\x08\x02\x4c\x01\x00;"}
    for name, data in broken.items():
        (root / name).write_bytes(data)
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "loop_a.jpg").symlink_to("loop_b.jpg")
    (root / "loop_b.jpg").symlink_to("loop_a.jpg")
    fd = os.open(os.fsencode(root) + b"/caf\xe9.jpg", os.O_WRONLY | os.O_CREAT, 0o644)  # latin-1, not UTF-8
    os.write(fd, photo(62))
    os.close(fd)
    os.mkfifo(root / "wait.jpg")  # opening it for reading would block forever
    (root / "device.jpg").symlink_to("/dev/zero")  # reading it would never end
    (root / "gone_folder").symlink_to(root.parent / "unmounted_drive")
    (root / "self_loop").symlink_to("self_loop")

    (root / ".hidden.jpg").write_bytes(b"hidden: ignored")  # neither embedded nor a failure
    (root / "notes.txt").write_text("not an image: ignored")
    (root / "README").write_text("no suffix: ignored")
    return good


def check_store(out: Path, good: set[str]) -> None:
    with EmbeddingStore.open(out) as s:
        paths = list(s.paths)
        assert sorted(paths) == sorted(good) and len(paths) == len(set(paths))  # each good image once
        assert s.embeddings.shape == (len(good), 16) and np.isfinite(s.embeddings).all()
        failures = {f.path: f.reason for f in s.failures}
    assert set(failures) == set(FAILURES)
    for path, pattern in FAILURES.items():
        assert re.search(pattern, failures[path]), (path, failures[path])


def test_hostile_folder_embeds_the_good_records_the_bad_and_reruns_clean(tmp_path, tiny_model, capsys):
    root = tmp_path / "hostile"
    root.mkdir()
    good = build_corpus(root)
    out = tmp_path / "s.tle"
    args = ["embed", str(root), "--out", str(out), "--model", tiny_model, "--layer", "features", "-q"]

    assert main(args) == 0
    report = capsys.readouterr().out
    assert f"{len(good)} embedded" in report and f"{len(FAILURES)} failed" in report
    assert "Could not read 2 of its folders and links" in report
    check_store(out, good)

    assert main(args) == 0  # re-run: nothing new, nothing removed, failures known
    report = capsys.readouterr().out
    assert f"0 embedded, {len(good)} unchanged (skipped), {len(FAILURES)} failed" in report
    assert "removed" not in report
    check_store(out, good)

    fresh = tmp_path / "fresh.tle"
    r = subprocess.run([sys.executable, "-m", "tl_embed.cli", *args[:2], "--out", str(fresh), *args[4:]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"{len(good)} embedded" in r.stdout
    check_store(fresh, good)


def test_scan_never_opens_links_pipes_or_bad_names_and_reports_unreadable_links(tmp_path):
    from tl_embed.embedding.scan import scan

    root = tmp_path / "hostile"
    root.mkdir()
    good = build_corpus(root)
    found = scan(root)
    assert {f.rel for f in found.files} == good | (set(FAILURES) - FOUND_BROKEN_BY_SCAN)
    assert {f.path for f in found.failures} == FOUND_BROKEN_BY_SCAN
    assert set(found.unreadable) == set(UNREADABLE)
    for name, pattern in UNREADABLE.items():
        assert re.search(pattern, found.unreadable[name])
