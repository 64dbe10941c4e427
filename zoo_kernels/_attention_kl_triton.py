"""Triton kernels for `zoo.kernels.attention_kl`; imported lazily, only when that backend runs.

Tensors are (B, H, N, D) with unit stride along D. Each program owns one block of rows of one
(batch, head) and streams the other side in blocks, so no N×N map is ever stored: the forward
keeps the teacher's and student's row log-sum-exps, the backward recomputes both softmaxes from
them. dq and dk come from separate kernels (FlashAttention-2 style), so there are no atomics and
the gradients are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton_support import block_d, dot_precision

@triton.jit
def _tile(ptr, off_b, off_h, stride_b, stride_h, stride_n, idx, n, d, BLOCK_D: tl.constexpr):
    """Load rows `idx` of one (batch, head) slice, zero outside [0, n) x [0, d)."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = ptr + off_b * stride_b + off_h * stride_h + idx[:, None] * stride_n + cols[None, :]
    return tl.load(ptrs, mask=(idx[:, None] < n) & (cols[None, :] < d), other=0.0)


@triton.jit
def _fwd_kernel(
    QT, KT, QS, KS, LSE_T, LSE_S, KL,
    sqt_b, sqt_h, sqt_n, skt_b, skt_h, skt_n, sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_n,
    H, N, DT, DS, scale_t, scale_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qt = _tile(QT, off_b, off_h, sqt_b, sqt_h, sqt_n, rows, N, DT, BLOCK_DT)
    qs = _tile(QS, off_b, off_h, sqs_b, sqs_h, sqs_n, rows, N, DS, BLOCK_DS)

    # Pass 1: online max and sum of exponentials of both logit rows.
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        kt = _tile(KT, off_b, off_h, skt_b, skt_h, skt_n, keys, N, DT, BLOCK_DT)
        ks = _tile(KS, off_b, off_h, sks_b, sks_h, sks_n, keys, N, DS, BLOCK_DS)
        lt = tl.where(key_ok[None, :], tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale_t, float("-inf"))
        ls = tl.where(key_ok[None, :], tl.dot(qs, tl.trans(ks), input_precision=PREC) * scale_s, float("-inf"))
        new_t = tl.maximum(m_t, tl.max(lt, 1))
        new_s = tl.maximum(m_s, tl.max(ls, 1))
        l_t = l_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(lt - new_t[:, None]), 1)
        l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(ls - new_s[:, None]), 1)
        m_t = new_t
        m_s = new_s
    lse_t = m_t + tl.log(l_t)
    lse_s = m_s + tl.log(l_s)

    # Pass 2: sum_j p_t (log p_t - log p_s), in the log domain so that no log(0) appears.
    kl = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        kt = _tile(KT, off_b, off_h, skt_b, skt_h, skt_n, keys, N, DT, BLOCK_DT)
        ks = _tile(KS, off_b, off_h, sks_b, sks_h, sks_n, keys, N, DS, BLOCK_DS)
        log_pt = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale_t - lse_t[:, None]
        log_ps = tl.dot(qs, tl.trans(ks), input_precision=PREC) * scale_s - lse_s[:, None]
        kl += tl.sum(tl.where(key_ok[None, :], tl.exp(log_pt) * (log_pt - log_ps), 0.0), 1)

    row_ok = rows < N
    tl.store(LSE_T + pid_bh * N + rows, lse_t, mask=row_ok)
    tl.store(LSE_S + pid_bh * N + rows, lse_s, mask=row_ok)
    tl.store(KL + pid_bh * N + rows, kl, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    QT, KT, QS, KS, LSE_T, LSE_S, GRAD, DQ,
    sqt_b, sqt_h, sqt_n, skt_b, skt_h, skt_n, sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_n,
    sdq_b, sdq_h, sdq_n,
    H, N, DT, DS, scale_t, scale_s, factor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    PREC: tl.constexpr,
):
    """dq_s[i] = grad · factor · Σ_j (p_s − p_t)[i, j] k_s[j], with factor = scale_s / (B·H·N)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    qt = _tile(QT, off_b, off_h, sqt_b, sqt_h, sqt_n, rows, N, DT, BLOCK_DT)
    qs = _tile(QS, off_b, off_h, sqs_b, sqs_h, sqs_n, rows, N, DS, BLOCK_DS)
    lse_t = tl.load(LSE_T + pid_bh * N + rows, mask=row_ok, other=0.0)
    lse_s = tl.load(LSE_S + pid_bh * N + rows, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kt = _tile(KT, off_b, off_h, skt_b, skt_h, skt_n, keys, N, DT, BLOCK_DT)
        ks = _tile(KS, off_b, off_h, sks_b, sks_h, sks_n, keys, N, DS, BLOCK_DS)
        p_t = tl.exp(tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale_t - lse_t[:, None])
        p_s = tl.exp(tl.dot(qs, tl.trans(ks), input_precision=PREC) * scale_s - lse_s[:, None])
        dlogits = tl.where((keys < N)[None, :], p_s - p_t, 0.0)
        acc += tl.dot(dlogits.to(ks.dtype), ks, input_precision=PREC)

    acc = acc * (tl.load(GRAD).to(tl.float32) * factor)
    cols = tl.arange(0, BLOCK_DS)
    ptrs = DQ + off_b * sdq_b + off_h * sdq_h + rows[:, None] * sdq_n + cols[None, :]
    tl.store(ptrs, acc.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < DS))


@triton.jit
def _bwd_dk_kernel(
    QT, KT, QS, KS, LSE_T, LSE_S, GRAD, DK,
    sqt_b, sqt_h, sqt_n, skt_b, skt_h, skt_n, sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_n,
    sdk_b, sdk_h, sdk_n,
    H, N, DT, DS, scale_t, scale_s, factor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    PREC: tl.constexpr,
):
    """dk_s[j] = grad · factor · Σ_i (p_s − p_t)[i, j] q_s[i]; the maps are built transposed, keys × queries."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kt = _tile(KT, off_b, off_h, skt_b, skt_h, skt_n, keys, N, DT, BLOCK_DT)
    ks = _tile(KS, off_b, off_h, sks_b, sks_h, sks_n, keys, N, DS, BLOCK_DS)

    acc = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        qt = _tile(QT, off_b, off_h, sqt_b, sqt_h, sqt_n, rows, N, DT, BLOCK_DT)
        qs = _tile(QS, off_b, off_h, sqs_b, sqs_h, sqs_n, rows, N, DS, BLOCK_DS)
        lse_t = tl.load(LSE_T + pid_bh * N + rows, mask=row_ok, other=0.0)
        lse_s = tl.load(LSE_S + pid_bh * N + rows, mask=row_ok, other=0.0)
        p_t = tl.exp(tl.dot(kt, tl.trans(qt), input_precision=PREC) * scale_t - lse_t[None, :])
        p_s = tl.exp(tl.dot(ks, tl.trans(qs), input_precision=PREC) * scale_s - lse_s[None, :])
        dlogits = tl.where(row_ok[None, :], p_s - p_t, 0.0)
        acc += tl.dot(dlogits.to(qs.dtype), qs, input_precision=PREC)

    acc = acc * (tl.load(GRAD).to(tl.float32) * factor)
    cols = tl.arange(0, BLOCK_DS)
    ptrs = DK + off_b * sdk_b + off_h * sdk_h + keys[:, None] * sdk_n + cols[None, :]
    tl.store(ptrs, acc.to(DK.dtype.element_ty), mask=(keys[:, None] < N) & (cols[None, :] < DS))


# `@triton.jit` read TRITON_INTERPRET when it decorated the kernels above.
INTERPRET: bool = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _config(dt: int, ds: int, dtype: torch.dtype, block_m: int | None, block_n: int | None) -> dict:
    """Tile sizes and launch options, chosen so that ptxas reports no (or little) register spilling.

    fp32 inputs go through three TF32 products per dot and need small tiles and 8 warps; 16-bit
    inputs take 64×64 tiles up to head dim 64. (Checked by compiling for sm_86 and sm_90, not timed.)
    """
    if dtype == torch.float32:
        tile, launch = 32, {"num_warps": 8, "num_stages": 1}
    else:
        tile, launch = (32 if max(block_d(dt), block_d(ds)) > 64 else 64), {"num_warps": 4}
    cfg = {"BLOCK_M": block_m or tile, "BLOCK_N": block_n or tile, "BLOCK_DT": block_d(dt), "BLOCK_DS": block_d(ds)}
    return cfg if INTERPRET else {**cfg, **launch}


def _common(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One dtype for all four (fp32 unless all share a 16-bit float), unit stride along D."""
    dtype = tensors[0].dtype
    native = (torch.float16,) if INTERPRET else (torch.float16, torch.bfloat16)  # the interpreter's bf16 dot is wrong
    if dtype not in native or any(t.dtype != dtype for t in tensors):
        dtype = torch.float32
    out = tuple(t.to(dtype) for t in tensors)
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in out)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def forward(
    q_t: torch.Tensor, k_t: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, scale_t: float, scale_s: float,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL, teacher lse and student lse, each (B·H, N) fp32."""
    q_t, k_t, q_s, k_s = _common(q_t, k_t, q_s, k_s)
    b, h, n, dt = q_t.shape
    ds = q_s.shape[-1]
    lse_t, lse_s, kl = (torch.empty(b * h, n, device=q_t.device, dtype=torch.float32) for _ in range(3))
    cfg = _config(dt, ds, q_t.dtype, block_m, block_n)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](
        q_t, k_t, q_s, k_s, lse_t, lse_s, kl,
        *_strides(q_t), *_strides(k_t), *_strides(q_s), *_strides(k_s),
        h, n, dt, ds, float(scale_t), float(scale_s),
        PREC=dot_precision(q_t.dtype, q_t.device, INTERPRET), **cfg,
    )
    return kl, lse_t, lse_s


def backward(
    q_t: torch.Tensor, k_t: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, scale_t: float, scale_s: float,
    lse_t: torch.Tensor, lse_s: torch.Tensor, grad: torch.Tensor,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the mean KL w.r.t. q_s and k_s, given the saved lse's and the scalar upstream grad."""
    out_dtype = (q_s.dtype, k_s.dtype)
    q_t, k_t, q_s, k_s = _common(q_t, k_t, q_s, k_s)
    b, h, n, dt = q_t.shape
    ds = q_s.shape[-1]
    grad = grad.detach().reshape(1).to(device=q_s.device, dtype=torch.float32)
    dq = torch.empty_like(q_s, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k_s, memory_format=torch.contiguous_format)
    cfg = _config(dt, ds, q_t.dtype, block_m, block_n)
    args = (*_strides(q_t), *_strides(k_t), *_strides(q_s), *_strides(k_s))
    tail = (h, n, dt, ds, float(scale_t), float(scale_s), float(scale_s) / (b * h * n))
    prec = dot_precision(q_t.dtype, q_t.device, INTERPRET)
    _bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), b * h)](
        q_t, k_t, q_s, k_s, lse_t, lse_s, grad, dq, *args, *_strides(dq), *tail, PREC=prec, **cfg
    )
    _bwd_dk_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), b * h)](
        q_t, k_t, q_s, k_s, lse_t, lse_s, grad, dk, *args, *_strides(dk), *tail, PREC=prec, **cfg
    )
    return dq.to(out_dtype[0]), dk.to(out_dtype[1])
