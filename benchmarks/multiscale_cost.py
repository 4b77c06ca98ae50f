"""What ``embed --scales 1,1.414`` costs: embed rate and one uploaded image's decode + embed, side by side.

    python benchmarks/multiscale_cost.py [--set flowers12] [--rounds 2]

The set is embedded into fresh stores in turn, ``--rounds`` times each, with MobileNetV2 (genuine ImageNet
weights through a temporary KERAS_HOME): average pooling at one scale (the default) and R-MAC at scales 1 and
√2 (317 px decoded, 224 px resized in the model).  Rates are ``embed``'s own (decode, inference, commits);
the query time is the median over 35 photos of decoding one at the store's input size and embedding it
alone, as a search or predict of an uploaded image does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_cpu
from retrieval import SHARED, keras_home

SETTINGS = (("avg", "1"), ("rmac", "1,1.414"))
QUERIES = 40  # the first 5 warm the runtime up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="flowers12")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras_home()
    print(describe_cpu())
    from tl_embed import EmbeddingStore, embed_folder
    from tl_embed.embedding.images import load_image
    from tl_embed.embedding.query import runtime_for

    folder = SHARED / "datasets" / args.set
    work = Path(tempfile.mkdtemp(prefix="tl-embed-ms-cost-"))
    rates: dict[tuple[str, str], list[float]] = {s: [] for s in SETTINGS}
    query_ms: dict[tuple[str, str], float] = {}
    try:
        for rnd in range(args.rounds):
            for pooling, scales in SETTINGS:
                out = work / f"{pooling}-{rnd}.tle"
                report = embed_folder(folder, out, pooling=pooling, scales=scales, progress=False)
                rates[(pooling, scales)].append(report.embedded / report.embed_seconds)
                if rnd == args.rounds - 1:
                    with EmbeddingStore.open(out) as s:
                        spec = s.spec
                    run = runtime_for(spec)
                    times = []
                    for f in sorted(folder.rglob("*.jpg"))[:QUERIES]:
                        t = time.perf_counter()
                        run(load_image(f, spec.input_size).pixels[None])
                        times.append(time.perf_counter() - t)
                    query_ms[(pooling, scales)] = 1000 * float(np.median(times[5:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = SETTINGS[0]
    for setting in SETTINGS:
        rate = float(np.median(rates[setting]))
        print(f"{setting[0]} --scales {setting[1]}: {rate:.1f} img/s (rounds: "
              f"{', '.join(f'{r:.1f}' for r in rates[setting])}), "
              f"{np.median(rates[base]) / rate:.2f}x the embedding time; one uploaded image "
              f"{query_ms[setting]:.1f} ms ({query_ms[setting] / query_ms[base]:.2f}x)")


if __name__ == "__main__":
    main()
