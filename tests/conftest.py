"""Shared fixtures. Nothing here touches the network or the user's ~/.cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_zoo_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty zoo store, weights lock file and an empty, offline Hugging Face cache.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `constants` when it is imported
    (zoo imports it), so the module attributes are patched as well as the environment.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "zoo_home"
    monkeypatch.setenv("ZOO_HOME", str(home))
    monkeypatch.setenv("ZOO_LOCK", str(home / "zoo.lock"))  # never a zoo.lock found above the working directory
    hf = tmp_path / "hf_cache"
    hf.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


TINY_CLIP = "zoo-test-tiny-clip"


@pytest.fixture
def tiny_open_clip(tmp_path):
    """A tiny random open_clip architecture registered under TINY_CLIP for the test, then removed."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    path = tmp_path / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    try:
        yield open_clip
    finally:  # open_clip has no public way to unregister a config
        factory._MODEL_CONFIG_PATHS.remove(path)
        factory._MODEL_CONFIGS.pop(TINY_CLIP, None)
