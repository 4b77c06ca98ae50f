"""Public names of a package, imported on first use: ``import tl_embed`` must not pay for TensorFlow,
FAISS or scikit-learn, yet ``tl_embed.train`` and ``from tl_embed.heads import HeadClassifier`` work."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` serving ``names`` (public name -> module that defines it)."""

    def __getattr__(name: str) -> object:
        if name in names:
            return getattr(import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
