"""Commands of the embedding stage: models, embed, info, export."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TlEmbedError
from ..kinds import STORE
from ..wording import count
from .options import add_backbone_options, add_command, add_runtime_option, positive_float, positive_int


# ---------------------------------------------------------------- models
def register_models(sub) -> None:
    p = add_command(sub, "models", "list the available backbones")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> None:
    from ..embedding.backbones import BACKBONES

    if args.format == "json":
        print(json.dumps([{"name": b.name, "keras": b.keras_name, "input_size": b.input_size,
                           "dim": b.dim, "note": b.note} for b in BACKBONES.values()], indent=2))
        return
    print(f"{'model':<22}{'input':>7}{'dim':>6}  note")
    for b in BACKBONES.values():
        print(f"{b.name:<22}{b.input_size:>5}px{b.dim:>6}  {b.note}")
    print("\nAny saved Keras model (.keras/.h5) works too: --model my_model.keras [--layer NAME]")


# ----------------------------------------------------------------- embed
def register_embed(sub) -> None:
    from ..embedding.backbones import TTAS
    from ..embedding.precision import CHOICES

    p = add_command(sub, "embed", "embed a folder of images into a store (resumable, incremental)",
             "Embed every image under IMAGES into the store OUT. Re-running only embeds new or "
             "changed files and removes deleted ones (many at once only with --prune); an interrupted run "
             "continues where it stopped. Folder links are followed, each real folder once. "
             "Labels come from the first sub-folder; a top-level train/val/test folder is the split.")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--out", "-o", required=True,
                   help="store folder to create or update (e.g. photos.tle)")
    add_backbone_options(p)
    p.add_argument("--tta", default="none", choices=TTAS,
                   help="test-time augmentation: 'flip' stores the mean of the embeddings of each image and its "
                        "mirror (about twice the inference per image); a store keeps one setting, and queries, "
                        "heads and indexes made from it use it too")
    p.add_argument("--precision", default="auto", choices=CHOICES,
                   help="what the backbone computes in: 'fp32' (the reference); 'int8' quantizes it with NNCF on a "
                        "sample of IMAGES (pip install \"tl_embed[int8]\"), carries that model in the store and says "
                        "how close it stays to fp32 on your images; 'bf16' needs a CPU with native bf16. 'auto': "
                        "the store's own when updating one, else fp32 (what was measured best: docs/performance.md). "
                        "Queries, heads and indexes of the store use it too")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage precision of a new store")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per inference batch and commit")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="local engine: decoding threads (default: CPU cores); ray engine: actors "
                        "(default: the cluster's CPUs / --cpus-per-worker)")
    add_runtime_option(p)
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="'local': this process; 'ray': a pool of Ray actors (pip install \"tl_embed[ray]\"), "
                        "on a local Ray started for the run or on the cluster at --address")
    p.add_argument("--address", default=None,
                   help="ray engine: an existing cluster ('auto', or ray://HOST:10001); the images must be on a "
                        "filesystem every node sees at the same path")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0,
                   help="ray engine: CPUs each actor reserves and its inference threads (fractions allowed)")
    p.add_argument("--prune", action="store_true",
                   help="allow removing the embeddings of many vanished images (more than 10 and more than 10%% "
                        "of the store, or all of it); without it such a run is refused, since an unmounted, "
                        "emptied or half-copied folder looks the same")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed, writes=STORE)


def cmd_embed(args) -> int:
    from ..embedding.embed import embed_folder
    from ..embedding.ray_engine import RayOptions

    if args.engine != "ray" and (args.address or args.cpus_per_worker != 1.0):
        raise TlEmbedError("--address and --cpus-per-worker apply only to --engine ray")
    ray = RayOptions(args.address, args.workers, args.cpus_per_worker)
    report = embed_folder(args.images, args.out, model=args.model, weights=args.weights,
                          pooling=args.pooling, layer=args.layer, preprocess=args.preprocess,
                          dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                          runtime=args.runtime, progress=not args.quiet, prune=args.prune,
                          engine=args.engine, ray=ray, tta=args.tta, precision=args.precision,
                          scales=args.scales)
    print(report.text())
    return 130 if report.interrupted else 0


# ------------------------------------------------------------------ info
def register_info(sub) -> None:
    p = add_command(sub, "info", "show what made a store, its counts and its failed images")
    p.add_argument("store")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_info, reads={"store": (STORE,)})


def cmd_info(args) -> None:
    from ..embedding.store import EmbeddingStore

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
              f"in {count(summary['shards'], 'shard')})")
        print("labels     " + _counts(summary["labels"]))
        print("splits     " + _counts(summary["splits"]))
        print(f"failed     {len(failures)}")
        for f in failures:
            print(f"  {f.path}: {f.reason}")


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


# ---------------------------------------------------------------- export
def register_export(sub) -> None:
    p = add_command(sub, "export", "export a store's embeddings to .npy and its manifest to .csv")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True,
                   help="output prefix: writes PREFIX.npy (N x D) and PREFIX.csv (row, path, label, ...)")
    p.set_defaults(func=cmd_export, reads={"store": (STORE,)})


def cmd_export(args) -> None:
    from ..embedding.store import EmbeddingStore

    npy, csv_ = export_paths(args.out)
    with EmbeddingStore.open(args.store) as s:
        s.export(npy, csv_)
        print(f"wrote {npy} ({len(s)} x {s.dim} {s.dtype}) and {csv_}")


def export_paths(out: str) -> tuple[Path, Path]:
    """PREFIX -> (PREFIX.npy, PREFIX.csv); the prefix keeps its own dots (``runs/emb.v2``), and a
    prefix given with ``.npy`` or ``.csv`` already is not doubled."""
    prefix = Path(out)
    if prefix.suffix.lower() in (".npy", ".csv"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".npy"), prefix.with_name(prefix.name + ".csv")
