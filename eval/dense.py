"""Dense evaluation of ViT patch features: a linear probe, UNIP's LL-FPN head, and fine-tuning.

`extract_dense` turns shards of (image, mask) pairs into frozen ViT patch maps (N, C, h, w) and
aligned masks (N, H, W). `dense_probe` trains a head on those frozen maps whose logits are
bilinearly upsampled to the mask size and trained with pixel cross-entropy:

- `head="linear"` (the DINOv2 / MMSeg "linear" protocol at CPU scale): a frozen BatchNorm2d
  without affine (statistics of the fit images) then a 1×1 conv, on normalised patch maps;
- `head="llfpn"`: UNIP's last-layer feature pyramid (`LLFPN`) plus a light decoder
  (`LLFPNHead`), on the LAST block's un-normalised tokens (`extract_dense(..., norm=False)`).

A grid of learning rates is trained in one pass; the best is chosen on held-out TRAIN images
(never val), retrained on all of train, and scored once on val: mIoU, per-class IoU, pixel
accuracy. `dense_finetune` instead trains backbone + head end to end from images (AdamW,
layer-wise lr decay, warmup + cosine) at one given lr and scores val once. `image_field` reads
another image-like field (e.g. the scenes' 1-channel `thermal`) as the input image. `miou` is the
pure metric.

Only the "segmentation" task exists; the `task` argument, `DenseResult.metrics` and the
per-task loss/metric helpers are where a depth head (RMSE) would slot in.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from zoo.errors import SampleError, ZooError
from zoo.schedule import Schedule, warmup_cosine
from zoo.eval.linear import heldout_split
from zoo.progress import progress

if TYPE_CHECKING:
    from zoo.data import Loader

log = logging.getLogger(__name__)

DEFAULT_LRS = (1e-3, 1e-2, 1e-1)  # the linear head's SGD grid
LLFPN_LRS = (1e-4, 1e-3, 1e-2)  # the LL-FPN head's AdamW grid
TASKS = ("segmentation",)
HEADS = ("linear", "llfpn")
# per head: the default lr grid and the lr that wins ties in held-out mIoU
_PROBE_GRID = {"linear": (DEFAULT_LRS, 1e-2), "llfpn": (LLFPN_LRS, 1e-3)}
HEAD_WEIGHT_DECAY = 0.05  # AdamW's, for the LL-FPN head and for fine-tuning (UNIP / BEiT segmentation)


def check_head(head: str) -> None:
    """A ZooError unless `head` names a dense head."""
    if head not in HEADS:
        raise ZooError(f"unknown dense head {head!r}; use one of {', '.join(HEADS)}")


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


def _maps(model: nn.Module, x: torch.Tensor, blocks: int | Sequence[int], norm: bool) -> torch.Tensor:
    """`patch_maps` with gradients (fine-tuning runs the backbone through it)."""
    _check_dense_model(model)
    indices = blocks if isinstance(blocks, int) else list(blocks)
    try:
        maps = model.forward_intermediates(x, indices=indices, norm=norm, output_fmt="NCHW", intermediates_only=True)
    except ValueError as e:
        depth = len(getattr(model, "blocks", ()))
        raise ZooError(f"blocks={blocks!r} does not fit this {depth}-block model ({e}); use -1 for the last "
                       f"block, a list like (-4, -1), or an int n for the last n") from None
    if not maps or any(not isinstance(m, torch.Tensor) or m.ndim != 4 for m in maps):
        raise ZooError(f"{type(model).__name__}.forward_intermediates did not return NCHW patch maps: "
                       "dense probing needs a ViT")
    return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


@torch.no_grad()
def patch_maps(model: nn.Module, x: torch.Tensor, blocks: int | Sequence[int] = (-1,), *,
               norm: bool = True) -> torch.Tensor:
    """(B, C * len(blocks), h, w): the patch tokens of the chosen blocks as maps, concatenated; after the
    model's final norm when `norm` (the linear probe), raw block outputs otherwise (LL-FPN)."""
    return _maps(model, x, blocks, norm)


class _ImageMask:
    """Sample -> {"image", "mask"} through a paired transform, with the field `image_field` standing in
    for the image (a 1-channel one is replicated to the model's 3 channels by PairedTransform)."""

    def __init__(self, transform: Callable[[dict[str, Any]], dict[str, Any]], image_field: str):
        self.transform = transform
        self.image_field = image_field

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        value = sample[self.image_field]
        if not isinstance(value, (Image.Image, np.ndarray, torch.Tensor)):
            raise SampleError(f"field {self.image_field!r} holds a {type(value).__name__}, not an image; "
                              "pass an image-like field (image, thermal, depth) as image_field")
        if self.image_field != "image":
            sample = {k: v for k, v in sample.items() if k != self.image_field}
            sample["image"] = value
        out = self.transform(sample)
        return {"image": out["image"], "mask": torch.as_tensor(out["mask"]).long()}


def _check_image_field(image_field: Any) -> None:
    if not isinstance(image_field, str) or not image_field or image_field == "mask":
        raise ZooError(f"image_field must name an image-like field such as 'image' or 'thermal', got {image_field!r}")


def dense_loader(
    model: nn.Module,
    urls: str | list[str],
    *,
    train: bool = False,
    image_field: str = "image",
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    shuffle: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
) -> "Loader":
    """Batches {"image": (B, 3, H, W) normalised float, "mask": (B, H, W) int64} of shards of image + mask
    samples, for a model's preprocessing.

    `image_field` is read as the image (e.g. "thermal": the scenes' PIL "L" rendering, made 3 equal
    channels before normalisation). `transform(sample) -> sample` must keep image and mask aligned;
    default `PairedTransform(model, train=train, modalities=())`: resize + center crop for eval, for
    training a random resized crop (`scale`, a fraction of the area) and a horizontal flip (`hflip`).
    """
    from zoo.data import loader
    from zoo.data.transforms import PairedTransform

    _check_image_field(image_field)
    if transform is None:
        aug = dict(scale=scale, hflip=hflip) if train else {}
        transform = PairedTransform(model, train=train, modalities=(), **aug)
    return loader(urls, fields=(image_field, "mask"), transform=_ImageMask(transform, image_field),
                  batch_size=batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed, drop_last=drop_last)


def _first_sample_fields(urls: str | list[str]) -> list[str]:
    """The fields of the shards' first sample, read from its member names without decoding."""
    from zoo.data.fields import field_of
    from zoo.data.reader import iter_raw_samples
    from zoo.data.shards import expand_sources

    flat = [u for source in expand_sources(urls) for u in source]
    with closing(iter_raw_samples(flat, Counter())) as raws:
        for raw in raws:
            return sorted({field_of(k) for k in raw if not k.startswith("__")})
    return []


def _no_samples_error(urls: str | list[str], skipped: Counter, image_field: str) -> ZooError:
    """Why no (image, mask) pair came out of the shards, in one line that says what would fit."""
    missing = skipped.get(f"missing_{image_field}", 0)
    if image_field != "image" and missing:
        fields = _first_sample_fields(urls)
        return ZooError(f"no sample in {urls} has the image field {image_field!r} ({missing} skipped); they have "
                        f"{len(fields)} fields: {', '.join(fields)}; pass one holding an image as image_field")
    return ZooError(f"no samples with both an image ({image_field}) and a mask (seg.png) in {urls}; "
                    "check the shards with `zoo shards check`")


def _check_max_samples(max_samples: Any) -> None:
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ZooError(f"max_samples must be a positive integer or None, got {max_samples!r}")


def extract_dense(
    model: nn.Module,
    urls: str | list[str],
    *,
    blocks: int | Sequence[int] = (-1,),
    norm: bool = True,
    image_field: str = "image",
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats (N, C, h, w) float32, masks (N, H, W) int64) of a ViT in eval mode over shards of
    image + mask samples, in shard order.

    `blocks`: block indices (negative from the end) or an int n for the last n; their patch maps are
    concatenated along channels, after the final norm when `norm` (the linear probe's input) or raw
    (`norm=False`, blocks=-1: the LL-FPN head's input). `image_field` and `transform`: see `dense_loader`
    (default transform: `PairedTransform(model, train=False)`, resize + center crop).
    """
    _check_dense_model(model)
    _check_max_samples(max_samples)
    if max_samples is not None:
        batch_size = min(batch_size, max_samples)
    data = dense_loader(model, urls, image_field=image_field, transform=transform, batch_size=batch_size,
                        num_workers=num_workers)
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
            feats.append(patch_maps(model, x.to(device), blocks, norm=norm).float().cpu())
            masks.append(m)
            n += len(m)
            if max_samples is not None and n >= max_samples:
                break
    finally:
        model.train(was_training)
    if not masks:
        raise _no_samples_error(urls, data.skipped, image_field)
    if data.skipped:
        log.warning("skipped %d samples while extracting dense features: %s", sum(data.skipped.values()), dict(data.skipped))
    return torch.cat(feats), torch.cat(masks)


# -- the LL-FPN head ----------------------------------------------------------------------------
def check_pyramid_grid(h: int, w: int) -> None:
    """A ZooError unless a patch grid of h × w fits LL-FPN's 0.5× (max-pooled) level."""
    if h < 2 or w < 2:
        raise ZooError(f"LL-FPN's 0.5x level (MaxPool2d(2)) needs a patch grid of at least 2x2, got {h}x{w}: "
                       "use larger images or a smaller patch size, or the linear head")


class LLFPN(nn.Module):
    """UNIP's last-layer feature pyramid: ONE map (B, C, h, w) of the last block's tokens turned into
    four maps of C channels at 4×, 2×, 1× and 0.5× its size (UNIP's ViT backbone with
    out_indices=[11, 11, 11, 11]). Modules are named as BEiT/UNIP's fpn1..fpn4, so their weights
    map by key. Odd sizes floor at 0.5× (MaxPool2d(2))."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2), nn.BatchNorm2d(c), nn.GELU(),
                                  nn.ConvTranspose2d(c, c, 2, stride=2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_pyramid_grid(*x.shape[-2:])
        return [self.fpn1(x), self.fpn2(x), self.fpn3(x), self.fpn4(x)]


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LLFPNHead(nn.Module):
    """LL-FPN and a LIGHT decoder: logits (B, K, 4h, 4w) from a last-block map (B, C, h, w).

    The official decoder is UperNet (PPM + FPN at 512 channels); at CPU scale this uses a light
    FPN-style fusion instead: each level -> 1×1 conv-BN-ReLU to `width`, bilinear upsampling to the
    4× level, sum, 3×3 conv-BN-ReLU, 1×1 conv to the classes.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 64):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ZooError(f"LL-FPN width must be a positive integer, got {width!r}")
        self.pyramid = LLFPN(channels)
        self.lateral = nn.ModuleList(_conv_bn_relu(channels, width, 1) for _ in range(4))
        self.fuse = _conv_bn_relu(width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.pyramid(x)
        size = levels[0].shape[-2:]
        fused = 0
        for lateral, level in zip(self.lateral, levels):
            fused = fused + _upsampled(lateral(level), size)
        return self.classifier(self.fuse(fused))


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
    """The linear head: (frozen) normalisation, then a 1×1 conv initialised N(0, 0.01)."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01, generator=g)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(_FrozenStats(*stats) if stats is not None else nn.Identity(), conv)


def _upsampled(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits bilinearly resized to the mask size (H, W)."""
    return logits if tuple(logits.shape[-2:]) == tuple(size) else F.interpolate(
        logits, size=tuple(size), mode="bilinear", align_corners=False)


def _seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pixel cross-entropy of logits upsampled to the mask size; 0 (not NaN) for an all-ignored batch."""
    up = _upsampled(logits, target.shape[-2:])
    n_valid = (target != ignore_index).sum().clamp_min(1)
    return F.cross_entropy(up, target, ignore_index=ignore_index, reduction="sum") / n_valid


def _train_heads(
    feats: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor, lrs: Sequence[float], num_classes: int, *,
    head: str, norm: str, width: int, epochs: int, batch_size: int, seed: int, ignore_index: int,
) -> list[nn.Module]:
    """One head per lr, all trained together on the images `idx` with summed pixel cross-entropies and a
    per-step cosine schedule. Linear: SGD momentum 0.9, no weight decay. LL-FPN: AdamW (0.9, 0.999),
    weight decay 0.05 off 1-D parameters, a warmup of 10% of the steps. Returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(len(idx) / batch_size))
    total, step = epochs * steps_per_epoch, 0
    heads: list[nn.Module]
    if head == "linear":
        stats = _channel_stats(feats, idx) if norm == "bn" else None
        heads = [_make_head(feats.shape[1], num_classes, stats, g) for _ in lrs]
        groups = [{"params": list(h.parameters()), "lr": lr, "base_lr": lr} for h, lr in zip(heads, lrs)]
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
        shared, parts, warmup = heads[0][0], [h[1] for h in heads], 0  # the frozen normalisation: applied once
    else:
        from timm.optim import param_groups_weight_decay  # no decay on biases and norms (1-D)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = [LLFPNHead(feats.shape[1], num_classes, width) for _ in lrs]
        groups = [{**grp, "lr": lr, "base_lr": lr}
                  for h, lr in zip(heads, lrs) for grp in param_groups_weight_decay(h, HEAD_WEIGHT_DECAY)]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        shared, parts, warmup = nn.Identity(), heads, total // 10
    for h in heads:
        h.train()
    with progress(total=total, desc=f"dense probe ({len(lrs)} {head} heads)", unit="step") as bar:
        for _ in range(epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            for b in range(steps_per_epoch):
                batch = order[b * batch_size : (b + 1) * batch_size]
                x, y = feats[batch].float(), masks[batch].long()
                z = shared(x)
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine(step, total, group["base_lr"], warmup=warmup)
                loss = sum(_seg_loss(p(z), y, ignore_index) for p in parts)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if bar.due():  # reading the loss syncs: only for a line that shows it
                    bar.set_postfix(loss=f"{float(loss.detach()) / len(heads):.4f}")
                bar.update(1)
    for h in heads:
        h.eval()
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
            cm += confusion_matrix(_upsampled(h(x), y.shape[-2:]).argmax(1), y, num_classes, ignore_index)
    return cms


def dense_probe(
    train_feats: torch.Tensor,
    train_masks: torch.Tensor,
    val_feats: torch.Tensor,
    val_masks: torch.Tensor,
    *,
    task: str = "segmentation",
    head: str = "linear",
    num_classes: int | None = None,
    lrs: Sequence[float] | None = None,
    epochs: int = 20,
    batch_size: int = 16,
    heldout: float = 0.2,
    seed: int = 0,
    ignore_index: int = 255,
    norm: str | None = None,
    width: int = 64,
) -> DenseResult:
    """Segmentation probe on frozen patch maps: lr chosen on a held-out `heldout` fraction of train
    images, retrained on all of train, scored once on val (mIoU and pixel accuracy in %).

    `head="linear"` (lrs default DEFAULT_LRS, SGD): `norm="bn"` (default) puts a BatchNorm2d without
    affine (fit-image statistics, frozen) before the 1×1 conv, as DINOv2's linear head does;
    `norm="none"` uses the raw features. `head="llfpn"` (lrs default LLFPN_LRS, AdamW): `LLFPNHead`
    of `width` channels; give it the last block's UN-normalised maps, `extract_dense(..., norm=False)`.
    `num_classes` defaults to 1 + the largest labelled value in train or val. `batch_size` counts images.
    """
    if task not in TASKS:
        raise ZooError(f"dense probe task {task!r} is not available; use one of {list(TASKS)}")
    check_head(head)
    if head == "llfpn" and norm is not None:
        raise ZooError(f"norm={norm!r} applies to the linear head only; LL-FPN normalises with its own BatchNorms")
    norm = "bn" if norm is None and head == "linear" else norm
    if head == "linear" and norm not in ("bn", "none"):
        raise ZooError(f"norm must be 'bn' or 'none', got {norm!r}")
    lrs = _PROBE_GRID[head][0] if lrs is None else lrs
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
    if head == "llfpn":
        check_pyramid_grid(*train_feats.shape[-2:])
        check_pyramid_grid(*val_feats.shape[-2:])
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
    common = dict(head=head, norm=norm, width=width, epochs=epochs, batch_size=batch_size, seed=seed,
                  ignore_index=ignore_index)
    heads = _train_heads(train_feats, train_masks, fit, lrs, num_classes, **common)
    grid = []
    for lr, cm in zip(lrs, _confusions(heads, train_feats, train_masks, held, num_classes, ignore_index, batch_size)):
        m = segmentation_metrics(cm)
        grid.append({"lr": lr, "heldout_mIoU": m["mIoU"], "heldout_pixel_acc": m["pixel_acc"]})
    tie = math.log10(_PROBE_GRID[head][1])  # ties go to the lr nearest the head's usual one
    best = max(grid, key=lambda r: (r["heldout_mIoU"], r["heldout_pixel_acc"], -abs(math.log10(r["lr"]) - tie)))
    log.info("dense probe (%s): lr %g chosen on %d held-out train images (mIoU %.2f)", head, best["lr"], len(held), best["heldout_mIoU"])

    everything = torch.arange(n_train)
    fitted = _train_heads(train_feats, train_masks, everything, [best["lr"]], num_classes, **common)[0]
    fitted.eval()
    val_cm = _confusions([fitted], val_feats, val_masks, torch.arange(len(val_feats)), num_classes, ignore_index, batch_size)[0]
    m = segmentation_metrics(val_cm)
    return DenseResult(
        task=task,
        metrics={"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"]},
        best={**best, "head": head},
        grid=grid,
        per_class_iou=m["per_class_iou"],
        num_classes=num_classes,
        split={"fit_images": len(fit), "heldout_images": len(held), "train_images": n_train, "val_images": len(val_feats)},
        head=fitted,
    )


# -- fine-tuning ------------------------------------------------------------------------------
class SegmentationModel(nn.Module):
    """A ViT backbone and a dense head trained together: logits (B, K, h', w') from images.

    The head reads the last block's patch map: raw for LL-FPN (UNIP), after the final norm for the
    linear head (as the probe). `group_matcher` puts the backbone's layers (its own group_matcher,
    through timm) below the head, so timm's layer-decay groups give the head the full lr, the last
    block `decay`, ..., the stem `decay ** (depth + 1)`: BEiT / UNIP's segmentation rule.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, norm: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.norm = norm

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last-block patch map (B, C, h, w) that the head reads."""
        return _maps(self.backbone, x, (-1,), self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm's matcher protocol: a parameter name -> its layer ordinal (backbone layers, then the head)."""
        from timm.models import group_parameters

        inner = group_parameters(self.backbone, self.backbone.group_matcher(coarse), reverse=True)
        top = max(inner.values(), default=-1) + 1

        def layer(name: str) -> tuple[int]:
            return (inner.get(name.removeprefix("backbone."), top) if name.startswith("backbone.") else top,)

        return layer


def layer_decay_groups(model: SegmentationModel, lr: float, weight_decay: float,
                       layer_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups with layer-wise lr decay (timm's `param_groups_layer_decay`): each group's
    `lr` = `lr * lr_scale`; no weight decay on 1-D parameters nor the backbone's `no_weight_decay()`."""
    from timm.optim import param_groups_layer_decay

    nwd = getattr(model.backbone, "no_weight_decay", None)
    skip = [f"backbone.{n}" for n in (nwd() if callable(nwd) else ())]
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=skip)
    for grp in groups:
        grp["lr"] = lr * grp["lr_scale"]
    return groups


def _check_finetune_model(model: nn.Module) -> None:
    _check_dense_model(model)
    blocks = getattr(model, "blocks", None)
    has_blocks = isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0
    if not has_blocks or not callable(getattr(model, "group_matcher", None)):
        raise ZooError(f"{type(model).__name__} has no transformer blocks with a group_matcher, which fine-tuning's "
                       "layer-wise lr decay needs; fine-tune a zoo or timm ViT, or probe it frozen (drop --finetune)")


def _set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly over the blocks to `rate` (timm / MAE rule), set on a copy."""
    from timm.layers import DropPath

    n = len(backbone.blocks)
    for i, blk in enumerate(backbone.blocks):
        if not (hasattr(blk, "drop_path1") and hasattr(blk, "drop_path2")):
            raise ZooError(f"{type(blk).__name__} blocks have no drop_path1/drop_path2: set drop_path=0")
        p = rate * i / max(n - 1, 1)
        blk.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        blk.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


class _MaskMax:
    """Sample -> the largest labelled value of its mask (-1: none), to count classes."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def __call__(self, sample: dict[str, Any]) -> int:
        m = np.asarray(sample["mask"])
        m = m[m != self.ignore_index]
        return int(m.max()) if m.size else -1


def _scan_num_classes(urls: Sequence[str | list[str]], ignore_index: int, num_workers: int) -> int:
    """1 + the largest labelled mask value in the shards (masks decoded alone, no images)."""
    from zoo.data import loader

    top = -1
    for u in urls:
        for batch in loader(u, fields=("mask",), transform=_MaskMax(ignore_index), batch_size=256,
                            num_workers=num_workers, shuffle=0):
            top = max(top, int(batch.max()))
    if top < 0:
        raise ZooError(f"no labelled mask pixel (all equal ignore_index={ignore_index}, or no seg.png) in {list(urls)}")
    return top + 1


def _check_positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ZooError(f"{name} must be a positive number, got {v!r}")


def dense_finetune(
    model: nn.Module,
    train_urls: str | list[str],
    val_urls: str | list[str],
    *,
    head: str = "llfpn",
    task: str = "segmentation",
    num_classes: int | None = None,
    epochs: int = 20,
    lr: float = 1e-4,
    layer_decay: float = 0.85,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    warmup: float = 0.1,
    drop_path: float = 0.0,
    batch_size: int = 16,
    image_field: str = "image",
    width: int = 64,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
    seed: int = 0,
    ignore_index: int = 255,
    num_workers: int = 0,
    max_samples: int | None = None,
) -> DenseResult:
    """Fine-tune a COPY of a ViT with a dense head end to end on train shards; score val once.

    AdamW (0.9, 0.999), `weight_decay` off 1-D parameters, layer-wise lr decay `layer_decay` (UNIP's
    0.85; the head gets `lr`, see `SegmentationModel`), a linear warmup over the first `warmup`
    fraction of the steps then cosine to 0, stochastic depth up to `drop_path`. Train images get a
    paired random resized crop (`scale`) and flip; val the eval resize + center crop. No model
    selection: one given `lr` (UNIP's official is 1e-4 at batch 16 for 160k steps; short CPU runs
    want more), so val is never looked at before the end. `max_samples` caps images per epoch and
    split. `num_classes` defaults to 1 + the largest labelled mask value (a scan of the masks).
    `result.head` is the fine-tuned `SegmentationModel`; the caller's `model` is left untouched.
    """
    if task not in TASKS:
        raise ZooError(f"dense task {task!r} is not available; use one of {list(TASKS)}")
    check_head(head)
    _check_finetune_model(model)
    _check_image_field(image_field)
    _check_max_samples(max_samples)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ZooError(f"{name} must be an integer >= 1, got {v!r}")
    _check_positive(lr=lr, layer_decay=layer_decay)
    if layer_decay > 1:
        raise ZooError(f"layer_decay must be in (0, 1] (1: no decay), got {layer_decay}")
    if not (0 <= weight_decay and 0 <= warmup < 1 and 0 <= drop_path < 1):
        raise ZooError(f"need weight_decay >= 0, warmup in [0, 1), drop_path in [0, 1); "
                       f"got {weight_decay}, {warmup}, {drop_path}")
    grid = getattr(model.patch_embed, "grid_size", None)
    if head == "llfpn" and grid is not None:
        check_pyramid_grid(*grid)
    if num_classes is None:
        num_classes = _scan_num_classes([train_urls, val_urls], ignore_index, num_workers)
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ZooError(f"num_classes must be an integer >= 2, got {num_classes!r}")

    from zoo.data import dataset_size

    n_train = dataset_size(train_urls, scan=True) or 0
    if max_samples is not None:
        n_train = min(n_train, max_samples)
    drop_last = n_train > batch_size  # no batch of one image for the head's BatchNorms
    steps_per_epoch = max(1, n_train // batch_size if drop_last else math.ceil(n_train / batch_size))
    total = epochs * steps_per_epoch
    shape = Schedule(1.0, 0.0, warmup_steps=round(warmup * total))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        backbone = copy.deepcopy(model).to(device)  # parameters keep their requires_grad (fixed sin-cos stays fixed)
        if drop_path > 0:
            _set_drop_path(backbone, drop_path)
        channels = _channels_of(backbone, device)
        if head == "llfpn":
            head_module: nn.Module = LLFPNHead(channels, num_classes, width)
        else:  # the probe's linear head with live (not frozen) BatchNorm statistics: features move here
            conv = nn.Conv2d(channels, num_classes, 1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            head_module = nn.Sequential(nn.BatchNorm2d(channels, affine=False), conv)
        seg = SegmentationModel(backbone, head_module.to(device), norm=head == "linear")
        opt = torch.optim.AdamW(layer_decay_groups(seg, lr, weight_decay, layer_decay), betas=(0.9, 0.999))
        train_data = dense_loader(model, train_urls, train=True, image_field=image_field, batch_size=batch_size,
                                  num_workers=num_workers, shuffle=1000, seed=seed, drop_last=drop_last,
                                  scale=scale, hflip=hflip)
        seg.train()
        step = 0
        with progress(total=total, desc=f"dense fine-tune ({head})", unit="step") as bar:
            for epoch in range(epochs):
                seen, loss_sum = 0, torch.zeros((), device=device)
                for batch in train_data:  # each pass is the loader's next epoch: a new shuffle and new crops
                    x, y = batch["image"], batch["mask"]
                    if max_samples is not None:
                        x, y = x[: max_samples - seen], y[: max_samples - seen]
                    _check_range(y, num_classes, ignore_index, "train")
                    for grp in opt.param_groups:
                        grp["lr"] = lr * grp["lr_scale"] * shape(step, total)
                    loss = _seg_loss(seg(x.to(device)), y.to(device), ignore_index)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    seen += len(y)
                    loss_sum += loss.detach() * len(y)
                    bar.update(1)
                    if max_samples is not None and seen >= max_samples:
                        break
                if not seen:
                    raise _no_samples_error(train_urls, train_data.skipped, image_field)
                mean_loss = float(loss_sum) / seen
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                log.info("dense fine-tune epoch %d: loss %.4f over %d images", epoch, mean_loss, seen)
    seg.eval()
    val_cm, n_val = _finetune_confusion(seg, model, val_urls, image_field, num_classes, ignore_index,
                                        batch_size, num_workers, max_samples)
    m = segmentation_metrics(val_cm)
    return DenseResult(
        task=task,
        metrics={"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"]},
        best={"head": head, "lr": lr, "layer_decay": layer_decay, "weight_decay": weight_decay, "epochs": epochs,
              "steps": step, "drop_path": drop_path, "image_field": image_field},
        per_class_iou=m["per_class_iou"],
        num_classes=num_classes,
        split={"train_images": n_train, "val_images": n_val},
        head=seg,
    )


def _channels_of(backbone: nn.Module, device: torch.device) -> int:
    """Channels of the backbone's patch maps: `embed_dim` (zoo and timm ViTs), else one dummy forward."""
    dim = getattr(backbone, "embed_dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    size = tuple(getattr(backbone, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    with torch.no_grad():
        return _maps(backbone, torch.zeros(1, *size, device=device), (-1,), False).shape[1]


@torch.no_grad()
def _finetune_confusion(seg: SegmentationModel, model: nn.Module, urls: str | list[str], image_field: str,
                        num_classes: int, ignore_index: int, batch_size: int, num_workers: int,
                        max_samples: int | None) -> tuple[torch.Tensor, int]:
    """(confusion matrix, images) of a fine-tuned model over val shards, predictions at mask resolution."""
    device = next(seg.parameters()).device
    data = dense_loader(model, urls, image_field=image_field, batch_size=batch_size, num_workers=num_workers)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    n = 0
    for batch in data:
        x, y = batch["image"], batch["mask"]
        if max_samples is not None:
            x, y = x[: max_samples - n], y[: max_samples - n]
        logits = seg(x.to(device))
        cm += confusion_matrix(_upsampled(logits, y.shape[-2:]).argmax(1).cpu(), y, num_classes, ignore_index)
        n += len(y)
        if max_samples is not None and n >= max_samples:
            break
    if not n:
        raise _no_samples_error(urls, data.skipped, image_field)
    return cm, n


__all__ = ["extract_dense", "dense_loader", "patch_maps", "dense_probe", "dense_finetune", "DenseResult",
           "LLFPN", "LLFPNHead", "SegmentationModel", "layer_decay_groups", "check_head", "check_pyramid_grid",
           "HEADS", "miou", "confusion_matrix", "iou_from_confusion", "segmentation_metrics"]
