"""The ``serve`` command: an HTTP search/predict service over an index (FastAPI on uvicorn)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from ..errors import TlEmbedError
from ..kinds import HEAD, INDEX, REPORT
from ..wording import count
from .options import add_command, add_runtime_option, add_trust_pickle_option, fraction, positive_int


def register_serve(sub) -> None:
    p = add_command(sub, "serve", "serve search and predictions over HTTP, with a web page",
             "Load the index, its store (read-only) and the heads once, then answer POST /search, "
             "POST /predict, GET /images/ID, /info and /healthz, with a search page at / and the API "
             "described at /docs; with --audit, also the audit's findings at /audit and on the page. "
             "Needs the 'serve' extra: pip install 'tl_embed[serve]'.")
    p.add_argument("index", help="index folder from `tl-embed index`")
    p.add_argument("--head", action="append", default=[], metavar="MODEL",
                   help="a head from `tl-embed train` for /predict (repeat for several)")
    p.add_argument("--audit", default=None, metavar="AUDIT.json",
                   help="the JSON report of `tl-embed audit STORE --format json` on the index's store: its "
                        "findings are browsable on the page's Audit tab and at GET /audit")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the images to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every route; or set $TL_EMBED_TOKEN, which "
                        "other users cannot read in the process list")
    p.add_argument("--min-confidence", type=fraction, default=0.0,
                   help="/predict answers 'unknown' below this top probability")
    p.add_argument("--max-upload-mb", type=positive_int, default=20, help="largest accepted request body")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="concurrent single-image requests embedded together, at most this many")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long the first image of a batch waits for others")
    add_runtime_option(p)
    add_trust_pickle_option(p)
    p.set_defaults(func=cmd_serve, reads={"index": (INDEX,), "head": (HEAD,), "audit": (REPORT,)})


def cmd_serve(args) -> None:
    try:
        import uvicorn
        from threadpoolctl import threadpool_limits

        from ..serve.app import create_app, load_service
        from ..serve.http import BoundedHeadProtocol
        from ..serve.logs import fold_request_warnings
    except ImportError as e:
        raise TlEmbedError(f"serve needs the 'serve' extra ({e.name} is missing): "
                           "pip install 'tl_embed[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise TlEmbedError(f"--port must be between 0 and 65535, not {args.port}")
    if args.batch_wait_ms < 0:
        raise TlEmbedError(f"--batch-wait-ms must not be negative, not {args.batch_wait_ms}")
    token = args.token or os.environ.get("TL_EMBED_TOKEN") or None
    sock = _bind(args.host, args.port)  # fails with one line (address in use) before the model loads
    if not _is_loopback(args.host):
        print(f"tl-embed: warning: listening on {args.host}: anyone who can reach this machine can search and "
              f"read the store's images{'' if token else ' (no --token set)'}", file=sys.stderr)
    service = load_service(args.index, args.head, args.runtime, args.min_confidence, args.max_batch,
                           args.batch_wait_ms / 1000, args.trust_pickle, args.audit)
    app = create_app(service, token, args.max_upload_mb * 1_000_000)
    host, port = sock.getsockname()[:2]
    audited = "" if service.audit is None else ", an audit"
    print(f"tl-embed: serving {service.catalog.index.path} ({count(len(service.catalog), 'image')}, "
          f"{count(len(service.heads), 'head')}{audited}) at http://{_url_host(host)}:{port}/",
          file=sys.stderr, flush=True)
    fold_request_warnings()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, http=BoundedHeadProtocol)
    # this process only serves: its parallelism is the requests', its cores the runtime's streams;
    # BLAS thread pools (FAISS's exact search) would only spin between the many small searches
    with threadpool_limits(1, user_api="blas"):
        uvicorn.Server(config).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TlEmbedError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise TlEmbedError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
