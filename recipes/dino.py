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

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- distributed helpers (no-ops in a single process) --------------------------------------------
def _distributed() -> bool:
    """True when a process group with more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce `t` in place across ranks when distributed; otherwise leave it as is."""
    if _distributed():
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


__all__ = [
    "DINOHead",
    "block_mask",
    "dino_loss",
    "ibot_masks",
    "ibot_patch_loss",
    "koleo_loss",
    "sinkhorn_knopp",
    "teacher_softmax_centered",
    "update_center",
]
