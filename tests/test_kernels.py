"""zoo.kernels.attention: every backend that runs here equals the explicit reference across shapes
and masks; the maps, the packed variable-length path, backend choice and forcing are checked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.kernels.attention import (
    BACKENDS,
    _flex,
    attention,
    attention_varlen,
    attention_weights,
    available_backends,
    choose_backend,
    combined_mask,
)

CPU_BACKENDS = [b for b, why in available_backends("cpu").items() if why == "available"]


def reference(q, k, v, mask=None, scale=None):
    """softmax(q kᵀ·scale + mask) v in float64, written out independently of zoo.kernels."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(-1) @ v


def make_mask(kind: str, b: int, nq: int, nk: int):
    """(attn_mask, key_padding_mask, is_causal, the same as one bool/additive mask for the reference)."""
    g = torch.Generator().manual_seed(nq * 100 + nk)
    if kind == "none":
        return None, None, False, None
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) > 0.3
        m[..., 0] = True  # every query sees at least one key
        return m, None, False, m
    if kind == "float":
        m = torch.randn(b, 1, nq, nk, generator=g)
        return m, None, False, m
    if kind == "padding":
        pad = torch.zeros(b, nk, dtype=torch.bool)
        pad[0, max(1, nk - 3):] = True  # the first sample's last keys are padding
        return None, pad, False, ~pad[:, None, None, :]
    if kind == "causal":
        return None, None, True, torch.ones(nq, nk, dtype=torch.bool).tril()
    if kind == "causal+padding":
        pad = torch.zeros(b, nk, dtype=torch.bool)
        pad[-1, -1] = nk > 1
        return None, pad, True, torch.ones(nq, nk, dtype=torch.bool).tril() & ~pad[:, None, None, :]
    raise ValueError(kind)


def assert_same_grads(out: torch.Tensor, ref: torch.Tensor, inputs) -> None:
    """Gradients of out and of the float64 reference under the same random upstream gradient."""
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, inputs, upstream.double())
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b.double(), atol=1e-4), (a.double() - b.double()).abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(1, 16), (17, 32), (65, 64), (50, 128), (197, 24)])
@pytest.mark.parametrize("kind", ["none", "bool", "float", "padding", "causal", "causal+padding"])
def test_every_cpu_backend_equals_the_reference(backend, n, d, kind, monkeypatch):
    monkeypatch.setenv("ZOO_ATTENTION", backend)
    q, k, v = (torch.randn(2, 3, n, d, requires_grad=True) for _ in range(3))
    attn_mask, pad, causal, full = make_mask(kind, 2, n, n)
    out = attention(q, k, v, attn_mask=attn_mask, key_padding_mask=pad, is_causal=causal)
    ref = reference(q, k, v, full)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.allclose(out.double(), ref, atol=2e-5), (out.double() - ref).abs().max()
    assert_same_grads(out, ref, (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_and_scale(backend, monkeypatch):
    monkeypatch.setenv("ZOO_ATTENTION", backend)
    q, k, v = torch.randn(2, 4, 7, 32), torch.randn(2, 4, 13, 32), torch.randn(2, 4, 13, 32)
    m = torch.rand(7, 13) > 0.5
    m[:, 0] = True
    out = attention(q, k, v, attn_mask=m, scale=0.3)
    assert torch.allclose(out.double(), reference(q, k, v, m, scale=0.3), atol=2e-5)
    causal = attention(q, k, v, is_causal=True)  # top-left aligned, as torch SDPA
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal, sdpa, atol=2e-5)


def test_flex_backend_mask_translation_on_cpu():
    """FlexAttention has no CPU backward, so the backend is CUDA-only; its mask translation (bool ->
    block mask, additive -> score_mod) is checked here forward-only, eagerly."""
    import warnings

    q, k, v = (torch.randn(2, 2, 33, 16) for _ in range(3))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        for kind in ("none", "bool", "float", "padding", "causal+padding"):
            attn_mask, pad, causal, full = make_mask(kind, 2, 33, 33)
            out = _flex(q, k, v, combined_mask(q, k, attn_mask, pad, causal))
            assert torch.allclose(out.double(), reference(q, k, v, full), atol=2e-5), kind


def test_attention_weights_are_the_softmax_maps():
    q, k, v = (torch.randn(2, 3, 11, 16) for _ in range(3))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, -4:] = True
    w = attention_weights(q, k, key_padding_mask=pad)
    assert w.shape == (2, 3, 11, 11)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 11), atol=1e-6)
    assert torch.all(w[1, :, :, -4:] == 0)  # padding keys get no weight
    assert torch.allclose(w @ v, attention(q, k, v, key_padding_mask=pad), atol=1e-5)
    causal = attention_weights(q, k, is_causal=True)
    assert torch.all(causal.triu(1) == 0)


@pytest.mark.parametrize("backend", [None, *CPU_BACKENDS])
def test_varlen_equals_each_sequence_alone(backend, monkeypatch):
    if backend:
        monkeypatch.setenv("ZOO_ATTENTION", backend)
    else:
        monkeypatch.delenv("ZOO_ATTENTION", raising=False)
    seqlens = [17, 5, 17, 5, 5, 9]  # 2 global + local crops, out of order
    t = sum(seqlens)
    q, k, v = (torch.randn(1, 3, t, 32, requires_grad=True) for _ in range(3))
    out = attention_varlen(q, k, v, seqlens)
    alone, start = [], 0
    for n in seqlens:
        s = slice(start, start + n)
        alone.append(reference(q[:, :, s], k[:, :, s], v[:, :, s]))
        start += n
    ref = torch.cat(alone, dim=2)
    assert torch.allclose(out.double(), ref, atol=2e-5)
    assert_same_grads(out, ref, (q, k, v))


def test_varlen_rejects_lengths_that_do_not_tile():
    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ZooError, match="do not tile"):
        attention_varlen(q, q, q, [4, 4])
    with pytest.raises(ZooError, match="packed"):
        attention_varlen(torch.randn(2, 2, 10, 16), q, q, [10])


def test_default_backend_on_cpu_is_sdpa(monkeypatch):
    monkeypatch.delenv("ZOO_ATTENTION", raising=False)
    q = torch.randn(1, 1, 4, 8)
    assert choose_backend(q) == "sdpa"
    calls = []
    monkeypatch.setitem(BACKENDS, "sdpa", lambda *a, **kw: calls.append(1) or torch.zeros(1))
    attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    assert calls == [1]


def test_forcing_an_unknown_or_unavailable_backend_is_an_error(monkeypatch):
    q = torch.randn(1, 1, 4, 8)
    monkeypatch.setenv("ZOO_ATTENTION", "flash9")
    with pytest.raises(ZooError, match="not a backend"):
        attention(q, q, q)
    for name in ("xformers", "flex"):
        monkeypatch.setenv("ZOO_ATTENTION", name)
        with pytest.raises(ZooError, match="CUDA"):
            attention(q, q, q)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ZOO_ATTENTION", "triton")
    with pytest.raises(ZooError, match="triton"):
        attention(q, q, q)
    status = available_backends("cpu")
    assert status["sdpa"] == status["math"] == "available"
    assert set(status) == set(BACKENDS)


def test_no_backend_is_imported_or_probed_at_import():
    """No warnings at import, and neither xformers nor our Triton kernels loaded before a call needs them
    (torch itself may import triton's Python package)."""
    ours = ("xformers", "zoo.kernels._attention_triton", "zoo.kernels._attention_kl_triton")
    code = f"import sys, zoo, zoo.kernels; print([m for m in {ours!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_triton_backend_through_the_interpreter():
    """ZOO_ATTENTION=triton on the CPU, run by Triton's interpreter, equals the reference."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from zoo.kernels import attention
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 19, 32) for _ in range(3))
        pad = torch.zeros(1, 19, dtype=torch.bool); pad[0, -3:] = True
        out = attention(q, k, v, key_padding_mask=pad)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
        print((out - ref).abs().max().item())
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "ZOO_ATTENTION": "triton"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4


def test_vit_attention_goes_through_zoo_kernels_and_matches_timm(monkeypatch):
    """The ViT's attention is zoo.kernels.attention, and its output is timm's VisionTransformer's."""
    import timm.models.vision_transformer as tvit

    import zoo
    from zoo.convert import to_timm

    model = zoo.create_model("vit_nano_patch4_32").eval()
    kwargs, sd = to_timm(model)
    reference_vit = tvit.VisionTransformer(**kwargs).eval()
    reference_vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    math = BACKENDS["math"]
    monkeypatch.setitem(BACKENDS, "math", lambda *a, **kw: calls.append(1) or math(*a, **kw))
    with torch.no_grad():
        expected = reference_vit.forward_features(x)
        for backend in CPU_BACKENDS:
            monkeypatch.setenv("ZOO_ATTENTION", backend)
            assert torch.allclose(model.forward_features(x), expected, atol=1e-5), backend
        monkeypatch.setenv("ZOO_ATTENTION", "math")
        model.forward_features(x, keep=torch.tensor([[0, 5, 9], [1, 2, 3]]))  # masked tokens take the same path
    assert len(calls) == 2 * len(model.blocks)
