"""Finite scalar quantisation (spec §8): codes and indices in one kernel, and the inverse map.

The reference, per scalar u of codebook c, dim j (level L = levels[j]), all in fp32:

    half_l = (L - 1) * (1 + 1e-3) / 2,  offset = 0.5 if L even else 0
    shift = atanh(offset / half_l)
    bounded = tanh(u + shift) * half_l - offset
    q = round_half_to_even(bounded),  code = q / (L // 2),  digit = code * (L // 2) + L // 2
    index_c = sum_j digit_j * prod(levels[:j])          (dim 0 is the least significant digit)

How the kernel gets q. The reference's q is a non-decreasing step function of the fp32 input u
(fp32 add, tanh, multiply, subtract and round are all monotone), with L - 1 steps per dim. So on
the host, once per (levels, device), we find by bisection over the fp32 numbers the smallest u at
which each step happens, evaluating the reference's own expression with torch on that device
(``_fsq_thresholds``). The kernel then counts the thresholds at or below u: q = count - L // 2.
Exact ties (bounded == k + 0.5, rounded to even) and the sign of zero codes (torch.round(-0.3)
is -0.0: one more threshold per dim) come out exactly as the reference computes them, at the
cost of L compares per scalar instead of a tanh and a rounding. Codes and indices are therefore
bit-identical to ``reference.fsq_quantize`` on the same device (up to the reference's own
last-ulp variation between torch's vectorised and scalar tanh on a CPU, which can only move a
step by an ulp). NaN inputs give the lowest level (the reference gives NaN codes).

Public API: :func:`fsq_quantize`, :func:`fsq_indices_to_codes`. References:
``reference.fsq_quantize`` and ``reference.fsq_indices_to_codes``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._utils import (check_runnable, check_same_device, check_tensor, device_guard,
                     interpreter_active, next_pow2)

FSQ_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _tile(N, DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """This program's token offsets (int64) and the codebook and level-dim lane offsets, with
    the token and level-dim masks: (offs_n, offs_c, offs_j, mask_n, mask_j)."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_D)
    return offs_n, offs_c, offs_j, offs_n < N, offs_j < DIM


@triton.jit
def _scale_codes(q, half_w, inv_half_w, POW2_HALF_W: tl.constexpr):
    """codes = q / (L // 2), as the reference divides (fp32)."""
    if POW2_HALF_W:
        codes = q * inv_half_w  # exact: a power-of-two scale
    else:
        codes = tl.div_rn(q, half_w)  # correctly rounded, as torch's division
    return codes


@triton.jit
def _fsq_quantize_kernel(
    Z, Thresholds, ConstsF, ConstsI, Codes, Indices,
    stride_z_n, stride_codes_n, stride_idx_n,
    N,
    NUM_CODEBOOKS: tl.constexpr,  # constexpr: with BLOCK_C == C the codebook mask folds away
    DIM: tl.constexpr,  # levels per codebook; constexpr so c * DIM + j folds into the addressing
    NUM_STEPS: tl.constexpr,  # max(levels) - 1
    POW2_HALF_W: tl.constexpr,  # every L // 2 a power of two: q / (L // 2) == q * (1 / (L // 2))
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_N tokens x all codebooks, tile [BLOCK_N, BLOCK_C, BLOCK_D].

    Z: [N, C * DIM] any float dtype, unit channel stride. Thresholds: [NUM_STEPS + 1, DIM] fp32:
    row k < NUM_STEPS is the smallest u with q(u) >= k + 1 - L // 2 (+inf past a dim's levels),
    row NUM_STEPS the smallest u whose bounded value has no sign bit (zero codes: +0, not -0).
    ConstsF: [2, DIM] fp32 rows L // 2, 1 / (L // 2). ConstsI: [3, DIM] int32 rows L // 2,
    basis = prod(levels[:j]), L (row 1 is read). Codes: [N, C * DIM] (unit channel stride),
    Indices: [N, C] int32 (unit channel stride).
    """
    offs_n, offs_c, offs_j, mask_n, mask_j = _tile(N, DIM, BLOCK_N, BLOCK_C, BLOCK_D)
    mask_c = offs_c < NUM_CODEBOOKS
    # Padded dims get harmless constants (half_w = 1, basis = 0: no index term).
    half_w = tl.load(ConstsF + offs_j, mask=mask_j, other=1.0)
    inv_half_w = tl.load(ConstsF + DIM + offs_j, mask=mask_j, other=1.0)
    basis = tl.load(ConstsI + DIM + offs_j, mask=mask_j, other=0)
    zero_sign = tl.load(Thresholds + NUM_STEPS * DIM + offs_j, mask=mask_j, other=0.0)

    mask = mask_n[:, None, None] & (mask_c[:, None] & mask_j[None, :])[None, :, :]
    cols = offs_c[:, None] * DIM + offs_j[None, :]
    u = tl.load(Z + offs_n[:, None, None] * stride_z_n + cols[None, :, :], mask=mask, other=0.0)
    u = u.to(tl.float32)  # exact for fp16 / bf16, round-to-nearest for fp64 (as z.float())

    # q = (number of steps at or below u) - L // 2, counted in fp32 (small integers: exact;
    # cheaper than int counting on the GPU).
    q = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_D), dtype=tl.float32) - half_w
    for k in range(NUM_STEPS):
        step = tl.load(Thresholds + k * DIM + offs_j, mask=mask_j, other=float("inf"))
        q += tl.where(u >= step, 1.0, 0.0)
    codes = _scale_codes(q, half_w, inv_half_w, POW2_HALF_W)
    # The code's sign bit is bounded's (round keeps it: round(-0.3) = -0.0), i.e. u < zero_sign,
    # i.e. the sign bit of u - zero_sign. OR-ing it in only changes zero codes (-0.0 below the
    # step). Bits, not a -0.0 literal or 0 - x: those lose the sign in some Triton versions.
    below = (u - zero_sign).to(tl.uint32, bitcast=True) & 0x80000000
    codes = (codes.to(tl.uint32, bitcast=True) | below).to(tl.float32, bitcast=True)
    # The reference's digit expression (bit-exact even where it is lossy, e.g. L = 26).
    digit = (codes * half_w + half_w).to(tl.int32)
    index = tl.sum(digit * basis, axis=2)

    tl.store(Codes + offs_n[:, None, None] * stride_codes_n + cols[None, :, :],
             codes.to(Codes.dtype.element_ty), mask=mask)
    tl.store(Indices + offs_n[:, None] * stride_idx_n + offs_c[None, :], index,
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _fsq_indices_to_codes_kernel(
    Indices, ConstsF, ConstsI, Codes,
    stride_idx_n, stride_codes_n,
    N, C,
    DIM: tl.constexpr, POW2_HALF_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Inverse map: digit_j = (index // basis_j) % L_j, code_j = (digit_j - L_j // 2) / (L_j // 2).

    Indices: [N, C] int32 / int64 (unit channel stride), values in [0, prod(levels)).
    ConstsF: [2, DIM] fp32 rows L // 2, 1 / (L // 2); ConstsI: [3, DIM] int32 rows L // 2, basis,
    L. Codes: [N, C * DIM] (unit channel stride).
    """
    offs_n, offs_c, offs_j, mask_n, mask_j = _tile(N, DIM, BLOCK_N, BLOCK_C, BLOCK_D)
    half_w = tl.load(ConstsF + offs_j, mask=mask_j, other=1.0)
    inv_half_w = tl.load(ConstsF + DIM + offs_j, mask=mask_j, other=1.0)
    half_w_int = tl.load(ConstsI + offs_j, mask=mask_j, other=1)
    basis = tl.load(ConstsI + DIM + offs_j, mask=mask_j, other=1)
    levels = tl.load(ConstsI + 2 * DIM + offs_j, mask=mask_j, other=1)

    mask_nc = mask_n[:, None] & (offs_c[None, :] < C)
    index = tl.load(Indices + offs_n[:, None] * stride_idx_n + offs_c[None, :], mask=mask_nc,
                    other=0).to(tl.int32)
    digit = (index[:, :, None] // basis[None, None, :]) % levels[None, None, :]
    q = (digit - half_w_int).to(tl.float32)
    codes = _scale_codes(q, half_w, inv_half_w, POW2_HALF_W)
    cols = offs_c[:, None] * DIM + offs_j[None, :]
    mask = mask_nc[:, :, None] & mask_j[None, None, :]
    tl.store(Codes + offs_n[:, None, None] * stride_codes_n + cols[None, :, :],
             codes.to(Codes.dtype.element_ty), mask=mask)


# (levels, device) -> (Thresholds, ConstsF, ConstsI): built once per device, on the first (eager,
# warm-up) call; CUDA-graph capture must not build them (see _tables).
_TABLES: dict = {}


def _check_levels(levels) -> tuple[int, ...]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ValueError(f"levels: expected a non-empty sequence of ints, got {levels!r}")
    out = []
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, int) or lv < 2:
            raise ValueError(f"levels: every level must be an int >= 2, got {list(levels)!r}")
        out.append(int(lv))
    if math.prod(out) > 2 ** 31:
        raise ValueError(f"levels: prod(levels) = {math.prod(out)} does not fit int32 indices")
    return tuple(out)


def _ordered_key(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64, strictly increasing over the non-NaN fp32 numbers (-0.0 just below +0.0)."""
    bits = x.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _from_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, -(key + 1) - (1 << 31), key)
    return bits.to(torch.int32).view(torch.float32)


def _fsq_thresholds(levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[max(levels), d] fp32: the steps of the reference's q(u), found by bisection.

    Row k < max(levels) - 1, column j: the smallest fp32 u with q_j(u) >= k + 1 - L_j // 2 (+inf
    where k >= L_j - 1); last row: the smallest u whose bounded value has a clear sign bit. q and
    bounded are ``reference.fsq_quantize``'s expressions, evaluated with torch on ``device``; the
    probes are padded to 64 elements so that a CPU evaluates tanh with the same vectorised code
    as it does on the bulk of a real input.
    """
    from atoken_rt.reference import _fsq_constants  # the reference's own fp32 arithmetic
    lv, half_l, offset, shift = _fsq_constants(levels, device)
    d, steps = len(levels), max(levels) - 1
    half_w = (lv // 2).float()
    target = torch.arange(1, steps + 1, device=device, dtype=torch.float32)[:, None] - half_w
    width = (steps + 1) * d
    padded = torch.zeros(-(-width // 64) * 64, dtype=torch.float32, device=device)

    def passes(u):  # [steps + 1, d] fp32 -> bool: at or past each step
        padded[:width] = (u + shift).reshape(-1)
        bounded = padded.tanh()[:width].view(steps + 1, d) * half_l - offset
        return torch.cat([torch.round(bounded[:steps]) >= target,
                          ~torch.signbit(bounded[steps:])])

    inf = torch.full((steps + 1, d), float("inf"), device=device)
    lo, hi = _ordered_key(-inf), _ordered_key(inf)  # invariant: passes(lo) false, passes(hi) true
    for _ in range(34):  # the fp32 line has < 2^33 keys
        mid = lo + (hi - lo) // 2
        ok = passes(_from_key(mid))
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    thresholds = _from_key(hi)
    unreachable = torch.arange(steps + 1, device=device)[:, None] >= (lv - 1)[None, :]
    unreachable[steps] = False
    return torch.where(unreachable, float("inf"), thresholds).contiguous()


def _tables(levels: tuple[int, ...], device: torch.device):
    """(Thresholds [max(levels), d] fp32, ConstsF [2, d] fp32: L // 2, 1 / (L // 2);
    ConstsI [3, d] int32: L // 2, basis = prod(levels[:j]), L), cached per (levels, device)."""
    key = (levels, str(device))
    hit = _TABLES.get(key)
    if hit is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fsq: the tables for levels {levels} on {device} are built by the "
                               "first call, which must run before CUDA-graph capture (warm-up)")
        lv = torch.tensor(levels, dtype=torch.int64, device=device)
        half_w = lv // 2
        basis = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0)
        consts_f = torch.stack([half_w.float(), 1.0 / half_w.float()]).contiguous()
        consts_i = torch.stack([half_w, basis, lv]).to(torch.int32).contiguous()
        hit = _TABLES[key] = (_fsq_thresholds(levels, device), consts_f, consts_i)
    return hit


def _config(c: int, d: int, interpreter: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_D), 4 warps: about 4096 lanes per program on the GPU (AToken:
    64 tokens x 8 x 8; ~32 SASS instructions per useful element, 64 registers, no spills, sm_90,
    triton 3.6); larger tiles under the interpreter, which pays a fixed cost per program."""
    if interpreter is None:
        interpreter = interpreter_active()
    block_c, block_d = next_pow2(c), next_pow2(d)
    budget = 1 << 16 if interpreter else 4096
    block_n = max(1, min(1024, budget // (block_c * block_d)))
    return block_n, block_c, block_d


def _pow2_half_w(levels: tuple[int, ...]) -> bool:
    return all((lv // 2) & (lv // 2 - 1) == 0 for lv in levels)


def _distinct(name: str, t: torch.Tensor, **others) -> None:
    for other_name, o in others.items():
        if t.numel() and o.numel() and t.untyped_storage().data_ptr() == \
                o.untyped_storage().data_ptr() and torch._C._overlaps(t, o):
            raise ValueError(f"{name}: shares memory with {other_name}")


def fsq_quantize(z: torch.Tensor, levels: Sequence[int], num_codebooks: int, *,
                 codes_out: torch.Tensor | None = None,
                 indices_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ codes and indices of z in one pass (spec §8).

    Parameters
    ----------
    z : [N, num_codebooks * len(levels)] fp32 / fp16 / bf16 / fp64, channel stride 1, any row
        stride (e.g. the view ``moments[:, :48]`` of a [N, 96] tensor). Upcast to fp32.
    levels : per-dim levels, ints >= 2 with prod(levels) <= 2^31 (AToken: (4, 4, 4, 4, 4, 4)).
    num_codebooks : C >= 1 (AToken: 8); codebook c is channels [c * d, (c + 1) * d).
    codes_out : optional [N, C * d] tensor of z.dtype, channel stride 1 (may be z itself: each
        program reads its rows before writing them).
    indices_out : optional [N, C] int32 tensor, channel stride 1.

    Returns
    -------
    (codes [N, C * d] in z.dtype, values q / (L // 2); indices [N, C] int32, dim 0 least
    significant), equal to ``reference.fsq_quantize`` on the same device (see the module
    docstring). The first call per (levels, device) builds small tables (a bisection of ~34
    steps of torch ops): make it before any CUDA-graph capture (it raises inside one).
    """
    levels = _check_levels(levels)
    if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
        raise ValueError(f"num_codebooks: expected an int >= 1, got {num_codebooks!r}")
    d, c = len(levels), num_codebooks
    check_tensor("z", z, dims=2, dtypes=FSQ_INPUT_DTYPES)
    if z.shape[1] != c * d:
        raise ValueError(f"z: expected {c} codebooks x {d} levels = {c * d} channels, got shape "
                         f"{tuple(z.shape)}")
    n = z.shape[0]
    if codes_out is None:
        codes_out = torch.empty((n, c * d), dtype=z.dtype, device=z.device)
    else:
        check_tensor("codes_out", codes_out, shape=(n, c * d), dtypes=(z.dtype,))
        same_view = (codes_out.data_ptr() == z.data_ptr() and codes_out.stride() == z.stride())
        if not same_view:
            _distinct("codes_out", codes_out, z=z)
    if indices_out is None:
        indices_out = torch.empty((n, c), dtype=torch.int32, device=z.device)
    else:
        check_tensor("indices_out", indices_out, shape=(n, c), dtypes=(torch.int32,))
        _distinct("indices_out", indices_out, z=z, codes_out=codes_out)
    check_same_device(z=z, codes_out=codes_out, indices_out=indices_out)
    check_runnable("z", z.device)
    if n == 0:
        return codes_out, indices_out
    thresholds, consts_f, consts_i = _tables(levels, z.device)
    block_n, block_c, block_d = _config(c, d)
    with device_guard(z.device):
        _fsq_quantize_kernel[(triton.cdiv(n, block_n),)](
            z, thresholds, consts_f, consts_i, codes_out, indices_out,
            z.stride(0), codes_out.stride(0), indices_out.stride(0),
            n,
            NUM_CODEBOOKS=c, DIM=d, NUM_STEPS=max(levels) - 1, POW2_HALF_W=_pow2_half_w(levels),
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=4,
            # No mul+add contraction: the digit is the reference's two rounded ops.
            enable_fp_fusion=False,
        )
    return codes_out, indices_out


def fsq_indices_to_codes(indices: torch.Tensor, levels: Sequence[int],
                         dtype: torch.dtype = torch.float32, *,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of FSQ indices: the inverse of :func:`fsq_quantize`'s index map.

    indices: [N, C] int32 / int64, channel stride 1, values in [0, prod(levels)) (others give
    unspecified codes, never out-of-bounds accesses). levels: as in :func:`fsq_quantize`.
    dtype: fp32 / fp16 / bf16 / fp64. out: optional [N, C * len(levels)] tensor of dtype, channel
    stride 1. Returns [N, C * len(levels)] codes (digit - L//2) / (L//2), equal to
    ``reference.fsq_indices_to_codes``.
    """
    levels = _check_levels(levels)
    if dtype not in FSQ_INPUT_DTYPES:
        raise ValueError(f"dtype: {dtype} not supported (expected one of "
                         f"{[str(t) for t in FSQ_INPUT_DTYPES]})")
    check_tensor("indices", indices, dims=2, dtypes=INDEX_DTYPES)
    n, c = indices.shape
    d = len(levels)
    if out is None:
        out = torch.empty((n, c * d), dtype=dtype, device=indices.device)
    else:
        check_tensor("out", out, shape=(n, c * d), dtypes=(dtype,))
        _distinct("out", out, indices=indices)
    check_same_device(indices=indices, out=out)
    check_runnable("indices", indices.device)
    if n == 0 or c == 0:
        return out
    _, consts_f, consts_i = _tables(levels, indices.device)
    block_n, block_c, block_d = _config(c, d)
    with device_guard(indices.device):
        _fsq_indices_to_codes_kernel[(triton.cdiv(n, block_n),)](
            indices, consts_f, consts_i, out,
            indices.stride(0), out.stride(0),
            n, c,
            DIM=d, POW2_HALF_W=_pow2_half_w(levels),
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=4, enable_fp_fusion=False,
        )
    return out


__all__ = ["fsq_quantize", "fsq_indices_to_codes"]
