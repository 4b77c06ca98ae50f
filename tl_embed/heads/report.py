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


def confusion_png(m: Metrics, path: Path, cell: int = 44) -> None:
    """Heatmap of the row-normalised confusion matrix with counts, class names on both axes."""
    cm = np.asarray(m.confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    font = ImageFont.load_default()
    label_w = 8 + 7 * min(24, max(len(c) for c in m.classes))
    n = len(m.classes)
    img = Image.new("RGB", (label_w + n * cell + 10, label_w + n * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 4), "rows: true class, columns: predicted", fill="black", font=font)
    top = label_w + 20
    for i, c in enumerate(m.classes):
        draw.text((4, top + i * cell + cell // 2 - 6), c[:24], fill="black", font=font)
        col = Image.new("RGB", (label_w - 10, 14), "white")
        ImageDraw.Draw(col).text((0, 0), c[:24], fill="black", font=font)
        img.paste(col.rotate(90, expand=True), (label_w + i * cell + cell // 2 - 7, 20))
        for j in range(n):
            v = norm[i, j]
            shade = (int(255 - 220 * v), int(255 - 140 * v), 255)
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(200, 200, 200))
            text = str(int(cm[i, j]))
            draw.text((x0 + cell // 2 - 3 * len(text), y0 + cell // 2 - 6), text,
                      fill="white" if v > 0.6 else "black", font=font)
    img.save(path)


def write_report(m: Metrics, prefix: Path, title: str, details: dict[str, Any]) -> list[Path]:
    """Write PREFIX.report.json, PREFIX.report.md and PREFIX.confusion.png; returns the paths."""
    json_p, md_p, png_p = (prefix.with_name(prefix.name + s)
                           for s in (".report.json", ".report.md", ".confusion.png"))
    payload = json.dumps({"title": title, **details, "metrics": m.to_dict()}, indent=2, default=str)
    atomic_write(json_p, lambda f: f.write(payload.encode()))
    atomic_write(md_p, lambda f: f.write(metrics_markdown(m, title, details).encode()))
    confusion_png(m, png_p)
    return [json_p, md_p, png_p]
