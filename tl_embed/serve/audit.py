"""The audit ``serve --audit`` shows: a store's JSON audit report, read once, its images named by store id.

An audit names images by their path under the image root; the page shows thumbnails and searches by the
ids the store holds (``/images/{id}``), so each path is resolved here, once.  A report of another image root
is refused at start: its findings would name other images, or none.  Findings are answered a page at a
time (a million-image store can have tens of thousands), each as one shape whatever its kind: the suspect
image, its score and facts, and the images to compare it with (its neighbours, or its duplicate).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..audit.findings import Duplicate, LabelIssue, Neighbour, Outlier
from ..audit.page import TITLES, WHAT, ordered
from ..audit.report import read_json
from ..errors import TlEmbedError
from .catalog import Catalog

SECTIONS = ("label-issues", "cross-split", "label-conflict", "outliers")  # /audit/{section}
THUMBNAIL = 256  # the size the page's thumbnails ask for, as a search result's


class AuditView:
    """One audit's findings, section by section in the report's order (most suspicious first)."""

    def __init__(self, path: str | os.PathLike, catalog: Catalog):
        audit = read_json(path)
        root = Path(catalog.root).absolute() if catalog.root else None
        audited = Path(audit.root).absolute() if audit.root else None
        if root != audited:
            raise TlEmbedError(f"audit {path} is of the images under {audit.root or '(no root)'}, but the index "
                               f"serves {catalog.root or '(no root)'}: audit the index's store "
                               f"({catalog.store_path}) with `tl-embed audit {catalog.store_path} --format json`")
        self.path, self.audit, self.catalog = Path(path), audit, catalog
        found = ordered(audit)
        self.sections: dict[str, list] = {key: found.get(key, []) for key in SECTIONS}

    def summary(self) -> dict[str, Any]:
        """What was audited and how, the dataset's shape, and each section's title, meaning and count."""
        a = self.audit
        shape = {**vars(a.shape), "confused": [{"given": g, "predicted": p, "images": n}
                                               for g, p, n in a.shape.confused]}
        flagged = a.flagged_paths()
        return {"path": str(self.path), "store": a.store, "root": a.root, "backbone": a.backbone,
                "settings": a.settings, "notes": a.notes, "shape": shape,
                "not_served": sum(p not in self.catalog.by_path for p in flagged),
                "sections": [{"key": k, "title": TITLES[k], "what": WHAT[k], "count": len(v)}
                             for k, v in self.sections.items()]}

    def page(self, section: str, offset: int, limit: int) -> dict[str, Any]:
        """Findings ``offset`` .. ``offset + limit`` of ``section``, ranked from 1 as in the report."""
        found = self.sections[section]
        items = [self._finding(f, rank) for rank, f in enumerate(found[offset:offset + limit], offset + 1)]
        return {"section": section, "title": TITLES[section], "total": len(found), "offset": offset,
                "findings": items}

    def _image(self, path: str, label: str | None) -> dict[str, Any]:
        ident = self.catalog.by_path.get(path)  # None: not in this index (filtered, or added to the store since)
        return {"id": ident, "path": path, "label": label,
                "thumbnail": None if ident is None else f"/images/{ident}?size={THUMBNAIL}"}

    def _near(self, n: Neighbour) -> dict[str, Any]:
        return {**self._image(n.path, n.label), "split": None, "similarity": n.similarity}

    def _finding(self, f: LabelIssue | Duplicate | Outlier, rank: int) -> dict[str, Any]:
        out = {"rank": rank, **self._image(f.path, f.given if isinstance(f, LabelIssue) else f.label),
               "split": getattr(f, "split", None), "suggested": None, "confidence": None, "distance": None}
        if isinstance(f, LabelIssue):
            out.update(score=f.score, suggested=f.suggested, confidence=f.confidence,
                       evidence=[self._near(n) for n in f.neighbours])
        elif isinstance(f, Duplicate):
            other = {**self._image(f.other, f.other_label), "split": f.other_split, "similarity": f.similarity}
            out.update(score=f.similarity, evidence=[other])
        else:
            out.update(score=f.score, suggested=f.nearest_label, distance=f.distance,
                       evidence=[self._near(n) for n in f.neighbours])
        return out
