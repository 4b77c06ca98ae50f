"""Commands around classifier heads: train, predict, evaluate, and plain ImageNet classify."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..kinds import EXPORT, HEAD, STORE
from .options import (
    add_command,
    add_runtime_option,
    add_trust_pickle_option,
    fraction,
    non_negative_int,
    positive_int,
)


# ----------------------------------------------------------------- train
def register_train(sub) -> None:
    from ..heads.head import DEFAULT_HEAD, HEADS
    from ..heads.sweep import TRANSFORMS

    p = add_command(sub, "train", "train a classifier head on a store's labelled embeddings",
             "Train a head on the store's labelled rows and report on a held-out part: "
             "the store's own test (or val) split when it has one, else a stratified --test-size "
             "hold-out. Hyper-parameters are chosen on the training rows only (stratified CV, or a "
             "validation split for dense), then the head is refitted on all of them. Writes the "
             "model file (data only, no pickle) plus OUT.report.json/.md and OUT.confusion.png.")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True, help="model file to write (e.g. pets.tlh)")
    p.add_argument("--head", default=DEFAULT_HEAD, choices=HEADS,
                   help="svm: linear SVM with sigmoid-calibrated probabilities; logreg: multinomial "
                        "logistic regression; knn: cosine k-NN; dense: the tutorials' Keras head "
                        "(Dropout + Dense softmax, early-stopped)")
    p.add_argument("--transform", default="auto", choices=["auto", *TRANSFORMS],
                   help="logreg/svm feature transform before standardisation: sqrt-l2 = signed square "
                        "root then L2 normalisation; auto chooses by CV, with C")
    p.add_argument("--hidden", type=non_negative_int, default=0,
                   help="dense: units of one hidden ReLU layer (0: none, the tutorials' head)")
    p.add_argument("--class-weight", choices=["balanced"], default=None,
                   help="re-weight classes inversely to their frequency")
    p.add_argument("--test-size", type=float, default=0.2,
                   help="held-out fraction when the store has no test/val split")
    p.add_argument("--cv", type=positive_int, default=3, help="cross-validation folds for hyper-parameters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", metavar="FILE", default=None,
                   help="leave these images out of training: a CSV with a path column (what `tl-embed audit "
                        "--out audit.csv` writes) or one path per line; the held-out rows stay the same")
    add_relabel_option(p)
    p.set_defaults(func=cmd_train, reads={"store": (STORE,)}, writes=HEAD)


def add_relabel_option(p) -> None:
    p.add_argument("--relabel", metavar="FILE", default=None,
                   help="use these labels instead of the folder names: a CSV with path and label columns "
                        "(paths relative to the store's image folder); the images are not touched")


def _row_files(args) -> tuple[set[str], dict[str, str] | None]:
    """What --exclude and --relabel list, as store paths."""
    from ..embedding.store import EmbeddingStore
    from ..heads.row_files import read_paths, read_relabel

    if not getattr(args, "exclude", None) and not args.relabel:
        return set(), None
    with EmbeddingStore.open(getattr(args, "store", None) or args.data) as store:
        root = store.root
    exclude = read_paths(args.exclude, root) if getattr(args, "exclude", None) else set()
    return exclude, read_relabel(args.relabel, root) if args.relabel else None


def cmd_train(args) -> None:
    from ..heads.report import metrics_text, write_report
    from ..heads.training import train_from_store

    exclude, relabel = _row_files(args)
    res = train_from_store(args.store, args.head, args.class_weight, args.test_size, args.seed, args.cv,
                           args.transform, args.hidden, exclude, relabel)
    out = Path(args.out)
    res.head.save(out)
    params = ", ".join(f"{k}={v}" for k, v in res.head.params.items()) or "defaults"
    left_out = res.head.metrics["trained_on"].get("excluded")
    relabelled = res.head.metrics["trained_on"].get("relabelled")
    trained = f"{res.n_train} images" + (f" ({left_out} left out by --exclude)" if left_out else "") + (
        f" ({relabelled} relabelled by --relabel)" if relabelled else "")
    details = {"head": args.head, "hyper-parameters": params, "backbone": res.head.spec.describe(),
               "store": args.store, "trained on": trained,
               "evaluated on": res.split, "training time": f"{res.info['train_seconds']:.2f} s"}
    reports = write_report(res.metrics, out, f"tl-embed {args.head} head: {out.name}", details)
    print(f"head {args.head}: {params} ({_how_chosen(res.info)})")
    print(f"trained on {trained} in {res.info['train_seconds']:.2f} s; "
          f"evaluated on {res.split}:\n")
    print(metrics_text(res.metrics))
    print(f"\nwrote {out}, " + ", ".join(str(r) for r in reports))


def _how_chosen(info: dict) -> str:
    if "validation_rows" in info:
        return (f"early-stopped on a {info['validation_rows']}-image validation split, "
                f"validation accuracy {info['validation_accuracy']:.2%}")
    if "cv_folds" in info:
        return f"chosen by {info['cv_folds']}-fold stratified CV, CV accuracy {info['cv_accuracy']:.2%}"
    return "defaults: a class is too small to hold images out"


# ------------------------------------------------------- predict/evaluate
def register_predict(sub) -> None:
    p = add_command(sub, "predict", "label new images (or a store) with a trained head",
             "Embed the inputs with the backbone recorded in the model file and print the top-k "
             "labels with probabilities. Inputs are images, folders, or a store (.tle). MODEL may also "
             "be a folder written by `tl-embed export-model`: its one model then labels the images.")
    p.add_argument("model", help="model file from `tl-embed train`, or an export-model folder")
    p.add_argument("inputs", nargs="+", help="images, folders of images, or a store")
    p.add_argument("--top-k", type=positive_int, default=1)
    p.add_argument("--min-confidence", type=fraction, default=0.0,
                   help="below this top probability the answer is 'unknown'")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    add_runtime_option(p)
    add_trust_pickle_option(p)
    p.set_defaults(func=cmd_predict, reads={"model": (HEAD, EXPORT), "inputs": (STORE,)})


def cmd_predict(args) -> None:
    from ..heads.exported import is_export_dir
    from ..heads.head import top_predictions

    if is_export_dir(args.model):
        classes, proba, paths, failed = _predict_exported(args)
    else:
        classes, proba, paths, failed = _predict_head(args)
    k = max(1, min(args.top_k, len(classes)))
    rows = [{"path": path, "label": pred.label, "confidence": pred.confidence,
             "top": [{"label": c, "probability": round(p, 4)} for c, p in pred.top]}
            for path, pred in zip(paths, top_predictions(proba, classes, k, args.min_confidence), strict=True)]
    _print_rows(rows, args.format, k, _display_base(args.inputs))
    for path, reason in failed:
        print(f"tl-embed: skipped {path}: {reason}", file=sys.stderr)


def _predict_head(args) -> tuple[list[str], np.ndarray, list[str], list]:
    """(classes, probabilities, paths, failed) of a model file: embed, then the head's steps."""
    from ..embedding.query import embed_for
    from ..heads.head import Head
    from ..heads.training import is_store, store_features

    head = Head.load(args.model, args.trust_pickle)
    if len(args.inputs) == 1 and is_store(args.inputs[0]):
        X, _, paths = store_features(head, args.inputs[0])
        failed = []
    else:
        emb = embed_for(head.spec, args.inputs, args.runtime)
        X, paths, failed = emb.vectors, [str(p) for p in emb.paths], emb.failed
    proba = head.predict_proba(X) if len(paths) else np.zeros((0, len(head.classes)))
    return head.classes, proba, paths, failed


def _predict_exported(args) -> tuple[list[str], np.ndarray, list[str], list]:
    """The same from an export folder: its one model maps decoded images to probabilities."""
    from ..embedding.query import embed_paths
    from ..embedding.scan import expand_inputs
    from ..errors import TlEmbedError
    from ..heads.exported import load_export
    from ..heads.training import is_store

    if any(is_store(i) for i in args.inputs):
        raise TlEmbedError(f"{args.model} is an exported model: it takes images, not a store's embeddings; "
                           "label a store with the .tlh model file")
    if args.runtime != "auto":
        raise TlEmbedError(f"--runtime does not apply to an exported model: {args.model} runs in its own format")
    model = load_export(args.model)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise TlEmbedError("no images found in " + ", ".join(map(str, args.inputs)))
    out = embed_paths(paths, model, model.input_size)
    proba = out.vectors if len(out.paths) else np.zeros((0, len(model.classes)))
    return model.classes, proba, [str(p) for p in out.paths], out.failed


def _display_base(inputs: list[str]) -> str:
    """The folder a table's paths are shown relative to: the common folder of what was given (a store's
    image root for a store), so the table shows ``cats/01.jpg``, not a long absolute path."""
    from ..embedding.store import EmbeddingStore
    from ..heads.training import is_store

    if len(inputs) == 1 and is_store(inputs[0]):
        with EmbeddingStore.open(inputs[0]) as store:
            return str(store.root)
    folders = [os.path.abspath(i if os.path.isdir(i) else os.path.dirname(i) or ".") for i in inputs]
    return os.path.commonpath(folders)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _print_rows(rows: list[dict], fmt: str, k: int, base: str) -> None:
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
        shown = [os.path.relpath(os.path.abspath(r["path"]), base) for r in rows]
        shown = [p if not p.startswith("..") else r["path"] for p, r in zip(shown, rows, strict=True)]
        width = min(60, max([len(p) for p in shown] + [5]))
        label_width = min(30, max([len(r["label"]) for r in rows] + [5]))
        others = ["2nd", "3rd", *[f"{i}th" for i in range(4, k + 1)]][: k - 1]
        print(f"{'image':<{width}}  {'label':<{label_width}}  {'p':>4}" + "".join(f"  {o:<{label_width + 5}}"
                                                                           for o in others).rstrip())
        for path, r in zip(shown, rows, strict=True):
            also = [f"{_shorten(t['label'], label_width)} {t['probability']:.2f}" for t in r["top"][1:]]
            rest = "".join(f"  {a:<{label_width + 5}}" for a in also)
            print(f"{_shorten(path, width):<{width}}  {_shorten(r['label'], label_width):<{label_width}}  "
                  f"{r['confidence']:>4.2f}{rest}".rstrip())


def register_evaluate(sub) -> None:
    p = add_command(sub, "evaluate", "report a head's accuracy on other labelled data (store or folder)")
    p.add_argument("model")
    p.add_argument("data", help="labelled store (.tle) or image folder (labels = sub-folders)")
    p.add_argument("--split", default=None,
                   help="score this split of a store (train/val/test). Default: on the store the head was "
                        "trained on, the rows held out from training; on any other data, every labelled image")
    p.add_argument("--out", default=None,
                   help="also write OUT.report.json/.md and OUT.confusion.png")
    add_relabel_option(p)
    add_runtime_option(p)
    add_trust_pickle_option(p)
    p.set_defaults(func=cmd_evaluate, reads={"model": (HEAD,), "data": (STORE,)})


def cmd_evaluate(args) -> None:
    from ..errors import TlEmbedError
    from ..heads.head import Head
    from ..heads.report import metrics_text, write_report
    from ..heads.training import evaluate_head, is_store

    head = Head.load(args.model, args.trust_pickle)
    relabel = _row_files(args)[1] if args.relabel and is_store(args.data) else None
    if args.relabel and relabel is None:
        raise TlEmbedError("--relabel applies to a store; an image folder is scored with its folder labels")
    m, scored = evaluate_head(head, args.data, args.split, args.runtime, relabel)
    print(f"{Path(args.model).name} on {args.data}, scored on {scored}:\n")
    print(metrics_text(m))
    if args.out:
        paths = write_report(m, Path(args.out), f"evaluation of {Path(args.model).name}",
                             {"data": args.data, "scored on": scored, "backbone": head.spec.describe()})
        print("\nwrote " + ", ".join(map(str, paths)))


# ----------------------------------------------------------- export-model
def register_export_model(sub) -> None:
    from ..heads.exported import FORMATS, PRECISIONS

    p = add_command(sub, "export-model", "export a head with its backbone as one model (images -> probabilities)",
             "Fold the backbone, its preprocessing and the head into one model taking RGB uint8 images "
             "(N, S, S, 3) at the backbone's input size and returning class probabilities. Writes the "
             "folder OUT: the model, labels.txt (one class per line, in output order), README.md (how to "
             "call it) and export.json (so `tl-embed predict OUT images...` runs it). A previous export "
             "in OUT is replaced; any other non-empty folder is refused.")
    p.add_argument("model", help="model file from `tl-embed train`")
    p.add_argument("--format", required=True, choices=list(FORMATS),
                   help="keras (.keras file), savedmodel (TensorFlow SavedModel), tflite (fp32), "
                        "onnx (needs tl_embed[export]), openvino (IR, fp32 or int8)")
    p.add_argument("--out", "-o", required=True, help="folder to write")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto: the head's own (an int8 head exports its quantized backbone, openvino only); "
                        "fp32: the fp32 backbone, also for a head trained on int8 embeddings; int8: openvino only, "
                        "for a head trained on a --precision int8 store")
    add_trust_pickle_option(p)
    p.set_defaults(func=cmd_export_model, reads={"model": (HEAD,)}, writes=EXPORT)


def cmd_export_model(args) -> None:
    from ..heads.export import check_format, export_model
    from ..heads.exported import FORMATS
    from ..heads.head import Head

    check_format(args.format)
    head = Head.load(args.model, args.trust_pickle)
    res = export_model(head, args.format, args.out, args.precision)
    s = head.spec.input_size
    print(f"exported {Path(args.model).name} ({head.head} head, {head.spec.describe()}) as {args.format} "
          f"{res.precision} in {res.seconds:.1f} s: {res.out / FORMATS[args.format]} ({res.bytes / 1e6:.1f} MB)")
    print(f"input 'image': uint8 RGB 0-255, (N, {s}, {s}, 3); output 'probabilities': (N, {len(head.classes)}) "
          f"in the order of {res.out / 'labels.txt'}; see {res.out / 'README.md'}")


# -------------------------------------------------------------- classify
def register_classify(sub) -> None:
    p = add_command(sub, "classify", "ImageNet classification with a full pretrained model",
             "Run the complete ImageNet model (include_top=True) and print decode_predictions "
             "labels. Offline, the top-included weights must already be in the Keras cache.")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--top-k", type=positive_int, default=3)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args) -> None:
    from ..embedding.classify import classify

    results = classify(args.images, args.model, args.top_k)
    if args.format == "json":
        print(json.dumps([{"path": str(p), "top": [{"label": n, "probability": round(s, 4)}
                                                   for n, s in preds]} for p, preds in results], indent=2))
        return
    for path, preds in results:
        print(f"{path}: " + ", ".join(f"{n} {s:.2f}" for n, s in preds))
