"""What an audit finds, as plain records: each finding carries its score and the evidence a person checks.

The report writers (HTML, JSON, CSV) and the service read only these, so every output shows the same
findings in the same order (most suspicious first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Neighbour:
    """A stored image near a finding's image: the evidence beside it."""

    path: str  # relative to the store's image root
    label: str | None
    similarity: float  # cosine


@dataclass(frozen=True)
class LabelIssue:
    """A row whose given label the out-of-fold predictions and its neighbours disagree with."""

    path: str
    given: str
    suggested: str
    confidence: float  # out-of-fold probability of the suggested label
    score: float  # suspicion in [0, 1], higher first: above 0.5 when another class is more probable (see run.py)
    neighbours: tuple[Neighbour, ...] = ()
    split: str | None = None


@dataclass(frozen=True)
class Duplicate:
    """Two near-identical images that should not be: across splits, or with different labels."""

    kind: str  # "cross-split" (an evaluation image's near-copy is trained on) or "label-conflict"
    path: str
    other: str
    similarity: float
    label: str | None = None
    other_label: str | None = None
    split: str | None = None
    other_split: str | None = None


@dataclass(frozen=True)
class Outlier:
    """An image far from everything, measured against how spread out its own class is."""

    path: str
    label: str | None
    score: float  # robust z-score of its mean k-NN distance within its class (or the whole store)
    distance: float  # mean cosine distance to its k nearest neighbours
    nearest_label: str | None = None  # the label most of its neighbours carry, when not its own
    neighbours: tuple[Neighbour, ...] = ()


@dataclass
class DatasetShape:
    """Counts and balance: what makes a head's accuracy hard to read before any single image is wrong."""

    rows: int
    labelled: int
    counts: dict[str, int] = field(default_factory=dict)  # label -> images
    splits: dict[str, int] = field(default_factory=dict)  # split (or "none") -> images
    tiny: list[str] = field(default_factory=list)  # classes with fewer than TINY_CLASS images
    imbalance: float = 1.0  # largest class / smallest class
    confused: list[tuple[str, str, int]] = field(default_factory=list)  # (given, predicted, count), most first
    failed: int = 0  # images the store could not read (recorded by `embed`)
    oof_accuracy: float | None = None  # accuracy of the out-of-fold predictions


@dataclass
class Audit:
    """Everything one audit of a store found, and how it was looked for."""

    store: str
    root: str
    backbone: str
    shape: DatasetShape
    label_issues: list[LabelIssue] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked and why, in one line each
    settings: dict[str, Any] = field(default_factory=dict)  # k, threshold, folds, head, seconds per pass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Audit:
        """The audit :meth:`to_dict` wrote (the JSON report), read back: what ``serve --audit`` shows.

        Raises KeyError or TypeError for anything else, which the reader turns into one line.
        """
        def near(f: dict[str, Any]) -> dict[str, Any]:
            return {**f, "neighbours": tuple(Neighbour(**n) for n in f.get("neighbours", ()))}

        shape = dict(d["shape"])
        shape["confused"] = [tuple(c) for c in shape.get("confused", [])]
        return cls(d["store"], d["root"], d["backbone"], DatasetShape(**shape),
                   [LabelIssue(**near(f)) for f in d["label_issues"]],
                   [Duplicate(**f) for f in d["duplicates"]],
                   [Outlier(**near(f)) for f in d["outliers"]],
                   list(d.get("notes", [])), dict(d.get("settings", {})))

    def flagged_paths(self) -> list[str]:
        """Every image a finding names as the likely problem, once, in finding order."""
        seen: dict[str, None] = {}
        for issue in self.label_issues:
            seen.setdefault(issue.path, None)
        for dup in self.duplicates:
            seen.setdefault(dup.path, None)
        for out in self.outliers:
            seen.setdefault(out.path, None)
        return list(seen)
