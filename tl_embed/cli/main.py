"""The ``tl-embed`` command: parses arguments, calls the library, prints results.

User errors (:class:`TlEmbedError`) and failures of the machine the user can act on (a full disk, a
read-only folder, a permission, a damaged SQLite file) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
import warnings

from ..errors import TlEmbedError
from . import pipeline
from .parser import Parser, dispatch
from .parser import build_parser as stage_parser


def main(argv: list[str] | None = None, raise_errors: bool = False) -> int:
    """Entry point; ``raise_errors`` lets a caller (a test, a script) see user errors itself."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return dispatch(args)
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


def build_parser() -> Parser:
    """Every command: the stages' and ``run``, which chains them."""
    return stage_parser(extra=[pipeline.register_run])
