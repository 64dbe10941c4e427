"""Shared fixtures. Nothing here touches the network or the user's ~/.cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_zoo_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty zoo store and an empty, offline Hugging Face cache.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `constants` when it is imported
    (zoo imports it), so the module attributes are patched as well as the environment.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "zoo_home"
    monkeypatch.setenv("ZOO_HOME", str(home))
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
