"""The ``tl-embed`` command: parses arguments, calls the library, prints results.

User errors (:class:`TlEmbedError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .errors import TlEmbedError

EPILOG = "Run `tl-embed COMMAND --help` for a command's options. Docs: README.md."


def main(argv: list[str] | None = None, raise_errors: bool = False) -> int:
    """Entry point; ``raise_errors`` lets a caller (the pipeline runner) see user errors itself."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except TlEmbedError as e:
        if raise_errors:
            raise
        print(f"tl-embed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tl-embed: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tl-embed models | head`
        sys.stdout = open(os.devnull, "w")
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tl-embed", epilog=EPILOG,
        description="Transfer learning without a GPU: embed images once with a frozen ImageNet "
                    "backbone, then train classifier heads and search with FAISS in seconds.")
    p.add_argument("--version", action="version", version=f"tl-embed {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return p


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def _add(sub, name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=description or help_,
                          formatter_class=_formatter)


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenet_v2",
                   help="backbone name (`tl-embed models`) or a saved Keras model file (.keras/.h5)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (from the Keras cache, $KERAS_HOME/models), 'none' (random), "
                        "or a weights file")
    p.add_argument("--pooling", default="avg", choices=["avg", "max"], help="global pooling")
    p.add_argument("--layer", default=None, help="custom model only: layer to cut the features at")
    p.add_argument("--preprocess", default=None,
                   help="custom model only: use this backbone's preprocess_input (default: none)")


def _runtime_name(value: str) -> str:
    from .runtime import check_runtime

    try:
        return check_runtime(value)
    except TlEmbedError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", type=_runtime_name,
                   help="how the backbone runs: 'openvino' (fast fp32, converted once and cached), "
                        "'keras' (the reference), or 'auto' (openvino, falling back to keras with a notice)")


# ---------------------------------------------------------------- models
def _register_models(sub) -> None:
    p = _add(sub, "models", "list the available backbones")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> None:
    from .backbones import BACKBONES

    if args.format == "json":
        print(json.dumps([{"name": b.name, "keras": b.keras_name, "input_size": b.input_size,
                           "dim": b.dim, "note": b.note} for b in BACKBONES.values()], indent=2))
        return
    print(f"{'model':<22}{'input':>7}{'dim':>6}  note")
    for b in BACKBONES.values():
        print(f"{b.name:<22}{b.input_size:>5}px{b.dim:>6}  {b.note}")
    print("\nAny saved Keras model (.keras/.h5) works too: --model my_model.keras [--layer NAME]")


# ----------------------------------------------------------------- embed
def _register_embed(sub) -> None:
    p = _add(sub, "embed", "embed a folder of images into a store (resumable, incremental)",
             "Embed every image under IMAGES into the store OUT. Re-running only embeds new or "
             "changed files and removes deleted ones; an interrupted run continues where it stopped. "
             "Labels come from the first sub-folder; a top-level train/val/test folder is the split.")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--out", "-o", required=True, help="store folder to create or update (e.g. photos.tle)")
    add_backbone_options(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage precision of a new store")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch and commit")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU cores)")
    add_runtime_option(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from .embed import embed_folder

    report = embed_folder(args.images, args.out, model=args.model, weights=args.weights,
                          pooling=args.pooling, layer=args.layer, preprocess=args.preprocess,
                          dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                          runtime=args.runtime, progress=not args.quiet)
    print(report.text())
    return 130 if report.interrupted else 0


# ------------------------------------------------------------------ info
def _register_info(sub) -> None:
    p = _add(sub, "info", "show what made a store, its counts and its failed images")
    p.add_argument("store")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> None:
    from .store import EmbeddingStore

    with EmbeddingStore.open(args.store) as s:
        summary = s.summary()
        failures = s.failures
        if args.format == "json":
            print(json.dumps({**summary, "backbone": s.spec.to_dict(), "root": str(s.root),
                              "created": s.meta.get("created"),
                              "tl_embed_version": s.meta.get("tl_embed_version"),
                              "failures": [f.__dict__ for f in failures]}, indent=2))
            return
        print(f"store      {s.path}")
        print(f"backbone   {s.spec.describe()}")
        print(f"           preprocessing {s.spec.preprocessing}; weights sha256 {s.spec.weights_sha256}")
        print(f"images     {s.root}")
        print(f"made       {s.meta.get('created')} by tl_embed {s.meta.get('tl_embed_version')}")
        print(f"embedded   {summary['images']} ({summary['dtype']}, {summary['bytes'] / 1e6:.1f} MB "
              f"in {summary['shards']} shard(s))")
        print("labels     " + _counts(summary["labels"]))
        print("splits     " + _counts(summary["splits"]))
        print(f"failed     {len(failures)}")
        for f in failures:
            print(f"  {f.path}: {f.reason}")


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


# ---------------------------------------------------------------- export
def _register_export(sub) -> None:
    p = _add(sub, "export", "export a store's embeddings to .npy and its manifest to .csv")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True,
                   help="output prefix: writes PREFIX.npy (N x D) and PREFIX.csv (row, path, label, ...)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from .store import EmbeddingStore

    prefix = Path(args.out)
    npy, csv_ = prefix.with_suffix(".npy"), prefix.with_suffix(".csv")
    with EmbeddingStore.open(args.store) as s:
        s.export(npy, csv_)
        print(f"wrote {npy} ({len(s)} x {s.dim} {s.dtype}) and {csv_}")


# ----------------------------------------------------------------- train
def _register_train(sub) -> None:
    from .heads import HEADS

    p = _add(sub, "train", "train a classifier head on a store's labelled embeddings",
             "Train a scikit-learn head on the store's labelled rows and report on a held-out part: "
             "the store's own test (or val) split when it has one, else a stratified --test-size "
             "hold-out. Writes the model file plus OUT.report.json/.md and OUT.confusion.png. "
             "Model files are pickles: only load files you trust.")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True, help="model file to write (e.g. pets.tlh)")
    p.add_argument("--head", default="logreg", choices=HEADS,
                   help="logreg: multinomial logistic regression; svm: linear SVM with calibrated "
                        "probabilities; knn: cosine k-NN")
    p.add_argument("--class-weight", choices=["balanced"], default=None,
                   help="re-weight classes inversely to their frequency")
    p.add_argument("--test-size", type=float, default=0.2,
                   help="held-out fraction when the store has no test/val split")
    p.add_argument("--cv", type=int, default=3, help="cross-validation folds for hyper-parameters")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from .report import metrics_text, write_report
    from .training import train_from_store

    res = train_from_store(args.store, args.head, args.class_weight, args.test_size, args.seed, args.cv)
    out = Path(args.out)
    res.head.save(out)
    cv = f", CV accuracy {res.info['cv_accuracy']:.2%}" if "cv_accuracy" in res.info else ""
    params = ", ".join(f"{k}={v}" for k, v in res.head.params.items()) or "defaults"
    details = {"head": args.head, "hyper-parameters": params, "backbone": res.head.spec.describe(),
               "store": args.store, "trained on": f"{res.n_train} images",
               "evaluated on": res.split, "training time": f"{res.info['train_seconds']:.2f} s"}
    reports = write_report(res.metrics, out, f"tl-embed {args.head} head: {out.name}", details)
    print(f"head {args.head}: {params} (chosen by {res.info.get('cv_folds', 0)}-fold stratified CV{cv})")
    print(f"trained on {res.n_train} images in {res.info['train_seconds']:.2f} s; "
          f"evaluated on {res.split}:\n")
    print(metrics_text(res.metrics))
    print(f"\nwrote {out}, " + ", ".join(str(r) for r in reports))


# ------------------------------------------------------- predict/evaluate
def _register_predict(sub) -> None:
    p = _add(sub, "predict", "label new images (or a store) with a trained head",
             "Embed the inputs with the backbone recorded in the model file and print the top-k "
             "labels with probabilities. Inputs are images, folders, or a store (.tle).")
    p.add_argument("model", help="model file from `tl-embed train`")
    p.add_argument("inputs", nargs="+", help="images, folders of images, or a store")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="below this top probability the answer is 'unknown'")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    add_runtime_option(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> None:
    from .heads import Head
    from .training import embed_for, is_store, store_features

    head = Head.load(args.model)
    if len(args.inputs) == 1 and is_store(args.inputs[0]):
        X, _, paths = store_features(head, args.inputs[0])
        failed = []
    else:
        emb = embed_for(head.spec, args.inputs, args.runtime)
        X, paths, failed = emb.vectors, [str(p) for p in emb.paths], emb.failed
    k = max(1, min(args.top_k, len(head.classes)))
    proba = head.predict_proba(X) if len(paths) else np.zeros((0, len(head.classes)))
    top = np.argsort(-proba, axis=1)[:, :k]
    rows = []
    for i, path in enumerate(paths):
        preds = [(head.classes[j], float(proba[i, j])) for j in top[i]]
        label = preds[0][0] if preds[0][1] >= args.min_confidence else "unknown"
        rows.append({"path": path, "label": label, "confidence": preds[0][1],
                     "top": [{"label": c, "probability": round(p, 4)} for c, p in preds]})
    _print_rows(rows, args.format, k)
    for path, reason in failed:
        print(f"tl-embed: skipped {path}: {reason}", file=sys.stderr)


def _print_rows(rows: list[dict], fmt: str, k: int) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", "confidence"] + [f"{s}{i}" for i in range(1, k + 1)
                                                      for s in ("top", "p")])
        for r in rows:
            w.writerow([r["path"], r["label"], f"{r['confidence']:.4f}"] +
                       [v for t in r["top"] for v in (t["label"], t["probability"])])
    else:
        width = min(60, max([len(r["path"]) for r in rows] + [4]))
        for r in rows:
            tops = "  ".join(f"{t['label']} {t['probability']:.2f}" for t in r["top"])
            print(f"{r['path'][-width:]:<{width}}  {r['label']:<14} {tops}")


def _register_evaluate(sub) -> None:
    p = _add(sub, "evaluate", "report a head's accuracy on other labelled data (store or folder)")
    p.add_argument("model")
    p.add_argument("data", help="labelled store (.tle) or image folder (labels = sub-folders)")
    p.add_argument("--split", default=None, help="only this split of a store (train/val/test)")
    p.add_argument("--out", default=None,
                   help="also write OUT.report.json/.md and OUT.confusion.png")
    add_runtime_option(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> None:
    from .heads import Head
    from .report import metrics_text, write_report
    from .training import evaluate_head

    head = Head.load(args.model)
    m = evaluate_head(head, args.data, args.split, args.runtime)
    print(f"{Path(args.model).name} on {args.data}:\n")
    print(metrics_text(m))
    if args.out:
        paths = write_report(m, Path(args.out), f"evaluation of {Path(args.model).name}",
                             {"data": args.data, "backbone": head.spec.describe()})
        print("\nwrote " + ", ".join(map(str, paths)))


# -------------------------------------------------------------- classify
def _register_classify(sub) -> None:
    p = _add(sub, "classify", "ImageNet classification with a full pretrained model",
             "Run the complete ImageNet model (include_top=True) and print decode_predictions "
             "labels. Offline, the top-included weights must already be in the Keras cache.")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args) -> None:
    from .classify import classify

    results = classify(args.images, args.model, args.top_k)
    if args.format == "json":
        print(json.dumps([{"path": str(p), "top": [{"label": n, "probability": round(s, 4)}
                                                   for n, s in preds]} for p, preds in results], indent=2))
        return
    for path, preds in results:
        print(f"{path}: " + ", ".join(f"{n} {s:.2f}" for n, s in preds))


# ----------------------------------------------------------------- index
def _register_index(sub) -> None:
    from .index import METRICS

    p = _add(sub, "index", "build or update a FAISS similarity index over a store",
             "Build a FAISS index over the store's embeddings (or bring an existing one up to date: "
             "new vectors are added and removed ones removed, without a rebuild where the type "
             "allows). Prints recall@10 against exact search, memory and query latency.")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True, help="index folder to write (e.g. photos.tli)")
    p.add_argument("--type", default="auto",
                   help="auto | flat | hnsw | ivf | ivfpq | a FAISS factory string such as 'IVF1024,PQ64'")
    p.add_argument("--metric", default="cosine", choices=METRICS)
    p.add_argument("--max-memory", default=None,
                   help="memory budget for the index, e.g. 2GB or 500MB (auto picks IVF-PQ above it)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="approximate indexes: smallest nprobe/efSearch reaching this recall@10")
    p.set_defaults(func=cmd_index)


def _bytes(text: str | None) -> float | None:
    if text is None:
        return None
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return float(t[: -len(unit)]) * mult
            except ValueError:
                break
    raise TlEmbedError(f"--max-memory must look like 500MB or 2GB, not {text!r}")


def cmd_index(args) -> None:
    from .index import Index

    idx = Index.build(args.store, args.out, args.type, args.metric, _bytes(args.max_memory),
                      args.target_recall)
    print(idx.describe())


def _register_search(sub) -> None:
    p = _add(sub, "search", "find the images most similar to query images",
             "Embed the queries with the index's own backbone (images already in the store reuse "
             "their stored embedding) and list the nearest neighbours.")
    p.add_argument("index", help="index folder from `tl-embed index`")
    p.add_argument("queries", nargs="+", help="query images or folders (or paths of stored images)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query")
    p.add_argument("--limit", type=int, default=None,
                   help="query at most this many of the given images, evenly spread (a sample)")
    p.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    p.add_argument("--out", default="search.html", help="with --format html: the page to write")
    add_runtime_option(p)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> None:
    from .embed import expand_inputs
    from .index import Index

    idx = Index.open(args.index)
    queries = expand_inputs(args.queries) if any(Path(q).is_dir() for q in args.queries) else args.queries
    if args.limit and len(queries) > args.limit:
        queries = [queries[round(i)] for i in np.linspace(0, len(queries) - 1, args.limit)]
    results = idx.search(queries, args.k, args.runtime)
    score = "similarity" if idx.meta["metric"] == "cosine" else "distance"
    if args.format == "html":
        from .report import contact_sheet

        contact_sheet([(Path(q), [(h.rank, h.path, h.score) for h in hits]) for q, hits in results],
                      Path(args.out), f"tl-embed search: {Path(args.index).name}")
        print(f"wrote {args.out} ({len(results)} queries, open it in a browser)")
    elif args.format == "json":
        print(json.dumps([{"query": q, "neighbours": [{"rank": h.rank, "path": h.path, score: h.score}
                                                       for h in hits]} for q, hits in results], indent=2))
    elif args.format == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["query", "rank", "path", score])
        for q, hits in results:
            w.writerows([q, h.rank, h.path, f"{h.score:.5f}"] for h in hits)
    else:
        for q, hits in results:
            print(f"query {q}")
            for h in hits:
                print(f"  {h.rank:>3}  {h.score:.4f}  {h.path}")


def _register_dedup(sub) -> None:
    p = _add(sub, "dedup", "report groups of near-duplicate images in a store")
    p.add_argument("store")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity for duplicates")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--out", default=None, help="write the report to this file instead of printing it")
    p.set_defaults(func=cmd_dedup)


def cmd_dedup(args) -> None:
    from .index import find_duplicates

    groups = find_duplicates(args.store, args.threshold)
    buf = io.StringIO()
    if args.format == "json":
        buf.write(json.dumps([[{"path": p, "similarity": round(s, 4)} for p, s in g] for g in groups], indent=2))
    elif args.format == "csv":
        import csv

        w = csv.writer(buf)
        w.writerow(["group", "size", "path", "similarity"])
        for n, g in enumerate(groups, 1):
            w.writerows([n, len(g), p, f"{s:.4f}"] for p, s in g)
    else:
        total = sum(len(g) for g in groups)
        buf.write(f"{len(groups)} group(s) of near-duplicates (cosine >= {args.threshold}), {total} images\n")
        for n, g in enumerate(groups, 1):
            buf.write(f"group {n} ({len(g)} images)\n" + "".join(f"  {s:.4f}  {p}\n" for p, s in g))
    if args.out:
        from .store import atomic_write

        atomic_write(Path(args.out), lambda f: f.write(buf.getvalue().encode()))
        print(f"{len(groups)} group(s) of near-duplicates (cosine >= {args.threshold}); wrote {args.out}")
    else:
        print(buf.getvalue().rstrip("\n"))


# ------------------------------------------------------------------- run
def _register_run(sub) -> None:
    p = _add(sub, "run", "run a pipeline file (pipelines/*.toml): several commands in one",
             "Run the steps of a pipeline file in order. A step whose outputs are newer than its "
             "inputs and whose options did not change is skipped (skipped: up to date).")
    p.add_argument("pipeline", help="pipeline file, e.g. pipelines/classify-folder.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline variable (images=..., model=..., weights=..., out=...)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> None:
    from . import pipeline

    pipe = pipeline.load(args.pipeline, args.overrides)
    if pipe.description:
        print(pipe.description)
    ran = pipeline.run(pipe, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"pipeline {Path(args.pipeline).name}: {ran} step(s) ran, "
              f"{len(pipe.steps) - ran} up to date; outputs in {pipe.stamp_dir}")


COMMANDS = [_register_models, _register_embed, _register_info, _register_export, _register_train,
            _register_predict, _register_evaluate, _register_classify, _register_index,
            _register_search, _register_dedup, _register_run]

if __name__ == "__main__":
    sys.exit(main())
