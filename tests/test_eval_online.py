"""Online kNN: runs every N steps, leaves the training RNG and the model's mode alone."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.data import write_shards
from zoo.data.builtin import generate
from zoo.errors import ZooError
from zoo.eval.online import OnlineKNN


@pytest.fixture
def digits(tmp_path):
    for split in ("train", "val"):
        write_shards(generate("digits", 200, split=split), tmp_path / split, maxcount=100)
    return str(tmp_path / "train" / "*.tar"), str(tmp_path / "val" / "*.tar")


def test_online_knn_every_n_steps_without_side_effects(digits):
    model = zoo.create_model("vit_nano_patch4_32").train()
    hook = OnlineKNN(*digits, every=5, k=10, max_samples=150)
    assert hook(model, 0) is None and hook(model, 3) is None
    torch.manual_seed(7)
    state = torch.get_rng_state()
    res = hook(model, 5)
    assert torch.equal(torch.get_rng_state(), state), "online eval consumed the training RNG"
    assert model.training, "online eval must restore train mode"
    assert set(res) == {"knn_top1"} and 10.0 < res["knn_top1"] <= 100.0  # digits: well above chance
    assert len(hook._data["train"][1]) == 150
    again = hook(model, 10)
    assert again == res  # same weights, same cached images: same number


def test_online_knn_bad_arguments(digits):
    with pytest.raises(ZooError, match="every"):
        OnlineKNN(*digits, every=0)
