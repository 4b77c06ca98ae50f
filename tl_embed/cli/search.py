"""Commands around similarity search: index, search, evaluate-search, dedup."""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..kinds import INDEX, STORE
from ..wording import count
from .options import add_command, add_runtime_option, fraction, non_negative_int, positive_int


# ----------------------------------------------------------------- index
def register_index(sub) -> None:
    from ..search.index import METRICS

    p = add_command(sub, "index", "build or update a FAISS similarity index over a store",
             "Build a FAISS index over the store's embeddings (or bring an existing one up to date: "
             "new vectors are added and removed ones removed, without a rebuild where the type "
             "allows). Streams the store in bounded memory; prints recall@10 against exact search on "
             "held-out rows, memory, single-query latency and batch QPS. For retrieval, "
             "--whiten-power 0 --whiten-dim 256 --dba 2 measured better than the default on every photo "
             "set of benchmarks/retrieval.py (check yours with `tl-embed evaluate-search`).")
    p.add_argument("store")
    p.add_argument("--out", "-o", required=True, help="index folder to write (e.g. photos.tli)")
    p.add_argument("--type", default="auto",
                   help="auto | flat | ivf | sqfp16 | sq8 | pq | opq | hnsw | a FAISS factory string such as "
                        "'IVF1024,PQ64'")
    p.add_argument("--metric", default="cosine", choices=METRICS)
    p.add_argument("--max-memory", default=None, type=memory_size,
                   help="memory budget for the index, e.g. 2GB or 500MB (default 2GB): auto compresses "
                        "(SQfp16, SQ8, PQ) to fit it")
    p.add_argument("--target-recall", type=fraction, default=0.95,
                   help="approximate indexes: smallest nprobe/efSearch reaching this recall@10")
    p.add_argument("--no-rerank", dest="rerank", action="store_const", const=False, default=None,
                   help="lossy codes (SQ8, PQ): do not re-rank the shortlist with the store's vectors")
    p.add_argument("--whiten", action="store_true",
                   help="PCA-whiten the vectors (fitted on this store, kept in the index, applied to every "
                        "query too); cosine only")
    p.add_argument("--whiten-dim", type=positive_int, default=None, metavar="D",
                   help="whiten and keep only the first D principal components (implies --whiten)")
    p.add_argument("--whiten-power", type=fraction, default=None, metavar="P",
                   help="how strongly to whiten (implies --whiten; default 0.5, full whitening): each component "
                        "is scaled by its variance ^ -P; 0 only centres and projects")
    p.add_argument("--dba", type=non_negative_int, default=0, metavar="N",
                   help="database-side augmentation: index each vector merged with its N nearest neighbours "
                        "(0: off); cosine only")
    p.set_defaults(func=cmd_index, reads={"store": (STORE,)}, writes=INDEX)


def memory_size(text: str) -> float:
    """``--max-memory``: a size such as 500MB or 2GB, in bytes."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), None)
    try:
        size = float(t[: -len(unit)]) * units[unit] if unit else math.nan
    except ValueError:
        size = math.nan
    if not size > 0 or math.isinf(size):
        raise argparse.ArgumentTypeError(f"must be a positive size such as 500MB or 2GB, not {text!r}")
    return size


def cmd_index(args) -> None:
    from ..search.index import Index

    idx = Index.build(args.store, args.out, args.type, args.metric, args.max_memory, args.target_recall,
                      rerank=args.rerank, whiten=args.whiten, whiten_dim=args.whiten_dim,
                      whiten_power=args.whiten_power, dba=args.dba)
    print(idx.describe())


def add_qe_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qe", type=non_negative_int, default=0, metavar="N",
                   help="query expansion: search again with each query merged with its top N results "
                        "(0: off)")


def register_search(sub) -> None:
    p = add_command(sub, "search", "find the images most similar to query images",
             "Embed the queries with the index's own backbone (images already in the store reuse "
             "their stored embedding) and list the nearest neighbours.")
    p.add_argument("index", help="index folder from `tl-embed index`")
    p.add_argument("queries", nargs="+", help="query images or folders (or paths of stored images)")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours per query")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="query at most this many of the given images, evenly spread (a sample)")
    p.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    p.add_argument("--out", default="search.html", help="with --format html: the page to write")
    add_qe_option(p)
    add_runtime_option(p)
    p.set_defaults(func=cmd_search, reads={"index": (INDEX,)})


def cmd_search(args) -> None:
    from ..embedding.scan import expand_inputs
    from ..search.index import Index

    idx = Index.open(args.index)
    queries = expand_inputs(args.queries) if any(Path(q).is_dir() for q in args.queries) else args.queries
    if args.limit and len(queries) > args.limit:
        queries = [queries[round(i)] for i in np.linspace(0, len(queries) - 1, args.limit)]
    results = idx.search(queries, args.k, args.runtime, exclude_self=True, qe=args.qe)
    score = "similarity" if idx.meta["metric"] == "cosine" else "distance"
    if args.format == "html":
        from ..search.sheet import contact_sheet

        contact_sheet([(Path(q), [(h.rank, h.path, h.score) for h in hits]) for q, hits in results],
                      Path(args.out), f"tl-embed search: {Path(args.index).name}",
                      Path(idx.meta["root"]) if idx.meta["root"] else None)
        print(f"wrote {args.out} ({count(len(results), 'query')}, open it in a browser)")
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


def register_evaluate_search(sub) -> None:
    p = add_command(sub, "evaluate-search", "score an index's retrieval on labelled images: mAP, recall@k",
                    "Score how well an index retrieves images of the same label: every labelled image of its "
                    "store is a query against all the others (itself left out), or the labelled images of "
                    "--queries are. Prints mAP over each query's ranked list and recall@1/5/10, the share of "
                    "queries with an image of their label among the first k.")
    p.add_argument("index", help="index folder from `tl-embed index`")
    p.add_argument("--queries", default=None, metavar="STORE",
                   help="labelled store of query images (same backbone), instead of the index's own images")
    add_qe_option(p)
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most this many queries, evenly spread (a sample, for large stores)")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    p.set_defaults(func=cmd_evaluate_search, reads={"index": (INDEX,), "queries": (STORE,)})


def cmd_evaluate_search(args) -> None:
    from ..search.evaluate import evaluate_search

    scores = evaluate_search(args.index, args.queries, args.qe, args.limit)
    if args.format == "json":
        print(json.dumps({"index": args.index, "query_store": args.queries, **scores.to_dict()}, indent=2))
    else:
        print(f"{args.index}: {scores.describe()}")


def register_dedup(sub) -> None:
    from ..search.dedup import EXACT_PAIRS_MAX, MODES

    p = add_command(sub, "dedup", "report groups of near-duplicate images in a store",
                    "Report groups of near-duplicate images: pairs of embeddings at or above a cosine "
                    "similarity, joined into connected groups. Small stores compare all pairs; large ones "
                    "take each image's nearest neighbours from a temporary approximate index as candidates "
                    "and check each candidate exactly.")
    p.add_argument("store")
    p.add_argument("--threshold", type=fraction, default=0.95, help="cosine similarity for duplicates")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help=f"exact: all pairs; ann: each image's -k nearest neighbours as candidates; "
                        f"auto: exact up to {EXACT_PAIRS_MAX:,} images, ann beyond")
    p.add_argument("-k", type=positive_int, default=10,
                   help="ann: neighbours checked per image (raise it for groups larger than k+1)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--out", default=None, help="write the report to this file instead of printing it")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_dedup, reads={"store": (STORE,)})


def cmd_dedup(args) -> None:
    from ..search.dedup import find_duplicates

    groups = find_duplicates(args.store, args.threshold, args.mode, args.k, progress=not args.quiet)
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
        buf.write(f"{count(len(groups), 'group')} of near-duplicates (cosine >= {args.threshold}), "
                  f"{count(total, 'image')}\n")
        for n, g in enumerate(groups, 1):
            buf.write(f"group {n} ({len(g)} images)\n" + "".join(f"  {s:.4f}  {p}\n" for p, s in g))
    if args.out:
        from ..files import atomic_write

        atomic_write(Path(args.out), lambda f: f.write(buf.getvalue().encode()))
        print(f"{count(len(groups), 'group')} of near-duplicates (cosine >= {args.threshold}); wrote {args.out}")
    else:
        print(buf.getvalue().rstrip("\n"))
