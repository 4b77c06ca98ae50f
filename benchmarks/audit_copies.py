"""Leaked test images: real photos' near-copies planted in train, found by ``tl-embed audit`` as cross-split duplicates.

For each shared set with a split (flowers12 train/test, pets3 train/test, hymenoptera train/val) the folder
is copied to a temporary place and every held-out photo gets ONE near-copy written into the training folder
of its class, the kinds taken in turn:

* ``re-encoded``: the same pixels saved again as JPEG at quality 60,
* ``resized``: scaled to half its width and height (Lanczos), saved at quality 90,
* ``cropped``: 5% cut from each border (90% of each side kept), saved at quality 90.

The copy is embedded with everything else by ``embed`` (genuine ImageNet MobileNetV2 through a temporary
KERAS_HOME) and audited with the CLI's defaults (``audit_store``: cosine threshold 0.95).  A copy counts as
found when a cross-split finding pairs it with its original, the training copy named as the one to leave
out.  Printed per set and kind: found / planted and the copies' cosine to their original (min, median);
also the cross-split findings that are not planted (near-copies the set already held), how often a copy
is its original's nearest training image, and, from the exact cosines of every held-out photo to every
training image, how many copies and how many other pairs a lower threshold would take.

    python benchmarks/audit_copies.py [--sets flowers12 pets3 hymenoptera] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit import SHARED, keras_home  # noqa: E402
from machine import describe_cpu  # noqa: E402

SPLIT_SETS = {"flowers12": ("train", "test"), "pets3": ("train", "test"), "hymenoptera": ("train", "val")}
KINDS = ("re-encoded", "resized", "cropped")
THRESHOLDS = (0.95, 0.9, 0.85, 0.8)  # what a lower --threshold would catch, and what else it would pair


def near_copy(src: Path, dst: Path, kind: str) -> None:
    """Write ``kind``'s near-copy of the photo ``src`` to ``dst`` (JPEG)."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        if kind == "re-encoded":
            im.save(dst, "JPEG", quality=60)
        elif kind == "resized":
            im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS).save(dst, "JPEG", quality=90)
        else:
            dx, dy = round(0.05 * w), round(0.05 * h)
            im.crop((dx, dy, w - dx, h - dy)).save(dst, "JPEG", quality=90)


def plant(name: str, folder: Path) -> dict[str, tuple[str, str]]:
    """Copy the set to ``folder`` and plant one near-copy of each held-out photo: copy path -> (original, kind)."""
    train, held = SPLIT_SETS[name]
    shutil.copytree(SHARED / "datasets" / name, folder)
    planted = {}
    originals = sorted(p for p in (folder / held).rglob("*") if p.is_file())
    for n, src in enumerate(originals):
        kind = KINDS[n % len(KINDS)]
        dst = folder / train / src.parent.name / f"leak_{kind}_{src.stem}.jpg"
        near_copy(src, dst, kind)
        planted[dst.relative_to(folder).as_posix()] = (src.relative_to(folder).as_posix(), kind)
    return planted


def bench_set(name: str, work: Path) -> None:
    from tl_embed import EmbeddingStore, embed_folder
    from tl_embed.audit.run import audit_store

    folder, store = work / name, work / f"{name}.tle"
    planted = plant(name, folder)
    t = time.perf_counter()
    embed_folder(folder, store, progress=False)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    audit = audit_store(store)
    audit_s = time.perf_counter() - t
    with EmbeddingStore.open(store) as s:
        row = {str(p): i for i, p in enumerate(s.paths)}
        U = np.array(s.embeddings, dtype=np.float32)
    U /= np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
    cross = {(d.path, d.other) for d in audit.duplicates if d.kind == "cross-split"}
    found, cosines = defaultdict(int), defaultdict(list)
    for copy, (original, kind) in planted.items():
        found[kind] += (copy, original) in cross
        cosines[kind].append(float(U[row[copy]] @ U[row[original]]))
    others = [pair for pair in cross if pair[0] not in planted]
    train_rows = np.array([r for path, r in row.items() if path.startswith(SPLIT_SETS[name][0] + "/")])
    held_rows = np.array([r for path, r in row.items() if path.startswith(SPLIT_SETS[name][1] + "/")])
    sims = U[held_rows] @ U[train_rows].T  # every held-out photo against every training image, copies included
    copy_of = {row[original]: row[copy] for copy, (original, _) in planted.items()}
    is_copy = train_rows[None, :] == np.array([copy_of.get(h, -1) for h in held_rows])[:, None]
    nearest_is_copy = np.mean([is_copy[i, sims[i].argmax()] for i in range(len(held_rows)) if is_copy[i].any()])
    print(f"\n{name}: {len(row)} images ({len(planted)} planted copies), embed {embed_s:.0f} s, audit {audit_s:.1f} s",
          flush=True)
    for kind in KINDS:
        c = cosines[kind]
        print(f"  {kind:<10}: found {found[kind]} / {len(c)}, cosine to the original min {min(c):.3f} "
              f"median {np.median(c):.3f}", flush=True)
    print(f"  cross-split findings not planted: {len(others)}"
          + (f" (e.g. {sorted(others)[0][0]} ~ {sorted(others)[0][1]})" if others else ""), flush=True)
    print(f"  each copy is its original's nearest training image: {nearest_is_copy:.1%}", flush=True)
    for t in THRESHOLDS:
        print(f"  at cosine >= {t:.2f}: copies {int((sims[is_copy] >= t).sum())} / {len(planted)}, other "
              f"held-out x train pairs {int((sims[~is_copy] >= t).sum())}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SPLIT_SETS), choices=list(SPLIT_SETS))
    ap.add_argument("--work", type=Path, default=None,
                    help="an empty folder for the copied sets and their stores (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(describe_cpu(), flush=True)
    keras_home()
    work = args.work or Path(tempfile.mkdtemp(prefix="audit_copies_"))
    work.mkdir(parents=True, exist_ok=True)
    for name in args.sets:
        bench_set(name, work)


if __name__ == "__main__":
    main()
