"""Residual add fused with the block norms: ``LayerNorm32`` (encoder) and ``RMSNorm32`` (decoder).

Spec §6.1 and §10.5. A pre-norm block computes ``x = x + delta`` (the residual add, rounded to the
model dtype) and then ``norm(x)``; one pass over the row does both, reading ``x`` and ``delta`` once
and writing the new residual stream and the normed row. Oracles: :func:`atoken_rt.reference.
layer_norm32` and :func:`atoken_rt.reference.rms_norm32` applied to ``round(x + delta)``.

    x_new = round(x32 + delta32)                                    (model dtype)
    LayerNorm32: y = round((x_new32 - mean) * rsqrt(var + eps) * w32 + b32)
                 mean, var over the row in fp32 (centred two-pass variance, biased, like torch)
    RMSNorm32:   y = round(round(x_new32 * rsqrt(mean(x_new32^2) + eps)) * w32)
                 (the official double rounding: bit-matching needs both rounds)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, check_runnable, check_same_device, check_tensor,
                     interpreter_active, next_pow2, overlap, same_view)

MAX_C = 8192  # one row lives in registers as a single block; AToken uses 1152, the GS decoder 768


@triton.jit
def _add_norm_kernel(
    X, Delta, W, B, XOut, Y,  # x, delta: [N, C] in; w, b: [C]; x_new, y: [N, C] out
    stride_x_n, stride_x_c, stride_delta_n, stride_delta_c,
    stride_xout_n, stride_xout_c, stride_y_n, stride_y_c,
    N, C, eps,
    HAS_DELTA: tl.constexpr,  # add delta (else x_new = x)
    WRITE_X: tl.constexpr,  # store x_new (the residual stream) into XOut
    HAS_BIAS: tl.constexpr,  # LayerNorm bias present
    IS_RMS: tl.constexpr,  # RMSNorm32 (double rounding) instead of LayerNorm32
    ROWS: tl.constexpr,  # rows per program (several short rows share a program)
    BLOCK_C: tl.constexpr,  # next_pow2(C): the whole row in one block, masked
):
    """One program normalises ROWS rows; every statistic in fp32, each output rounded as the
    reference does (see the module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)  # int64: N * stride can pass 2^31
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(X + rows[:, None] * stride_x_n + cols[None, :] * stride_x_c, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(Delta + rows[:, None] * stride_delta_n + cols[None, :] * stride_delta_c,
                    mask=mask, other=0.0)
        # the residual add of the model dtype: exact fp32 sum, one rounding
        x = (x.to(tl.float32) + d.to(tl.float32)).to(XOut.dtype.element_ty)
    if WRITE_X:
        tl.store(XOut + rows[:, None] * stride_xout_n + cols[None, :] * stride_xout_c, x,
                 mask=mask)

    xf = x.to(tl.float32)  # the statistics see the rounded x_new, as the reference does
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if IS_RMS:
        ms = tl.sum(xf * xf, axis=1) / C
        rstd = tl.rsqrt(ms + eps)
        y1 = (xf * rstd[:, None]).to(Y.dtype.element_ty)  # first rounding (spec §6.1 step 2)
        y = y1.to(tl.float32) * w[None, :]
    else:
        mean = tl.sum(xf, axis=1) / C
        # centred second pass (on registers): no E[x^2] - E[x]^2 cancellation; padded lanes = 0
        xc = tl.where(mask, xf - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        rstd = tl.rsqrt(var + eps)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y_n + cols[None, :] * stride_y_c,
             y.to(Y.dtype.element_ty), mask=mask)


def _check_out(name: str, out: torch.Tensor, x: torch.Tensor, inputs: dict) -> None:
    """An output has x's shape and dtype, distinct rows, and overlaps an input only by being the
    very same view (each program reads its rows before writing them, so that is race-free)."""
    n, c = x.shape
    check_tensor(name, out, shape=(n, c), dtypes=(x.dtype,))
    if n > 1 and out.stride(0) < c:
        raise ValueError(f"{name}: rows overlap (strides {out.stride()}, shape "
                         f"{tuple(out.shape)})")
    for other, t in inputs.items():
        if t is not None and overlap(out, t) and not same_view(out, t):
            raise ValueError(f"{name}: partially overlaps {other}; pass the same view or a "
                             "separate tensor")


def _launch_config(c: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps): about 2K elements per program on a GPU (Liger-style sizing,
    no autotune); under the interpreter, more rows per program (its cost is per program)."""
    block = next_pow2(c)
    per_prog = 16384 if interpreter_active() else 2048
    rows = max(1, min(64, per_prog // block))
    num_warps = min(16, max(4, rows * block // 256))
    return block, rows, num_warps


def _add_norm(x, delta, weight, bias, eps, x_out, y_out, is_rms: bool):
    check_tensor("x", x, dims=2, dtypes=FLOAT_DTYPES)
    n, c = x.shape
    if not 1 <= c <= MAX_C:
        raise ValueError(f"x: row width {c} not supported (1 <= C <= {MAX_C})")
    if delta is not None:
        check_tensor("delta", delta, shape=(n, c), dtypes=(x.dtype,))
    check_tensor("weight", weight, shape=(c,), dtypes=FLOAT_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, shape=(c,), dtypes=FLOAT_DTYPES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    dev = check_same_device(x=x, delta=delta, weight=weight, bias=bias, x_out=x_out, y_out=y_out)
    check_runnable("x", dev)
    inputs = {"x": x, "delta": delta, "weight": weight, "bias": bias}
    if x_out is not None:
        _check_out("x_out", x_out, x, inputs)
    if y_out is not None:
        _check_out("y_out", y_out, x, inputs)
        if x_out is not None and overlap(x_out, y_out):
            raise ValueError("y_out: overlaps x_out")
        if x_out is None and delta is None and overlap(x, y_out):
            raise ValueError("y_out: overlaps x, which is returned as x_new")

    write_x = delta is not None or (x_out is not None and not same_view(x_out, x))
    if x_out is None:
        x_out = torch.empty_like(x, memory_format=torch.contiguous_format) if write_x else x
    if y_out is None:
        y_out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    if n == 0:
        return x_out, y_out

    block, rows, num_warps = _launch_config(c)
    d = delta if delta is not None else x  # never read when HAS_DELTA is False
    b = bias if bias is not None else weight  # never read when HAS_BIAS is False
    _add_norm_kernel[(triton.cdiv(n, rows),)](
        x, d, weight, b, x_out, y_out,
        x.stride(0), x.stride(1), d.stride(0), d.stride(1),
        x_out.stride(0), x_out.stride(1), y_out.stride(0), y_out.stride(1),
        n, c, float(eps),
        HAS_DELTA=delta is not None, WRITE_X=write_x, HAS_BIAS=bias is not None, IS_RMS=is_rms,
        ROWS=rows, BLOCK_C=block, num_warps=num_warps,
    )
    return x_out, y_out


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float = 1e-6, *,
                   x_out: torch.Tensor | None = None, y_out: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + ``LayerNorm32`` in one pass: returns ``(x_new, y)``.

    Parameters
    ----------
    x : [N, C] fp32 / fp16 / bf16, unit last stride (any row stride). The residual stream.
    delta : [N, C] same dtype as x, unit last stride, or None. The block output to add.
    weight, bias : [C], any float dtype (upcast to fp32); bias may be None.
    eps : float >= 0, added to the variance (AToken: 1e-6).
    x_out : [N, C] x.dtype, optional. Where x_new goes. ``x_out=x`` updates the residual stream
        in place; by default a new tensor is allocated. With ``delta=None`` nothing is added:
        x_new is x itself (no write) unless a distinct ``x_out`` is given, which then gets a copy.
    y_out : [N, C] x.dtype, optional. Where y goes (default: a new tensor). Must not overlap x_new.

    Math: ``x_new = round(x + delta)`` (fp32 add, one rounding to x.dtype);
    ``y = round(LayerNorm_fp32(x_new) * w + b)``, statistics in fp32 with a centred variance.
    Equals ``reference.layer_norm32(x + delta, weight, bias, eps)`` up to fp32 summation order.
    C <= 8192. Raises ValueError naming the bad argument.
    """
    return _add_norm(x, delta, weight, bias, eps, x_out, y_out, is_rms=False)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float = 1e-6, *, x_out: torch.Tensor | None = None,
                 y_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + ``RMSNorm32`` in one pass: returns ``(x_new, y)``.

    Same arguments as :func:`add_layer_norm`, without bias. Math (spec §6.1, double rounding):
    ``x_new = round(x + delta)``; ``y1 = round(x_new32 * rsqrt(mean(x_new32^2) + eps))``;
    ``y = round(y1_32 * w32)``. Equals ``reference.rms_norm32(x + delta, weight, eps)`` up to
    fp32 summation order.
    """
    return _add_norm(x, delta, weight, None, eps, x_out, y_out, is_rms=True)


__all__ = ["add_layer_norm", "add_rms_norm", "MAX_C"]
