"""UNIP: hybrid-attention distillation for infrared segmentation (Tao et al., ICLR 2025, arXiv:2502.02257),
as in casiatao/UNIP `UNIP_pretraining/` (facts: specs/unip_tstitch.md §1.2, §6).

A frozen, larger pretrained ViT (the teacher) runs up to ONE chosen layer, the "hybrid" one: its attention
mixes local (query-dependent, high NMI) and global (shared, low NMI) patterns, found with
`zoo analyze attention TEACHER --data ...`. A small student ViT, whose LAST block attends with the teacher's
head count, learns to reproduce that layer's attention distributions:

    loss = mean over (batch, head, query) of KL( softmax(q_t k_tᵀ · s_t) ‖ softmax(q_s k_sᵀ · s_s) )

computed by `zoo.kernels.attention_kl` (a fused Triton kernel on GPU, never building the N×N maps; the
explicit reference on the CPU). τ = 1: the official `--temperature` flag never reaches the loss. Each side
uses its own scale: s_t = teacher head_dim^-½, s_s = the student's last-block head_dim^-½ (UNIP-S: 24^-½).
No other loss term. Teacher and student see the same unmasked image; the student's last block stops at its
attention, so that block's MLP and the final norm get no gradient (as officially; `zoo convert --from unip`
reports these parts of released checkpoints).

Data: InfMix-style. Every image is grey replicated to 3 channels: a sample's thermal-like rendering where it
has one (the infrared part), else its RGB image rendered grey (the ImageNet/COCO part); sources mix through
the loader's weighted sources (`data.train: 'a::b'`, `data.weights`). Normalised with infrared statistics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

import zoo
from zoo.convert import as_zoo_vit
from zoo.errors import ConfigError
from zoo.kernels import attention_kl
from zoo.recipes.base import DataSpec, Export, Method, check_same_input, check_vit_overrides
from zoo.recipes.mae import init_mae_weights
from zoo.registry import MODELS, RECIPES

INFRARED_MEAN = (0.3801, 0.3801, 0.3801)  # UNIP's infrared statistics, the same on each grey channel
INFRARED_STD = (0.1871, 0.1871, 0.1871)


def hybrid_layer_from(spec: int | str | Path, depth: int) -> int:
    """The teacher layer (1-based, as UNIP's `--intermediate`): an int, or the JSON `zoo analyze attention`
    wrote (its `hybrid_layer`); a one-line error naming the valid range when it does not fit the teacher."""
    if isinstance(spec, (str, Path)) and not str(spec).lstrip("-").isdigit():
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"unip: teacher_layer {str(spec)!r} is neither a layer number (1..{depth}) nor an "
                              "analysis JSON; run `zoo analyze attention TEACHER --data SHARDS --out DIR` first")
        report = json.loads(path.read_text())
        layer = report.get("hybrid_layer")
        if isinstance(layer, dict):  # {"index": 0-based, "layer": 1-based}
            layer = layer.get("layer", layer.get("index", -1) + 1)
        if not isinstance(layer, int):
            raise ConfigError(f"unip: {path} has no hybrid_layer; is it the JSON `zoo analyze attention` wrote?")
    else:
        layer = int(spec)
    if not 1 <= layer <= depth:
        raise ConfigError(f"unip: teacher_layer {layer} is out of range for a {depth}-layer teacher: use 1..{depth} "
                          "(1-based, as UNIP's --intermediate)")
    return layer


def attention_distillation_loss(teacher: nn.Module, layer: int, student: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """KL(teacher's layer-`layer` attention (0-based) ‖ student's last-block attention), mean over batch, heads
    and queries; one forward each, stopping at those attentions."""
    with torch.no_grad():
        q_t, k_t = teacher.forward_qk(images, layer)[layer]
    last = len(student.blocks) - 1
    q_s, k_s = student.forward_qk(images, last)[last]
    return attention_kl(q_t, k_t, q_s, k_s, scale_t=teacher.blocks[layer].attn.scale,
                        scale_s=student.blocks[last].attn.scale)


class InfMix:
    """A sample -> {"image": grey 3-channel tensor}: its `thermal` field where present, else its RGB image
    rendered grey (ITU-R 601 luma, PIL's "L"), then the recipe's crop, flip and infrared normalisation."""

    def __init__(self, cfg: Any, thermal_field: str = "thermal", **crop: Any):
        from zoo.data.transforms import train_transform

        self.thermal_field = thermal_field
        self.image = train_transform(cfg, **crop)

    def grey(self, sample: dict[str, Any]) -> Image.Image:
        img = sample.get(self.thermal_field)
        if img is None:
            img = sample["image"]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        return img.convert("L").convert("RGB")

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": self.image(self.grey(sample))}


class UNIP(Method):
    """NMI-HAD: a student ViT (`arch`) distilled from a frozen teacher's hybrid-attention layer.

    `teacher`: any name `zoo.load` takes whose model is a ViT (zoo, `timm:`, `hf-hub:`; timm ViTs are
    converted to zoo ViTs with the same weights). `teacher_layer`: 1-based (UNIP: MAE-L 18 of 24, DINO-B 9
    of 12), or the analysis JSON. The student's last block gets the teacher's head count at that layer.
    """

    def __init__(
        self,
        arch: str,
        teacher: str,
        teacher_layer: int | str,
        thermal_field: str = "thermal",
        crop_scale: tuple[float, float] = (0.2, 1.0),
        **arch_overrides: Any,
    ):
        super().__init__()
        if MODELS.get(arch).meta.get("family") != "vit":
            raise ConfigError(f"unip: {arch!r} is not a ViT architecture; the student must be a zoo ViT")
        check_vit_overrides(UNIP, "unip", arch_overrides)
        if "last_heads" in arch_overrides:
            raise ConfigError("unip: the student's last_heads is the teacher's head count at teacher_layer; "
                              "do not set it")
        args = {"pos_embed": "sincos", "global_pool": "token", "num_classes": 0, "mean": INFRARED_MEAN,
                "std": INFRARED_STD, "drop_path_rate": 0.1, **arch_overrides}
        self.teacher = self.load_frozen(teacher, convert=as_zoo_vit)  # any ViT zoo.load takes, as a zoo ViT
        self.teacher_name = teacher
        depth = len(self.teacher.blocks)
        self.teacher_layer = hybrid_layer_from(teacher_layer, depth)
        heads = self.teacher.blocks[self.teacher_layer - 1].attn.num_heads
        try:
            self.student = zoo.create_model(arch, **args, last_heads=heads)
        except zoo.ZooError as e:
            raise ConfigError(f"unip: the student's last block must take the teacher's {heads} heads: {e}") from None
        check_same_input(self.teacher, self.student, f"unip: teacher {teacher!r}")  # one token grid for both
        self.student.apply(init_mae_weights)  # models_unip.py initialises as MAE
        self.arch = arch
        self.thermal_field = thermal_field
        self.crop_scale = tuple(crop_scale)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        loss = attention_distillation_loss(self.teacher, self.teacher_layer - 1, self.student, batch["image"])
        return {"loss": loss}

    def data_spec(self) -> DataSpec:
        # main_pretrain.py: RandomResizedCrop (scale 0.2-1, bicubic) + flip of the grey image
        mix = InfMix(self.student.pretrained_cfg, self.thermal_field, scale=self.crop_scale, hflip=0.5,
                     interpolation="bicubic")
        return DataSpec(fields=("image",), optional_fields=(self.thermal_field,), transform=mix)

    def backbone(self) -> nn.Module:
        """The student, a plain zoo ViT with `last_heads` (published as is)."""
        return self.student

    def export(self, name: str) -> dict[str, Export]:
        """The student, its card naming what it was distilled from and what pretraining left untrained."""
        last = len(self.student.blocks) - 1
        card = {"teacher": self.teacher_name, "teacher_layer": self.teacher_layer,
                "last_heads": self.student.blocks[last].attn.num_heads,
                "untrained": [f"blocks.{last}.norm2", f"blocks.{last}.mlp", "norm"]}
        return {name: Export(self.student, card={"unip": card})}


RECIPES.register(
    "unip",
    UNIP,
    family="unip",
    paper="arXiv:2502.02257",
    cpu_recipe="unip_vit_tiny_patch4_32_scenes",
    prerequisites=("mae_vit_small_patch4_32_scenes",),  # publishes the CPU recipe's teacher
    description="UNIP: a student's last-block attention distilled from a frozen teacher's hybrid (mid-NMI) layer",
)

__all__ = ["UNIP", "InfMix", "attention_distillation_loss", "hybrid_layer_from", "INFRARED_MEAN", "INFRARED_STD"]
