"""zoo.recipes: one module per pretraining method, each registered in `zoo.registry.RECIPES`."""
