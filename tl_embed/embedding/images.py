"""Image file -> RGB uint8 array of the backbone's input size.

Every way a real photo folder can be odd (EXIF rotation or corrupt EXIF, palette/alpha/CMYK/16-bit
modes, truncated or empty files, decompression bombs, pipes or devices named like images) ends either
in a correct RGB array or in an :class:`ImageDecodeError` with a short reason; nothing here crashes
or blocks a batch run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import (  # noqa: F401 - registers the decoders of PIL_FORMATS (Pillow preloads only some)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# The decoders Pillow may use, whatever a file is named: the formats above (JPEG's also opens phone cameras'
# multi-picture JPEGs as MPO).  Without a list Pillow tries every plugin it has, EPS among them, which runs
# Ghostscript when installed: an attack surface for a service that takes files from strangers.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
MAX_PIXELS = 250_000_000  # larger than any camera; a bigger header is a decompression bomb
EXIF_ORIENTATION = 0x0112
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white

# Our own MAX_PIXELS check replaces Pillow's warning/error pair (its 89 MP warning fires on real
# 100 MP camera files); Pillow keeps a hard stop for formats whose size we cannot see up front.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# Corrupt EXIF is common in camera and phone files; we ignore it (see exif_orientation), so do its warnings.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}  # EXIF orientation -> undo it
_FILE_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


class ImageDecodeError(Exception):
    """A file that cannot become an image; ``reason`` is one short line for reports."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (size, size, 3) uint8
    width: int  # original size, after EXIF rotation
    height: int
    sha256: str  # of the file's bytes


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def not_regular_reason(mode: int) -> str:
    return f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


def os_error_reason(e: OSError) -> str:
    """One line for why a file or folder could not be opened."""
    if e.errno == errno.ELOOP:
        return "symlink loop (the link leads back to itself)"
    if e.errno == errno.ENOENT:
        return "missing (a broken link, or deleted during the run)"
    return f"unreadable: {e.strerror or e}"


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; a pipe or device is refused, never waited on.

    The scan checked the type already; this catches a file swapped for a pipe since then.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ImageDecodeError(os_error_reason(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(not_regular_reason(mode))
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise ImageDecodeError(os_error_reason(e)) from None
    finally:
        os.close(fd)


def load_image(path: str | Path, size: int) -> DecodedImage:
    """Read, hash and decode ``path`` into a ``size`` x ``size`` RGB array (bilinear, no crop)."""
    data = read_regular_file(path)
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    pixels, width, height = decode_bytes(data, size)
    return DecodedImage(pixels, width, height, hashlib.sha256(data).hexdigest())


def decode_bytes(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Decode encoded image bytes; returns (pixels, original width, original height).

    ``max_pixels`` lets a service refuse smaller bombs than a batch run does: it decodes many
    uploads at once.
    """
    pixels, w, h = _decode(data, size, max_pixels)
    if w * h >= RELEASE_PIXELS:  # the full-size image is gone with _decode's frame: hand its memory back
        release_memory()
    return pixels, w, h


def _decode(data: bytes, size: int, max_pixels: int) -> tuple[np.ndarray, int, int]:
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"too large: {w}x{h} pixels (limit {max_pixels:,})")
            if img.format in ("JPEG", "MPO") and min(w, h) >= 2 * size:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: several times faster for big photos
                # (phone cameras' multi-picture JPEGs open as MPO: 83 ms -> 28 ms at 12 MP).
                img.draft("RGB", (size, size))
            img.load()
            if exif_orientation(img) in (5, 6, 7, 8):  # rotated 90 degrees
                w, h = h, w
            rgb = to_rgb(upright(img))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format (JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise ImageDecodeError(f"{reason}: {msg}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8), w, h


RELEASE_PIXELS = 16_000_000  # a decode this large leaves ~50 MB+ behind in malloc's arenas


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Give freed memory back to the OS.  glibc keeps large freed blocks in its arenas: a few concurrent
    decodes of huge images would leave a server hundreds of MB larger for good; trimming after each
    large decode hands that memory back."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it (EXIF orientation applied); the same object when already upright."""
    orientation = exif_orientation(img)
    return img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright), or 1 when the EXIF block is unreadable: the pixels still are."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        return orientation if orientation in _TRANSPOSE else 1
    except Exception:  # Pillow's EXIF parser raises many types on garbage; none matters here
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would show it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, RGBX ...
    return img.convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale: scale the full range to 8 bits (Pillow's convert would clip at 255)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scaled = arr / 257.0
    elif img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo or 1.0) * 255.0 if hi > 1.0 or lo < 0.0 else arr * 255.0
    else:  # "I": 32-bit; PNG stores 16-bit grayscale this way in some Pillow versions
        scaled = arr / 257.0 if arr.max(initial=0) > 255 else arr
    gray = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
