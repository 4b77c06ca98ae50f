"""Argument-parser pieces shared by every command, so one option means one thing everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TlEmbedError


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where there is one to show: not for a required option, a flag, an
    option without a default (None), or one whose help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def formatter(prog: str) -> argparse.HelpFormatter:
    return _DefaultsFormatter(prog, max_help_position=32)


def add_command(sub, name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=description or help_,
                          formatter_class=formatter)


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenet_v2",
                   help="backbone name (`tl-embed models`) or a saved Keras model file (.keras/.h5)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (from the Keras cache, $KERAS_HOME/models), 'none' (random), "
                        "or a weights file")
    p.add_argument("--pooling", default="avg", choices=["avg", "max", "gem", "rmac"],
                   help="how the last feature map becomes one vector: 'avg' or 'max' (MAC) global pooling, 'gem' "
                        "(generalised mean, p=3) or 'rmac' (regional MACs): the retrieval literature's descriptors "
                        "(docs/commands.md#descriptors-for-search---pooling---scales)")
    p.add_argument("--scales", default="1",
                   help="image scales whose descriptors are combined, e.g. '1,1.414' (multi-scale: the image "
                        "decoded at the largest, each scale one more backbone pass, about 3x the embedding time "
                        "for 1,1.414); built-in backbones only")
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


def check_kinds(args: argparse.Namespace) -> None:
    """Refuse arguments of the wrong tl_embed kind before any heavy import (TensorFlow takes seconds).

    A command declares them with ``set_defaults(reads={"dest": (kinds...)}, writes=kind)``.
    """
    from ..kinds import require, require_output

    for dest, kinds in getattr(args, "reads", {}).items():
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                require(value, *kinds)
    if getattr(args, "writes", None) and getattr(args, "out", None):
        require_output(args.out, args.writes)


def check_out_folder(out: str | None) -> None:
    """``--out`` is the thing a command writes; its folder must exist (a typo'd tree is never guessed).

    Checked when the command runs, not when it is parsed: a pipeline parses every step first and
    creates its output folders just before each step runs.
    """
    if out is None:
        return
    parent = Path(out).expanduser().absolute().parent
    if not parent.is_dir():
        raise TlEmbedError(f"--out {out}: folder {parent} does not exist; create it first or choose another --out")


def non_negative_int(value: str) -> int:
    """An integer of at least 0 (0 meaning none)."""
    return _int_at_least(value, 0)


def positive_int(value: str) -> int:
    """An integer of at least 1 (counts, sizes, -k)."""
    return _int_at_least(value, 1)


def _int_at_least(value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {n}")
    return n


def positive_float(value: str) -> float:
    """A number above 0 (CPU shares such as --cpus-per-worker 0.5)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return x


def fraction(value: str) -> float:
    """A number in [0, 1] (probabilities, thresholds, recall)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return x


def add_trust_pickle_option(p) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="also open model files of the old pickle format (loading one runs code from the file: "
                        "only for files you trust)")
