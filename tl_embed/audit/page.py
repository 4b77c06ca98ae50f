"""The audit report's HTML: one page a person scans instead of reading, each suspect beside its evidence.

Kept apart from the writers (:mod:`tl_embed.audit.report`) so the markup reads top to bottom.  Everything
here is a pure function of the findings, their thumbnails and their links; every string from the store
(paths, labels, notes) is escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from html import escape
from typing import Any

from ..search.sheet import breakable
from .findings import Audit, Duplicate, LabelIssue, Neighbour, Outlier

Thumb = tuple[str, int, int] | str  # (data URI, width, height), or why the image cannot be shown
Href = Callable[[str], str]  # an image's path (relative to the image root) -> the link to its file

TITLES = {"label-issues": "Likely wrong labels", "cross-split": "Near-duplicates across splits",
          "label-conflict": "Near-duplicates with different labels", "outliers": "Outliers"}
KNOWN_DUPLICATES = ("cross-split", "label-conflict")
WHAT = {  # what a section means, and what to do about it
    "label-issues": "Images whose given label the out-of-fold predictions and their nearest neighbours disagree "
                    "with, most suspicious first (score = 1 − the predicted probability of the given label). "
                    "Check each beside its neighbours; relabel it or drop it when the suggestion is right.",
    "cross-split": "An evaluation image with a near-copy in another split: the model has seen it, so the measured "
                   "accuracy is too high. Keep each pair in one split, or drop one of them.",
    "label-conflict": "Near-identical images that carry different labels: at least one label is wrong, or the "
                      "classes overlap. Give both the same label, or drop one.",
    "outliers": "Images far from everything else in their class (score = robust z-score of the mean distance to "
                "their neighbours): a wrong label, a broken or unrelated picture, or a rare view worth keeping.",
    "shape": "Counts and balance: tiny classes and a large imbalance make a head's accuracy hard to read "
             "before any single image is wrong. Add images to small classes, or merge them.",
}
CSS = """
:root { color-scheme: light dark; --accent: #2563eb; --bad: #dc2626; --good: #16a34a; --line: #8884;
  font-family: system-ui, sans-serif; }
body { margin: 0 auto; max-width: 80rem; padding: 0.75rem; line-height: 1.4; }
h1 { font-size: 1.4rem; margin: 0.2rem 0; } h2 { font-size: 1.15rem; margin: 1.6rem 0 0.3rem; }
h3 { font-size: 0.95rem; margin: 0.8rem 0 0.3rem; }
nav a { margin-right: 1rem; } .n { font-weight: normal; opacity: 0.7; }
.what { margin: 0 0 0.6rem; opacity: 0.85; max-width: 60rem; } .more, .none { font-style: italic; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; margin: 0; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
.finding { display: flex; flex-wrap: wrap; gap: 0.8rem; align-items: flex-start; padding: 0.6rem 0;
  border-top: 1px solid var(--line); }
.facts { min-width: 12rem; max-width: 18rem; } .facts p { margin: 0.1rem 0; }
.rank { opacity: 0.6; } .given { color: var(--bad); font-weight: 600; }
.suggested { color: var(--good); font-weight: 600; }
.strip { display: flex; flex-wrap: wrap; gap: 0.5rem; }
figure { margin: 0; width: var(--thumb); font-size: 0.8rem; }
figure.suspect img, figure.suspect .missing { outline: 3px solid var(--accent); }
figure img, .missing { display: block; width: var(--thumb); height: var(--thumb); object-fit: contain;
  background: #8882; border-radius: 0.3rem; }
.missing { box-sizing: border-box; padding: 0.4rem; color: #555; background: #ccc; overflow: hidden;
  font-size: 0.75rem; }
figcaption { overflow-wrap: anywhere; } figcaption b { display: block; } figure a { text-decoration: none; }
.agrees b { color: var(--good); }
.sim { align-self: center; font-size: 1.1rem; }
.bars { display: grid; grid-template-columns: minmax(6rem, max-content) 1fr; gap: 0.15rem 0.6rem; max-width: 50rem; }
.bar { background: var(--accent); color: #fff; min-width: 2.5rem; padding: 0 0.3rem; box-sizing: border-box;
  border-radius: 0.2rem; font-size: 0.8rem; white-space: nowrap; }
.bar.tiny { background: var(--bad); } .label { overflow-wrap: anywhere; }
table { border-collapse: collapse; } td, th { padding: 0.1rem 0.6rem; border-bottom: 1px solid var(--line);
  text-align: left; }
"""


def ordered(audit: Audit) -> dict[str, list]:
    """Each finding section's findings, most suspicious first (the order the page and the CSV use)."""
    dups = sorted(audit.duplicates, key=lambda d: -d.similarity)
    kinds = [*KNOWN_DUPLICATES, *sorted({d.kind for d in dups} - set(KNOWN_DUPLICATES))]
    return {"label-issues": sorted(audit.label_issues, key=lambda i: -i.score),
            **{kind: [d for d in dups if d.kind == kind] for kind in kinds},
            "outliers": sorted(audit.outliers, key=lambda o: -o.score)}


def shown_paths(audit: Audit, limit: int) -> list[str]:
    """Every image the page shows (the first ``limit`` findings of each section, their evidence), once."""
    paths: dict[str, None] = {}
    for findings in ordered(audit).values():
        for f in findings[:limit]:
            paths.setdefault(f.path, None)
            for p in [f.other] if isinstance(f, Duplicate) else [n.path for n in f.neighbours]:
                paths.setdefault(p, None)
    return list(paths)


def render(audit: Audit, thumbs: Mapping[str, Thumb], href: Href, thumb: int, limit: int) -> str:
    """The whole page."""
    fig = _Figures(thumbs, href)
    sections = ordered(audit)
    items = {"label-issues": lambda i, n: _label_issue(i, n, fig), "outliers": lambda o, n: _outlier(o, n, fig)}
    body = [_section(key, findings, limit, items.get(key, lambda d, n: _duplicate(d, n, fig)))
            for key, findings in sections.items()]
    nav = " ".join(f'<a href="#{k}">{escape(_title(k))} <span class="n">({len(v)})</span></a>'
                   for k, v in sections.items())
    title = f"Audit of {audit.store}"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>:root {{ --thumb: {thumb}px; }}{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><nav>{nav} <a href=\"#shape\">Dataset shape</a></nav></header>"
            f"{_summary(audit)}{''.join(body)}{_shape(audit, limit)}</body></html>\n")


def _title(key: str) -> str:
    return TITLES.get(key, f"Near-duplicates: {key}")


def _section(key: str, findings: list, limit: int, item: Callable[[Any, int], str]) -> str:
    items = "".join(item(f, rank) for rank, f in enumerate(findings[:limit], 1))
    if not findings:
        items = '<p class="none">None found.</p>'
    elif len(findings) > limit:
        items += (f'<p class="more">… and {len(findings) - limit} more not shown here '
                  f"(the JSON and CSV reports list every finding).</p>")
    what = WHAT.get(key, "Near-identical images that should not be.")
    return (f'<section id="{escape(key)}"><h2>{escape(_title(key))} <span class="n">({len(findings)})</span></h2>'
            f'<p class="what">{escape(what)}</p>{items}</section>')


class _Figures:
    """Thumbnails as figures: each links to its image file and is captioned with its relative path."""

    def __init__(self, thumbs: Mapping[str, Thumb], href: Href):
        self.thumbs, self.href = thumbs, href

    def __call__(self, path: str, heading: str = "", cls: str = "") -> str:
        shown = self.thumbs.get(path, "not decoded")
        if isinstance(shown, tuple):
            src, w, h = shown
            picture = f'<img src="{src}" width="{w}" height="{h}" alt="{escape(path)}">'
        else:
            picture = f'<div class="missing" role="img" aria-label="{escape(path)}">{escape(shown)}</div>'
        return (f'<figure class="{cls}"><a href="{escape(self.href(path))}" title="{escape(path)}">{picture}</a>'
                f"<figcaption>{heading}{breakable(path)}</figcaption></figure>")

    def neighbours(self, neighbours: tuple[Neighbour, ...], agree: str | None = None) -> str:
        if not neighbours:
            return ""
        figs = "".join(self(n.path, f"<b>{_label(n.label)} · {n.similarity:.3f}</b>",
                            "agrees" if agree is not None and n.label == agree else "") for n in neighbours)
        return f'<div><h3>Nearest neighbours (label · similarity)</h3><div class="strip">{figs}</div></div>'


def _label(label: str | None) -> str:
    return "<i>unlabelled</i>" if label is None else escape(label)


def _label_issue(issue: LabelIssue, rank: int, fig: _Figures) -> str:
    split = f"<p>split {escape(issue.split)}</p>" if issue.split else ""
    facts = (f'<div class="facts"><p class="rank">#{rank}</p><p><span class="given">{_label(issue.given)}</span> → '
             f'<span class="suggested">{_label(issue.suggested)}</span></p>'
             f"<p>confidence {issue.confidence:.2f} · score {issue.score:.3f}</p>{split}</div>")
    return (f'<article class="finding">{fig(issue.path, cls="suspect")}{facts}'
            f"{fig.neighbours(issue.neighbours, agree=issue.suggested)}</article>")


def _duplicate(dup: Duplicate, rank: int, fig: _Figures) -> str:
    def side(path: str, label: str | None, split: str | None) -> str:
        where = f" · {escape(split)}" if split else ""
        return fig(path, f"<b>{_label(label)}{where}</b>", "suspect" if path == dup.path else "")

    return (f'<article class="finding"><p class="rank">#{rank}</p>{side(dup.path, dup.label, dup.split)}'
            f'<p class="sim">≈ {dup.similarity:.3f}</p>{side(dup.other, dup.other_label, dup.other_split)}</article>')


def _outlier(out: Outlier, rank: int, fig: _Figures) -> str:
    nearest = (f"<p>neighbours are mostly <span class=\"suggested\">{_label(out.nearest_label)}</span></p>"
               if out.nearest_label is not None else "")
    facts = (f'<div class="facts"><p class="rank">#{rank}</p><p>label {_label(out.label)}</p>'
             f"<p>score {out.score:.1f} · distance {out.distance:.3f}</p>{nearest}</div>")
    return f'<article class="finding">{fig(out.path, cls="suspect")}{facts}{fig.neighbours(out.neighbours)}</article>'


def _summary(audit: Audit) -> str:
    rows = [("Store", escape(audit.store)), ("Image root", escape(audit.root)), ("Backbone", escape(audit.backbone)),
            ("Images", f"{audit.shape.rows} ({audit.shape.labelled} labelled)")]
    rows += [(escape(str(k)), _value(v)) for k, v in audit.settings.items()]
    facts = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    notes = "".join(f"<li>{escape(n)}</li>" for n in audit.notes)
    notes = f"<h3>Notes</h3><ul>{notes}</ul>" if notes else ""
    return (f'<section id="summary"><h2>Summary</h2><p class="what">What was audited and how: the settings the '
            f"findings below depend on, the time each pass took, and anything that was not checked.</p>"
            f"<dl>{facts}</dl>{notes}</section>")


def _value(v: Any) -> str:
    """A setting as a person reads it: numbers rounded, nested settings (seconds per pass) inline."""
    if isinstance(v, dict):
        return ", ".join(f"{escape(str(k))} {_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}"
    return escape(str(v))


def _bars(counts: Mapping[str, int], tiny: set[str], limit: int) -> str:
    """Counts as a bar chart made of divs, largest first."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    most = max(counts.values(), default=0) or 1
    rows = "".join(f'<span class="label">{escape(k)}</span><span class="bar{" tiny" if k in tiny else ""}" '
                   f'style="width:{100 * n / most:.1f}%">{n}</span>' for k, n in top[:limit])
    left = len(top) - limit
    more = f'<p class="more">… and {left} more {"class" if left == 1 else "classes"}</p>' if left > 0 else ""
    return f'<div class="bars">{rows}</div>{more}'


def _shape(audit: Audit, limit: int) -> str:
    s = audit.shape
    tiny = ", ".join(escape(t) for t in s.tiny) or "none"
    acc = "not measured" if s.oof_accuracy is None else f"{s.oof_accuracy:.3f}"
    facts = (f"<dl><dt>Images</dt><dd>{s.rows} ({s.labelled} labelled)</dd><dt>Classes</dt><dd>{len(s.counts)}</dd>"
             f"<dt>Imbalance</dt><dd>{s.imbalance:.1f}× (largest class / smallest)</dd>"
             f"<dt>Tiny classes</dt><dd>{tiny}</dd><dt>Failed images</dt><dd>{s.failed} (the store could not "
             f"read them)</dd><dt>Out-of-fold accuracy</dt><dd>{acc}</dd></dl>")
    confused = "".join(f"<tr><td>{escape(g)}</td><td>{escape(p)}</td><td>{n}</td></tr>"
                       for g, p, n in s.confused[:limit])
    confused = (f"<table><tr><th>given</th><th>predicted</th><th>images</th></tr>{confused}</table>"
                if confused else '<p class="none">None.</p>')
    return (f'<section id="shape"><h2>Dataset shape</h2><p class="what">{escape(WHAT["shape"])}</p>{facts}'
            f"<h3>Images per class</h3>{_bars(s.counts, set(s.tiny), limit)}"
            f"<h3>Images per split</h3>{_bars(s.splits, set(), limit)}"
            f"<h3>Most confused pairs (out of fold)</h3>{confused}</section>")
