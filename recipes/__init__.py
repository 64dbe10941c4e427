"""zoo.recipes: one module per pretraining method, each registered in `zoo.registry.RECIPES`, and
its recipe YAMLs beside it (found by name: `zoo pretrain dino_vit_tiny_patch4_32_fractals`)."""

from zoo.recipes import bmmae, clip, diffusion, dino, flame, lm, look, lvmae, mae, mae_distill, medical_mae, mp3, poa, satmae, supervised, unip  # noqa: F401  (registration side effects)
