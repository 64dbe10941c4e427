"""Flash attention in Triton: the `triton` backend of `zoo.kernels.attention`; imported lazily.

`triton_attention(q, k, v, attn_mask, is_causal, scale)` computes softmax(q kᵀ·scale + mask) v for
(B, H, N, D) tensors like `torch.nn.functional.scaled_dot_product_attention`, without ever storing
an Nq×Nk map:

* forward: one program per block of query rows of one (batch, head); it streams the keys and
  values in blocks and keeps a running row max, row sum and output accumulator (online softmax,
  fp32, in base 2). It saves the row log-sum-exp of the logits for the backward.
* backward (FlashAttention-2 style, all Triton): a small kernel computes delta = rowsum(dO ∘ O);
  one kernel per query block accumulates dQ = dS K·scale, one per key block accumulates
  dV = Pᵀ dO and dK = dSᵀ Q·scale, both recomputing P = exp(S − lse) from the saved lse, with
  dS = P ∘ (dO Vᵀ − delta). No atomics, so the gradients are deterministic. When an additive mask
  requires grad, the dq kernel also writes dS (this one costs B·H·Nq·Nk fp32 memory), which is
  summed down to the mask's shape.

Masks follow SDPA: a bool mask is True where attention is allowed, a float mask is added to the
scaled logits; either broadcasts to (B, H, Nq, Nk) and is read blockwise through its (zero)
broadcast strides. `is_causal` is SDPA's top-left aligned lower triangle (query i sees keys
j <= i, also when Nq != Nk). Unlike SDPA, a mask and `is_causal` may be given together (both apply).
Rows whose keys are all masked (or Nk == 0) give zeros and zero gradients, as SDPA does on CPU
(its "safe softmax"); their saved lse is -inf.

Inputs are fp32, fp16 or bf16 (q, k, v of one dtype), accumulated in fp32, returned in the input
dtype. Under Triton's CPU interpreter (TRITON_INTERPRET=1 set before Python starts) bf16 inputs are
computed in fp32, because the interpreter's bf16 `tl.dot` is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.errors import ZooError
from zoo.kernels.triton_support import block_d, dot_precision

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_MASK, _BOOL_MASK, _ADD_MASK = 0, 1, 2


@triton.jit
def _tile(ptr, off, stride_n, idx, n, d, BLOCK_D: tl.constexpr):
    """Rows `idx` of one (batch, head) slice starting at `ptr + off`, zero outside [0, n) x [0, d)."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = ptr + off + idx[:, None] * stride_n + cols[None, :]
    return tl.load(ptrs, mask=(idx[:, None] < n) & (cols[None, :] < d), other=0.0)


@triton.jit
def _masked_logits(s, M, m_off, sm_m, sm_n, qi, kj, NQ, NK, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Bounds, causal and user masks applied to base-2 logits `s`; qi, kj: query and key indices shaped like s."""
    ok = (qi < NQ) & (kj < NK)
    if CAUSAL:
        ok = ok & (kj <= qi)
    if MASK == 1:
        allowed = tl.load(M + m_off + qi * sm_m + kj * sm_n, mask=ok, other=0)
        ok = ok & (allowed != 0)
    if MASK == 2:
        bias = tl.load(M + m_off + qi * sm_m + kj * sm_n, mask=ok, other=0.0)
        s = s + bias.to(tl.float32) * 1.4426950408889634
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, M, O, LSE,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n, so_b, so_h, so_n,
    H, NQ, NK, D, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """O = softmax(S) V and lse = logsumexp(S) for one block of query rows; qk_scale = scale·log2(e)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    k_off = off_b * sk_b + off_h * sk_h
    v_off = off_b * sv_b + off_h * sv_h
    m_off = off_b * sm_b + off_h * sm_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _tile(Q, off_b * sq_b + off_h * sq_h, sq_n, rows, NQ, D, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _tile(K, k_off, sk_n, keys, NK, D, BLOCK_D)
        v = _tile(V, v_off, sv_n, keys, NK, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _masked_logits(s, M, m_off, sm_m, sm_n, rows[:, None], keys[None, :], NQ, NK, MASK, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf while a row has seen no key
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0 and lse -inf, as SDPA's safe softmax
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = rows < NQ
    tl.store(LSE + pid_bh * NQ + rows, lse, mask=row_ok)
    cols = tl.arange(0, BLOCK_D)
    ptrs = O + off_b * so_b + off_h * so_h + rows[:, None] * so_n + cols[None, :]
    tl.store(ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < D))


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, H, NQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[i] = Σ_d dO[i, d] O[i, d]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _tile(O, off_b * so_b + off_h * so_h, so_n, rows, NQ, D, BLOCK_D).to(tl.float32)
    do = _tile(DO, off_b * sdo_b + off_h * sdo_h, sdo_n, rows, NQ, D, BLOCK_D).to(tl.float32)
    tl.store(DELTA + pid_bh * NQ + rows, tl.sum(o * do, 1), mask=rows < NQ)


@triton.jit
def _lse2(LSE, off, idx, n):
    """The saved natural-log lse in base 2, with +inf for fully masked rows so that their P is 0."""
    lse = tl.load(LSE + off + idx, mask=idx < n, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, M, DO, LSE, DELTA, DQ, DS,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n, sdo_b, sdo_h, sdo_n,
    sdq_b, sdq_h, sdq_n,
    H, NQ, NK, D, qk_scale, scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, STORE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """dQ[i] = scale · Σ_j dS[i, j] K[j]; with STORE_DS also writes dS (the logits' gradient) to DS (B·H, NQ, NK)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    k_off = off_b * sk_b + off_h * sk_h
    v_off = off_b * sv_b + off_h * sv_h
    m_off = off_b * sm_b + off_h * sm_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _tile(Q, off_b * sq_b + off_h * sq_h, sq_n, rows, NQ, D, BLOCK_D)
    do = _tile(DO, off_b * sdo_b + off_h * sdo_h, sdo_n, rows, NQ, D, BLOCK_D)
    lse2 = _lse2(LSE, pid_bh * NQ, rows, NQ)
    delta = tl.load(DELTA + pid_bh * NQ + rows, mask=rows < NQ, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _tile(K, k_off, sk_n, keys, NK, D, BLOCK_D)
        v = _tile(V, v_off, sv_n, keys, NK, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _masked_logits(s, M, m_off, sm_m, sm_n, rows[:, None], keys[None, :], NQ, NK, MASK, CAUSAL)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if STORE_DS:
            ptrs = DS + pid_bh * NQ * NK + rows[:, None] * NK + keys[None, :]
            tl.store(ptrs, ds, mask=(rows[:, None] < NQ) & (keys[None, :] < NK))

    cols = tl.arange(0, BLOCK_D)
    ptrs = DQ + off_b * sdq_b + off_h * sdq_h + rows[:, None] * sdq_n + cols[None, :]
    tl.store(ptrs, (acc * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < NQ) & (cols[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, M, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n, sdo_b, sdo_h, sdo_n,
    sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
    H, NQ, NK, D, qk_scale, scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """dV[j] = Σ_i P[i, j] dO[i], dK[j] = scale · Σ_i dS[i, j] Q[i]; maps built transposed, keys × queries."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_off = off_b * sq_b + off_h * sq_h
    do_off = off_b * sdo_b + off_h * sdo_h
    m_off = off_b * sm_b + off_h * sm_h
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _tile(K, off_b * sk_b + off_h * sk_h, sk_n, keys, NK, D, BLOCK_D)
    v = _tile(V, off_b * sv_b + off_h * sv_h, sv_n, keys, NK, D, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
    for start in range(lo, NQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _tile(Q, q_off, sq_n, rows, NQ, D, BLOCK_D)
        do = _tile(DO, do_off, sdo_n, rows, NQ, D, BLOCK_D)
        lse2 = _lse2(LSE, pid_bh * NQ, rows, NQ)
        delta = tl.load(DELTA + pid_bh * NQ + rows, mask=rows < NQ, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        s_t = _masked_logits(s_t, M, m_off, sm_m, sm_n, rows[None, :], keys[:, None], NQ, NK, MASK, CAUSAL)
        p_t = tl.exp2(s_t - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)

    cols = tl.arange(0, BLOCK_D)
    ok = (keys[:, None] < NK) & (cols[None, :] < D)
    ptrs = DK + off_b * sdk_b + off_h * sdk_h + keys[:, None] * sdk_n + cols[None, :]
    tl.store(ptrs, (dk * scale).to(DK.dtype.element_ty), mask=ok)
    ptrs = DV + off_b * sdv_b + off_h * sdv_h + keys[:, None] * sdv_n + cols[None, :]
    tl.store(ptrs, dv.to(DV.dtype.element_ty), mask=ok)


# `@triton.jit` read TRITON_INTERPRET when it decorated the kernels above.
INTERPRET: bool = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _config(d: int, dtype: torch.dtype, block_m: int | None, block_n: int | None) -> dict:
    """Block sizes and launch options.

    On GPU every kernel stays under 99 KB of shared memory (compiled for sm_80 and sm_90): fp32
    inputs use three TF32 products per dot, so they get smaller tiles. The interpreter runs
    programs one after another, so it gets the largest tiles.
    """
    bd = block_d(d)
    if INTERPRET:
        bm, bn, opts = 64, 64, {}
    elif dtype != torch.float32:
        bm, bn, opts = 64, 64, {"num_warps": 4 if bd <= 64 else 8, "num_stages": 2}
    elif bd <= 64:
        bm, bn, opts = 64, 32, {"num_warps": 4, "num_stages": 2}
    else:
        bm, bn, opts = 32, 32, {"num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": block_m or bm, "BLOCK_N": block_n or bn, "BLOCK_D": bd, **opts}


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
    """Raise a one-line ZooError unless q, k, v, attn_mask fit together."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ZooError(f"triton attention expects (B, H, N, D) tensors; got {shapes}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ZooError(f"triton attention needs the same (B, H) for q, k, v and the same N for k and v; got {shapes}")
    if not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        raise ZooError(f"triton attention needs one head dim for q, k and v; got {shapes}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ZooError(f"triton attention supports head dims 1..{MAX_HEAD_DIM}; got {shapes}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        dtypes = f"{q.dtype}, {k.dtype}, {v.dtype}"
        raise ZooError(f"triton attention needs q, k, v of one dtype among float32, float16, bfloat16; got {dtypes}")
    if not q.device == k.device == v.device:
        raise ZooError(f"triton attention needs q, k, v on one device; got {q.device}, {k.device}, {v.device}")
    if attn_mask is not None:
        _check_mask(q, k, attn_mask)
    if q.device.type != "cuda" and not INTERPRET:
        raise ZooError(
            f"triton attention got tensors on {q.device.type}; move them to a CUDA device or set TRITON_INTERPRET=1 "
            "before starting Python to run the kernels through Triton's CPU interpreter"
        )


def _check_mask(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor) -> None:
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() > 4 or not _broadcast_shapes_ok(attn_mask, target):
        shape = tuple(attn_mask.shape)
        raise ZooError(f"triton attention: attn_mask {shape} does not broadcast to (B, H, Nq, Nk) {target}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ZooError(f"triton attention needs a bool or floating attn_mask; got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ZooError(f"triton attention needs attn_mask on {q.device}; got {attn_mask.device}")


def _broadcast_shapes_ok(mask: torch.Tensor, target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        return False


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def _prepare(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(attn_mask: torch.Tensor | None, target: tuple[int, int, int, int], ref: torch.Tensor):
    """(tensor, 4 strides, kind) for the kernels: the mask expanded with zero strides, never copied to `target`."""
    if attn_mask is None:
        return ref, (0, 0, 0, 0), _NO_MASK
    if attn_mask.dtype == torch.bool:
        mask, kind = attn_mask.view(torch.uint8), _BOOL_MASK
    else:
        mask, kind = attn_mask.detach(), _ADD_MASK
        if INTERPRET and mask.dtype == torch.bfloat16:
            mask = mask.float()  # copied at its own (broadcastable) shape
    mask = mask.expand(target)
    return mask, tuple(mask.stride()), kind


def _forward(q, k, v, attn_mask, is_causal, scale, block_m=None, block_n=None):
    """(out in the compute dtype, lse (B·H, Nq) fp32) for prepared q, k, v."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.empty(b, h, nq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b * h, nq, device=q.device, dtype=torch.float32)
    mask, m_strides, kind = _mask_args(attn_mask, (b, h, nq, nk), q)
    cfg = _config(d, q.dtype, block_m, block_n)
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](
        q, k, v, mask, out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *m_strides, *_strides3(out),
        h, nq, nk, d, float(scale) * _LOG2E,
        MASK=kind, CAUSAL=bool(is_causal), PREC=dot_precision(q.dtype, q.device, INTERPRET), **cfg,
    )
    return out, lse


def _backward(q, k, v, attn_mask, is_causal, scale, out, lse, dout, need_dq, need_dkdv, need_dmask,
              block_m=None, block_n=None):
    """(dq, dk, dv, dlogits) in the compute dtype (fp32 for dlogits), None for what is not needed."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dout = _prepare(dout, q.dtype)
    mask, m_strides, kind = _mask_args(attn_mask, (b, h, nq, nk), q)
    cfg = _config(d, q.dtype, block_m, block_n)
    prec = dot_precision(q.dtype, q.device, INTERPRET)
    delta = torch.empty(b * h, nq, device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(nq, cfg["BLOCK_M"]), b * h)](
        out, dout, delta, *_strides3(out), *_strides3(dout), h, nq, d,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
    )
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *m_strides, *_strides3(dout))
    tail = (h, nq, nk, d, float(scale) * _LOG2E, float(scale))
    dq = dk = dv = ds = None
    if need_dq or need_dmask:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        ds = torch.zeros(b * h, nq, nk, device=q.device, dtype=torch.float32) if need_dmask else lse
        _bwd_dq_kernel[(triton.cdiv(nq, cfg["BLOCK_M"]), b * h)](
            q, k, v, mask, dout, lse, delta, dq, ds, *common, *_strides3(dq), *tail,
            MASK=kind, CAUSAL=bool(is_causal), STORE_DS=bool(need_dmask), PREC=prec, **cfg,
        )
        ds = ds.view(b, h, nq, nk) if need_dmask else None
    if need_dkdv:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        _bwd_dkdv_kernel[(triton.cdiv(nk, cfg["BLOCK_N"]), b * h)](
            q, k, v, mask, dout, lse, delta, dk, dv, *common, *_strides3(dk), *_strides3(dv), *tail,
            MASK=kind, CAUSAL=bool(is_causal), PREC=prec, **cfg,
        )
    return dq, dk, dv, ds


class _FlashAttention(torch.autograd.Function):
    """Triton forward (output and row lse) and Triton backward (P recomputed blockwise from the lse)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal: bool, scale: float, blocks: tuple):  # type: ignore[override]
        dtypes = (q.dtype, k.dtype, v.dtype)
        cdtype = _compute_dtype(q.dtype)
        q, k, v = (_prepare(t, cdtype) for t in (q, k, v))
        out, lse = _forward(q, k, v, attn_mask, is_causal, scale, *blocks)
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
        ctx.args = (is_causal, scale, blocks, dtypes)
        return out.to(dtypes[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, attn_mask, out, lse = ctx.saved_tensors
        is_causal, scale, blocks, dtypes = ctx.args
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        if not (need_q or need_k or need_v or need_mask):
            return (None,) * 7
        dq, dk, dv, ds = _backward(
            q, k, v, attn_mask, is_causal, scale, out, lse, dout, need_q, need_k or need_v, need_mask, *blocks
        )
        dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if need_mask else None
        return (
            dq.to(dtypes[0]) if need_q else None,
            dk.to(dtypes[1]) if need_k else None,
            dv.to(dtypes[2]) if need_v else None,
            dmask, None, None, None,
        )


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v with flash-attention Triton kernels, forward and backward.

    q (B, H, Nq, D), k and v (B, H, Nk, D), D <= 128, fp32/fp16/bf16; attn_mask None, bool (True =
    attend) or additive float, broadcastable to (B, H, Nq, Nk); is_causal: query i sees keys j <= i
    (SDPA's top-left alignment). Fully masked rows give 0, as SDPA. Runs on CUDA tensors, or on CPU
    tensors when TRITON_INTERPRET=1 was set before Python started.
    """
    return _attention(q, k, v, attn_mask, is_causal, scale)


def _attention(q, k, v, attn_mask=None, is_causal=False, scale=None, block_m=None, block_n=None):
    """`triton_attention` with explicit block sizes (tests use small ones to get many blocks)."""
    _check(q, k, v, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0:
        return (q @ k.transpose(-2, -1)) @ v  # no queries: an empty (B, H, 0, D) result, still in the graph
    return _FlashAttention.apply(q, k, v, attn_mask, bool(is_causal), scale, (block_m, block_n))
