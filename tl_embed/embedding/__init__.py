"""The embedding stage: images -> decode -> backbone (runtime) -> store.

Modules, in the order the data flows: :mod:`.scan` (find images), :mod:`.images` (decode),
:mod:`.backbones` (registry, build a Keras model), :mod:`.runtime` (run it), :mod:`.store` (on disk),
:mod:`.embed` (a folder into a store), :mod:`.query` (ad-hoc images for heads and search).
"""
