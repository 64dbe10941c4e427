"""Shared fixtures. Nothing here touches the network or the user's ~/.cache."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_zoo_home(tmp_path_factory, monkeypatch):
    """Every test gets its own empty zoo store, so none reads or writes ~/.cache/zoo."""
    home = tmp_path_factory.mktemp("zoo_home")
    monkeypatch.setenv("ZOO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
