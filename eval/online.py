"""Online kNN for the training engine: every N steps, kNN top-1 of the model being trained on
small held-out sets, without touching the training RNG streams or the model's train/eval mode.

The held-out images are read, transformed (eval transform: deterministic) and kept in memory once;
each evaluation is then only forward passes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.eval.features import pool
from zoo.eval.knn import knn_eval


class OnlineKNN:
    """`hook(model, step)` -> {"knn_top1": ...} every `every` steps (step 0 excluded), else None."""

    def __init__(
        self,
        train: str | list[str],
        val: str | list[str],
        *,
        every: int = 500,
        k: int = 20,
        temperature: float = 0.07,
        variant: str = "cls",
        transform: Callable[[Any], torch.Tensor] | None = None,
        max_samples: int | None = 2000,
        batch_size: int = 256,
    ):
        if every <= 0:
            raise ZooError(f"online kNN needs every >= 1 step, got {every}")
        self.train_urls, self.val_urls = train, val
        self.every, self.k, self.temperature, self.variant = every, k, temperature, variant
        self.transform = transform
        self.max_samples = max_samples
        self.batch_size = batch_size
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _images(self, name: str, urls, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._data:
            from zoo.data import loader

            transform = self.transform
            if transform is None:
                from zoo.data.transforms import eval_transform

                transform = eval_transform(model.pretrained_cfg)
            data = loader(urls, fields=("image", "label"), batch_size=self.batch_size, shuffle=0,
                          transform=lambda s: {"image": transform(s["image"]), "label": int(s["label"])})
            xs, ys, n = [], [], 0
            for batch in data:
                xs.append(batch["image"])
                ys.append(batch["label"])
                n += len(batch["label"])
                if self.max_samples is not None and n >= self.max_samples:
                    break
            if not xs:
                raise ZooError(f"online kNN: no labelled images in {urls}")
            x, y = torch.cat(xs), torch.cat(ys)
            self._data[name] = (x[: self.max_samples], y[: self.max_samples])
        return self._data[name]

    @torch.no_grad()
    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return torch.cat([
            pool(model, images[i : i + self.batch_size].to(device), [self.variant])[self.variant].float().cpu()
            for i in range(0, len(images), self.batch_size)
        ])

    def __call__(self, model: nn.Module, step: int) -> dict[str, float] | None:
        if step == 0 or step % self.every:
            return None
        was_training = model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the training streams continue as if we never ran
            model.eval()
            try:
                xtr, ytr = self._images("train", self.train_urls, model)
                xva, yva = self._images("val", self.val_urls, model)
                res = knn_eval(self.features(model, xtr), ytr, self.features(model, xva), yva, ks=(self.k,),
                               temperature=self.temperature)
            finally:
                model.train(was_training)
        return {"knn_top1": res[f"top1_k{self.k}"]}
