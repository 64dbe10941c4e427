"""Dense linear probe on frozen patch features (the DINOv2 / MMSeg "linear" protocol at CPU scale).

`extract_dense` turns shards of (image, mask) pairs into frozen ViT patch maps (N, C, h, w) and
aligned masks (N, H, W). `dense_probe` fits a per-patch linear head — a frozen BatchNorm2d
without affine (statistics of the fit images) then a 1×1 conv — whose logits are bilinearly
upsampled to the mask size and trained with pixel cross-entropy. A grid of learning rates is
trained in one pass; the best is chosen on held-out TRAIN images (never val), retrained on all of
train, and scored once on val: mIoU, per-class IoU, pixel accuracy. `miou` is the pure metric.

Only the "segmentation" task exists; the `task` argument, `DenseResult.metrics` and the
per-task loss/metric helpers are where a depth head (RMSE) would slot in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.schedule import warmup_cosine
from zoo.errors import ZooError
from zoo.eval.linear import heldout_split
from zoo.progress import progress

log = logging.getLogger(__name__)

DEFAULT_LRS = (1e-3, 1e-2, 1e-1)
TASKS = ("segmentation",)


# -- metrics (pure) --------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, over pixels whose target is
    not `ignore_index`."""
    if pred.shape != target.shape:
        raise ZooError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    _check_range(target, num_classes, ignore_index, "target")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ZooError(f"predictions must be class indices in 0..{num_classes - 1}, got values up to {int(pred.max())}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU in % (float64); NaN for a class absent from both ground truth and prediction."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, 100.0 * tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else float("nan")


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> tuple[float, torch.Tensor]:
    """(mean IoU in %, per-class IoU (K,) in %) of integer label maps. The mean runs over the
    classes present in the ground truth or the predictions; absent classes are NaN in per-class."""
    per_class = iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
    return _nanmean(per_class), per_class


def segmentation_metrics(cm: torch.Tensor) -> dict[str, Any]:
    """mIoU (%), pixel accuracy (%) and {class: IoU %} (present classes only) from a confusion matrix."""
    per_class = iou_from_confusion(cm)
    total = int(cm.sum())
    return {
        "mIoU": _nanmean(per_class),
        "pixel_acc": 100.0 * float(cm.diag().sum()) / total if total else float("nan"),
        "per_class_iou": {c: float(v) for c, v in enumerate(per_class.tolist()) if not math.isnan(v)},
    }


# -- feature extraction ------------------------------------------------------------------------
def _check_dense_model(model: nn.Module) -> None:
    if not callable(getattr(model, "forward_intermediates", None)) or not hasattr(model, "patch_embed"):
        raise ZooError(
            f"{type(model).__name__} has no ViT patch maps (forward_intermediates + patch_embed): "
            "dense probing needs a ViT, e.g. vit_nano_patch4_32"
        )


@torch.no_grad()
def patch_maps(model: nn.Module, x: torch.Tensor, blocks: int | Sequence[int] = (-1,)) -> torch.Tensor:
    """(B, C * len(blocks), h, w): the normalised patch tokens of the chosen blocks as maps, concatenated."""
    _check_dense_model(model)
    indices = blocks if isinstance(blocks, int) else list(blocks)
    try:
        maps = model.forward_intermediates(x, indices=indices, norm=True, output_fmt="NCHW", intermediates_only=True)
    except ValueError as e:
        depth = len(getattr(model, "blocks", ()))
        raise ZooError(f"blocks={blocks!r} does not fit this {depth}-block model ({e}); use -1 for the last "
                       f"block, a list like (-4, -1), or an int n for the last n") from None
    if not maps or any(not isinstance(m, torch.Tensor) or m.ndim != 4 for m in maps):
        raise ZooError(f"{type(model).__name__}.forward_intermediates did not return NCHW patch maps: "
                       "dense probing needs a ViT")
    return torch.cat(maps, dim=1)


def extract_dense(
    model: nn.Module,
    urls: str | list[str],
    *,
    blocks: int | Sequence[int] = (-1,),
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats (N, C, h, w) float32, masks (N, H, W) int64) of a ViT in eval mode over shards of
    image + mask samples, in shard order.

    `blocks`: block indices (negative from the end) or an int n for the last n; their normalised
    patch maps are concatenated along channels. `transform(sample) -> sample` must keep image and
    mask aligned (default: `PairedTransform(model, train=False)`, resize + center crop).
    """
    from zoo.data import loader
    from zoo.data.transforms import PairedTransform

    _check_dense_model(model)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ZooError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if transform is None:
        transform = PairedTransform(model, train=False, modalities=())

    def prepare(sample: dict[str, Any]) -> dict[str, Any]:
        out = transform(sample)
        return {"image": out["image"], "mask": torch.as_tensor(out["mask"]).long()}

    if max_samples is not None:
        batch_size = min(batch_size, max_samples)
    data = loader(urls, fields=("image", "mask"), transform=prepare, batch_size=batch_size,
                  num_workers=num_workers, shuffle=0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    feats: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    n = 0
    was_training = model.training
    model.eval()
    try:
        try:
            total = len(data)
        except TypeError:
            total = None
        for batch in progress(data, total=total, desc="dense features", unit="batch"):
            x, m = batch["image"], batch["mask"]
            if max_samples is not None:
                x, m = x[: max_samples - n], m[: max_samples - n]
            feats.append(patch_maps(model, x.to(device), blocks).float().cpu())
            masks.append(m)
            n += len(m)
            if max_samples is not None and n >= max_samples:
                break
    finally:
        model.train(was_training)
    if not masks:
        raise ZooError(f"no samples with both an image and a mask (seg.png) in {urls}; "
                       "check the shards with `zoo shards check`")
    if data.skipped:
        log.warning("skipped %d samples while extracting dense features: %s", sum(data.skipped.values()), dict(data.skipped))
    return torch.cat(feats), torch.cat(masks)


# -- the probe ---------------------------------------------------------------------------------
@dataclass
class DenseResult:
    """A dense probe's val metrics (`metrics`: mIoU and pixel_acc in % for segmentation), per-class
    IoU, the chosen configuration and the held-out score of every learning rate."""

    task: str
    metrics: dict[str, float]
    best: dict[str, Any]
    grid: list[dict[str, Any]] = field(default_factory=list)
    per_class_iou: dict[int, float] = field(default_factory=dict)
    num_classes: int = 0
    split: dict[str, int] = field(default_factory=dict)
    head: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def miou(self) -> float:
        return self.metrics["mIoU"]

    @property
    def pixel_acc(self) -> float:
        return self.metrics["pixel_acc"]

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.metrics, "per_class_iou": self.per_class_iou, "best": self.best,
                "grid": self.grid, "num_classes": self.num_classes, "split": self.split}


def _check_range(masks: torch.Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    labelled = masks[masks != ignore_index]
    if labelled.numel() and (labelled.min() < 0 or labelled.max() >= num_classes):
        bad = int(labelled.max()) if labelled.max() >= num_classes else int(labelled.min())
        raise ZooError(f"{what} masks hold value {bad}, outside 0..{num_classes - 1} (ignore_index={ignore_index}): "
                       f"raise num_classes or map that value to ignore_index")


def _check_split(feats: torch.Tensor, masks: torch.Tensor, what: str) -> None:
    if feats.ndim != 4 or masks.ndim != 3:
        raise ZooError(f"{what}: features must be (N, C, h, w) and masks (N, H, W), "
                       f"got {tuple(feats.shape)} and {tuple(masks.shape)}")
    if len(feats) != len(masks):
        raise ZooError(f"{what}: {len(feats)} feature maps but {len(masks)} masks; they must pair one to one")
    if len(feats) == 0:
        raise ZooError(f"{what} split is empty: the dense probe needs images in both train and val")
    if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
        raise ZooError(f"{what} masks must be integer class maps, got dtype {masks.dtype}")


class _FrozenStats(nn.BatchNorm2d):
    """BatchNorm2d without affine whose statistics are set once from the fit images and never updated."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor):
        super().__init__(len(mean), affine=False)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.eval()

    def train(self, mode: bool = True) -> "_FrozenStats":
        return super().train(False)


def _channel_stats(feats: torch.Tensor, idx: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.zeros(feats.shape[1], dtype=torch.float64)
    ss = torch.zeros_like(s)
    for i in range(0, len(idx), chunk):
        x = feats[idx[i : i + chunk]].double()
        s += x.sum((0, 2, 3))
        ss += x.pow(2).sum((0, 2, 3))
    count = len(idx) * feats.shape[2] * feats.shape[3]
    mean = s / count
    return mean.float(), (ss / count - mean.pow(2)).clamp_min(0).float()


def _make_head(channels: int, num_classes: int, stats: tuple[torch.Tensor, torch.Tensor] | None,
               g: torch.Generator) -> nn.Sequential:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01, generator=g)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(_FrozenStats(*stats) if stats is not None else nn.Identity(), conv)


def _seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of logits upsampled to the mask size; 0 (not NaN) for an all-ignored batch."""
    up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    n_valid = (target != ignore_index).sum().clamp_min(1)
    return F.cross_entropy(up, target, ignore_index=ignore_index, reduction="sum") / n_valid


def _train_heads(
    feats: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor, lrs: Sequence[float], num_classes: int, *,
    norm: str, epochs: int, batch_size: int, seed: int, ignore_index: int,
) -> list[nn.Sequential]:
    """One head per lr, all trained together on the images `idx`: SGD momentum 0.9, no weight decay,
    per-step cosine schedule, summed pixel cross-entropies."""
    g = torch.Generator().manual_seed(seed)
    stats = _channel_stats(feats, idx) if norm == "bn" else None
    heads = [_make_head(feats.shape[1], num_classes, stats, g) for _ in lrs]
    groups = [{"params": list(h.parameters()), "lr": lr, "base_lr": lr} for h, lr in zip(heads, lrs)]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(idx) / batch_size))
    total, step = epochs * steps_per_epoch, 0
    with progress(total=total, desc=f"dense probe ({len(lrs)} heads)", unit="step") as bar:
        for _ in range(epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            for b in range(steps_per_epoch):
                batch = order[b * batch_size : (b + 1) * batch_size]
                x, y = feats[batch].float(), masks[batch].long()
                z = heads[0][0](x)  # the normalisation is shared and frozen: apply it once
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine(step, total, group["base_lr"])
                loss = sum(_seg_loss(h[1](z), y, ignore_index) for h in heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if bar.due():  # reading the loss syncs: only for a line that shows it
                    bar.set_postfix(loss=f"{float(loss.detach()) / len(heads):.4f}")
                bar.update(1)
    return heads


@torch.no_grad()
def _confusions(heads: Sequence[nn.Module], feats: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor,
                num_classes: int, ignore_index: int, batch_size: int) -> list[torch.Tensor]:
    """Confusion matrix of each head over the images `idx`, predictions at mask resolution."""
    cms = [torch.zeros(num_classes, num_classes, dtype=torch.long) for _ in heads]
    for i in range(0, len(idx), batch_size):
        b = idx[i : i + batch_size]
        x, y = feats[b].float(), masks[b].long()
        for cm, h in zip(cms, heads):
            logits = F.interpolate(h(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
            cm += confusion_matrix(logits.argmax(1), y, num_classes, ignore_index)
    return cms


def dense_probe(
    train_feats: torch.Tensor,
    train_masks: torch.Tensor,
    val_feats: torch.Tensor,
    val_masks: torch.Tensor,
    *,
    task: str = "segmentation",
    num_classes: int | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 20,
    batch_size: int = 16,
    heldout: float = 0.2,
    seed: int = 0,
    ignore_index: int = 255,
    norm: str = "bn",
) -> DenseResult:
    """Linear segmentation probe on patch maps: lr chosen on a held-out `heldout` fraction of train
    images, retrained on all of train, scored once on val (mIoU and pixel accuracy in %).

    `num_classes` defaults to 1 + the largest labelled value in train or val. `norm="bn"` puts a
    BatchNorm2d without affine (fit-image statistics, frozen) before the 1×1 conv, as DINOv2's
    linear head does; `norm="none"` uses the raw features. `batch_size` counts images.
    """
    if task not in TASKS:
        raise ZooError(f"dense probe task {task!r} is not available; use one of {list(TASKS)}")
    if norm not in ("bn", "none"):
        raise ZooError(f"norm must be 'bn' or 'none', got {norm!r}")
    if not lrs or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in lrs):
        raise ZooError(f"lrs must be a non-empty list of positive learning rates, got {lrs!r}")
    if not 0 < heldout < 1:
        raise ZooError(f"heldout must be a fraction in (0, 1), got {heldout!r}")
    if epochs < 1 or batch_size < 1:
        raise ZooError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    _check_split(train_feats, train_masks, "train")
    _check_split(val_feats, val_masks, "val")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ZooError(f"train features have {train_feats.shape[1]} channels but val {val_feats.shape[1]}: "
                       "extract both with the same model and blocks")
    for what, m in (("train", train_masks), ("val", val_masks)):
        if not (m != ignore_index).any():
            raise ZooError(f"every {what} mask pixel equals ignore_index={ignore_index}: nothing to train or score")
    if num_classes is None:
        num_classes = 1 + max(int(m[m != ignore_index].max()) for m in (train_masks, val_masks))
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ZooError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    _check_range(train_masks, num_classes, ignore_index, "train")
    _check_range(val_masks, num_classes, ignore_index, "val")

    n_train = len(train_feats)
    # split images (not pixels): a plain random split, through the stratified splitter with one stratum
    fit, held = heldout_split(torch.zeros(n_train, dtype=torch.long), heldout, seed)
    if len(held) == 0 or len(fit) == 0:
        raise ZooError(f"{n_train} train image(s) are too few to hold out a {heldout:.0%} part for choosing the lr; "
                       "give more train images or a larger heldout")
    if not (train_masks[held] != ignore_index).any():
        raise ZooError("the held-out train images have no labelled pixels; change seed or heldout")
    common = dict(norm=norm, epochs=epochs, batch_size=batch_size, seed=seed, ignore_index=ignore_index)
    heads = _train_heads(train_feats, train_masks, fit, lrs, num_classes, **common)
    grid = []
    for lr, cm in zip(lrs, _confusions(heads, train_feats, train_masks, held, num_classes, ignore_index, batch_size)):
        m = segmentation_metrics(cm)
        grid.append({"lr": lr, "heldout_mIoU": m["mIoU"], "heldout_pixel_acc": m["pixel_acc"]})
    # ties go to the lr nearest 1e-2
    best = max(grid, key=lambda r: (r["heldout_mIoU"], r["heldout_pixel_acc"], -abs(math.log10(r["lr"]) + 2)))
    log.info("dense probe: lr %g chosen on %d held-out train images (mIoU %.2f)", best["lr"], len(held), best["heldout_mIoU"])

    everything = torch.arange(n_train)
    head = _train_heads(train_feats, train_masks, everything, [best["lr"]], num_classes, **common)[0]
    head.eval()
    val_cm = _confusions([head], val_feats, val_masks, torch.arange(len(val_feats)), num_classes, ignore_index, batch_size)[0]
    m = segmentation_metrics(val_cm)
    return DenseResult(
        task=task,
        metrics={"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"]},
        best=dict(best),
        grid=grid,
        per_class_iou=m["per_class_iou"],
        num_classes=num_classes,
        split={"fit_images": len(fit), "heldout_images": len(held), "train_images": n_train, "val_images": len(val_feats)},
        head=head,
    )


__all__ = ["extract_dense", "patch_maps", "dense_probe", "DenseResult", "miou", "confusion_matrix",
           "iou_from_confusion", "segmentation_metrics"]
