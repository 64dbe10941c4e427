"""zoo.kernels.attention: backends agree with the explicit reference; forcing is checked."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import ZooError
from zoo.kernels import attention, available_backends
from zoo.kernels.attention import BACKENDS


@pytest.mark.parametrize("n", [1, 17, 65])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_sdpa_matches_math(n, mask, monkeypatch):
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, n, n) > 0.3
        m[..., 0] = True  # every query sees at least one key
    elif mask == "float":
        m = torch.randn(2, 1, n, n)
    monkeypatch.setenv("ZOO_ATTENTION", "math")
    ref = attention(q, k, v, attn_mask=m)
    monkeypatch.setenv("ZOO_ATTENTION", "sdpa")
    assert torch.allclose(attention(q, k, v, attn_mask=m), ref, atol=1e-5)


def test_causal_matches_math():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    assert torch.allclose(BACKENDS["sdpa"](q, k, v, is_causal=True), BACKENDS["math"](q, k, v, is_causal=True), atol=1e-5)


def test_default_backend_on_cpu_is_sdpa(monkeypatch):
    monkeypatch.delenv("ZOO_ATTENTION", raising=False)
    calls = []
    monkeypatch.setitem(BACKENDS, "sdpa", lambda *a, **kw: calls.append(1) or torch.zeros(1))
    attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)))
    assert calls == [1]


def test_forcing_an_unknown_or_unavailable_backend_is_an_error(monkeypatch):
    q = torch.randn(1, 1, 4, 8)
    monkeypatch.setenv("ZOO_ATTENTION", "flash9")
    with pytest.raises(ZooError, match="not a backend"):
        attention(q, q, q)
    monkeypatch.setenv("ZOO_ATTENTION", "xformers")
    with pytest.raises(ZooError, match="CUDA"):
        attention(q, q, q)
    assert available_backends("cpu")["sdpa"] == "available"


def test_vit_attention_goes_through_zoo_kernels(monkeypatch):
    import zoo

    model = zoo.create_model("vit_nano_patch4_32").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        monkeypatch.setenv("ZOO_ATTENTION", "math")
        ref = model(x)
        calls = []
        monkeypatch.setitem(BACKENDS, "math", lambda *a, **kw: calls.append(1) or BACKENDS["sdpa"](*a, **kw))
        out = model(x)
    assert len(calls) == 4  # one per block
    assert torch.allclose(out, ref, atol=1e-5)
