"""Counted nouns in what we print: "1 query", "2 queries", never "1 queries" or "query(s)"."""

from __future__ import annotations

_IRREGULAR = {"query": "queries", "index": "indexes", "copy": "copies"}


def count(n: int, noun: str) -> str:
    """``n`` and ``noun`` in the number ``n`` needs (English plurals of the nouns we count)."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {_IRREGULAR.get(noun, noun + 's')}"
