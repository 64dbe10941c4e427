"""zoo.recipes: one module per pretraining method, each registered in `zoo.registry.RECIPES`."""

from zoo.recipes import clip, mae  # noqa: F401  (registration side effects)
