"""The parser of the stage commands, and how a parsed command is carried out.

Its own module so that ``run`` (a pipeline of these commands, :mod:`.pipeline`) can check and execute
its steps without importing :mod:`.main`, which registers ``run`` itself: the import graph stays a tree.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from .. import __version__
from .options import check_kinds, check_out_folder

EPILOG = "Run `tl-embed COMMAND --help` for a command's options. Docs: README.md and docs/commands.md."


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong, where to look), like every other error.

    :attr:`commands` maps each sub-command's name to its parser, in the order ``--help`` lists them.
    """

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(extra: Iterable[Callable] = ()) -> Parser:
    """The ``tl-embed`` parser with every stage command, and the ``extra`` registrations after them."""
    p = Parser(
        prog="tl-embed", epilog=EPILOG,
        description="Transfer learning without a GPU: embed images once with a frozen ImageNet "
                    "backbone, then train classifier heads and search with FAISS in seconds.")
    p.add_argument("--version", action="version", version=f"tl-embed {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for register in (*_stage_commands(), *extra):
        register(sub)
    p.commands = dict(sub.choices)
    return p


def dispatch(args: argparse.Namespace) -> int:
    """Carry out a parsed command: file checks before any heavy import, then the command itself."""
    check_out_folder(getattr(args, "out", None))
    check_kinds(args)
    return args.func(args) or 0


def _stage_commands() -> list[Callable]:
    from . import audit, embedding, heads, search, serve

    return [embedding.register_models, embedding.register_embed, embedding.register_info,
            embedding.register_export, heads.register_train, heads.register_predict,
            heads.register_evaluate, heads.register_export_model, heads.register_classify, search.register_index,
            search.register_evaluate_search,
            search.register_search, search.register_dedup, audit.register_audit, serve.register_serve]
