"""``tl-embed audit``: likely wrong labels, leaking or conflicting near-duplicates and outliers, as a report."""

from __future__ import annotations

import sys
from pathlib import Path

from ..kinds import REPORT, STORE
from .options import add_command, positive_int

FORMATS = ("html", "json", "csv")


def register_audit(sub) -> None:
    from ..heads.head import DEFAULT_HEAD, HEADS

    p = add_command(sub, "audit", "find likely wrong labels, near-duplicates and outliers in a store",
             "Read a labelled store and report what would cost accuracy or make it a lie: images whose "
             "label the out-of-fold predictions of --head and their nearest neighbours disagree with "
             "(confident learning), near-copies of test/val images in training and near-copies with "
             "different labels (cosine >= --threshold), images far from everything in their class, and "
             "the classes' counts and confusions. Nothing is changed: act on it with `tl-embed train "
             "STORE --exclude AUDIT.csv` or --relabel; click through it with `tl-embed serve INDEX --audit "
             "AUDIT.json`. Unlabelled stores get the duplicate and outlier checks.")
    p.add_argument("store")
    p.add_argument("--out", "-o", default=None,
                   help="report to write; default: STORE's name with .audit.html beside it (html), or "
                        "standard output (json, csv)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="html: one self-contained page with thumbnails; json or csv for scripts (csv has a "
                        "path column that train --exclude reads). Default: from --out's suffix, else html")
    p.add_argument("-k", type=positive_int, default=20,
                   help="nearest neighbours per image: their labels join the label check; evidence; outliers")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="cosine similarity at which two images are near-duplicates (as dedup --threshold)")
    p.add_argument("--head", default=DEFAULT_HEAD, choices=HEADS,
                   help="the head whose out-of-fold predictions judge the labels (as train --head)")
    p.add_argument("--cv", type=positive_int, default=3, help="folds for the out-of-fold predictions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit, reads={"store": (STORE,)}, writes=REPORT)


def cmd_audit(args) -> None:
    from ..audit.report import write_report
    from ..audit.run import audit_store
    from ..wording import count

    fmt = args.format or _format_of(args.out)
    audit = audit_store(args.store, args.k, args.threshold, args.head, args.cv, args.seed, progress=not args.quiet)
    to_stdout = args.out is None and fmt != "html"
    if to_stdout:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = write_report(audit, Path(tmp) / f"audit.{fmt}", fmt)
            sys.stdout.write(out.read_text(encoding="utf-8"))
        return
    out = Path(args.out) if args.out else _default_out(Path(args.store))
    write_report(audit, out, fmt)
    kinds = {"cross-split": 0, "label-conflict": 0}
    for d in audit.duplicates:
        kinds[d.kind] += 1
    print(f"{count(len(audit.label_issues), 'likely wrong label')}, "
          f"{count(kinds['cross-split'], 'near-duplicate')} across splits, "
          f"{count(kinds['label-conflict'], 'near-duplicate')} with different labels, "
          f"{count(len(audit.outliers), 'outlier')} in {audit.shape.rows} images")
    for note in audit.notes:
        print(f"note: {note}")
    print(f"wrote {out}")


def _format_of(out: str | None) -> str:
    suffix = Path(out).suffix.lower().lstrip(".") if out else ""
    return {"htm": "html"}.get(suffix, suffix) if suffix in (*FORMATS, "htm") else "html"


def _default_out(store: Path) -> Path:
    stem = store.name[:-len(store.suffix)] if store.suffix == ".tle" else store.name
    return store.with_name(f"{stem}.audit.html")
