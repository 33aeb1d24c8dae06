"""funcam's implementation, in layers: ``base`` (shared types, imports nothing of funcam) < ``cuts`` and
``core`` (pure functions over models and tensors) < ``app`` (explain by name, models, images, rendering, dataset
runs) < ``cli``. Public names are re-exported by ``funcam`` and its public modules; nothing here is public."""
