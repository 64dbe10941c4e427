"""Self-distillation for further pretraining (Lee et al., "Self-Distillation for Further Pre-training of
Transformers", ICLR 2023, arXiv:2210.02871), as in seanie12/self-distillation `trainer.py` (specs/mae.md §3e).

Further pretraining adapts a published MAE to a target domain by continuing MAE on the target data. The paper
adds a distillation term that keeps the student's representation near a frozen teacher's:

    loss = L_MAE(student, masked image) + w * (1/B) * sum_i || h_s(x_i) - h_t(x_i) ||^2

with h the FINAL-layer class token after the final LayerNorm, computed on the UNMASKED image for both
networks (the student runs a second, unmasked encoder pass), squared L2 summed over the features and averaged
over the batch, w = 1. Everything else is MAE (`recipes/mae.py`): the only override is `extra_losses`.

The teacher. Officially there are two stages: stage 1 continues MAE from the published model on the target data
(plain further pretraining: `mae` with `init_from`), stage 2 re-initialises the student from the PUBLISHED model
and distils from the frozen stage-1 encoder. Both are here: `teacher: NAME` loads a frozen teacher by name (the
stage-1 export: the paper's stage 2); `teacher: null` (default) makes the teacher a frozen copy of the `init_from`
model itself, the one-stage form that needs no stage 1: the term then measures, and penalises, how far the
student has drifted from where it started, and is exactly zero at step 0. Either way the student starts from
`init_from` (required: a one-line error otherwise), and weights of another architecture are refused in one line.

Open choices, stated: zoo publishes MAE encoders without their decoder, so the decoder starts from MAE's init
(officially the whole HF `ViTMAEForPreTraining` is loaded); the official run uses lr 1.5e-4 with linear decay
and no warmup, wd 0.01, batch 64, 20k steps, resize + normalise only: the CPU recipe keeps the optimiser settings
at its scale and MAE's crop.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from zoo.errors import ConfigError
from zoo.recipes.mae import MAE, MaskedOutput
from zoo.registry import RECIPES


def cls_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i ||s_i - t_i||^2 over (B, D) class-token features: squared L2 per sample, mean over the batch."""
    return (student.float() - teacher.float()).pow(2).sum(dim=-1).mean()


class MAEDistill(MAE):
    """MAE further pretraining from `init_from` with a distillation term to a frozen teacher's class token."""

    recipe = "mae_distill"

    def __init__(self, arch: str, teacher: str | None = None, distill_weight: float = 1.0, **mae_args: Any):
        super().__init__(arch, **mae_args)
        if distill_weight < 0:
            raise ConfigError(f"mae_distill: distill_weight must be >= 0, got {distill_weight}")
        self.loss_weights["distill"] = float(distill_weight)
        self.teacher_name = teacher
        if teacher is not None:
            self.teacher = self.load_frozen(teacher, like=self.encoder)
        else:  # a frozen copy of the init_from model, filled by init_backbone; kept in checkpoints as state
            self.teacher = self.freeze(copy.deepcopy(self.encoder))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))  # init_from happened (checkpointed)
        self._checked = False

    def init_backbone(self, source: nn.Module, name: str) -> None:
        """The student starts from `name`; with `teacher: null` the teacher is a frozen copy of the same weights."""
        super().init_backbone(source, name)
        if self.teacher_name is None:
            self.teacher.load_state_dict(self.encoder.state_dict())
        self.initialised.fill_(True)

    def extra_losses(self, batch: dict[str, Any], x: torch.Tensor, out: MaskedOutput) -> dict[str, torch.Tensor]:
        if not self._checked and not bool(self.initialised):  # checked once: no host sync per step
            raise ConfigError("mae_distill further-pretrains a published MAE: set init_from: NAME in the recipe "
                              "(e.g. init_from: vit_tiny_patch4_32.mae_fractal), or --set init_from=NAME")
        self._checked = True
        student = self.encoder.forward_features(x)[:, 0]  # the second, unmasked pass: final-layer cls after the norm
        with torch.no_grad():
            teacher = self.teacher.forward_features(x)[:, 0]
        return {"distill": cls_distillation_loss(student, teacher)}


RECIPES.register(
    "mae_distill",
    MAEDistill,
    family="mae",
    paper="arXiv:2210.02871",
    cpu_recipe="mae_distill_vit_tiny_patch4_32_digits",
    prerequisites=("mae_vit_tiny_patch4_32_fractals",),  # publishes the MAE the CPU recipe continues from
    # 8 steps cannot show it: without learning the term stays exactly 0, while any learning run first moves the student
    learning_shown_by="tests/test_recipe_mae_distill.py::test_further_pretraining_learns_a_fixed_batch",
    description="Further pretraining: MAE continued on target data from a published MAE, plus a squared-L2 "
                "distillation of the unmasked class token to a frozen teacher (the starting model)",
)

__all__ = ["MAEDistill", "cls_distillation_loss"]
