"""zoo.eval.generative: Fréchet distance in a backbone's feature space and label accuracy, on CPU."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from torchvision.transforms.v2 import functional as TF

import zoo
from zoo.data.builtin import generate
from zoo.errors import ConfigError, ZooError
from zoo.eval.generative import (
    BackboneFeatures,
    FrechetDistance,
    frechet_distance,
    label_accuracy,
    label_classifier,
    preprocess,
)

ARCH = "vit_nano_patch4_32"


class Identity(nn.Module):
    """Features = the input vectors: FD of the samples themselves, through the same code path."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _digits(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    samples = list(generate("digits", n, size=16, split=split))
    images = torch.stack([TF.to_dtype(TF.to_image(s["image"]), torch.float32, scale=True) for s in samples])
    return images, torch.tensor([s["label"] for s in samples])


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(ARCH)


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": _digits(800, "train"), "val": _digits(359, "val")}


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


def test_fd_on_known_gaussians_matches_scipy_and_the_analytic_value():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 1.5, -1.0, 1.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 2.0])
    real = (mu1 + s1 * torch.randn(4000, 4, generator=g)).double()
    fake = (mu2 + s2 * torch.randn(4000, 4, generator=g)).double()
    fd = FrechetDistance(features=Identity(4), batch_size=512)
    fd.add_real(real[:1500])
    fd.add_real(real[1500:])  # real statistics accumulate across calls
    got = fd(fake)
    assert got == pytest.approx(_reference_fd(real.numpy(), fake.numpy()), rel=1e-6)
    analytic = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # diagonal covariances: 4.5
    assert got == pytest.approx(analytic, rel=0.1)
    assert fd(fake) == pytest.approx(got, rel=1e-12)  # fake statistics reset each call, real kept
    assert fd([fake[:10], fake[10:]]) == pytest.approx(got, rel=1e-9)  # an iterable of batches
    assert fd.num_real == 4000


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise(backbone, digits):
    images = digits["train"][0][:128]
    fd = FrechetDistance(backbone)
    fd.add_real(images)
    assert fd.name == ARCH
    scale = fd(digits["val"][0][:128])  # another sample of the same distribution
    assert abs(fd(images)) < 1e-4 * scale
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g)
    shifted = [fd((images + level * noise).clamp(0, 1)) for level in (0.05, 0.15, 0.4)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]


def test_fd_loads_a_backbone_by_name(backbone, digits):
    zoo.publish(backbone, f"{ARCH}.gen_test")
    images = digits["train"][0][:20]
    fd = FrechetDistance(f"{ARCH}.gen_test")
    fd.add_real(images)
    assert fd.name == f"{ARCH}.gen_test"
    assert fd(images[:10]) == pytest.approx(frechet_distance(images, images[:10], backbone), rel=1e-5)


def test_fd_errors_say_what_to_do(backbone):
    fd = FrechetDistance(backbone)
    images = torch.rand(4, 3, 16, 16)
    cases = [
        (ZooError, "add_real", lambda: fd(images)),  # before add_real
        (ConfigError, "[0, 1]", lambda: fd.add_real(images * 2)),
        (ConfigError, "[0, 1]", lambda: fd.add_real(torch.full((2, 3, 8, 8), float("nan")))),
        (ConfigError, "float", lambda: fd.add_real((images * 255).byte())),
        (ConfigError, "(N, C, H, W)", lambda: fd.add_real(images[0])),
        (ConfigError, "C 1 or 3", lambda: fd.add_real(torch.rand(2, 4, 8, 8))),
        (ConfigError, "not both", lambda: FrechetDistance()),
    ]
    for kind, words, call in cases:
        with pytest.raises(kind, match=re.escape(words)) as err:
            call()
        assert "\n" not in str(err.value)
    fd.add_real(images[:1])
    with pytest.raises(ZooError, match="at least 2 first"):
        fd(images)  # one real image
    fd.add_real(images[1:])
    with pytest.raises(ZooError, match="at least 2 generated"):
        fd(images[:1])
    with pytest.raises(ZooError, match="unknown model"):
        FrechetDistance(f"{ARCH}.no_such_tag")


def test_backbone_features_take_any_size_and_grey_images(backbone):
    features = BackboneFeatures(backbone)
    assert features.num_features == backbone.num_features
    grey = torch.rand(5, 1, 20, 24)
    out = features(grey)
    assert out.shape == (5, features.num_features) and not out.requires_grad
    torch.testing.assert_close(out, features(grey.expand(-1, 3, -1, -1)))
    backbone.train()
    features(grey)
    assert backbone.training  # eval during the forward, the caller's mode restored
    backbone.eval()
    # at the backbone's own size: only normalisation, and the features are the backbone's pooled ones
    x = torch.rand(3, 3, 32, 32)
    cfg = backbone.pretrained_cfg
    expected = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x, backbone), expected)
    with torch.no_grad():
        torch.testing.assert_close(features(x), backbone(expected))


def test_label_accuracy_high_on_real_digits_and_chance_on_shuffled_labels(backbone, digits):
    (train, train_labels), (val, val_labels) = digits["train"], digits["val"]
    classifier = label_classifier(backbone, train, train_labels)
    acc = label_accuracy(val, val_labels, classifier)
    assert acc > 70.0  # measured 83% with this random backbone (83-87% over init seeds)
    shuffled = val_labels[:200][torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert label_accuracy(val[:200], shuffled, classifier) < 25.0  # chance: 10%
    with pytest.raises(ConfigError, match="one label per image"):
        label_accuracy(val, val_labels[:-1], classifier)


def test_fit_linear_head_is_the_linear_probes_head():
    """The head label_classifier uses scores val as linear_probe does (standardization folded into one Linear)."""
    from zoo.eval.linear import fit_linear_head, linear_probe

    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (600,), generator=g)
    x = centers[y] + 4 * torch.randn(600, 16, generator=g) + 10  # overlapping classes, off-centre features
    head = fit_linear_head(x[:400], y[:400])
    with torch.no_grad():
        top1 = 100.0 * (head(x[400:]).argmax(1) == y[400:]).float().mean().item()
    assert top1 == pytest.approx(linear_probe(x[:400], y[:400], x[400:], y[400:]).top1, abs=0.5)
    assert 40 < top1 < 100
