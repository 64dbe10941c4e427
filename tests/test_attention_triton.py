"""zoo.kernels._attention_triton: the flash-attention kernels, run on the CPU through Triton's interpreter,
match an explicit float64 softmax(q kᵀ·scale + mask) v in value and in the gradients of q, k, v (and of
an additive mask), and match torch SDPA on causal alignment and on fully masked rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreter_results as child_results
from triton_interpreter import run_cases

pytest.importorskip("triton")

from zoo.errors import ZooError  # noqa: E402
from zoo.kernels import _attention_triton as fa  # noqa: E402


def _reference(q, k, v, mask=None, is_causal=False, scale=None):
    """softmax(q kᵀ·scale + mask) v in float64, with plain torch ops; is_causal: query i sees keys j <= i."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-2, -1) * scale
    if is_causal:
        allowed = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
        logits = logits.masked_fill(~allowed, -math.inf)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(-1) @ v


def _qkv(b, h, nq, nk, d, dtype=torch.float32, layout="bhnd"):
    """q, k, v with grad; layout "bnhd" gives (B, H, N, D) views of (B, N, H, D) memory."""
    def make(n):
        if layout == "bnhd":
            return torch.randn(b, n, h, d).transpose(1, 2).to(dtype).requires_grad_()
        return torch.randn(b, h, n, d).to(dtype).requires_grad_()

    return make(nq), make(nk), make(nk)


def _mask(kind, b, h, nq, nk):
    if kind is None:
        return None
    if kind == "keypad":  # (B, 1, 1, Nk) key padding, first key always kept
        mask = torch.rand(b, 1, 1, nk) > 0.4
        mask[..., 0] = True
    elif kind == "bool":  # a full (B, H, Nq, Nk) mask, one random key kept per row
        mask = torch.rand(b, h, nq, nk) > 0.5
        keep = torch.randint(nk, (b, h, nq, 1))
        mask.scatter_(-1, keep, True)
    elif kind == "additive2d":  # (Nq, Nk), with some -inf
        mask = torch.randn(nq, nk)
        mask[:, 1:][torch.rand(nq, nk - 1) < 0.2] = -math.inf
    elif kind == "additive4d":
        mask = 2 * torch.randn(b, h, nq, nk)
    else:
        raise ValueError(kind)
    return mask


def _grads(out, inputs, upstream):
    return torch.autograd.grad((out * upstream.to(out.dtype)).sum(), inputs)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _case_matches_reference(b, h, nq, nk, d, mask_kind=None, is_causal=False, block=None, layout="bhnd", scale=None):
    q, k, v = _qkv(b, h, nq, nk, d, layout=layout)
    mask = _mask(mask_kind, b, h, nq, nk)
    out = fa._attention(q, k, v, mask, is_causal, scale, block_m=block, block_n=block)
    ref = _reference(q, k, v, mask, is_causal, scale)
    assert out.dtype == torch.float32 and out.shape == (b, h, nq, d)
    _close(out, ref, 1e-5, "out")
    upstream = torch.randn(b, h, nq, d)
    for name, g, g_ref in zip("qkv", _grads(out, (q, k, v), upstream), _grads(ref, (q, k, v), upstream)):
        _close(g, g_ref, 1e-4, f"d{name}")


def _case_lse_and_scale():
    b, h, nq, nk, d, scale = 1, 2, 21, 40, 24, 0.37
    q, k, v = (t.detach() for t in _qkv(b, h, nq, nk, d))
    mask = _mask("keypad", b, h, nq, nk)
    out, lse = fa._forward(q, k, v, mask, False, scale, 16, 16)
    logits = (q.double() @ k.double().transpose(-2, -1) * scale).masked_fill(~mask, -math.inf)
    _close(lse.view(b, h, nq), logits.logsumexp(-1), 1e-5, "lse")
    _close(out, _reference(q, k, v, mask, scale=scale), 1e-5, "out")


def _case_causal_alignment_is_sdpas():
    """Top-left aligned, also for Nq != Nk: the same as torch SDPA's is_causal."""
    for nq, nk in ((7, 19), (19, 7), (16, 16)):
        q, k, v = _qkv(1, 2, nq, nk, 16)
        out = fa.triton_attention(q, k, v, is_causal=True)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        _close(out, sdpa, 1e-5, f"causal {nq}x{nk}")
        upstream = torch.randn_like(sdpa)
        for name, g, g_ref in zip("qkv", _grads(out, (q, k, v), upstream), _grads(sdpa, (q, k, v), upstream)):
            _close(g, g_ref, 1e-4, f"causal {nq}x{nk} d{name}")


def _safe_reference(q, k, v, mask):
    """`_reference` with SDPA's safe softmax: rows whose keys are all masked give 0."""
    logits = q.double() @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.double()
    dead = logits.isneginf().all(-1, keepdim=True)
    return (logits.masked_fill(dead, 0.0).softmax(-1) * ~dead) @ v.double()


def _case_fully_masked_rows_match_sdpa():
    """Rows with every key masked: SDPA on CPU returns 0 (and zero gradients), so does the kernel; lse is -inf."""
    b, h, nq, nk, d = 2, 2, 9, 33, 16
    q, k, v = _qkv(b, h, nq, nk, d)
    bool_mask = torch.rand(b, h, nq, nk) > 0.5
    bool_mask[..., 0] = True
    bool_mask[0, 1, 3] = False
    bool_mask[1, :, 5:] = False
    add_mask = torch.zeros(b, 1, nq, nk).masked_fill(torch.rand(b, 1, nq, nk) < 0.3, -math.inf)
    add_mask[1, 0, 2] = -math.inf
    keypad = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    keypad[1] = False  # a whole batch element with no key
    for name, mask in (("bool", bool_mask), ("additive", add_mask), ("keypad", keypad)):
        out = fa._attention(q, k, v, mask, block_m=16, block_n=16)
        assert not out.isnan().any(), f"{name}: NaN in the output"
        upstream = torch.randn(b, h, nq, d)
        got = _grads(out, (q, k, v), upstream)
        expected = [_safe_reference(q, k, v, mask)]
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if not sdpa.isnan().any():  # torch < 2.5 returned NaN for these rows
            expected.append(sdpa)
        for want in expected:
            _close(out, want, 1e-5, f"{name} out")
            for wrt, g, g_ref in zip("qkv", got, _grads(want, (q, k, v), upstream)):
                _close(g, g_ref, 1e-4, f"{name} d{wrt}")
    assert len(expected) == 2 or torch.__version__ < "2.5", "SDPA returned NaN for fully masked rows"
    assert (out[1] == 0).all()
    _, lse = fa._forward(q.detach(), k.detach(), v.detach(), bool_mask, False, d**-0.5)
    assert lse.view(b, h, nq)[0, 1, 3] == -math.inf and lse.view(b, h, nq)[1, :, 5:].eq(-math.inf).all()
    assert lse.isfinite().sum() == b * h * nq - 1 - h * (nq - 5)
    # no keys at all: zeros, as SDPA
    q, k, v = _qkv(1, 1, 5, 0, 16)
    assert torch.equal(fa.triton_attention(q, k, v), torch.zeros(1, 1, 5, 16))


def _case_additive_mask_gradient():
    b, h, nq, nk, d = 2, 2, 17, 23, 16
    q, k, v = _qkv(b, h, nq, nk, d)
    for shape in ((1, h, nq, nk), (nq, nk), (b, 1, 1, nk)):
        mask = torch.randn(shape).requires_grad_()
        out = fa._attention(q, k, v, mask, block_m=16, block_n=16)
        ref = _reference(q, k, v, mask)
        upstream = torch.randn(b, h, nq, d)
        got = _grads(out, (q, k, v, mask), upstream)
        want = _grads(ref, (q, k, v, mask), upstream)
        for name, g, g_ref in zip(("dq", "dk", "dv", "dmask"), got, want):
            assert g.shape == g_ref.shape, f"{name} {shape}: {tuple(g.shape)} != {tuple(g_ref.shape)}"
            _close(g, g_ref, 1e-4, f"{name} {shape}")


def _case_half_precision(dtype_name):
    """fp16 and bf16: fp32 accumulation, output and gradients in the input dtype."""
    dtype = getattr(torch, dtype_name)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    b, h, nq, nk, d = 1, 2, 33, 40, 64
    q, k, v = _qkv(b, h, nq, nk, d, dtype=dtype)
    mask = _mask("keypad", b, h, nq, nk)
    out = fa.triton_attention(q, k, v, attn_mask=mask)
    assert out.dtype == dtype
    _close(out, _reference(q, k, v, mask), tol, f"{dtype_name} out")
    upstream = torch.randn(b, h, nq, d)
    got = _grads(out, (q, k, v), upstream)
    assert all(g.dtype == dtype for g in got)
    for name, g, g_ref in zip("qkv", got, _grads(_reference(q, k, v, mask), (q, k, v), upstream)):
        _close(g, g_ref, tol, f"{dtype_name} d{name}")


def _case_only_some_grads_and_empty_queries():
    q, k, v = _qkv(1, 2, 9, 12, 16)
    k.requires_grad_(False)
    v.requires_grad_(False)
    (dq,) = torch.autograd.grad(fa.triton_attention(q, k, v).sum(), (q,))
    (dq_ref,) = torch.autograd.grad(_reference(q, k, v).sum(), (q,))
    _close(dq, dq_ref, 1e-4, "dq alone")
    q, k, v = _qkv(1, 2, 0, 12, 16)
    out = fa.triton_attention(q, k, v)
    assert out.shape == (1, 2, 0, 16)


# Triton reads TRITON_INTERPRET once, when it is first imported, and importing zoo (torch) imports
# it; so the kernels run in a child process started with the variable set. The child calls the
# `_case_*` functions below, once each, and reports "ok" or what failed per case.
INTERPRETER_CASES = {
    "n1-d16": ("matches_reference", (1, 2, 1, 1, 16)),
    "n7-d16": ("matches_reference", (2, 2, 7, 7, 16)),
    "q65-k65-d64": ("matches_reference", (1, 2, 65, 65, 64)),
    "q33-k65-d24-keypad": ("matches_reference", (1, 2, 33, 65, 24, "keypad")),
    "q65-k33-d48-bool": ("matches_reference", (2, 1, 65, 33, 48, "bool")),
    "q33-k7-d128-additive2d": ("matches_reference", (1, 2, 33, 7, 128, "additive2d")),
    "q7-k33-d96-additive4d": ("matches_reference", (2, 2, 7, 33, 96, "additive4d")),
    "q7-k65-d64-causal": ("matches_reference", (1, 2, 7, 65, 64, None, True)),
    "q65-k33-d24-causal": ("matches_reference", (2, 1, 65, 33, 24, None, True)),
    "q65-k65-d16-causal": ("matches_reference", (1, 2, 65, 65, 16, None, True)),
    "q37-k29-d24-blocks16-strided-causal-keypad": (
        "matches_reference", (2, 2, 37, 29, 24, "keypad", True, 16, "bnhd", 0.3)
    ),
    "q33-k45-d48-blocks16-bool": ("matches_reference", (1, 3, 33, 45, 48, "bool", False, 16)),
    "lse-and-scale": ("lse_and_scale", ()),
    "causal-alignment-is-sdpas": ("causal_alignment_is_sdpas", ()),
    "fully-masked-rows-match-sdpa": ("fully_masked_rows_match_sdpa", ()),
    "additive-mask-gradient": ("additive_mask_gradient", ()),
    "float16": ("half_precision", ("float16",)),
    "bfloat16": ("half_precision", ("bfloat16",)),
    "some-grads-and-empty-queries": ("only_some_grads_and_empty_queries", ()),
}


def run_interpreter_cases() -> dict[str, str]:
    """Entry point of the TRITON_INTERPRET=1 child process."""
    return run_cases(globals(), INTERPRETER_CASES, None if fa.INTERPRET else "the kernels were not decorated under TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    return child_results("test_attention_triton")


@pytest.mark.parametrize("case", INTERPRETER_CASES)
def test_triton_interpreted_matches_reference(interpreter_results, case):
    assert interpreter_results[case] == "ok", interpreter_results[case]


def test_reference_matches_sdpa():
    q, k, v = (t.detach() for t in _qkv(2, 2, 9, 13, 16))
    for mask in (None, _mask("keypad", 2, 2, 9, 13), _mask("additive4d", 2, 2, 9, 13)):
        _close(_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 1e-5, "reference")
    _close(_reference(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-5, "causal")


@pytest.mark.parametrize(
    ("shapes", "mask", "match"),
    [
        (((2, 9, 16), (2, 9, 16), (2, 9, 16)), None, r"\(B, H, N, D\).*\(2, 9, 16\)"),
        (((1, 2, 9, 16), (1, 3, 9, 16), (1, 3, 9, 16)), None, r"same \(B, H\)"),
        (((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 8, 16)), None, r"same N for k and v"),
        (((1, 2, 9, 16), (1, 2, 9, 24), (1, 2, 9, 24)), None, r"one head dim"),
        (((1, 2, 9, 256), (1, 2, 9, 256), (1, 2, 9, 256)), None, r"head dims 1\.\.128"),
        (((1, 2, 9, 16), (1, 2, 7, 16), (1, 2, 7, 16)), (9, 9), r"mask \(9, 9\) does not broadcast.*\(1, 2, 9, 7\)"),
        (((1, 2, 9, 16), (1, 2, 7, 16), (1, 2, 7, 16)), (3, 1, 1, 7), r"does not broadcast"),
        (((1, 2, 9, 16), (1, 2, 7, 16), (1, 2, 7, 16)), (1, 1, 1, 9, 7), r"does not broadcast"),
    ],
)
def test_bad_inputs_are_one_line_errors(shapes, mask, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    mask = None if mask is None else torch.ones(mask, dtype=torch.bool)
    with pytest.raises(ZooError, match=match) as info:
        fa.triton_attention(q, k, v, attn_mask=mask)
    assert "\n" not in str(info.value)


def test_bad_dtypes_are_errors():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ZooError, match="one dtype"):
        fa.triton_attention(q, q.half(), q)
    with pytest.raises(ZooError, match="one dtype"):
        fa.triton_attention(q.double(), q.double(), q.double())
    with pytest.raises(ZooError, match="bool or floating attn_mask"):
        fa.triton_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.int64))


def test_cpu_tensors_without_the_interpreter_are_an_error():
    if fa.INTERPRET:
        pytest.skip("this process runs Triton under its interpreter")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ZooError, match="TRITON_INTERPRET=1"):
        fa.triton_attention(q, q, q)


def test_broadcast_masks_are_read_through_zero_strides_not_copied():
    target = (2, 3, 5, 7)
    for mask in (torch.rand(2, 1, 1, 7) > 0.5, torch.randn(5, 7), torch.randn(3, 1, 7)):
        expanded, strides, kind = fa._mask_args(mask, target, torch.empty(0))
        assert kind == (fa._BOOL_MASK if mask.dtype == torch.bool else fa._ADD_MASK)
        assert expanded.shape == target and expanded.data_ptr() == mask.data_ptr()
        assert 0 in strides and expanded.untyped_storage().nbytes() == mask.untyped_storage().nbytes()
