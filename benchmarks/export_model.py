"""export-model on real photos: does each exported model answer like `tl-embed predict`, and how fast?

For each set: embed it with the genuine ImageNet MobileNetV2 (../shared/weights via a temporary
KERAS_HOME), train a head on the set's training rows (its own split, else a seeded 20% hold-out),
then on the held-out images compare `tl-embed predict M.tlh` (embed with the openvino runtime + the
head's numpy steps) with `tl-embed predict DIR` for every export format (the same image decoding,
then the one exported model). Prints per format: export time, model size, images/s of predict
(decode included, one process, batches of 32), top-1 agreement and the largest probability difference.

    python benchmarks/export_model.py [--sets flowers12 hymenoptera] [--heads logreg] [--formats ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_cpu  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
FORMATS = ["keras", "savedmodel", "tflite", "onnx", "openvino"]


def use_genuine_weights() -> None:
    home = Path(tempfile.mkdtemp())
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        (home / "models" / f.name).symlink_to(f.resolve())
    os.environ["KERAS_HOME"] = str(home)


def held_out(name: str, work: Path, head_name: str):
    """(head, held-out image paths) for one set: embedded, trained on its training rows."""
    from tl_embed import EmbeddingStore, embed_folder
    from tl_embed.heads.fit import fit_head
    from tl_embed.heads.training import choose_split

    store = work / f"{name}.tle"
    embed_folder(SHARED / "datasets" / name, store, model="mobilenet_v2", progress=False)
    with EmbeddingStore.open(store) as s:
        X, labels, splits, spec = np.asarray(s.embeddings), s.labels, s.splits, s.spec
        tr, te, how = choose_split(labels, splits, 0.2, 0)
        paths = [s.absolute_path(p) for p in s.paths[te]]
    head, _ = fit_head(X[tr], labels[tr].astype(str), spec, head_name)
    print(f"\n== {name}: {head_name} head trained on {len(tr)} images; {len(te)} held-out images ({how}) ==")
    return head, paths


def predict_reference(head, paths: list[Path]) -> tuple[np.ndarray, float]:
    """What `tl-embed predict M.tlh images` computes, and its images/s (backbone already converted)."""
    from tl_embed.embedding.query import embed_paths, runtime_for

    run = runtime_for(head.spec, "auto")
    t = time.perf_counter()
    emb = embed_paths(paths, run, head.spec.input_size)
    proba = head.predict_proba(emb.vectors)
    return proba, len(paths) / (time.perf_counter() - t)


def bench_format(head, fmt: str, paths: list[Path], ref: np.ndarray, work: Path) -> None:
    from tl_embed.embedding.query import embed_paths
    from tl_embed.heads.export import export_model
    from tl_embed.heads.exported import load_export

    try:
        res = export_model(head, fmt, work / f"export-{fmt}")
    except Exception as e:  # noqa: BLE001 - a converter failing is a result to print
        print(f"{fmt:<11} export failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        return
    t = time.perf_counter()
    model = load_export(res.out)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    out = embed_paths(paths, model, model.input_size)
    ips = len(paths) / (time.perf_counter() - t)
    got = out.vectors
    same = int((got.argmax(1) == ref.argmax(1)).sum())
    print(f"{fmt:<11}{res.seconds:>9.1f}{res.bytes / 1e6:>9.1f}{load_s:>8.1f}{ips:>9.1f}"
          f"{f'{same}/{len(ref)}':>11}{np.abs(got - ref).max():>13.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["flowers12", "hymenoptera"])
    ap.add_argument("--heads", nargs="+", default=["logreg"])
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(describe_cpu())
    use_genuine_weights()
    work = Path(tempfile.mkdtemp())
    os.environ["TL_EMBED_CACHE"] = str(work / "cache")
    for name in args.sets:
        for head_name in args.heads:
            head, paths = held_out(name, work, head_name)
            ref, ref_ips = predict_reference(head, paths)
            print(f"predict M.tlh (openvino backbone + numpy head): {ref_ips:.1f} images/s")
            print(f"{'format':<11}{'export s':>9}{'MB':>9}{'load s':>8}{'img/s':>9}{'top-1 same':>11}"
                  f"{'max |dp|':>13}")
            for fmt in args.formats:
                bench_format(head, fmt, paths, ref, work)


if __name__ == "__main__":
    main()
