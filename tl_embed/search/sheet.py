"""HTML contact sheets: each query image followed by its neighbours, thumbnails inlined."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from ..embedding.images import to_rgb, upright
from ..files import atomic_write


def thumbnail_uri(path: Path, size: int = 160) -> str:
    """A small inline JPEG (data URI) so the HTML page works when moved or mailed."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            thumb = to_rgb(upright(im)).copy()  # a copy outlives the file
            thumb.thumbnail((size, size))
    except (OSError, ValueError, SyntaxError):
        return ""
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def contact_sheet(results: list[tuple[Path, list[tuple[int, str, float]]]], out: Path,
                  title: str, root: Path | None = None) -> None:
    """HTML page: each query image followed by its neighbours (rank, path, score) as thumbnails."""
    def tile(path: Path, caption: str) -> str:
        src = thumbnail_uri(path)
        img = f'<img src="{src}" alt="">' if src else '<div class="missing">no preview</div>'
        return f'<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>'

    rows = []
    for query, hits in results:
        tiles = [tile(query, f"query: {query.name}")]
        for rank, p, score in hits:
            full = (root / p) if root and not Path(p).is_absolute() else Path(p)
            tiles.append(tile(full, f"#{rank} {score:.3f} {p}"))
        rows.append(f'<section>{"".join(tiles)}</section>')
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:16px}}section{{display:flex;flex-wrap:wrap;gap:8px;
margin-bottom:18px;border-bottom:1px solid #ddd;padding-bottom:12px}}figure{{margin:0;width:170px}}
figure:first-child{{outline:3px solid #2a6}}img{{max-width:160px;max-height:160px;display:block}}
figcaption{{font-size:11px;word-break:break-all}}.missing{{width:160px;height:100px;background:#eee}}</style>
</head><body><h1>{html.escape(title)}</h1>{"".join(rows)}</body></html>"""
    atomic_write(out, lambda f: f.write(page.encode()))
