"""`tl-embed serve` under a bounded load, against `tl-embed embed`'s throughput on the same backbone.

Setup (in a temp folder; nothing is written into ../shared): real photos from ../shared/datasets/pets3
are embedded with MobileNetV2 (genuine ImageNet weights via a temporary KERAS_HOME) by `embed_folder`,
which is also the throughput baseline (images/s, model loading excluded).  A 10 000-row store is then
synthesised from those real vectors plus noisy copies (EmbeddingStore.create/add), indexed, and served
by the real command in a subprocess on loopback.

Load: for each query kind (`upload`: a multipart JPEG, embedded by the service; `id`: a stored image's
vector) and each concurrency (1, 4, 16 clients, keep-alive connections in threads), at most --requests
requests or --seconds seconds.  Prints p50/p99 latency, throughput, errors and the CPU time per
request of the service and of this load generator (which shares the cores), then the goals: upload
p50 <= 50 ms at 1 client, and upload throughput at 16 clients >= 0.8 x embed's.

    python benchmarks/serve_latency.py [--requests 2000] [--seconds 60] [--rows 10000] [--serve-args ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def cpu_text() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("flags")), "")
    from tl_embed.cpus import cpu_count

    return f"CPU: {model}, {cpu_count()} usable cores\nflags: {flags}"


def keras_home(tmp: Path) -> Path:
    home = tmp / "keras_home"
    (home / "models").mkdir(parents=True)
    for f in (SHARED / "weights").iterdir():
        if f.suffix in (".h5", ".json"):
            (home / "models" / f.name).symlink_to(f.resolve())
    return home


def real_photos(tmp: Path, n: int) -> Path:
    files = sorted(p for p in (SHARED / "datasets" / "pets3").rglob("*.jpg"))[:n]
    folder = tmp / "photos"
    for f in files:
        dst = folder / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(f.resolve())
    return folder


def synthesise(real_store: Path, out: Path, rows: int) -> None:
    """A ``rows``-row store: the real rows, then noisy copies of their vectors under invented paths."""
    from tl_embed.embedding import EmbeddingStore, ManifestRow

    with EmbeddingStore.open(real_store) as real:
        spec, root = real.spec, real.root
        base_rows, base = list(real.rows), np.asarray(real.embeddings, np.float32)
    rng = np.random.default_rng(0)
    with EmbeddingStore.create(out, spec, root=root) as store:
        store.add(base_rows, base)
        for start in range(len(base_rows), rows, 2000):
            n = min(2000, rows - start)
            pick = rng.integers(0, len(base), n)
            vectors = np.abs(base[pick] + rng.normal(0, 0.35, (n, base.shape[1])).astype(np.float32))
            fake = [ManifestRow(f"synthetic/{start + i:06d}.jpg", base_rows[p].label, None, "0" * 64, 0, 0, 1, 1)
                    for i, p in enumerate(pick)]
            store.add(fake, vectors)
        store.compact()


def multipart(data: bytes, k: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int, seconds: float) -> dict:
    """``clients`` threads, each with one keep-alive connection, until ``requests`` are done or time is up."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = iter(range(requests))
    deadline = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                if next(issued, None) is None:
                    break
            body, ctype = rnd.choice(bodies)
            t = time.perf_counter()
            try:
                conn.request("POST", "/search", body, {"content-type": ctype})
                r = conn.getresponse()
                payload = r.read()
                ok = r.status == 200 and b'"neighbours"' in payload
            except OSError as e:
                ok, payload = False, str(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            took = time.perf_counter() - t
            with lock:
                latencies.append(took) if ok else errors.append(payload[:200].decode(errors="replace"))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "done": len(latencies), "errors": len(errors), "first_error": errors[:1],
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "rps": len(latencies) / wall, "seconds": wall}


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"tl-embed serve exited: {proc.stderr.read()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    sys.exit("tl-embed serve did not start within 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="per (query kind, concurrency)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time cap per (query kind, concurrency)")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--photos", type=int, default=400, help="real photos embedded (and the embed baseline)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--kinds", nargs="+", default=["upload", "id"], choices=["upload", "id"])
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="passed on to tl-embed serve (e.g. --max-batch 16); must come last")
    args = ap.parse_args()
    if not (SHARED / "weights").is_dir():
        sys.exit(f"{SHARED / 'weights'} is needed (genuine MobileNetV2 weights)")
    print(cpu_text())
    print(f"load average before: {_load()} (other processes share these cores)")
    with tempfile.TemporaryDirectory(prefix="tl_embed_serve_bench-") as tmp_str:
        tmp = Path(tmp_str)
        os.environ["KERAS_HOME"] = str(keras_home(tmp))
        os.environ["TL_EMBED_CACHE"] = str(tmp / "cache")
        from tl_embed import embed_folder
        from tl_embed.search.index import Index

        photos = real_photos(tmp, args.photos)
        report = embed_folder(photos, tmp / "real.tle", "mobilenet_v2", progress=False)
        embed_rate = report.embedded / report.embed_seconds
        print(f"\nembed baseline: {report.embedded} real photos in {report.embed_seconds:.1f} s = "
              f"{embed_rate:.1f} images/s ({report.runtime} runtime, model loading excluded)")
        synthesise(tmp / "real.tle", tmp / "big.tle", args.rows)
        index = Index.build(tmp / "big.tle", tmp / "big.tli", log=lambda _: None)
        print(f"index: {index.describe()}")

        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        proc = subprocess.Popen([sys.executable, "-m", "tl_embed.cli", "serve", str(tmp / "big.tli"),
                                 "--port", str(port), *args.serve_args], env=env, stderr=subprocess.PIPE, text=True)
        try:
            t = time.perf_counter()
            wait_ready(proc, port)
            print(f"service ready in {time.perf_counter() - t:.1f} s (IR cached by the embed run)")
            queries = sorted((SHARED / "datasets" / "pets3" / "test").rglob("*.jpg"))[:20]
            uploads = [multipart(q.read_bytes(), 10) for q in queries]
            ids = [json.dumps({"id": int(i), "k": 10}).encode() for i in
                   random.Random(0).sample(range(1, args.rows + 1), 200)]
            by_id = [(b, "application/json") for b in ids]
            load(port, uploads[:2], 2, 20, 30)  # warm-up: first requests compile nothing, but fill caches
            results = {}
            print(f"\n{'query':<8}{'clients':>8}{'done':>7}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
                  f"{'service CPU ms/req':>20}{'client CPU ms/req':>19}")
            for kind, bodies in (("upload", uploads), ("id", by_id)):
                if kind not in args.kinds:
                    continue
                for clients in args.clients:
                    before = _cpu_seconds(proc.pid), time.process_time()
                    r = load(port, bodies, clients, args.requests, args.seconds)
                    service_cpu, client_cpu = _cpu_seconds(proc.pid) - before[0], time.process_time() - before[1]
                    results[kind, clients] = r
                    per = 1000 / max(r["done"] + r["errors"], 1)
                    print(f"{kind:<8}{clients:>8}{r['done']:>7}{r['errors']:>7}{r['p50']:>9.1f}{r['p99']:>9.1f}"
                          f"{r['rps']:>9.1f}{service_cpu * per:>20.1f}{client_cpu * per:>19.1f}"
                          + (f"  first error: {r['first_error'][0]}" if r["errors"] else ""))
            info = _get_json(port, "/info")["batching"]
            print(f"\nbatching: {info['images']} uploads embedded in {info['batches']} batches "
                  f"(max {info['max_batch']}, wait {info['max_wait_ms']:.0f} ms)")
        finally:
            proc.terminate()
            proc.wait(30)
    if "upload" not in args.kinds:
        return
    one, many = results.get(("upload", min(args.clients))), results.get(("upload", max(args.clients)))
    errors = sum(r["errors"] for r in results.values())
    print(f"\ngoal upload p50 <= 50 ms at {one['clients']} client(s): {one['p50']:.1f} ms -> "
          f"{'met' if one['p50'] <= 50 else 'MISSED'}")
    ratio = many["rps"] / embed_rate
    print(f"goal upload throughput at {many['clients']} clients >= 0.8 x embed: {many['rps']:.1f} / "
          f"{embed_rate:.1f} = {ratio:.2f}x -> {'met' if ratio >= 0.8 else 'MISSED'}")
    print(f"errors: {errors}")
    print(f"load average after: {_load()}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


if __name__ == "__main__":
    main()
