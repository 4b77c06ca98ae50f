"""Write an audit's findings for people (one self-contained HTML page) and for scripts (JSON, CSV).

The page must open anywhere, mailed or moved: thumbnails are inlined as data URIs, styles inline, nothing
fetched from the network.  Each thumbnail still links to its file, relative to the page, for a closer look.
All three writers read only :class:`~tl_embed.audit.findings.Audit`, so they list the same findings in the
same order, and each writes atomically: an interrupted run leaves the previous report, never half of one.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from ..cpus import cpu_count
from ..embedding.images import PIL_FORMATS, ImageDecodeError, read_regular_file, to_rgb, upright
from ..errors import TlEmbedError, first_line
from ..files import atomic_write
from .findings import Audit, Duplicate, LabelIssue, Outlier
from .page import Thumb, ordered, render, shown_paths

FORMATS = {"html": ".html", "json": ".json", "csv": ".csv"}
SUFFIXES = {".html": "html", ".htm": "html", ".json": "json", ".csv": "csv"}
CSV_COLUMNS = ("kind", "path", "label", "suggested", "confidence", "score", "distance",
               "other", "other_label", "similarity", "split", "other_split")
THUMB_PIXELS = 40_000_000  # a larger decode (after JPEG's draft scaling) costs more memory than a preview is worth


def write_report(audit: Audit, out: Path, fmt: str | None = None) -> Path:
    """Write ``audit`` to ``out`` as ``fmt`` (html, json or csv), or as ``out``'s suffix says."""
    out = Path(out)
    chosen = fmt.lower() if fmt else SUFFIXES.get(out.suffix.lower())
    if chosen not in FORMATS:
        asked = f"format {fmt!r}" if fmt else f"file suffix {out.suffix or '(none)'!r}"
        raise TlEmbedError(f"unknown report {asked}: choose html, json or csv (or name the file .html, .json or .csv)")
    return {"html": write_html, "json": write_json, "csv": write_csv}[chosen](audit, out)


def write_json(audit: Audit, out: Path) -> Path:
    """Every finding and setting, as :meth:`Audit.to_dict` has them (UTF-8, paths unescaped)."""
    text = json.dumps(audit.to_dict(), indent=1, ensure_ascii=False) + "\n"
    atomic_write(out, lambda f: f.write(text.encode()))
    return out


def read_json(path: str | os.PathLike) -> Audit:
    """The audit a JSON report holds (``tl-embed audit STORE --format json``), or one line saying why not."""
    hint = "write one with `tl-embed audit STORE --format json --out AUDIT.json`"
    def finite_only(name: str) -> float:  # NaN or Infinity: no audit writes one, and JSON replies cannot carry it
        raise ValueError(name)

    try:
        data = json.loads(Path(path).read_bytes(), parse_constant=finite_only)
    except FileNotFoundError:
        raise TlEmbedError(f"audit report {path} does not exist: {hint}") from None
    except IsADirectoryError:
        raise TlEmbedError(f"audit report {path} is a folder, not a JSON report: {hint}") from None
    except OSError as e:
        raise TlEmbedError(f"cannot read audit report {path}: {e.strerror}") from None
    except ValueError:  # not UTF-8, not JSON, or NaN in it
        raise TlEmbedError(f"{path} is not an audit's JSON report (an HTML or CSV report cannot be read back): "
                           f"{hint}") from None
    try:
        return Audit.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TlEmbedError(f"{path} is JSON but not an audit report of this version: {hint}") from None


def write_csv(audit: Audit, out: Path) -> Path:
    """One row per finding, grouped by kind (label issues, duplicates, outliers), most suspicious first.

    ``path`` names the image a finding suspects, relative to the image root: a script can drop those rows.
    A duplicate's score is its similarity.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for findings in ordered(audit).values():
        writer.writerows(_row(f) for f in findings)
    atomic_write(out, lambda f: f.write(buf.getvalue().encode()))
    return out


def _row(f: LabelIssue | Duplicate | Outlier) -> dict[str, object]:
    if isinstance(f, LabelIssue):
        return {"kind": "label", "path": f.path, "label": f.given, "suggested": f.suggested,
                "confidence": f.confidence, "score": f.score, "split": f.split}
    if isinstance(f, Duplicate):
        return {"kind": f.kind, "path": f.path, "label": f.label, "score": f.similarity, "other": f.other,
                "other_label": f.other_label, "similarity": f.similarity, "split": f.split,
                "other_split": f.other_split}
    return {"kind": "outlier", "path": f.path, "label": f.label, "suggested": f.nearest_label, "score": f.score,
            "distance": f.distance}


def write_html(audit: Audit, out: Path, thumb: int = 128, limit: int = 200, progress: bool = False) -> Path:
    """One self-contained page: a section per kind of finding (at most ``limit`` each, most suspicious
    first), each suspect beside its neighbours or its duplicate, then the dataset's shape.

    Thumbnails (``thumb`` px) are decoded in a thread pool; an image that cannot be read is shown as a grey
    box saying why.
    """
    out = Path(out)
    root = Path(audit.root).absolute()
    paths = shown_paths(audit, limit)
    thumbs = dict(zip(paths, _thumbnails([root / p for p in paths], thumb, progress), strict=True))
    page = render(audit, thumbs, lambda p: _link(root / p, out.absolute().parent), thumb, limit)
    atomic_write(out, lambda f: f.write(page.encode()))
    return out


def _thumbnails(files: list[Path], size: int, progress: bool) -> list[Thumb]:
    """Each file's thumbnail (in order), decoded by a few threads (Pillow decodes without the GIL)."""
    from tqdm import tqdm

    with ThreadPoolExecutor(min(cpu_count(), 8)) as pool, \
            tqdm(total=len(files), unit="img", desc="audit: thumbnails", disable=not progress, delay=1) as bar:
        def one(path: Path) -> Thumb:
            try:
                return thumbnail(path, size)
            finally:
                bar.update()

        return list(pool.map(one, files))


def thumbnail(path: Path, size: int) -> Thumb:
    """A JPEG data URI of ``path`` at most ``size`` px on its longer side, upright, with its size; or the
    reason it cannot be shown (missing, not an image, corrupt, too large).  Never raises for a bad file."""
    try:
        data = read_regular_file(path)  # refuses a pipe or device named like an image, never waits on one
        if not data:
            return "empty file (0 bytes)"
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            width, height = im.size
            im.draft("RGB", (size, size))  # JPEG: let libjpeg decode at 1/2 .. 1/8 scale
            if im.width * im.height > THUMB_PIXELS:
                return f"too large to preview ({width}x{height})"
            small = to_rgb(upright(im))
            small.thumbnail((size, size))
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=80)
    except ImageDecodeError as e:
        return e.reason
    except UnidentifiedImageError:
        return "not a recognised image format"
    except Image.DecompressionBombError:
        return "too large to preview"
    except Exception as e:  # Pillow's decoders raise many types on garbage: none may stop the report
        return f"cannot be decoded: {first_line(e)}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), small.width, small.height


def _link(image: Path, folder: Path) -> str:
    """A URL for ``image`` relative to ``folder`` (where the page lies), else a file:// URI."""
    try:
        return quote(Path(os.path.relpath(image, folder)).as_posix())
    except ValueError:  # another drive on Windows: no relative path leads there
        return image.as_uri()
