"""LOOK: supervised pretraining with a leave-one-out kNN loss (Feng, Jiang, Tang, Jin, Gao; ICLR 2022,
arXiv:2110.06014; facts: specs/flame_clipqc_look.md §3 and §6).

No official code exists; this is the first public implementation, written from the paper's abstract and its
description of the loss. Cross-entropy pulls every image of a class to one point and loses the class's inner
structure; LOOK only asks each image's k nearest neighbours, *itself left out*, to vote for its label, so a
class may stay multi-modal. For an anchor image i with feature z_i (L2-normalised):

    s_ij   = z_i · v_j                 for every entry j of a memory bank of the training set, except i's own
    N_k(i) = the k entries with the largest s_ij
    p_i    = Σ_{j∈N_k(i), y_j = y_i} exp(s_ij/τ) / Σ_{j∈N_k(i)} exp(s_ij/τ)      (the weighted kNN vote for y_i)
    L      = -mean_i log p_i

The bank holds one detached entry per training sample, keyed by its stable index (`DataSpec(index=True)`),
updated every step with the batch's features: v_i <- normalize(m v_i + (1 - m) z̄_i) (the SNCA rule, m = 0.5;
z̄_i the mean of the sample's views), or written by a momentum encoder (`momentum_encoder`). Leave-one-out
drops the entry of the anchor's own index, which is also where its other views' features went. The top-k
selection is not differentiable: the gradient flows through the selected neighbours' weights into z_i.
With k = the bank size this is scalable NCA (Wu et al. 2018); SupCon pulls all same-class samples together.

Choices the paper leaves open are named options, defaults stated here and in the YAML: k = 50 (200 at paper
scale), τ = 0.1, bank momentum 0.5, no momentum encoder, an MLP projection head to 128 dims, one view per image
(`views: 2` adds a second crop as a second anchor), anchors with no same-class neighbour in N_k left out of the
mean (their rate is logged as `miss`), the bank filled as training goes (entries not yet seen take no part).

`bank_shard: true` splits the bank over the ranks (entry i on rank i mod R): each rank scores every rank's
anchors against its part, the k-th largest score is agreed over the ranks, and the vote's sums are reduced
(differentiably) across them, so the loss equals the unsharded one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data.pipeline import dist_info
from zoo.engine.distributed import all_gather, all_gather_with_grad, all_reduce_with_grad
from zoo.engine.ema import ema_copy, ema_update
from zoo.errors import ConfigError
from zoo.recipes.base import DataSpec, Progress
from zoo.recipes.supervised import LabelledPretraining, projection_head
from zoo.registry import RECIPES


# -- the loss, as plain functions ------------------------------------------------------------------
def neighbour_scores(z: torch.Tensor, bank: torch.Tensor, bank_ids: torch.Tensor, bank_labels: torch.Tensor,
                     anchor_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) similarities of the anchors to the bank entries; -inf at each anchor's own entry (leave-one-out:
    the entry with its index) and at entries not filled yet (label -1)."""
    s = z @ bank.T
    own = anchor_ids[:, None] == bank_ids[None, :]
    return s.masked_fill(own | (bank_labels < 0)[None, :], float("-inf"))


def loo_knn_vote(scores: torch.Tensor, bank_labels: torch.Tensor, labels: torch.Tensor, k: int, temperature: float,
                 kth: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 reduce: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, has_neighbours): the weighted vote of each anchor's k nearest entries for its own label.

    `scores` from `neighbour_scores`. `kth`: each anchor's k-th largest score (default: from `scores`; a
    sharded bank passes the one agreed over ranks), `shift` a per-anchor constant subtracted before exp for
    stability (default the row max), `reduce` sums the (numerator, denominator) across bank shards."""
    finite = torch.isfinite(scores)
    if kth is None or shift is None:
        top = scores.detach().topk(min(k, scores.shape[1]), dim=1).values
        kth = top[:, -1] if kth is None else kth
        shift = top[:, 0] if shift is None else shift
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    chosen = finite & (scores >= kth[:, None])
    weights = torch.where(chosen, torch.exp((scores - shift[:, None]) / temperature), torch.zeros_like(scores))
    same = bank_labels[None, :] == labels[:, None]
    num, den = (weights * same).sum(1), weights.sum(1)
    if reduce is not None:
        num, den = reduce(torch.stack([num, den])).unbind(0)
    has = den > 0
    return num / den.clamp(min=torch.finfo(den.dtype).tiny), has


def loo_knn_loss(p: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """-mean log p over the anchors that have a same-class neighbour (p > 0); 0 with none. A weighted mean,
    not a selection, so the step needs no host sync."""
    keep = has & (p > 0)
    nll = torch.where(keep, -torch.log(p.clamp(min=torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return nll.sum() / keep.sum().clamp(min=1)


def class_votes(top: torch.Tensor, idx: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                temperature: float) -> torch.Tensor:
    """(B, C) weighted kNN votes per class from the anchors' top-k scores and their bank rows (`scores.topk`),
    the argmax being the kNN prediction."""
    w = torch.where(torch.isfinite(top), torch.exp((top - top[:, :1]) / temperature), torch.zeros_like(top))
    lab = bank_labels[idx].clamp(min=0)
    return torch.zeros(len(top), num_classes, device=top.device, dtype=w.dtype).scatter_add_(1, lab, w)


# -- the memory bank ---------------------------------------------------------------------------------
def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be had without swapping, page cache included
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume it fits
        return 1 << 62


class LOOK(LabelledPretraining):
    """LOOK: a zoo ViT (`arch`) + projection head trained with the leave-one-out kNN loss over a memory bank of
    the whole training set. See the module docstring for the loss and every option's default."""

    name = "look"

    def __init__(self, arch: str, num_classes: int, k: int = 50, temperature: float = 0.1,
                 bank_momentum: float = 0.5, momentum_encoder: float | None = None, bank_shard: bool = False,
                 head: str = "mlp", head_hidden_dim: int = 512, head_dim: int = 128, views: int = 1,
                 n_local_crops: int = 0, local_crops_scale: tuple[float, float] = (0.05, 0.4),
                 crop_scale: tuple[float, float] = (0.2, 1.0), **arch_overrides: Any):
        super().__init__(arch, num_classes, views=views, crop_scale=crop_scale, **arch_overrides)
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError(f"look: k must be an integer >= 1 (neighbours that vote), got {k!r}")
        if temperature <= 0:
            raise ConfigError(f"look: temperature must be > 0, got {temperature}")
        if not 0 <= bank_momentum < 1:
            raise ConfigError(f"look: bank_momentum must be in [0, 1) (0: entries replaced), got {bank_momentum}")
        if momentum_encoder is not None and not 0 <= momentum_encoder < 1:
            raise ConfigError(f"look: momentum_encoder must be null (off) or in [0, 1), got {momentum_encoder}")
        if not (isinstance(n_local_crops, int) and n_local_crops >= 0):
            raise ConfigError(f"look: n_local_crops must be an integer >= 0, got {n_local_crops!r}")
        self.head = projection_head(self.encoder.embed_dim, head_hidden_dim, head_dim, head)
        self.dim = head_dim if head != "none" else self.encoder.embed_dim
        self.k, self.temperature, self.bank_momentum = k, float(temperature), float(bank_momentum)
        self.momentum_encoder, self.bank_shard = momentum_encoder, bool(bank_shard)
        self.n_local, self.local_scale = n_local_crops, tuple(local_crops_scale)
        if momentum_encoder is not None:  # frozen state: in checkpoints, moved by EMA after each step
            self.key_encoder = self.freeze(ema_copy(nn.ModuleDict({"encoder": self.encoder, "head": self.head})))
        self._pending: list[tuple[torch.Tensor, ...]] = []  # this step's (index, features, labels), not yet written
        self.register_buffer("bank", torch.zeros(0, self.dim))
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))

    # -- the bank's shape, from the data ----------------------------------------------------------
    def on_data(self, samples: int | None) -> None:
        if samples is None:
            raise ConfigError("look: the memory bank needs the dataset's sample count; the shards need a sizes.json, "
                              "_info.json or *_stats.json (zoo shards check prints the counts)")
        if self.k >= samples:
            raise ConfigError(f"look: k={self.k} must be smaller than the memory bank ({samples} samples, one entry "
                              f"each, the anchor's own left out); lower method.k")
        rank, world = dist_info()
        shards = world if self.bank_shard else 1
        rows = -(-samples // shards)
        device = self.bank.device
        need, free = rows * (self.dim * self.bank.element_size() + 8), free_memory(device)
        if need > free // 2:
            hint = (f"shard it over more ranks (method.bank_shard: true splits it over the {world} rank(s); "
                    "run on more with torchrun)" if self.bank_shard else
                    "shard it across ranks with method.bank_shard: true (each of R ranks keeps 1/R)")
            raise ConfigError(f"look: the memory bank of {samples} x {self.dim} float32 needs {need / 2**30:.2f} GiB per "
                              f"rank, more than half of the {free / 2**30:.2f} GiB free on {device}; {hint}, or lower "
                              "method.head_dim")
        self.shards, self.shard = shards, rank if self.bank_shard else 0
        self.bank = torch.zeros(rows, self.dim, device=device)
        self.bank_labels = torch.full((rows,), -1, dtype=torch.long, device=device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A bank not sized yet (no `on_data`: a method built to read a checkpoint) takes the checkpoint's size;
        one sized for other data is a one-line error, not a size mismatch deep in torch."""
        saved = state_dict.get(prefix + "bank")
        if saved is not None and saved.shape != self.bank.shape:
            if len(self.bank):
                raise ConfigError(f"look: the checkpoint's memory bank holds {saved.shape[0]} rows of {saved.shape[1]}, "
                                  f"this run's {len(self.bank)} of {self.dim}: resume on the same data, ranks and "
                                  "method.bank_shard / head_dim")
            self.bank = torch.empty(saved.shape, dtype=self.bank.dtype, device=self.bank.device)
            self.bank_labels = torch.empty(saved.shape[0], dtype=torch.long, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bank_ids(self) -> torch.Tensor:
        """The sample index of each local bank row (row r of shard s holds sample r * shards + s)."""
        rows = torch.arange(len(self.bank), device=self.bank.device)
        return rows * self.shards + self.shard

    @torch.no_grad()
    def update_bank(self, index: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write every rank's batch into the bank rows this rank holds: v <- normalize(m v + (1 - m) z) where the
        entry was filled, z where it was not (`features` L2-normalised, one row per sample)."""
        index, features, labels = all_gather(index), all_gather(features.contiguous()), all_gather(labels)
        mine = (index % self.shards) == self.shard
        rows = index[mine] // self.shards
        z, y = features[mine].to(self.bank.dtype), labels[mine]
        filled = (self.bank_labels[rows] >= 0)[:, None]
        mixed = torch.where(filled, self.bank_momentum * self.bank[rows] + (1 - self.bank_momentum) * z, z)
        self.bank[rows] = F.normalize(mixed, dim=-1)
        self.bank_labels[rows] = y

    # -- the step -------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(images)), dim=-1)

    def vote(self, z: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(p, has_neighbours, class votes or None) of this rank's anchors, for an unsharded or a sharded bank."""
        ids, bank_labels = self.bank_ids(), self.bank_labels
        if self.shards == 1:
            scores = neighbour_scores(z, self.bank, ids, bank_labels, index)
            top, idx = scores.detach().topk(min(self.k, scores.shape[1]), dim=1)  # one top-k for the loss and `acc`
            p, has = loo_knn_vote(scores, bank_labels, labels, self.k, self.temperature, kth=top[:, -1],
                                  shift=top[:, 0])
            return p, has, class_votes(top, idx, bank_labels, self.num_classes, self.temperature)
        # sharded: every rank scores every rank's anchors against its own rows; the top-k is agreed over ranks
        rank, world = dist_info()
        every_z, every_label, every_index = all_gather_with_grad(z), all_gather(labels), all_gather(index)
        scores = neighbour_scores(every_z, self.bank, ids, bank_labels, every_index)
        local_top = scores.detach().topk(min(self.k, scores.shape[1]), dim=1).values
        top = all_gather(local_top.T.contiguous()).T.topk(self.k, dim=1).values  # (B_all, k) over all shards
        p, has = loo_knn_vote(scores, bank_labels, every_label, self.k, self.temperature, kth=top[:, -1],
                              shift=top[:, 0], reduce=all_reduce_with_grad)
        mine = slice(rank * len(z), (rank + 1) * len(z))
        return p[mine], has[mine], None

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        index, labels = batch["__index__"], batch["label"]
        b = len(labels)
        views = batch["views"] if "views" in batch else [batch["image"]]
        n_global = len(views) - self.n_local
        z_global = self.embed(torch.cat(views[:n_global]))
        z = z_global if not self.n_local else torch.cat([z_global, self.embed(torch.cat(views[n_global:]))])
        n_anchor_views = len(z) // b
        p, has, votes = self.vote(z, labels.repeat(n_anchor_views), index.repeat(n_anchor_views))
        loss = loo_knn_loss(p, has)
        with torch.no_grad():  # written after the optimizer step (backward still reads the bank)
            if self.momentum_encoder is not None:
                key = self.key_encoder
                keys = F.normalize(key["head"](key["encoder"](torch.cat(views[:n_global]))), dim=-1)
            else:
                keys = z_global.detach()
            per_sample = F.normalize(keys.float().view(n_global, b, -1).mean(0), dim=-1)
            self._pending.append((index, per_sample, labels))
        out = {"loss": loss, "miss": (~(has & (p > 0))).float().mean().detach() * 100,
               "p": p.detach().mean()}
        if votes is not None:
            out["acc"] = (votes.argmax(1) == labels.repeat(n_anchor_views)).float().mean() * 100
        return out

    def on_step_end(self, progress: Progress) -> None:
        """The step's batches (all micro-batches) into the bank, then the momentum encoder's EMA."""
        for index, features, labels in self._pending:
            self.update_bank(index, features, labels)
        self._pending.clear()
        if self.momentum_encoder is not None:
            ema_update(self.key_encoder, nn.ModuleDict({"encoder": self.encoder, "head": self.head}),
                       self.momentum_encoder)

    def view_transforms(self) -> list[Any]:
        """`views` crops, then `n_local_crops` small ones (DINO's multi-crop, crops and flips only)."""
        if not self.n_local:
            return super().view_transforms()
        from zoo.data.transforms import MultiCrop

        return MultiCrop(self.encoder, n_global=self.views, n_local=self.n_local, global_scale=self.crop_scale,
                         local_scale=self.local_scale, color_jitter=0, grayscale=0, blur=(0, 0, 0),
                         solarize=(0, 0, 0)).views

    def data_spec(self) -> DataSpec:
        spec = super().data_spec()
        spec.index = True  # the bank is keyed by each sample's stable index
        return spec

    def export(self, name: str) -> dict[str, Any]:
        out = super().export(name)
        out[name].card["pretraining"].update(k=self.k, temperature=self.temperature)
        return out


RECIPES.register(
    "look",
    LOOK,
    family="look",
    paper="arXiv:2110.06014",
    cpu_recipe="look_vit_nano_patch4_32_digits_coarse",
    # The registry test's 8-step loss comparison cannot show learning here: the frozen run's bank matches its
    # model, the learning run's bank lags it (its loss first rises). This test shows the vote learning instead.
    learning_shown_by="tests/test_recipe_look.py::test_training_step_writes_the_bank_after_the_step_and_learns_the_vote",
    description="LOOK: supervised pretraining by a leave-one-out kNN vote over a memory bank (classes stay multi-modal)",
)

__all__ = ["LOOK", "neighbour_scores", "loo_knn_vote", "loo_knn_loss", "class_votes", "free_memory"]
