"""HTML contact sheets: each query image followed by its neighbours, thumbnails inlined."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from ..embedding.images import PIL_FORMATS, to_rgb, upright
from ..files import atomic_write


def thumbnail_uri(path: Path, size: int = 160) -> str:
    """A small inline JPEG (data URI) so the HTML page works when moved or mailed."""
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            im.draft("RGB", (size, size))
            thumb = to_rgb(upright(im)).copy()  # a copy outlives the file
            thumb.thumbnail((size, size))
    except (OSError, ValueError, SyntaxError):
        return ""
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def shown_path(path: Path, root: Path | None) -> str:
    """``path`` relative to the store's image root when it lies inside it (as the store names it), else absolute."""
    full = Path(os.path.abspath(path))
    if root is not None:
        for candidate in (full, full.resolve()):
            if candidate.is_relative_to(root):
                return candidate.relative_to(root).as_posix()
    return str(full)


def breakable(path: str) -> str:
    """Escaped ``path`` that may wrap after each '/' (<wbr>), so a caption breaks between names, not inside one."""
    return "/<wbr>".join(html.escape(part) for part in path.split("/"))


def contact_sheet(results: list[tuple[Path, list[tuple[int, str, float]]]], out: Path,
                  title: str, root: Path | None = None) -> None:
    """HTML page: each query image followed by its neighbours (rank, score, path) as thumbnails.

    Paths are shown relative to the image root ``root`` (neighbours' relative paths are resolved there).
    """
    def tile(path: Path, heading: str) -> str:
        src = thumbnail_uri(path)
        img = (f'<img src="{src}" alt="" title="{html.escape(str(path))}">' if src
               else '<div class="missing">no preview</div>')
        return (f'<figure>{img}<figcaption><b>{html.escape(heading)}</b> '
                f'{breakable(shown_path(path, root))}</figcaption></figure>')

    rows = []
    for query, hits in results:
        tiles = [tile(query, "query")]
        tiles += [tile(root / p if root else Path(p), f"#{rank} {score:.3f}") for rank, p, score in hits]
        rows.append(f'<section>{"".join(tiles)}</section>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:16px}}section{{display:flex;flex-wrap:wrap;gap:8px;
margin-bottom:18px;border-bottom:1px solid #ddd;padding-bottom:12px}}figure{{margin:0;width:170px}}
figure:first-child{{outline:3px solid #2a6}}img{{max-width:160px;max-height:160px;display:block}}
figcaption{{font-size:11px;overflow-wrap:break-word}}figcaption b{{display:block}}
.missing{{width:160px;height:100px;background:#eee}}</style>
</head><body><h1>{html.escape(title)}</h1>{"".join(rows)}</body></html>"""
    atomic_write(out, lambda f: f.write(page.encode()))
