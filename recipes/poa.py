"""POA: Pre-training Once for models of All sizes (Zhang et al., 2024, arXiv:2408.01031).

DINO + iBOT self-distillation (`recipes/dino.py`) with a third branch. An EMA teacher (the full
network) sees the global crops; the *intact* student (the full network) and an *elastic* student (a
sub-network of width D and depth L sliced out of the intact one, `zoo.models.elastic`) both see the
global crops (block-masked once iBOT is on) and the local crops. The two students share every
weight, heads included, so one backward pass trains all sizes at once; afterwards any (D, L) is
extracted without retraining.

Per step, averaged over the multiple projection heads (MPH, one prototype count each):
  L_IS  = DINO(teacher -> intact)                                   weight λ
  L_ES1 = DINO(teacher -> elastic)                                  weight 1 − λ
  L_ES2 = CE(softmax(intact / τ_s), elastic), same views, globals and locals as separate batch means
                                                                    weight 1 − λ (not over the 18 pairs)
  iBOT  = λ·CE(teacher, intact masked patches) + (1 − λ)·CE(teacher, elastic masked patches)
plus KoLeo on the class tokens of both students (½ each). The elastic (D, L) comes from a pool in
which each pair appears round(a_w·b_d) times (a_w, b_d linear from S down to 1 over the widths and
depths: small shapes are drawn more), the full network excluded, shuffled and consumed in turn
(`elastic_pool`, `elastic_draws`). Spec: `shared/specs/poa_and_eval_protocols.md` §1 and §5.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data.pipeline import dist_info
from zoo.errors import ConfigError
from zoo.models.elastic import check_size, elastic_card, elastic_forward_features_list, extract
from zoo.recipes.base import Export
from zoo.recipes.dino import DINO, DINOHead, dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from zoo.registry import RECIPES
from zoo.schedule import Schedule


# -- the elastic space -------------------------------------------------------------------------------
def elastic_pool(widths: Sequence[int], depths: Sequence[int], scale: float = 3.0) -> list[tuple[int, int]]:
    """POA's sampling pool: (w, d) repeated round(a_w·b_d) times, a and b linear from `scale` (the smallest
    width / depth) down to 1 (the largest), widths outer, ascending; the full network, the pool's last
    entry, is dropped (the intact student already trains it). The official space gives 573 - 1 entries."""
    widths, depths = sorted(widths), sorted(depths)
    a, b = np.linspace(scale, 1.0, len(widths)), np.linspace(scale, 1.0, len(depths))
    pool = [(w, d) for i, w in enumerate(widths) for j, d in enumerate(depths) for _ in range(round(a[i] * b[j]))]
    full = (widths[-1], depths[-1])
    return [p for p in pool if p != full]


def elastic_draws(pool: Sequence[tuple[int, int]], step: int, per_step: int, seed: int = 0,
                  rank: int = 0) -> list[tuple[int, int]]:
    """The `per_step` sub-networks of optimizer step `step`: the pool shuffled once per pass (its own
    shuffle per rank, as the official `seed + rank`) and consumed in order. A pure function of the step,
    so a resumed run draws what the straight run would have."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        cycle, pos = divmod(i, len(pool))
        order = list(range(len(pool)))
        random.Random(f"poa-pool-{seed}-{rank}-{cycle}").shuffle(order)
        out.append(tuple(pool[order[pos]]))
    return out


# -- heads ------------------------------------------------------------------------------------------
class MultiHead(nn.Module):
    """POA's multiple projection heads (MPH): one DINO head per prototype count on the same features; each
    loss is averaged over them. Elastic: a width-D input reads the first Linear's input columns [:D], scaled
    by α = D_max / D (POA's input rescaling, folded into the sliced weight)."""

    def __init__(self, in_dim: int, out_dims: Sequence[int], **head_args: Any):
        super().__init__()
        self.in_dim = in_dim
        self.heads = nn.ModuleList(DINOHead(in_dim, k, **head_args) for k in out_dims)

    def forward(self, x: torch.Tensor, width: int | None = None) -> list[torch.Tensor]:
        """Prototype logits of every head, for features of the full width or of `width`."""
        if width is None or width == self.in_dim:
            return [h(x) for h in self.heads]
        alpha = self.in_dim / width
        out = []
        for h in self.heads:
            name, w = next(iter(h.mlp.named_parameters()))  # the first Linear's weight (`0.weight`, or `weight`)
            out.append(torch.func.functional_call(h, {f"mlp.{name}": w[:, :width] * alpha}, (x,), strict=False))
        return out

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.heads for p in h.last_layer_parameters()]


# -- losses -----------------------------------------------------------------------------------------
def same_view_distillation(intact_logits: Sequence[torch.Tensor], elastic_logits: Sequence[torch.Tensor],
                           temp: float) -> torch.Tensor:
    """POA's L_ES2: the elastic student matches the intact student's softmax(logits / temp) (stop-gradient,
    no centering) on the SAME views; a batch mean per group of views (globals, locals), summed."""
    if len(intact_logits) != len(elastic_logits):
        raise ValueError(f"{len(intact_logits)} intact and {len(elastic_logits)} elastic groups of views")
    total = elastic_logits[0].new_zeros((), dtype=torch.float32)
    for t, s in zip(intact_logits, elastic_logits):
        target = F.softmax(t.detach().float() / temp, dim=-1)
        total = total + (-(target * F.log_softmax(s.float() / temp, dim=-1)).sum(-1)).mean()
    return total


# -- the method ---------------------------------------------------------------------------------------
class POA(DINO):
    """POA on a zoo ViT (`arch`, the intact model): the teacher's intact ViT is the backbone; `export()`
    publishes it and every size in `export_sizes`. Arguments beyond DINO's (see `DINO`):

    widths, depths: the elastic space (widths multiples of the head size, up to embed_dim; depths up to
    the model's); net_select_scale: S of the pool weights; elastic_per_step: sub-networks per step on this
    process (the official run draws one per GPU on 32 GPUs: raise it on one machine to match coverage);
    intact_weight: λ; out_dims: the prototype counts of the heads (MPH); ibot_start_epoch: iBOT (and the
    masking of the students' global crops) starts after this many epochs; export_sizes: [[w, d], ...].
    """

    def __init__(
        self,
        arch: str,
        widths: Sequence[int] = (),
        depths: Sequence[int] = (),
        net_select_scale: float = 3.0,
        elastic_per_step: int = 1,
        intact_weight: float = 0.8,
        out_dims: Sequence[int] = (8192, 16384, 32768, 65536),
        ibot_start_epoch: float = 30,
        export_sizes: Sequence[Sequence[int]] = (),
        pool_seed: int = 0,
        momentum_teacher: float = 0.992,
        momentum_teacher_end: float = 0.9999,
        centering: str = "sinkhorn_knopp",
        **kwargs: Any,
    ):
        if "out_dim" in kwargs:
            raise ConfigError("poa: the heads' sizes are out_dims (a list, one per projection head), not out_dim")
        if centering != "sinkhorn_knopp":
            raise ConfigError(f"poa: teacher targets are Sinkhorn-Knopp balanced (DINOv2); centering {centering!r} "
                              "is DINO's, use the dino recipe for it")
        if not out_dims:
            raise ConfigError("poa: out_dims needs at least one prototype count, e.g. [8192, 16384, 32768, 65536]")
        if kwargs.get("separate_ibot_head"):
            raise ConfigError("poa: iBOT shares the projection heads (separate_ibot_head: false)")
        self.out_dims = [int(k) for k in out_dims]  # read by `projection_head` while DINO builds the student
        super().__init__(arch, out_dim=self.out_dims[0], centering=centering, momentum_teacher=momentum_teacher,
                         momentum_teacher_end=momentum_teacher_end, **kwargs)
        del self.center, self.patch_center  # Sinkhorn-Knopp needs no running center
        vit = self.student.backbone
        if not widths or not depths:
            raise ConfigError(f"poa: give the elastic space, widths and depths (e.g. widths: "
                              f"[{vit.embed_dim // 2}, {vit.embed_dim}], depths: [{len(vit.blocks) // 2}, {len(vit.blocks)}])")
        for w in widths:
            check_size(vit, int(w), len(vit.blocks))
        for d in depths:
            check_size(vit, vit.embed_dim, int(d))
        if elastic_per_step < 1:
            raise ConfigError(f"poa: elastic_per_step must be >= 1, got {elastic_per_step}")
        if not 0.0 <= intact_weight <= 1.0:
            raise ConfigError(f"poa: intact_weight (λ) must be in [0, 1], got {intact_weight}")
        self.widths, self.depths = sorted(int(w) for w in widths), sorted(int(d) for d in depths)
        self.pool = elastic_pool(self.widths, self.depths, net_select_scale)
        if not self.pool:
            raise ConfigError(f"poa: the elastic space widths {self.widths} x depths {self.depths} holds only the full "
                              "network; add smaller widths or depths")
        self.export_sizes = [(int(w), int(d)) for w, d in export_sizes]
        for w, d in self.export_sizes:
            check_size(vit, w, d)
        self.elastic_per_step, self.intact_weight = int(elastic_per_step), float(intact_weight)
        self.ibot_start_epoch, self.pool_seed = float(ibot_start_epoch), int(pool_seed)

    def projection_head(self, dim: int, out_dim: int, **head_args: Any) -> nn.Module:
        """POA's multiple projection heads (MPH), one per prototype count in `out_dims`, in place of DINO's one."""
        return MultiHead(dim, self.out_dims, **head_args)

    # -- schedules ------------------------------------------------------------------------------------
    def schedules(self) -> dict[str, Schedule]:
        """DINO's (teacher temperature warmup; momentum cosine to `momentum_teacher_end`) and the iBOT gate:
        0 during its warmup (`ibot_start_epoch` epochs), then 1; iBOT runs once it reaches 1."""
        out = super().schedules()
        out["ibot_active"] = Schedule(1.0, shape="constant", warmup_epochs=self.ibot_start_epoch, warmup_from=0.0)
        return out

    # -- the step -------------------------------------------------------------------------------------
    def draws(self, step: int) -> list[tuple[int, int]]:
        """The elastic sub-networks of optimizer step `step` on this rank."""
        return elastic_draws(self.pool, step, self.elastic_per_step, self.pool_seed, dist_info()[0])

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        ng, nl = self.n_global, self.n_local
        globals_, locals_ = torch.cat(views[:ng]), views[ng:]
        ibot = self.weights["ibot"] > 0 and self.scheduled.get("ibot_active", 1.0) >= 1.0 and "masks" in batch
        masks = batch["masks"] if ibot else None
        temp = self.scheduled.get("teacher_temp", self.teacher_temps[1])
        lam = self.intact_weight
        with torch.no_grad():
            t_tokens = self.teacher.backbone.forward_features(globals_)
            t_probs = [sinkhorn_knopp(z, temp) for z in self.teacher.head(t_tokens[:, 0])]
            if ibot:
                t_patch_probs = [sinkhorn_knopp(z, temp) for z in self.teacher.head(t_tokens[:, 1:][masks])]
        inputs = [globals_] + ([torch.cat(locals_)] if locals_ else [])
        in_masks = [masks] + [None] * (len(inputs) - 1)
        vit = self.student.backbone

        def branch(tokens: list[torch.Tensor], width: int | None) -> dict[str, Any]:
            logits = self.student.head(torch.cat([t[:, 0] for t in tokens]), width)  # per head: (views * B, K)
            out = {"logits": logits, "global_cls": tokens[0][:, 0]}
            if ibot:
                out["patch"] = self.student.head(tokens[0][:, 1:][masks], width)
            return out

        intact = branch(vit.forward_features_list(inputs, masks=in_masks, mask_token=self.mask_token,
                                                  pack=self.pack_crops), None)
        drawn = self.draws(step)
        elastic = [branch(elastic_forward_features_list(vit, inputs, w, d, masks=in_masks, mask_token=self.mask_token,
                                                        pack=self.pack_crops), w) for w, d in drawn]
        n_g = len(globals_)
        per_head = []
        parts: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            parts[name] = parts.get(name, 0.0) + value.detach() / len(self.out_dims)

        def groups(z: torch.Tensor) -> list[torch.Tensor]:  # the global views, then the local views
            return [z[:n_g], z[n_g:]] if nl else [z]

        for h, probs in enumerate(t_probs):
            t_views = list(probs.chunk(ng))
            l_is = dino_loss(list(intact["logits"][h].chunk(ng + nl)), t_views, self.student_temp)
            l_es1 = sum(dino_loss(list(e["logits"][h].chunk(ng + nl)), t_views, self.student_temp)
                        for e in elastic) / len(elastic)
            l_es2 = sum(same_view_distillation(groups(intact["logits"][h]), groups(e["logits"][h]), self.student_temp)
                        for e in elastic) / len(elastic)
            total = self.weights["dino"] * (lam * l_is + (1 - lam) * (l_es1 + l_es2))
            add("loss_dino_intact", l_is)
            add("loss_dino_elastic", l_es1)
            add("loss_same_view", l_es2)
            if ibot:
                i_ibot = ibot_patch_loss(intact["patch"][h], t_patch_probs[h], masks, self.student_temp)
                e_ibot = sum(ibot_patch_loss(e["patch"][h], t_patch_probs[h], masks, self.student_temp)
                             for e in elastic) / len(elastic)
                total = total + self.weights["ibot"] * (lam * i_ibot + (1 - lam) * e_ibot)
                add("loss_ibot_intact", i_ibot)
                add("loss_ibot_elastic", e_ibot)
            per_head.append(total)
        loss = sum(per_head) / len(per_head)
        if self.weights["koleo"] > 0:
            if n_g < 2 * ng:
                raise ConfigError(f"poa: KoLeo compares each image with its nearest neighbour in the batch, so it needs "
                                  f">= 2 images per process; got {n_g // ng}: raise data.batch_size or set "
                                  "method.koleo_weight: 0")
            k_int = sum(koleo_loss(c) for c in intact["global_cls"].chunk(ng))
            k_el = sum(sum(koleo_loss(c) for c in e["global_cls"].chunk(ng)) for e in elastic) / len(elastic)
            loss = loss + self.weights["koleo"] * 0.5 * (k_int + k_el)
            parts["loss_koleo"] = (0.5 * (k_int + k_el)).detach()
        with torch.no_grad():
            p = t_probs[0]
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, **parts, "teacher_entropy": entropy,
                "elastic_width": torch.tensor(float(np.mean([w for w, _ in drawn]))),
                "elastic_depth": torch.tensor(float(np.mean([d for _, d in drawn])))}

    # -- what is published ----------------------------------------------------------------------------
    def export(self, name: str) -> dict[str, Export | nn.Module]:
        """The teacher's intact ViT under `name` (its card holds the elastic space, so `zoo extract` can cut any
        other size later) and each of `export_sizes` under `{name}_w{W}_d{L}`, extracted from it."""
        vit = self.teacher.backbone
        space = {"widths": self.widths, "depths": self.depths, "width": vit.embed_dim, "depth": len(vit.blocks)}
        out: dict[str, Export | nn.Module] = {name: Export(vit, card={"elastic": space})}
        for w, d in self.export_sizes:
            card = {**elastic_card(w, d, vit.embed_dim, len(vit.blocks)), "parent": name}
            out[f"{name}_w{w}_d{d}"] = Export(extract(vit, w, d), card={"elastic": card})
        return out


RECIPES.register(
    "poa",
    POA,
    family="dino",
    paper="arXiv:2408.01031",
    cpu_recipe="poa_vit_nano_patch4_32_fractals",
    description="POA: DINO/iBOT with an intact and an elastic student; one run yields ViTs of many widths and depths",
)

__all__ = ["POA", "MultiHead", "elastic_draws", "elastic_pool", "same_view_distillation"]
