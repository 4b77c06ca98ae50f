"""The ``tl-embed`` command: parses arguments, calls the library, prints results.

User errors (:class:`TlEmbedError`) and failures of the machine the user can act on (a full disk, a
read-only folder, a permission, a damaged SQLite file) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sqlite3
import sys
import warnings

from .. import __version__
from ..errors import TlEmbedError
from .options import check_kinds, check_out_folder

EPILOG = "Run `tl-embed COMMAND --help` for a command's options. Docs: README.md."


def main(argv: list[str] | None = None, raise_errors: bool = False) -> int:
    """Entry point; ``raise_errors`` lets a caller (the pipeline runner) see user errors itself."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_out_folder(getattr(args, "out", None))
        check_kinds(args)
        return args.func(args) or 0
    except TlEmbedError as e:
        if raise_errors:
            raise
        print(f"tl-embed: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `tl-embed models | head`: an OSError, but not a failure
        sys.stdout = open(os.devnull, "w")
        return 0
    except (OSError, sqlite3.Error) as e:
        if raise_errors:
            raise
        print(f"tl-embed: error: {system_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tl-embed: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Library warnings (a model file from another scikit-learn, ...) as users see errors: one line."""
    return f"tl-embed: warning: {message}\n"


_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and run the same command again (what was committed is kept)",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run the same command again",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EACCES: "permission denied: check the file's and folder's permissions",
    errno.EPERM: "operation not permitted: check the file's and folder's permissions",
    errno.ENOENT: "no such file or folder",
    errno.EFBIG: "the file grew past the size this system allows",
    errno.EIO: "an input/output error: the disk or network share may be failing",
}


def system_error_text(e: OSError | sqlite3.Error) -> str:
    """One line for an OS or SQLite failure: which file, what happened, what to do."""
    if isinstance(e, sqlite3.Error):
        text = str(e)
        hint = ("the disk is full: free some space and run again" if "full" in text else
                "the store's manifest may be damaged or on a read-only or failing disk")
        return f"SQLite: {text}; {hint}"
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f) or "a file"
    hint = _ERRNO_HINTS.get(e.errno or -1, e.strerror or str(e))
    if e.errno == errno.ENOSPC or e.errno not in _ERRNO_HINTS:
        hint = f"{e.strerror or e}; {hint}" if e.errno != errno.ENOSPC else hint
    return f"{where}: {hint}"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong, where to look), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tl-embed", epilog=EPILOG,
        description="Transfer learning without a GPU: embed images once with a frozen ImageNet "
                    "backbone, then train classifier heads and search with FAISS in seconds.")
    p.add_argument("--version", action="version", version=f"tl-embed {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for register in _commands():
        register(sub)
    return p




def _commands() -> list:
    from . import embedding, heads, pipeline, search, serve

    return [embedding.register_models, embedding.register_embed, embedding.register_info,
            embedding.register_export, heads.register_train, heads.register_predict,
            heads.register_evaluate, heads.register_export_model, heads.register_classify, search.register_index,
            search.register_search, search.register_dedup, serve.register_serve, pipeline.register_run]

