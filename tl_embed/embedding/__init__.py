"""The embedding stage: images -> decode -> backbone (runtime) -> store.

Modules, in the order the data flows: :mod:`.scan` (find images), :mod:`.images` and :mod:`.decode`
(decode), :mod:`.backbones` (registry, build a Keras model), :mod:`.runtime` (run it), :mod:`.sink`
(what both engines commit), :mod:`.store` (on disk), :mod:`.embed` and :mod:`.ray_engine` (a folder into
a store), :mod:`.query` (ad-hoc images for heads and search).
"""

from ..lazy import lazy_exports

_PUBLIC = {
    "embed_folder": "tl_embed.embedding.embed",
    "EmbedReport": "tl_embed.embedding.sink",
    "EmbeddingStore": "tl_embed.embedding.store",
    "ManifestRow": "tl_embed.embedding.records",
    "Failure": "tl_embed.embedding.records",
    "BackboneSpec": "tl_embed.embedding.backbones",
    "BACKBONES": "tl_embed.embedding.backbones",
    "load_backbone": "tl_embed.embedding.backbones",
    "embed_for": "tl_embed.embedding.query",
    "KerasImageEmbedder": "tl_embed.embedding.sklearn_embedder",
    "RayOptions": "tl_embed.embedding.ray_engine",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
