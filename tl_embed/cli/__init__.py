"""The ``tl-embed`` command line: one module per stage's commands, shared options in :mod:`.options`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
