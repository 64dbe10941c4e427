"""zoo.kernels.attention_kl: the reference matches a naive KLDivLoss; the Triton kernel, run on the CPU
through Triton's interpreter, matches the reference in value and in the student's gradients."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreter_results as child_results
from triton_interpreter import run_cases

from zoo.errors import ZooError
from zoo.kernels import attention_kl, attention_kl_reference

kl_module = importlib.import_module("zoo.kernels.attention_kl")  # the package attribute is the function


def _inputs(b, h, n, dt, ds, dtype=torch.float32, sharpness=1.0):
    """Teacher (q_t, k_t) without grad, student (q_s, k_s) with grad."""
    q_t, k_t = (sharpness * torch.randn(b, h, n, dt, dtype=dtype) for _ in range(2))
    q_s, k_s = (torch.randn(b, h, n, ds, dtype=dtype).requires_grad_() for _ in range(2))
    return q_t, k_t, q_s, k_s


def _naive(q_t, k_t, q_s, k_s):
    """UNIP's forward_kd_loss: KLDivLoss(log_target) on log-softmax maps, summed over keys, mean over B, H, N."""
    log_pt = (q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5).log_softmax(-1)
    log_ps = (q_s @ k_s.transpose(-2, -1) * q_s.shape[-1] ** -0.5).log_softmax(-1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1).mean()


def _grads(loss_fn, q_t, k_t, q_s, k_s, upstream=1.0):
    loss = loss_fn(q_t, k_t, q_s, k_s)
    dq, dk = torch.autograd.grad(upstream * loss, (q_s, k_s))
    return loss.detach(), dq, dk


def test_reference_matches_naive_kl_div_in_value_and_gradient():
    q_t, k_t, q_s, k_s = _inputs(2, 3, 11, 8, 12, dtype=torch.float64)
    loss, dq, dk = _grads(attention_kl_reference, q_t, k_t, q_s, k_s)
    loss_n, dq_n, dk_n = _grads(_naive, q_t, k_t, q_s, k_s)
    torch.testing.assert_close(loss, loss_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq, dq_n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, dk_n, rtol=1e-10, atol=1e-12)
    small = [t[:1, :1, :6].detach().requires_grad_() for t in (q_s, k_s)]
    assert torch.autograd.gradcheck(lambda q, k: attention_kl_reference(q_t[:1, :1, :6], k_t[:1, :1, :6], q, k), small)


def test_reference_is_fp32_gives_no_teacher_grad_and_is_zero_for_equal_maps():
    q_t, k_t, _, _ = _inputs(1, 2, 9, 16, 16)
    q_t.requires_grad_()
    k_t.requires_grad_()
    q_s = q_t.detach().to(torch.bfloat16).float().requires_grad_()
    k_s = k_t.detach().to(torch.bfloat16).float().requires_grad_()
    loss = attention_kl_reference(q_t.bfloat16(), k_t.bfloat16(), q_s, k_s)
    assert loss.dtype == torch.float32
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert q_t.grad is None and k_t.grad is None
    assert q_s.grad is not None and k_s.grad is not None
    assert not attention_kl_reference(q_t, k_t, q_s.detach(), k_s.detach()).requires_grad


# Triton reads TRITON_INTERPRET once, when it is first imported, and importing zoo (torch) imports
# it; so the kernel runs in a child process started with the variable set. The child calls the
# `_case_*` functions below, once each, and reports "ok" or the assertion message per case.
INTERPRETER_CASES = {
    "n7-dt16-ds32": ("matches_reference", (2, 2, 7, 16, 32)),
    "n33-dt16-ds32": ("matches_reference", (1, 2, 33, 16, 32)),
    "n65-dt16-ds32": ("matches_reference", (1, 2, 65, 16, 32)),
    "n65-dt64-ds64": ("matches_reference", (1, 2, 65, 64, 64)),
    "n20-dt24-ds40": ("matches_reference", (1, 1, 20, 24, 40)),
    "n37-blocks16-strided": ("small_blocks_strided", ()),
}


def _case_matches_reference(b, h, n, dt, ds):
    q_t, k_t, q_s, k_s = _inputs(b, h, n, dt, ds, sharpness=2.0)
    fused = lambda *t: attention_kl(*t, backend="triton")  # noqa: E731
    assert not fused(q_t.requires_grad_(), k_t, q_s.detach(), k_s.detach()).requires_grad  # teacher: no grad
    loss, dq, dk = _grads(fused, q_t, k_t, q_s, k_s, upstream=3.0)
    loss_r, dq_r, dk_r = _grads(attention_kl_reference, q_t, k_t, q_s, k_s, upstream=3.0)
    torch.testing.assert_close(loss, loss_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dq, dq_r, rtol=1e-4, atol=1e-4 * dq_r.abs().max().item())
    torch.testing.assert_close(dk, dk_r, rtol=1e-4, atol=1e-4 * dk_r.abs().max().item())


def _case_small_blocks_strided():
    """Several key and query blocks with a ragged last one, on (B, N, H, D) memory seen as (B, H, N, D)."""
    kernels = kl_module._kernels()
    n, h = 37, 2
    q_t, k_t, q_s, k_s = (torch.randn(1, n, h, 16).transpose(1, 2) for _ in range(4))
    st, ss = 16**-0.5, 0.3
    kl, lse_t, lse_s = kernels.forward(q_t, k_t, q_s, k_s, st, ss, block_m=16, block_n=16)
    dq, dk = kernels.backward(q_t, k_t, q_s, k_s, st, ss, lse_t, lse_s, torch.tensor(1.0), block_m=16, block_n=16)
    q_s.requires_grad_()
    k_s.requires_grad_()
    loss_r, dq_r, dk_r = _grads(lambda *t: attention_kl_reference(*t, st, ss), q_t, k_t, q_s, k_s)
    logits_t = (q_t @ k_t.transpose(-2, -1) * st).reshape(h, n, n)
    torch.testing.assert_close(lse_t, logits_t.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.mean(), loss_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dq, dq_r, rtol=1e-4, atol=1e-4 * dq_r.abs().max().item())
    torch.testing.assert_close(dk, dk_r, rtol=1e-4, atol=1e-4 * dk_r.abs().max().item())


def run_interpreter_cases() -> dict[str, str]:
    """Entry point of the TRITON_INTERPRET=1 child process."""
    return run_cases(globals(), INTERPRETER_CASES, kl_module.triton_unavailable("cpu"))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    pytest.importorskip("triton")
    return child_results("test_attention_kl")


@pytest.mark.parametrize("case", INTERPRETER_CASES)
def test_triton_interpreted_matches_reference(interpreter_results, case):
    assert interpreter_results[case] == "ok", interpreter_results[case]


def test_default_backend_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kl_module, "_kernels", lambda: pytest.fail("the Triton module was loaded"))
    q_t, k_t, q_s, k_s = _inputs(1, 2, 5, 16, 8)
    assert torch.equal(attention_kl(q_t, k_t, q_s, k_s), attention_kl_reference(q_t, k_t, q_s, k_s))


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ZooError, match="TRITON_INTERPRET|not installed"):
        attention_kl(q, q, q, q, backend="triton")
    with pytest.raises(ZooError, match="unknown"):
        attention_kl(q, q, q, q, backend="cuda")


def test_interpreter_requested_after_triton_was_imported_is_reported(monkeypatch):
    tl = pytest.importorskip("triton.language")
    if type(tl.zeros).__name__ == "InterpretedFunction":
        pytest.skip("this process runs Triton under its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ZooError, match="before starting Python"):
        attention_kl(q, q, q, q, backend="triton")
    assert torch.equal(attention_kl(q, q, q, q), attention_kl_reference(q, q, q, q))


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((1, 2, 5, 16), (1, 2, 5, 16), (1, 2, 6, 8), (1, 2, 6, 8)), r"same \(B, H, N\).*\(1, 2, 6, 8\)"),
        (((1, 2, 5, 16), (1, 2, 5, 16), (1, 3, 5, 8), (1, 3, 5, 8)), r"same \(B, H, N\)"),
        (((1, 2, 5, 16), (1, 2, 5, 12), (1, 2, 5, 8), (1, 2, 5, 8)), r"head dim.*\(1, 2, 5, 12\)"),
        (((1, 2, 5, 16), (1, 2, 5, 16), (1, 2, 5, 8), (1, 2, 5, 4)), r"head dim"),
        (((2, 5, 16), (2, 5, 16), (2, 5, 8), (2, 5, 8)), r"\(B, H, N, D\).*\(2, 5, 16\)"),
    ],
)
def test_bad_shapes_are_errors(shapes, match):
    tensors = [torch.randn(*s) for s in shapes]
    for backend in (None, "reference"):
        with pytest.raises(ZooError, match=match):
            attention_kl(*tensors, backend=backend)


def test_import_needs_no_triton_and_is_silent():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib, torch\n"
        "m = importlib.import_module('zoo.kernels.attention_kl')\n"
        "from zoo.errors import ZooError\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "assert torch.equal(m.attention_kl(q, q, q, q), m.attention_kl_reference(q, q, q, q))\n"
        "try:\n"
        "    m.attention_kl(q, q, q, q, backend='triton')\n"
        "except ZooError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
