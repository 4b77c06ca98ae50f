import io

import numpy as np
import pytest
from PIL import Image

from tl_embed.embedding import images
from tl_embed.embedding.images import ImageDecodeError, decode_bytes, load_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[images.EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    px, w, h = decode_bytes(encode(img, "JPEG", exif=exif, quality=95), 16)
    assert (w, h) == (20, 40)  # reported size is the displayed one
    assert px[1, 8, 0] > 200 and px[1, 8, 2] < 60  # top row is now red
    assert px[-2, 8, 2] > 200 and px[-2, 8, 0] < 60  # bottom row blue


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    px, _, _ = decode_bytes(encode(img, "PNG"), 8)
    assert tuple(px[7, 7]) == (255, 255, 255)
    assert tuple(px[0, 0]) == (0, 0, 255)


def test_palette_with_transparency_and_la_mode():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.putpixel((1, 1), 1)
    px, _, _ = decode_bytes(encode(p, "PNG", transparency=0), 8)
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[1, 1]) == (10, 200, 10)
    la = Image.new("LA", (4, 4), (100, 255))
    px, _, _ = decode_bytes(encode(la, "PNG"), 4)
    assert tuple(px[0, 0]) == (100, 100, 100)


def test_cmyk_grayscale_and_16_bit():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink = white
    px, _, _ = decode_bytes(encode(cmyk, "JPEG", quality=100), 8)
    assert px.min() > 245
    gray = Image.new("L", (8, 8), 77)
    px, _, _ = decode_bytes(encode(gray, "PNG"), 8)
    assert px.shape == (8, 8, 3) and (px == 77).all()
    arr16 = np.full((8, 8), 65535, np.uint16)
    arr16[0, 0] = 32896  # half range
    px, _, _ = decode_bytes(encode(Image.fromarray(arr16), "PNG"), 8)
    assert px[4, 4, 0] == 255 and 126 <= px[0, 0, 0] <= 130  # scaled, not clipped


def test_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    px, _, _ = decode_bytes(data, 8)
    assert px[4, 4, 0] > 200 and px[4, 4, 2] < 50


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF", "PNG"])
def test_other_formats_decode(fmt):
    px, w, h = decode_bytes(encode(Image.new("RGB", (30, 20), (10, 120, 240)), fmt), 24)
    assert px.shape == (24, 24, 3) and (w, h) == (30, 20)
    assert abs(int(px[5, 5, 2]) - 240) < 8


def test_draft_mode_matches_full_decode():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((2000, 1500), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=95)
    fast, _, _ = decode_bytes(data, 64)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 6


def test_a_phone_cameras_multi_picture_jpeg_is_decoded_like_a_plain_one():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((2000, 1500))
    mpo = encode(big, "MPO", quality=90, save_all=True, append_images=[big.rotate(90)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    pixels, w, h = decode_bytes(mpo, 64)
    assert (w, h) == (2000, 1500)
    np.testing.assert_array_equal(pixels, decode_bytes(encode(big, "JPEG", quality=90), 64)[0])  # draft too


def test_broken_files_raise_typed_errors(tmp_path):
    ok = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    cases = {"empty.jpg": b"", "truncated.jpg": ok[: len(ok) // 2], "text.jpg": b"hello, not an image"}
    reasons = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError) as e:
            load_image(tmp_path / name, 16)
        reasons[name] = e.value.reason
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "not a recognised" in reasons["text.jpg"]


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (16_000, 16_000)), "PNG")  # 256 MP, a few KB on disk
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_bytes(bomb, 16)


def test_load_image_hashes_the_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (5, 5)), "PNG"))
    import hashlib

    assert load_image(path, 8).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding ``payload`` inserted after its JFIF header."""
    import struct

    i = jpeg.index(b"\xff\xdb")  # first quantisation table: after SOI and APP0
    return jpeg[:i] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[i:]


@pytest.mark.parametrize("exif", [b"Exif\x00\x00" + bytes(range(200)),  # not a TIFF header
                                  b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05",  # IFD cut short
                                  b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02\x01\x12\x00\x03"])
def test_corrupt_exif_is_ignored_when_the_pixels_decode(exif):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = (0, 0, 255)
    clean = encode(Image.fromarray(arr), "JPEG", quality=95, dpi=(72, 72))  # dpi: Pillow won't pre-read EXIF
    px, w, h = decode_bytes(with_app1(clean, exif), 16)
    expected, _, _ = decode_bytes(clean, 16)
    assert (w, h) == (40, 20)
    np.testing.assert_array_equal(px, expected)


def test_pipes_devices_and_folders_are_refused_without_reading(tmp_path):
    import os
    import threading

    os.mkfifo(tmp_path / "wait.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    cases = {"wait.jpg": "not a regular file (a named pipe)", "folder.jpg": "not a regular file (a folder)",
             "/dev/zero": "not a regular file (a character device)",
             "loop.jpg": "symlink loop (the link leads back to itself)",
             "gone.jpg": "missing (a broken link, or deleted during the run)"}
    reasons = {}

    def load_all():
        for name in cases:
            try:
                load_image(tmp_path / name, 16)
            except ImageDecodeError as e:
                reasons[name] = e.reason

    t = threading.Thread(target=load_all, daemon=True)  # a blocking open would hang here, not the suite
    t.start()
    t.join(timeout=20)
    assert not t.is_alive() and reasons == cases


def test_memory_of_large_decodes_goes_back_to_the_os():
    """Eight concurrent decodes of a 7000 x 7000 PNG (what a service's uploads can be) must not leave the
    process hundreds of MB larger for good: glibc keeps such blocks unless trimmed."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import io, threading
        from PIL import Image
        from tl_embed.embedding.images import decode_bytes
        def rss_mb():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
        buf = io.BytesIO()
        Image.new("RGB", (7000, 7000), (10, 200, 30)).save(buf, "PNG")
        data = buf.getvalue()
        decode_bytes(data, 224, 50_000_000)
        start = rss_mb()
        for _ in range(3):
            threads = [threading.Thread(target=decode_bytes, args=(data, 224, 50_000_000)) for _ in range(8)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        print(start, rss_mb())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    start, end = map(int, r.stdout.split())
    assert end - start < 100, (start, end)  # without trimming: +200 to +500 MB
