"""Linear layers with their element-wise tail fused: bias + GELU-tanh (fc1), bias + residual add
(fc2, to_out).

Spec §6.1-6.2 and §10.5: a Linear output is accumulated in fp32, the bias is added in the
epilogue and the sum is rounded ONCE to the model dtype; GELU-tanh is then evaluated in fp32 on
that rounded value and rounded once; the residual add happens in the model dtype (fp32 add, one
rounding). Oracles: ``reference.gelu_tanh(F.linear(x, W, b))`` and ``residual + F.linear(x, W, b)``.

    h   = round(x @ W^T + b)          fp32 accumulate, one rounding
    fc1 = round(gelu_tanh(h32))       gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
    res = round(residual32 + h32)

Two implementations behind one API, selected by ``impl`` (pick per GPU by measurement,
``bench/bench_epilogue.py``):

- ``"triton"``: one Triton GEMM (fp32 accumulator, grouped tile order for L2 reuse) whose
  epilogue adds the bias, rounds, applies GELU or adds the residual, rounds, and stores once.
- ``"cublas"``: torch's GEMM (cuBLAS) with the bias folded into ``addmm`` (added to the fp32
  accumulator before the one rounding: the same numbers as ``F.linear``), then ONE fused Triton
  element-wise kernel for GELU or the residual add (:func:`bias_gelu_` / :func:`bias_residual_`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, check_runnable, check_same_device, check_tensor,
                     interpreter_active, next_pow2, overlap, same_view)

IMPLS = ("triton", "cublas")
_GELU, _RESIDUAL = 0, 1  # EPILOGUE constexpr values


@triton.jit
def _gelu_tanh_f32(u):
    """GELU-tanh of an fp32 block, from tl.exp only (no libdevice tanh in the interpreter).

    0.5 (1 + tanh(z)) = sigmoid(2z) = 1 / (1 + e) for z >= 0 and e / (1 + e) for z < 0, with
    e = exp(-2|z|) in [0, 1]: it never overflows (|u| up to fp32 max, where u^3 = inf gives
    e = 0 and the exact tails u and -0), and for z < 0 it avoids the cancellation in 1 + tanh(z)
    that torch's formula has. Outside the far negative tail (gelu(u) ~ 1e-7 |u|) the two agree to
    fp32 rounding.
    """
    z = 0.7978845608028654 * (u + 0.044715 * u * u * u)  # sqrt(2/pi) (u + 0.044715 u^3)
    e = tl.exp(-2.0 * tl.abs(z))
    s = tl.where(z >= 0.0, 1.0, e) / (1.0 + e)
    return u * s


@triton.jit
def _linear_epilogue_kernel(
    X, W, Bias, Res, Out,  # x [M, K], W [N, K], bias [N], residual [M, N], out [M, N]
    stride_x_m, stride_x_k, stride_w_n, stride_w_k,
    stride_res_m, stride_res_n, stride_out_m, stride_out_n,
    M, N, K,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # _GELU or _RESIDUAL: the unused branch compiles away
    IEEE_FP32: tl.constexpr,  # fp32 operands: full fp32 products (torch's default), not TF32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group in the launch order (L2 reuse of W tiles)
):
    """out = epilogue(round(x @ W^T + bias)), one BLOCK_M x BLOCK_N tile per program."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M consecutive programs share a column of W tiles while it is in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride can pass 2^31
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles load wrapped rows/columns (always in bounds, never stored), so the loads in the
    # K loop only need the K mask; the stores below are masked on M and N.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = X + rows[:, None] * stride_x_m + offs_k[None, :] * stride_x_k
    # a [BLOCK_K, BLOCK_N] tile of W^T, read straight from the [N, K] Linear layout
    w_ptrs = W + cols[None, :] * stride_w_n + offs_k[:, None] * stride_w_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_x_k
        w_ptrs += BLOCK_K * stride_w_k

    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = acc.to(Out.dtype.element_ty).to(tl.float32)  # the Linear's single rounding
    if EPILOGUE == 0:  # _GELU
        o = _gelu_tanh_f32(h)
    else:  # _RESIDUAL: the add in the model dtype = fp32 add, one rounding
        r = tl.load(Res + offs_m[:, None] * stride_res_m + offs_n[None, :] * stride_res_n,
                    mask=mask, other=0.0)
        o = r.to(tl.float32) + h
    tl.store(Out + offs_m[:, None] * stride_out_m + offs_n[None, :] * stride_out_n,
             o.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _bias_epilogue_kernel(
    Y, Bias, Res, Out,  # y [M, N] (model dtype or fp32), bias [N], residual / out [M, N]
    stride_y_m, stride_y_n, stride_res_m, stride_res_n, stride_out_m, stride_out_n,
    M, N,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # _GELU or _RESIDUAL
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = epilogue(round(y + bias)) element-wise, rounded to out's dtype (out may be y)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    h = tl.load(Y + offs_m[:, None] * stride_y_m + offs_n[None, :] * stride_y_n, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = h.to(Out.dtype.element_ty).to(tl.float32)  # the Linear's rounding (no-op without bias)
    if EPILOGUE == 0:  # _GELU
        o = _gelu_tanh_f32(h)
    else:  # _RESIDUAL
        r = tl.load(Res + offs_m[:, None] * stride_res_m + offs_n[None, :] * stride_res_n,
                    mask=mask, other=0.0)
        o = r.to(tl.float32) + h
    tl.store(Out + offs_m[:, None] * stride_out_m + offs_n[None, :] * stride_out_n,
             o.to(Out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def _check_linear(x, weight, bias, residual):
    """Validate a Linear's operands; returns (M, N, K)."""
    check_tensor("x", x, dims=2, dtypes=FLOAT_DTYPES)
    m, k = x.shape
    check_tensor("weight", weight, dims=2, dtypes=(x.dtype,))
    if weight.shape[1] != k:
        raise ValueError(f"weight: expected shape (*, {k}) to match x {tuple(x.shape)}, got "
                         f"{tuple(weight.shape)}")
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=(x.dtype,))
    if residual is not None:
        check_tensor("residual", residual, shape=(m, n), dtypes=(x.dtype,))
    dev = check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    check_runnable("x", dev)
    return m, n, k


def _matmul_config(dtype: torch.dtype, m: int) -> dict:
    """Fixed tiles (no autotune: token counts vary per call and must not re-tune).

    H100/H200, bf16/fp16: 128x128x64 tiles, 8 warps (two warpgroups for wgmma), 3 stages
    (3 x 32 KB of shared memory); 64-row tiles when M is small. fp32 (exact, no TF32) uses
    K = 32 to keep the staged tiles in shared memory. The interpreter's cost is per program and
    per op, so 64x64x32 tiles there (the tests' odd sizes still leave ragged M, N and K edges).
    """
    if interpreter_active():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _linear_triton(x, weight, bias, residual, epilogue: int) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = _matmul_config(x.dtype, m)
    b = bias if bias is not None else weight  # never read when HAS_BIAS is False
    r = residual if residual is not None else out  # never read unless EPILOGUE is _RESIDUAL
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear_epilogue_kernel[grid](
        x, weight, b, r, out,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        m, n, k,
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, IEEE_FP32=x.dtype == torch.float32,
        **cfg,
    )
    return out


def _launch_bias_epilogue(y, bias, residual, out, epilogue: int) -> torch.Tensor:
    """Launch :func:`_bias_epilogue_kernel` on validated tensors (out may be y: in place).

    y may be fp32 while out is in the model dtype (a GEMM with an fp32 output, e.g.
    ``torch.mm(..., out_dtype=torch.float32)``): the bias add is then exact before the rounding.
    """
    m, n = out.shape
    if m == 0 or n == 0:
        return out
    block_n = min(next_pow2(n), 1024)
    block_m = max(1, 4096 // block_n)  # ~4K elements per program: 16 B accesses, enough in flight
    b = bias if bias is not None else out  # never read when HAS_BIAS is False
    r = residual if residual is not None else out  # never read unless EPILOGUE is _RESIDUAL
    _bias_epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        y, b, r, out,
        y.stride(0), y.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        m, n,
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def _linear_cublas(x, weight, bias, residual, epilogue: int) -> torch.Tensor:
    with torch.no_grad():  # parameters may require grad; this path is inference only
        if bias is not None:
            h = torch.addmm(bias, x, weight.t())  # bias added to the fp32 accumulator, 1 rounding
        else:
            h = torch.mm(x, weight.t())
    return _launch_bias_epilogue(h, None, residual, h, epilogue)


def linear_bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     impl: str = "triton") -> torch.Tensor:
    """fc1 of the MLP: ``gelu_tanh(round(x @ W^T + b))``, GELU in fp32, rounded once.

    Parameters
    ----------
    x : [M, K] fp32 / fp16 / bf16, unit last stride (any row stride).
    weight : [N, K] x.dtype (PyTorch Linear layout), unit last stride.
    bias : [N] x.dtype, or None.
    impl : ``"triton"`` (Triton GEMM with the epilogue fused) or ``"cublas"`` (``torch.addmm`` /
        ``torch.mm`` then one fused Triton element-wise GELU kernel).

    Returns a new [M, N] tensor in x.dtype. Rounding points (spec §10.5) in both impls: the fp32
    accumulator plus the bias is rounded once to x.dtype, GELU runs in fp32 on that value and is
    rounded once. (``"cublas"`` folds the bias into ``addmm``, i.e. into cuBLAS's fp32 epilogue,
    exactly as ``F.linear`` does. A plain ``torch.mm`` in bf16 followed by a separate bias add
    would round the product before the bias (two roundings); ``torch.mm(..., out_dtype=fp32)``
    avoids that too but writes and re-reads an fp32 [M, N] temporary, which bench_epilogue.py
    times as a baseline.) fp32 operands use full-fp32 products (no TF32) in both impls, like
    torch's default. Raises ValueError naming the bad argument.
    """
    _check_impl(impl)
    _check_linear(x, weight, bias, None)
    if impl == "triton":
        return _linear_triton(x, weight, bias, None, _GELU)
    return _linear_cublas(x, weight, bias, None, _GELU)


def linear_bias_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         residual: torch.Tensor, *, impl: str = "triton") -> torch.Tensor:
    """fc2 / to_out with the residual add: ``round(residual + round(x @ W^T + b))``.

    Same arguments as :func:`linear_bias_gelu`, plus ``residual`` : [M, N] x.dtype, unit last
    stride (read only; a new tensor is returned). The residual add is the model dtype's: fp32
    add of the two rounded operands, one rounding.
    """
    _check_impl(impl)
    _check_linear(x, weight, bias, residual)
    if impl == "triton":
        return _linear_triton(x, weight, bias, residual, _RESIDUAL)
    return _linear_cublas(x, weight, bias, residual, _RESIDUAL)


def _check_elementwise(y, bias, residual):
    check_tensor("y", y, dims=2, dtypes=FLOAT_DTYPES)
    m, n = y.shape
    if m > 1 and n > 0 and y.stride(0) < n:
        raise ValueError(f"y: rows overlap (strides {y.stride()} for shape {tuple(y.shape)}); "
                         "it is written in place")
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=(y.dtype,))
    if residual is not None:
        check_tensor("residual", residual, shape=(m, n), dtypes=(y.dtype,))
    dev = check_same_device(y=y, bias=bias, residual=residual)
    check_runnable("y", dev)
    if residual is not None and overlap(y, residual) and not same_view(y, residual):
        raise ValueError("residual: partially overlaps y, which is written in place")


def bias_gelu_(y: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """In place on y: ``y = round(gelu_tanh(round(y + b)))``; returns y.

    y : [M, N] fp32 / fp16 / bf16, unit last stride, a GEMM output without its bias (or with it,
    and ``bias=None``); bias : [N] y.dtype or None. The tail of the ``"cublas"`` path in one pass.
    Note: when y came from a bf16/fp16 GEMM, the product was already rounded once before this
    bias add (two roundings, unlike ``F.linear``); fold the bias into the GEMM (``addmm``) and
    pass ``bias=None`` for the reference's single rounding.
    """
    _check_elementwise(y, bias, None)
    return _launch_bias_epilogue(y, bias, None, y, _GELU)


def bias_residual_(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
                   ) -> torch.Tensor:
    """In place on y: ``y = round(residual + round(y + b))``; returns y.

    y : [M, N], unit last stride; bias : [N] y.dtype or None; residual : [M, N] y.dtype (read
    only; may be y itself). Same rounding note as :func:`bias_gelu_`.
    """
    _check_elementwise(y, bias, residual)
    return _launch_bias_epilogue(y, bias, residual, y, _RESIDUAL)


__all__ = ["linear_bias_gelu", "linear_bias_residual", "bias_gelu_", "bias_residual_", "IMPLS"]
