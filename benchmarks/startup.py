"""One-image `tl-embed predict` and `tl-embed search`, and `tl-embed embed` of 10 new images into an existing
store and into a new one, each a fresh process, timed end to end.

Setup (temp folder): 30 real photos from ../shared/datasets/pets3 embedded with MobileNetV2 (genuine
weights via a temporary KERAS_HOME), a logistic-regression head and a Flat index.  Then, per command:

* ``no IR cache``: a fresh TL_EMBED_CACHE, so TensorFlow builds the backbone and OpenVINO converts it
  (what every run paid before start-up read the cached IR);
* ``keras runtime``: ``--runtime keras`` (TensorFlow's import and the Keras build, no conversion);
* ``cold``: the first run once the IR is cached (OpenVINO compiles it and caches the compiled blob);
* ``warm``: the median of the next --runs runs (IR and compiled blob cached, OS file cache warm).

For ``embed`` each run adds the same 10 new photos to a fresh copy of the 30-photo store (the copy is made
before the clock starts); for ``new store`` each run embeds those 10 photos into a new store (the last run's
is deleted first), whose spec comes from the recipe the first build left (``tl_embed/embedding/recipes.py``).
Each line also says whether the process imported TensorFlow.

    python benchmarks/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
sys.path.insert(0, str(HERE))

from machine import describe_cpu  # noqa: E402

PROBE = ("import sys; from tl_embed.cli import main; rc = main(sys.argv[1:]); "
         "print('TF' if 'tensorflow' in sys.modules else 'noTF', file=sys.stderr); sys.exit(rc)")


def run(args: list[str], env: dict) -> tuple[float, bool]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {out.stderr}")
    return took, out.stderr.strip().splitlines()[-1] == "TF"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(describe_cpu())
    with tempfile.TemporaryDirectory(prefix="tl_embed_startup-") as tmp_str:
        tmp = Path(tmp_str)
        home = tmp / "keras_home" / "models"
        home.mkdir(parents=True)
        for f in (SHARED / "weights").iterdir():
            if f.suffix in (".h5", ".json"):
                (home / f.name).symlink_to(f.resolve())
        photos = tmp / "photos"
        pool = sorted((SHARED / "datasets" / "pets3" / "train").rglob("*.jpg"))
        for f in pool[::12][:30]:
            (photos / f.parent.name).mkdir(parents=True, exist_ok=True)
            (photos / f.parent.name / f.name).symlink_to(f.resolve())
        new = [f for f in pool[5::12] if not (photos / f.parent.name / f.name).exists()][:10]
        query = str(next((SHARED / "datasets" / "pets3" / "test").rglob("*.jpg")))
        env = {**os.environ, "KERAS_HOME": str(home.parent), "TL_EMBED_CACHE": str(tmp / "setup_cache"),
               "PYTHONPATH": str(HERE.parent)}
        for step in (["embed", str(photos), "--out", str(tmp / "s.tle")], ["train", str(tmp / "s.tle"), "--out",
                     str(tmp / "m.tlh")], ["index", str(tmp / "s.tle"), "--out", str(tmp / "i.tli")]):
            run(step, env)
        for f in new:  # in the folder from now on (the store in s.tle does not hold them), and alone in ten/
            for folder in (photos, tmp / "ten"):
                (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
                (folder / f.parent.name / f.name).symlink_to(f.resolve())
        grown = tmp / "grown.tle"
        commands = {"predict": ["predict", str(tmp / "m.tlh"), query],
                    "search": ["search", str(tmp / "i.tli"), query, "-k", "5"],
                    "embed": ["embed", str(photos), "--out", str(grown), "-q"],
                    "new store": ["embed", str(tmp / "ten"), "--out", str(tmp / "new.tle"), "-q"]}
        print(f"{'command':<11}{'case':<16}{'seconds':>9}  tensorflow imported")
        for name, cmd in commands.items():
            cache = tmp / f"cache_{name}"
            fresh = {**env, "TL_EMBED_CACHE": str(cache)}

            def timed(argv: list[str], name: str = name, fresh: dict = fresh) -> tuple[float, bool]:
                if name == "embed":  # 10 new images each time: a fresh copy of the 30-image store
                    shutil.rmtree(grown, ignore_errors=True)
                    shutil.copytree(tmp / "s.tle", grown)
                shutil.rmtree(tmp / "new.tle", ignore_errors=True)
                return run(argv, fresh)

            rows = [("no IR cache", *timed(cmd)), ("keras runtime", *timed(cmd + ["--runtime", "keras"])),
                    ("cold", *timed(cmd))]
            warm = [timed(cmd) for _ in range(args.runs)]
            median = statistics.median(t for t, _ in warm)
            rows.append((f"warm (median {args.runs})", median, any(tf for _, tf in warm)))
            for case, seconds, tf in rows:
                print(f"{name:<11}{case:<16}{seconds:>9.2f}  {'yes' if tf else 'no'}")
            shutil.rmtree(cache)
        print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
