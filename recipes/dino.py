"""DINO + iBOT: self-distillation with no labels (Caron et al., 2021, arXiv:2104.14294) and masked
image modelling with an online tokenizer (Zhou et al., 2021, arXiv:2111.07832), as combined in
DINOv2 (Oquab et al., 2023, arXiv:2304.07193) and POA.

A student ViT and its EMA teacher both end in a `DINOHead` (MLP, L2-normalise, weight-normalised
prototypes). DINO: the teacher's sharpened, centered (or Sinkhorn-Knopp balanced) distribution
over the K prototypes for each global crop is the target of the student's distribution for every
*other* crop, global and local (`dino_loss`). iBOT: the student sees the global crops with
block-masked patches (`block_mask`, `ibot_masks`) and predicts the teacher's patch distributions
at the masked positions (`ibot_patch_loss`). DINOv2's KoLeo term (`koleo_loss`) spreads the
student's CLS features over the sphere.

The pure pieces come first, in the order above; the `Method` class that wires them into the
engine lives at the bottom of this file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

import zoo
from zoo.data.pipeline import dist_info
from zoo.data.transforms import MultiCrop
from zoo.engine.ema import cosine_momentum, ema_copy, ema_update
from zoo.errors import ConfigError
from zoo.recipes.base import DataSpec, Method, Progress, check_vit_overrides
from zoo.registry import MODELS, RECIPES
from zoo.schedule import Schedule


# -- distributed helpers (no-ops in a single process) --------------------------------------------
def _all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce `t` in place across ranks when distributed; otherwise leave it as is."""
    if dist_info()[1] > 1:
        dist = torch.distributed
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


# -- head --------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> weight-normalised Linear onto `out_dim` prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight = g * v / ||v|| per output row; g = 1 makes every prototype a unit vector.
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) features -> (..., out_dim) prototype logits."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the prototype layer (DINO drops their grads in epoch 1)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]


# -- teacher targets ---------------------------------------------------------------------------
@torch.no_grad()
def teacher_softmax_centered(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """DINO's teacher target softmax((logits - center) / temp) in float32; centering and a low
    temperature together avoid both collapse modes (uniform and one-hot)."""
    return F.softmax((logits.float() - center.float()) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean logit: m * center + (1 - m) * mean over the (global) batch."""
    batch_sum = logits.float().sum(dim=0, keepdim=True)
    count = torch.tensor(float(logits.shape[0]), device=logits.device)
    _all_reduce_(batch_sum)
    _all_reduce_(count)
    return center * momentum + (batch_sum / count).to(center.dtype) * (1.0 - momentum)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """(B, K) logits -> (B, K) teacher targets whose rows are distributions and whose prototypes
    are used about equally over the global batch (DINOv2 / SwAV), in float32."""
    x = logits.float() / temp
    # A global shift cancels in the first normalisation; it only keeps exp() finite. A rank may
    # hold no rows (no masked patches), hence the -inf.
    local_max = x.max() if x.numel() else x.new_tensor(-math.inf)
    x = x - _all_reduce_(local_max, op="max")
    q = torch.exp(x).t()  # (K, B)
    k = q.shape[0]
    b = _all_reduce_(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce_(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce_(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: total mass 1/B
        q /= b
    return (q * b).t()


# -- losses ------------------------------------------------------------------------------------
def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Mean over all (teacher view i, student view v != i) pairs of the batch-mean cross-entropy
    -sum_k t_i * log_softmax(s_v / student_temp); views are (B, K), global crops first."""
    n_t, n_s = len(teacher_probs), len(student_logits)
    n_terms = n_t * n_s - min(n_t, n_s)
    if n_terms == 0:
        raise ValueError(f"dino_loss needs a pair of different views; got {n_t} teacher and {n_s} student views")
    # Elementwise, not a matmul: TF32 matmuls would round the targets and log-probabilities.
    log_s = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total = log_s[0].new_zeros(())
    for i, t in enumerate(teacher_probs):
        t = t.float()
        for v, ls in enumerate(log_s):
            if v != i:
                total = total + (-(t * ls).sum(dim=-1)).mean()
    return total / n_terms


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    mask: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """iBOT's masked-patch cross-entropy: (M, K) student logits and teacher targets of the M masked
    patches, in `mask.nonzero()` order (mask (B, N) bool, so only masked patches go through the
    heads); the mean over each image's masked patches, then the mean over all B images (unmasked
    images count as 0)."""
    mask = mask.bool()
    per_image = mask.sum(dim=1).clamp(min=1).float()  # (B,)
    weights = (1.0 / per_image).unsqueeze(1).expand_as(mask)[mask]  # (M,)
    log_s = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    ce = -(teacher_patch_probs.float() * log_s).sum(dim=-1)  # (M,)
    return (ce * weights).sum() / mask.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's Kozachenko-Leonenko entropy regulariser on (n, D) features:
    -mean_i log(||z_i - z_nn(i)|| + eps) with z the L2-normalised rows; low when points spread out."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs a (n, D) batch with n >= 2 rows to find nearest neighbours, got shape "
            f"{tuple(x.shape)}; use a per-device batch of at least 2 or turn the KoLeo term off"
        )
    z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    dots = z @ z.t()
    self_pairs = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    nn_idx = dots.masked_fill(self_pairs, -math.inf).argmax(dim=1)
    distances = torch.linalg.vector_norm(z - z[nn_idx], dim=-1)
    return -torch.log(distances + eps).mean()


# -- masks -------------------------------------------------------------------------------------
def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    """One float uniform in [lo, hi) from torch's RNG."""
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _place_block(
    mask: torch.Tensor,
    max_new: int,
    min_num_patches: int,
    log_aspect: tuple[float, float],
    generator: torch.Generator | None,
    tries: int = 10,
) -> int:
    """Mask one random rectangle that adds between 1 and `max_new` new cells; return how many."""
    h_grid, w_grid = mask.shape
    for _ in range(tries):
        # Below min_num_patches the official draw mostly yields blocks too big to accept.
        area = _uniform(min(min_num_patches, max_new), max_new, generator)
        aspect = math.exp(_uniform(*log_aspect, generator))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (1 <= h <= h_grid and 1 <= w <= w_grid):
            continue
        top = int(torch.randint(0, h_grid - h + 1, (), generator=generator))
        left = int(torch.randint(0, w_grid - w + 1, (), generator=generator))
        block = mask[top : top + h, left : left + w]
        new = h * w - int(block.sum())
        if 0 < new <= max_new:
            block.fill_(True)
            return new
    return 0


def block_mask(
    grid: tuple[int, int],
    num_masking_patches: int,
    *,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT/iBOT block-wise mask, a (h, w) bool tensor with at most `num_masking_patches` True cells,
    built from random rectangles of log-uniform aspect ratio (reproducible with a seeded generator)."""
    h, w = grid
    n = h * w
    if not 0 <= num_masking_patches <= n:
        raise ValueError(f"num_masking_patches must be in [0, {n}] for a {h}x{w} grid, got {num_masking_patches}")
    max_block = n if max_num_patches is None else max_num_patches
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    while count < num_masking_patches:
        added = _place_block(mask, min(num_masking_patches - count, max_block), min_num_patches, log_aspect, generator)
        if added == 0:
            break
        count += added
    return mask


def ibot_masks(
    n_images: int,
    grid: tuple[int, int],
    *,
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DINOv2's collate rule: (n_images, h*w) bool masks; int(n_images * mask_probability) images get
    a block mask whose ratio is drawn from its own slice of `ratio_range`, the rest none; shuffled."""
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    lo, hi = ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= lo <= hi <= 1, got {ratio_range}")
    n = grid[0] * grid[1]
    n_masked = int(n_images * mask_probability)
    bounds = torch.linspace(lo, hi, n_masked + 1).tolist()
    masks = torch.zeros(n_images, n, dtype=torch.bool)
    for i in range(n_masked):
        ratio = _uniform(bounds[i], bounds[i + 1], generator)
        masks[i] = block_mask(grid, int(n * ratio), generator=generator).flatten()
    return masks[torch.randperm(n_images, generator=generator)]


# -- data: multi-crop views per sample, block masks per batch ----------------------------------
class MultiCropViews:
    """Per-sample transform (in the loader workers): the image -> {"views": global crops, then local crops}."""

    def __init__(self, crops: MultiCrop):
        self.crops = crops

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"views": self.crops(sample["image"])}


class MaskedCollate:
    """Per-batch collate (in the loader workers): stack the views, then draw iBOT block masks for the
    `n_global` x B global crops (DINOv2's rule), seeded with the loader's stream."""

    def __init__(self, n_global: int, grid: tuple[int, int], mask_probability: float,
                 mask_ratio: tuple[float, float]):
        self.n_global, self.grid = n_global, tuple(grid)
        self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        n = self.n_global * len(samples)
        batch["masks"] = ibot_masks(n, self.grid, mask_probability=self.mask_probability, ratio_range=self.mask_ratio)
        return batch


# -- the method ----------------------------------------------------------------------------------
class Network(nn.Module):
    """A backbone and its projection head(s), named as DINO's `MultiCropWrapper` (`backbone.*`, `head.*`)."""

    def __init__(self, backbone: nn.Module, head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.ibot_head = ibot_head  # None: iBOT shares `head` (DINOv2's default)

    def patch_head(self) -> DINOHead:
        return self.head if self.ibot_head is None else self.ibot_head


class DINO(Method):
    """DINO + iBOT pretraining of a zoo ViT (`arch`); the EMA teacher's backbone is what is evaluated
    and published. Arguments are DINO's and DINOv2's names; see the module docstring and the recipes.

    Per step: the teacher encodes the global crops; the student encodes the global crops (with block
    masks in `mask_probability` of them) and the local crops. loss = dino_weight * DINO cross-view loss
    (class token) + ibot_weight * iBOT loss (masked patches) + koleo_weight * KoLeo (student class
    tokens, per global crop). Then AdamW, then teacher <- EMA of the student.
    """

    def __init__(
        self,
        arch: str,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        freeze_last_layer: int = 1,  # epochs without gradients into the prototypes
        separate_ibot_head: bool = False,
        n_global_crops: int = 2,
        n_local_crops: int = 6,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_size: int | None = None,  # default: about 3/7 of the input size, a multiple of the patch
        blur: tuple[float, float, float] = (1.0, 0.1, 0.5),  # probabilities: first global, other globals, locals
        solarize: tuple[float, float, float] = (0.0, 0.2, 0.0),
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 30,
        momentum_teacher: float = 0.996,  # cosine to momentum_teacher_end over the run
        momentum_teacher_end: float = 1.0,
        centering: Literal["center", "sinkhorn_knopp"] = "center",
        center_momentum: float = 0.9,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        pack_crops: bool | None = None,  # None: pack through attention_varlen on CUDA only
        **arch_overrides: Any,
    ):
        super().__init__()
        if MODELS.get(arch).meta.get("family") != "vit":
            raise ConfigError(f"dino: {arch!r} is not a ViT architecture; DINO/iBOT trains a zoo ViT")
        check_vit_overrides(DINO, "dino", arch_overrides)
        if n_global_crops < 2:
            raise ConfigError(f"dino: the DINO loss pairs every crop with a *different* global crop of the teacher, "
                              f"so it needs n_global_crops >= 2; got {n_global_crops}")
        if n_local_crops < 0:
            raise ConfigError(f"dino: n_local_crops must be >= 0 (0: global crops only), got {n_local_crops}")
        if centering not in ("center", "sinkhorn_knopp"):
            raise ConfigError(f"dino: centering must be 'center' or 'sinkhorn_knopp', got {centering!r}")
        if ibot_weight > 0 and not 0 < mask_probability <= 1:
            raise ConfigError(f"dino: the iBOT loss needs masked crops: mask_probability in (0, 1], got "
                              f"{mask_probability}; or set ibot_weight: 0")
        if not 0 <= mask_ratio[0] <= mask_ratio[1] < 1:
            raise ConfigError(f"dino: mask_ratio must be (low, high) with 0 <= low <= high < 1, got {mask_ratio}")
        for key in ("global_pool", "num_classes"):
            if key in arch_overrides:
                raise ConfigError(f"dino: the backbone is pretrained with its class token and no head; "
                                  f"remove {key} (choose pooling and heads when probing)")
        backbone = zoo.create_model(arch, global_pool="token", num_classes=0, **arch_overrides)
        dim = backbone.embed_dim
        head_args = dict(hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=head_layers,
                         norm_last_layer=norm_last_layer)
        ibot_head = DINOHead(dim, out_dim, **head_args) if separate_ibot_head else None
        self.student = Network(backbone, self.projection_head(dim, out_dim, **head_args), ibot_head)
        self.teacher = self.freeze(ema_copy(self.student))  # state: it stays in checkpoints
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # the student's; the exported ViT has none
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, out_dim))
        self.arch = arch
        self.n_global, self.n_local = int(n_global_crops), int(n_local_crops)
        self.crops = dict(global_scale=tuple(global_crops_scale), local_scale=tuple(local_crops_scale),
                          local_size=local_crops_size, blur=tuple(blur), solarize=tuple(solarize))
        self.student_temp, self.centering, self.center_momentum = student_temp, centering, center_momentum
        self.teacher_temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.momentum_teacher, self.momentum_teacher_end = momentum_teacher, momentum_teacher_end
        self.freeze_last_layer = freeze_last_layer
        self.weights = {"dino": dino_weight, "ibot": ibot_weight, "koleo": koleo_weight}
        self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)
        self.pack_crops = pack_crops

    def projection_head(self, dim: int, out_dim: int, **head_args: Any) -> nn.Module:
        """The student's projection head on `dim`-wide features (the teacher's is its EMA copy): one DINOHead;
        POA overrides it with its multiple heads."""
        return DINOHead(dim, out_dim, **head_args)

    # -- the Method contract ---------------------------------------------------------------------
    def schedules(self) -> dict[str, Schedule]:
        """DINO's teacher momentum (cosine to `momentum_teacher_end`, 1 by default) and teacher temperature (linear
        warmup, then constant)."""
        warm_from, temp, warm_epochs = self.teacher_temps
        return {"momentum": cosine_momentum(self.momentum_teacher, self.momentum_teacher_end),
                "teacher_temp": Schedule(temp, shape="constant", warmup_epochs=warm_epochs, warmup_from=warm_from)}

    def data_spec(self) -> DataSpec:
        vit = self.student.backbone
        crops = MultiCrop(vit, n_global=self.n_global, n_local=self.n_local, **self.crops)
        collate = MaskedCollate(self.n_global, vit.patch_embed.grid_size, self.mask_probability, self.mask_ratio) \
            if self.weights["ibot"] > 0 else None
        return DataSpec(fields=("image",), transform=MultiCropViews(crops), collate=collate)

    def _targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        return teacher_softmax_centered(logits, center, temp)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        globals_, locals_ = torch.cat(views[: self.n_global]), views[self.n_global :]
        masks = batch.get("masks") if self.weights["ibot"] > 0 else None
        temp = self.scheduled.get("teacher_temp", self.teacher_temps[1])
        with torch.no_grad():
            t_tokens = self.teacher.backbone.forward_features(globals_)
            t_cls = self.teacher.head(t_tokens[:, 0])
            t_probs = self._targets(t_cls, self.center, temp)
            if masks is not None:
                t_patch = self.teacher.patch_head()(t_tokens[:, 1:][masks])
                t_patch_probs = self._targets(t_patch, self.patch_center, temp)
        inputs = [globals_] + ([torch.cat(locals_)] if locals_ else [])
        tokens = self.student.backbone.forward_features_list(
            inputs, masks=[masks] + [None] * (len(inputs) - 1), mask_token=self.mask_token, pack=self.pack_crops)
        s_cls = self.student.head(torch.cat([t[:, 0] for t in tokens]))
        n_views = self.n_global + self.n_local
        losses = {"dino": dino_loss(list(s_cls.chunk(n_views)), list(t_probs.chunk(self.n_global)), self.student_temp)}
        if masks is not None:
            s_patch = self.student.patch_head()(tokens[0][:, 1:][masks])
            losses["ibot"] = ibot_patch_loss(s_patch, t_patch_probs, masks, self.student_temp)
        if self.weights["koleo"] > 0:
            cls = tokens[0][:, 0]
            if len(cls) < 2 * self.n_global:
                raise ConfigError(f"dino: KoLeo compares each image with its nearest neighbour in the batch, so it "
                                  f"needs >= 2 images per process; got {len(cls) // self.n_global}: raise "
                                  "data.batch_size or set method.koleo_weight: 0")
            losses["koleo"] = sum(koleo_loss(c) for c in cls.chunk(self.n_global))  # DINOv2: summed over crops
        loss = sum(self.weights[k] * v for k, v in losses.items())
        with torch.no_grad():
            if self.centering == "center":
                self.center.copy_(update_center(self.center, t_cls, self.center_momentum))
                if masks is not None and len(t_patch):
                    self.patch_center.copy_(update_center(self.patch_center, t_patch, self.center_momentum))
            entropy = -(t_probs * t_probs.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, v in losses.items()}, "teacher_entropy": entropy}

    def before_optimizer_step(self, progress: Progress) -> None:
        """DINO: no gradient into the prototypes during the first `freeze_last_layer` epochs."""
        if progress.epoch < self.freeze_last_layer:
            heads = [self.student.head] + ([self.student.ibot_head] if self.student.ibot_head is not None else [])
            for head in heads:
                for p in head.last_layer_parameters():
                    p.grad = None

    def on_step_end(self, progress: Progress) -> None:
        ema_update(self.teacher, self.student, self.scheduled.get("momentum", self.momentum_teacher))

    def backbone(self) -> nn.Module:
        """The EMA teacher's ViT: DINO evaluates (and releases) the teacher."""
        return self.teacher.backbone

    def init_backbone(self, source: nn.Module, name: str) -> None:
        """`init_from` loads into the student; the teacher starts as its copy."""
        from zoo.convert import fit_state_dict, load_checked

        target = self.student.backbone
        load_checked(target, fit_state_dict(source.state_dict(), target), f"init_from {name!r}")
        self.teacher.backbone.load_state_dict(target.state_dict())

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """plots/attention.png: the teacher's last-block attention of the class token over the patches,
        per head, on the first global crop of up to 6 images."""
        from zoo.engine.plots import attention_maps

        vit = self.teacher.backbone
        images = batch["views"][0][:6]
        attn = vit.get_last_selfattention(images)[:, :, 0, vit.num_prefix_tokens:]  # (B, heads, N)
        gh, gw = images.shape[-2] // vit.patch_embed.patch_size[0], images.shape[-1] // vit.patch_embed.patch_size[1]
        cfg = vit.pretrained_cfg
        return [attention_maps(images, attn.reshape(len(images), -1, gh, gw), folder / "attention.png",
                               mean=cfg["mean"], std=cfg["std"], title=f"{self.arch}: class-token attention (teacher)")]


RECIPES.register(
    "dino",
    DINO,
    family="dino",
    paper="arXiv:2104.14294, arXiv:2111.07832",
    cpu_recipe="dino_vit_tiny_patch4_32_fractals",
    description="DINO self-distillation (EMA teacher, multi-crop, centering) with iBOT's masked-patch loss and KoLeo",
)

__all__ = [
    "DINO",
    "DINOHead",
    "MaskedCollate",
    "MultiCropViews",
    "Network",
    "block_mask",
    "dino_loss",
    "ibot_masks",
    "ibot_patch_loss",
    "koleo_loss",
    "sinkhorn_knopp",
    "teacher_softmax_centered",
    "update_center",
]
