"""The ``tl-embed`` command: parses arguments, calls the library, prints results.

User errors (:class:`TlEmbedError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import TlEmbedError

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
    for register in _commands():
        register(sub)
    return p




def _commands() -> list:
    from . import embedding, heads, pipeline, search

    return [embedding.register_models, embedding.register_embed, embedding.register_info,
            embedding.register_export, heads.register_train, heads.register_predict,
            heads.register_evaluate, heads.register_classify, search.register_index,
            search.register_search, search.register_dedup, pipeline.register_run]

