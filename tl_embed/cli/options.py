"""Argument-parser pieces shared by every command, so one option means one thing everywhere."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import TlEmbedError


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def add_command(sub, name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=description or help_,
                          formatter_class=formatter)


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenet_v2",
                   help="backbone name (`tl-embed models`) or a saved Keras model file (.keras/.h5)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (from the Keras cache, $KERAS_HOME/models), 'none' (random), "
                        "or a weights file")
    p.add_argument("--pooling", default="avg", choices=["avg", "max"], help="global pooling")
    p.add_argument("--layer", default=None, help="custom model only: layer to cut the features at")
    p.add_argument("--preprocess", default=None,
                   help="custom model only: use this backbone's preprocess_input (default: none)")


def _runtime_name(value: str) -> str:
    from ..embedding.runtime import check_runtime

    try:
        return check_runtime(value)
    except TlEmbedError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", type=_runtime_name,
                   help="how the backbone runs: 'openvino' (fast fp32, converted once and cached), "
                        "'keras' (the reference), or 'auto' (openvino, falling back to keras with a notice)")


_PLANNED_FOLDERS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("planned_folders", default=())


@contextlib.contextmanager
def planned_folders(folders: Iterable[Path]) -> Iterator[None]:
    """Let :func:`out_path` accept folders a pipeline creates before the step runs (it validates first)."""
    token = _PLANNED_FOLDERS.set(tuple(Path(f).expanduser().absolute() for f in folders))
    try:
        yield
    finally:
        _PLANNED_FOLDERS.reset(token)


def out_path(value: str) -> str:
    """``--out``: the thing a command writes; its folder must exist (we never guess a typo'd tree)."""
    parent = Path(value).expanduser().absolute().parent
    planned = any(parent == f or parent in f.parents for f in _PLANNED_FOLDERS.get())
    if not parent.is_dir() and not planned:
        raise argparse.ArgumentTypeError(f"folder {parent} does not exist; create it first or choose another --out")
    return value


def positive_int(value: str) -> int:
    """An integer of at least 1 (counts, sizes, -k)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def fraction(value: str) -> float:
    """A number in [0, 1] (probabilities, thresholds, recall)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return x
