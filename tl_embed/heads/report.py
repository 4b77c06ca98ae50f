"""Reports of a head's quality: metrics as text/markdown/JSON and a confusion-matrix PNG.

Pictures are drawn with Pillow (already a dependency) rather than pulling in a plotting library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_write
from .metrics import Metrics


def metrics_text(m: Metrics) -> str:
    """Terminal table: overall scores, per-class precision/recall/F1, confusion matrix."""
    w = max(8, *(len(c) for c in m.classes)) + 2
    lines = [f"accuracy {m.accuracy:.2%}   balanced accuracy {m.balanced_accuracy:.2%}   "
             f"macro-F1 {m.macro_f1:.3f}   ({m.n} images)", "",
             f"{'class':<{w}}{'precision':>10}{'recall':>8}{'f1':>7}{'support':>9}"]
    for c, s in m.per_class.items():
        lines.append(f"{c:<{w}}{s['precision']:>10.3f}{s['recall']:>8.3f}{s['f1']:>7.3f}{s['support']:>9d}")
    cw = max(4, len(str(max(max(r) for r in m.confusion))) + 1)
    lines += ["", "confusion matrix (rows: true, columns: predicted, numbered as the rows)",
              " " * (w + 4) + "".join(f"{j:>{cw}d}" for j in range(len(m.classes)))]
    for i, (c, row) in enumerate(zip(m.classes, m.confusion, strict=True)):
        lines.append(f"{i:>3d} {c:<{w}}" + "".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def metrics_markdown(m: Metrics, title: str, details: dict[str, Any]) -> str:
    out = [f"# {title}", ""]
    out += [f"- **{k}**: {v}" for k, v in details.items()]
    out += ["", "| accuracy | balanced accuracy | macro-F1 | images |", "|---|---|---|---|",
            f"| {m.accuracy:.2%} | {m.balanced_accuracy:.2%} | {m.macro_f1:.3f} | {m.n} |", "",
            "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    out += [f"| {c} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
            for c, s in m.per_class.items()]
    out += ["", "Confusion matrix (rows: true, columns: predicted)", "",
            "| | " + " | ".join(m.classes) + " |", "|---" * (len(m.classes) + 1) + "|"]
    out += [f"| **{c}** | " + " | ".join(str(v) for v in row) + " |"
            for c, row in zip(m.classes, m.confusion, strict=True)]
    return "\n".join(out) + "\n"


MARGIN = 16
MIN_WIDTH = 560  # px: a 2-class matrix still reads as a figure, with room for its heading
LABEL_MAX = 170  # px: longer class names are cut with an ellipsis
TITLE_SIZE, TEXT_SIZE = 16, 13
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Ink = str | tuple[int, int, int]


def report_font(size: int) -> Font:
    """Pillow's bundled scalable font (Pillow 10.1+), so labels are legible at any size, with no system fonts."""
    return ImageFont.load_default(size)


def confusion_title(m: Metrics, title: str) -> list[str]:
    """The picture's heading: what it shows and how to read it, one line each."""
    return [title, f"accuracy {m.accuracy:.1%} on {m.n} images",
            "rows: true class, columns: predicted class, shade: share of the true class"]


def confusion_png(m: Metrics, path: Path, title: str = "Confusion matrix") -> None:
    """Write :func:`confusion_image` as a PNG."""
    confusion_image(m, title).save(path)


def confusion_image(m: Metrics, title: str = "Confusion matrix") -> Image.Image:
    """Heatmap of the row-normalised confusion matrix with counts, class names on both axes.

    Sized to its content so nothing is clipped: cells shrink from 64 to 24 px as classes grow (2 to
    50 classes read at a glance), the canvas is at least as wide as every heading line, a too long
    title is wrapped, long class names are shortened with an ellipsis, and column names turn
    vertical when they do not fit across their cell.
    """
    cm = np.asarray(m.confusion, dtype=int)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(m.classes)
    cell = int(np.clip(640 // n, 24, 64))
    head_font, font = report_font(TITLE_SIZE), report_font(TEXT_SIZE)
    count_font = _fitting_font(str(cm.max(initial=0)), cell - 6, min(TEXT_SIZE + 1, cell // 2))
    names = [_shorten(c, font, LABEL_MAX) for c in m.classes]
    name_w = int(max(font.getlength(c) for c in names))
    line_h = TEXT_SIZE + 6
    upright = name_w <= cell - 6
    cols_h = line_h if upright else name_w + 6

    lines = confusion_title(m, title)
    grid_w = MARGIN + line_h + name_w + 8 + n * cell + MARGIN
    width = max(MIN_WIDTH, grid_w, 2 * MARGIN + int(max(head_font.getlength(t) for t in lines[1:])) + 1)
    heading = _wrap(lines[0], head_font, width - 2 * MARGIN)
    lines = heading + lines[1:]
    top = MARGIN + len(lines) * (TITLE_SIZE + 6) + 8 + line_h + cols_h + 4
    img = Image.new("RGB", (width, top + n * cell + MARGIN), "white")
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * (TITLE_SIZE + 6)), text, fill="black" if i < len(heading) else (70, 70, 70),
                  font=head_font)

    left = (width - grid_w) // 2 + MARGIN + line_h + name_w + 8
    _centred(draw, (left + n * cell / 2, top - cols_h - 4 - line_h / 2), "predicted class", font, (90, 90, 90))
    axis = _text_image("true class", font, (90, 90, 90)).rotate(90, expand=True)
    img.paste(axis, (left - name_w - 8 - line_h, top + (n * cell - axis.height) // 2))
    for i, name in enumerate(names):
        y = top + i * cell
        _centred(draw, (left - 8 - font.getlength(name) / 2, y + cell / 2), name, font, "black")
        x = left + i * cell
        if upright:
            _centred(draw, (x + cell / 2, top - 4 - line_h / 2), name, font, "black")
        else:
            label = _text_image(name, font, "black").rotate(90, expand=True)
            img.paste(label, (x + (cell - label.width) // 2, top - 4 - label.height))
        for j in range(n):
            v = share[i, j]
            x0 = left + j * cell
            draw.rectangle([x0, y, x0 + cell - 1, y + cell - 1], fill=(int(255 - 220 * v), int(255 - 140 * v), 255),
                           outline=(200, 200, 200))
            ink = "white" if v > 0.6 else ("black" if cm[i, j] else (190, 190, 190))  # zeros recede
            _centred(draw, (x0 + cell / 2, y + cell / 2), str(cm[i, j]), count_font, ink)
    return img


def _fitting_font(widest: str, room: int, size: int) -> Font:
    """The largest font (at most ``size``) in which ``widest`` fits in ``room`` px (counts in small cells)."""
    while size > 7 and report_font(size).getlength(widest) > room:
        size -= 1
    return report_font(size)


def _shorten(text: str, font: Font, room: int) -> str:
    """``text``, cut and ended with an ellipsis when wider than ``room`` px."""
    if font.getlength(text) <= room:
        return text
    while text and font.getlength(text + "\u2026") > room:
        text = text[:-1]
    return text.rstrip() + "\u2026"


def _wrap(text: str, font: Font, room: int) -> list[str]:
    """``text`` in lines at most ``room`` px wide, broken between words (inside a word only if it must)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= room:
            lines[-1] += f" {word}"
            continue
        while font.getlength(word) > room and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > room:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def _centred(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, font: Font, fill: Ink) -> None:
    """Draw ``text`` centred on ``centre`` (measured, so it works with the bitmap font too)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text((centre[0] - (x0 + x1) / 2, centre[1] - (y0 + y1) / 2), text, fill=fill, font=font)


def _text_image(text: str, font: Font, fill: Ink) -> Image.Image:
    """``text`` alone on a white image, tightly cropped, to be rotated."""
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    img = Image.new("RGB", (x1 - min(x0, 0) + 2, y1 - min(y0, 0) + 2), "white")
    ImageDraw.Draw(img).text((-min(x0, 0) + 1, -min(y0, 0) + 1), text, fill=fill, font=font)
    return img


def write_report(m: Metrics, prefix: Path, title: str, details: dict[str, Any]) -> list[Path]:
    """Write PREFIX.report.json, PREFIX.report.md and PREFIX.confusion.png; returns the paths."""
    json_p, md_p, png_p = (prefix.with_name(prefix.name + s)
                           for s in (".report.json", ".report.md", ".confusion.png"))
    payload = json.dumps({"title": title, **details, "metrics": m.to_dict()}, indent=2, default=str)
    atomic_write(json_p, lambda f: f.write(payload.encode()))
    atomic_write(md_p, lambda f: f.write(metrics_markdown(m, title, details).encode()))
    confusion_png(m, png_p, title)
    return [json_p, md_p, png_p]
