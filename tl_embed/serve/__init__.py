"""``tl-embed serve``: an HTTP service answering search and predict queries from a loaded index and heads."""

from ..lazy import lazy_exports

_PUBLIC = {"create_app": "tl_embed.serve.app"}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
