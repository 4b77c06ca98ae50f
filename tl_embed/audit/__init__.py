"""``tl-embed audit``: what is wrong in a labelled image folder, found in its store before it costs accuracy.

Neither a head nor a search: the audit reads a store, uses both (out-of-fold predictions of the default
head, the k-NN graph and ``dedup``'s pairs), and writes a report; it never changes the store or a file.
"""

from ..lazy import lazy_exports

_PUBLIC = {
    "audit_store": "tl_embed.audit.run",
    "Audit": "tl_embed.audit.findings",
    "write_report": "tl_embed.audit.report",
    "read_json": "tl_embed.audit.report",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
