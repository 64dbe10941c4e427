"""Zero-shot classification with an image-text model (CLIP protocol).

Each class gets the mean of its L2-normalised template embeddings ("a photo of a {}."), re-normalised;
an image is assigned the class whose embedding is most similar to its normalised image embedding.
Works with any module exposing `encode_image(images)` and `encode_text(tokens)` (open_clip models,
ours) and a tokenizer mapping a list of strings to a LongTensor (e.g. `open_clip.get_tokenizer`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.progress import progress

DEFAULT_TEMPLATES = ("a photo of a {}.",)
Template = str | Callable[[str], str]


# -- the model side, shared with retrieval ---------------------------------------------------------
def model_name(model: nn.Module) -> str:
    """How errors name a model: the name it was loaded by, else its class."""
    return str(getattr(model, "zoo_source", None) or type(model).__name__)


def require_image_text(model: nn.Module, what: str = "zero-shot") -> None:
    """Raise a ZooError unless `model` has both `encode_image` and `encode_text`."""
    missing = [m for m in ("encode_image", "encode_text") if not callable(getattr(model, m, None))]
    if missing:
        has = "only text features" if missing == ["encode_image"] else "only image features"
        raise ZooError(
            f"{what} needs an image-text model (with encode_image and encode_text), e.g. open_clip:ARCH/TAG; "
            f"{model_name(model)} has {has}"
        )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def default_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """The model's own eval preprocessing: zoo/timm `pretrained_cfg`, else open_clip's `preprocess_cfg`
    (or its legacy `visual.image_size` / `image_mean` / `image_std`)."""
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        from zoo.data.transforms import eval_transform

        return eval_transform(model)
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    if "size" not in cfg and getattr(visual, "image_size", None) is not None:
        cfg["size"] = visual.image_size
        cfg.setdefault("mean", getattr(visual, "image_mean", None))
        cfg.setdefault("std", getattr(visual, "image_std", None))
    if "size" not in cfg:
        raise ZooError(
            f"{model_name(model)} does not say how to preprocess images (no pretrained_cfg, visual.preprocess_cfg "
            "or visual.image_size); pass transform= (a PIL image -> tensor callable)"
        )
    import open_clip

    return open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        interpolation=cfg.get("interpolation"), resize_mode=cfg.get("resize_mode"), fill_color=cfg.get("fill_color", 0),
    )


class _EvalMode:
    """`with _EvalMode(model):` eval mode and no autograd inside, the previous mode restored after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.no_grad = torch.no_grad()

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def encode_texts(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised float32 text embeddings (N, D) of `texts`, on the model's device."""
    tokens = tokenizer(list(texts))
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.to(model_device(model))
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 image embeddings (N, D) of a batch, on the model's device."""
    return F.normalize(model.encode_image(images.to(model_device(model))).float(), dim=-1)


# -- zero-shot -------------------------------------------------------------------------------------
def _check_classes(classnames: Sequence[str], templates: Sequence[Template]) -> tuple[list[str], list[Template]]:
    if isinstance(classnames, str) or not classnames:
        raise ZooError(
            "zero-shot needs a non-empty list of class names, one per label in label order (label i -> classnames[i])"
        )
    if isinstance(templates, str):
        templates = (templates,)
    if not templates:
        raise ZooError(f"zero-shot needs at least one template, e.g. {DEFAULT_TEMPLATES[0]!r}")
    for t in templates:
        if isinstance(t, str) and "{}" not in t:
            raise ZooError(f"template {t!r} has no '{{}}' for the class name; write e.g. 'a photo of a {{}}.'")
        if not isinstance(t, str) and not callable(t):
            raise ZooError(f"a template must be a format string with '{{}}' or a callable name -> text, got {t!r}")
    return [str(c) for c in classnames], list(templates)


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    *,
    classes_per_batch: int = 16,
) -> torch.Tensor:
    """(D, C) class embeddings: per class the mean of its normalised template embeddings, re-normalised.

    The same weights as `open_clip.zero_shot_classifier.build_zero_shot_classifier`, for any model with
    `encode_text(tokens)` (that builder needs `encode_text(..., normalize=True)`). On the model's device."""
    require_image_text(model)
    classnames, templates = _check_classes(classnames, templates)
    columns = []
    with _EvalMode(model):
        for c0 in range(0, len(classnames), classes_per_batch):
            names = classnames[c0 : c0 + classes_per_batch]
            texts = [t.format(n) if isinstance(t, str) else t(n) for n in names for t in templates]
            emb = encode_texts(model, tokenizer, texts).reshape(len(names), len(templates), -1).mean(1)
            columns.append(F.normalize(emb, dim=-1))
    return torch.cat(columns).T.contiguous()


def zero_shot_eval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    urls: str | list[str],
    classnames: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    transform: Callable[[Any], torch.Tensor] | None = None,
    ks: Sequence[int] = (1, 5),
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    label_field: str = "label",
    desc: str = "zero-shot",
) -> dict[str, float]:
    """Top-k accuracy in % (`top1`, `top5`, ...) of zero-shot classification over the shards' images and labels.

    Label i is the class `classnames[i]`. A `topK` is reported only when there are at least K classes.
    `transform` maps a PIL image to a tensor (default: the model's eval preprocessing)."""
    from zoo.data import loader

    require_image_text(model)
    classnames, templates = _check_classes(classnames, templates)
    if not ks or any(int(k) < 1 for k in ks):
        raise ZooError(f"ks must be positive integers (top-k accuracies to report), got {tuple(ks)}")
    ks = sorted({int(k) for k in ks if k <= len(classnames)}) or [1]
    transform = default_transform(model) if transform is None else transform
    weights = zero_shot_classifier(model, tokenizer, classnames, templates)

    def prepare(sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": transform(sample["image"]), "label": int(sample[label_field])}

    data = loader(urls, fields=("image", label_field), transform=prepare, batch_size=batch_size,
                  num_workers=num_workers, shuffle=0)
    try:
        total = len(data)
    except TypeError:
        total = None
    correct = dict.fromkeys(ks, 0)
    n = 0
    with _EvalMode(model):
        for batch in progress(data, total=total, desc=desc, unit="batch"):
            labels = batch["label"].long()
            bad = labels[(labels < 0) | (labels >= len(classnames))]
            if len(bad):
                raise ZooError(
                    f"the shards have label {int(bad[0])} but only {len(classnames)} class names were given; "
                    f"pass one class name per label (labels 0..{int(labels.max())}, in label order)"
                )
            logits = encode_images(model, batch["image"]) @ weights
            if not torch.isfinite(logits).all():
                raise ZooError("the image embeddings contain NaN or inf: the model diverged or overflowed (try float32)")
            ranked = logits.topk(max(ks), dim=1).indices.cpu()
            hits = ranked == labels[:, None]
            for k in ks:
                correct[k] += int(hits[:, :k].any(1).sum())
            n += len(labels)
    if n == 0:
        raise ZooError(
            f"no samples with an image and a {label_field!r} in {urls}; check the shards with `zoo shards check`"
        )
    return {f"top{k}": 100.0 * correct[k] / n for k in ks}


__all__ = [
    "DEFAULT_TEMPLATES",
    "zero_shot_classifier",
    "zero_shot_eval",
    "default_transform",
    "require_image_text",
    "encode_images",
    "encode_texts",
]
