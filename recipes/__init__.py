"""zoo.recipes: one module per pretraining method, each registered in `zoo.registry.RECIPES`, and
its recipe YAMLs beside it (found by name: `zoo pretrain dino_vit_tiny_patch4_32_fractals`)."""

from zoo.recipes import clip, diffusion, dino, flame, lm, look, mae, poa, supervised, unip  # noqa: F401  (registration side effects)
