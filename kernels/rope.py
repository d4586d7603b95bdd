"""4D rotary position embedding (spec §5.1), optionally after the decoder's per-head QK
normalisation (spec §6.3), in one pass over q and k.

Math, per token n, head h and channel pair m = 0..D/2-1 (interleaved pairs (2m, 2m+1)):

    axis = m // (D/8),  k = m % (D/8)            (axis-major: t, x, y, z; pairs m >= 4*(D//8)
    phi  = fp32(pos[n, axis]) * freqs[k]          are not rotated, as in reference.rope_angles)
    (a, b) -> (a cos(phi) - b sin(phi), a sin(phi) + b cos(phi))   in fp32, rounded once.

With gammas, first ``u' = round(u / max(||u||_2, 1e-12) * gamma[h] * sqrt(D))`` over the D
channels of the head (fp32 math, rounded to the model dtype: the reference's rounding point),
then u' is upcast and rotated. cos/sin are computed in the kernel (no tables in memory) from the
fp32 angle, with an explicit range reduction (exact for |phi| < 2^13 * pi/2 ~ 12868, i.e. any
position below 12868 on any axis, as freqs <= 1) and polynomials: within ~1.5e-7 of the exact
values, like torch's own cos/sin of the same fp32 angle.

Public API: :func:`rope_qk` (q and k of a fused QKV projection) and :func:`rope` (one tensor).
The torch reference is ``reference.apply_rope(reference.qk_l2_norm(...), *rope_cos_sin(...))``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, check_runnable, check_same_device, check_tensor, device_guard,
                     interpreter_active, next_pow2, overlap)

# Cody-Waite split of pi/2: P1 and P2 have 11 significant bits, so j * P1 and j * P2 are exact in
# fp32 for |j| < 2^13; P3 is the fp32 rounding of the rest (residual ~1.7e-15).
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
_PIO2_1 = tl.constexpr(1.5703125)
_PIO2_2 = tl.constexpr(0.0004837512969970703125)
_PIO2_3 = tl.constexpr(7.549790126404332e-08)
# Taylor coefficients of sin and cos on |r| <= pi/4 (+ a little): truncation error < 1e-11.
_S3 = tl.constexpr(-1.0 / 6.0)
_S5 = tl.constexpr(1.0 / 120.0)
_S7 = tl.constexpr(-1.0 / 5040.0)
_S9 = tl.constexpr(1.0 / 362880.0)
_S11 = tl.constexpr(-1.0 / 39916800.0)
_C2 = tl.constexpr(-0.5)
_C4 = tl.constexpr(1.0 / 24.0)
_C6 = tl.constexpr(-1.0 / 720.0)
_C8 = tl.constexpr(1.0 / 40320.0)
_C10 = tl.constexpr(-1.0 / 3628800.0)
_C12 = tl.constexpr(1.0 / 479001600.0)


@triton.jit
def _sincos(angle):
    """(sin(angle), cos(angle)) of an fp32 tensor, within ~2 ulp of the correctly rounded values
    for |angle| < 12868. Written from tl primitives: the interpreter has no libdevice, and on the
    GPU tl.sin/tl.cos may be the approximate hardware instructions (poor beyond [-pi, pi])."""
    j = tl.floor(angle * _TWO_OVER_PI + 0.5)
    # r = angle - j * pi/2 in three steps; the first two products and differences are exact.
    r = angle - j * _PIO2_1
    r = r - j * _PIO2_2
    r = r - j * _PIO2_3
    r2 = r * r
    s = r + r * (r2 * (_S3 + r2 * (_S5 + r2 * (_S7 + r2 * (_S9 + r2 * _S11)))))
    c = 1.0 + r2 * (_C2 + r2 * (_C4 + r2 * (_C6 + r2 * (_C8 + r2 * (_C10 + r2 * _C12)))))
    quadrant = j.to(tl.int32) & 3  # two's complement: also right for negative j
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin, cos


@triton.jit
def _rope_angles(Pos, Freqs, offs_n, mask_n, stride_pos_n, stride_pos_a,
                 P0: tl.constexpr, BLOCK: tl.constexpr, N_FREQ: tl.constexpr):
    """sin, cos [BLOCK_N, 1, BLOCK] of the angles of pairs P0 .. P0 + BLOCK - 1.

    angle = fp32(pos[n, m // N_FREQ]) * freqs[m % N_FREQ]: one fp32 multiply, as torch.outer in
    the reference. Pairs from 4 * N_FREQ on (D not a multiple of 8, or padding) get angle 0.
    """
    offs_p = P0 + tl.arange(0, BLOCK)
    axis = offs_p // N_FREQ
    k = offs_p - axis * N_FREQ
    rotated = offs_p < 4 * N_FREQ
    pos = tl.load(Pos + offs_n[:, None] * stride_pos_n + axis[None, :] * stride_pos_a,
                  mask=mask_n[:, None] & rotated[None, :], other=0)
    freq = tl.load(Freqs + k, mask=rotated, other=0.0)
    sin, cos = _sincos(pos.to(tl.float32) * freq[None, :])
    return sin[:, None, :], cos[:, None, :]


@triton.jit
def _load_pairs(ptrs, mask, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Load [BLOCK_N, BLOCK_H, 2 * BLOCK_P] channels, upcast, and split the interleaved pairs
    (2m, 2m + 1) into a, b [BLOCK_N, BLOCK_H, BLOCK_P] (a register-local reshape)."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (BLOCK_N, BLOCK_H, BLOCK_P, 2)))


@triton.jit
def _qk_scale(a, b, inv, g_ptrs, mask, sqrt_d, DTYPE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """round((u * inv) * gamma * sqrt(D)) to DTYPE, back in fp32: the reference's F.normalize,
    gamma and sqrt(D) products in its order, with its rounding point.

    gamma is loaded at the tile's full shape (the same row once per token, from L1) so that it
    gets the data's register layout; a [H, D] load broadcast over tokens would need two layout
    conversions through shared memory instead.
    """
    ga, gb = _load_pairs(g_ptrs, mask, BLOCK_N, BLOCK_H, BLOCK_P)
    a = (((a * inv) * ga) * sqrt_d).to(DTYPE).to(tl.float32)
    b = (((b * inv) * gb) * sqrt_d).to(DTYPE).to(tl.float32)
    return a, b


@triton.jit
def _rotate_store(a, b, sin, cos, ptrs, mask,
                  BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """(a, b) -> (a cos - b sin, a sin + b cos) in fp32, interleaved back, rounded once, stored."""
    out_a = a * cos - b * sin
    out_b = a * sin + b * cos
    y = tl.reshape(tl.join(out_a, out_b), (BLOCK_N, BLOCK_H, 2 * BLOCK_P))
    tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(
    X, Pos, Freqs, QGamma, KGamma, Out,
    stride_x_n, stride_x_s, stride_x_h,
    stride_pos_n, stride_pos_a,
    stride_qg_h, stride_kg_h,
    stride_out_n, stride_out_s,
    N, H, sqrt_d,
    NUM_SLICES: tl.constexpr,  # 2: slices 0 (q) and 1 (k) of [N, 3, H, D]; 1: a plain [N, H, D]
    HEAD_DIM: tl.constexpr,  # constexpr: pair/axis maths and the d < HEAD_DIM mask fold away
    X_HEADS_PACKED: tl.constexpr,  # stride_x_h == HEAD_DIM: lets the compiler prove 16 B alignment
    HAS_GAMMA: tl.constexpr,
    GAMMA_PACKED: tl.constexpr,  # both gamma row strides == HEAD_DIM (vector loads, as above)
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    MAIN_P: tl.constexpr,  # pairs in the main chunk: the largest power of two <= D / 2
    TAIL_P: tl.constexpr,  # next_pow2(D / 2 - MAIN_P), 0 when D / 2 is a power of two
):
    """One program: BLOCK_N tokens x BLOCK_H heads x all D channels, for each slice (q, then k).

    X: [N, S, H, D] (S >= NUM_SLICES; unit channel stride), Pos: [N, 4] int, Freqs: [D // 8] fp32,
    QGamma / KGamma: [H, D] (read only when HAS_GAMMA), Out: [N, NUM_SLICES, H, D] with heads
    packed (stride D) and unit channel stride.

    A head's D channels are two power-of-two chunks, so that no lane is padding when D = 72:
    channels [0, 2 * MAIN_P) (64) and [2 * MAIN_P, D) (8, padded to 2 * TAIL_P). The norm sums
    both; cos/sin are computed once per (token, pair) and shared by all heads and by q and k.
    """
    N_FREQ: tl.constexpr = HEAD_DIM // 8
    HAS_TAIL: tl.constexpr = TAIL_P > 0
    pid_n = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_nh = mask_n[:, None, None] & (offs_h < H)[None, :, None]
    x_head = offs_h * HEAD_DIM if X_HEADS_PACKED else offs_h * stride_x_h
    x_rows = X + offs_n[:, None, None] * stride_x_n + x_head[None, :, None]
    out_rows = Out + offs_n[:, None, None] * stride_out_n + (offs_h * HEAD_DIM)[None, :, None]

    offs_d0 = tl.arange(0, 2 * MAIN_P)[None, None, :]
    mask0 = tl.broadcast_to(mask_nh, (BLOCK_N, BLOCK_H, 2 * MAIN_P))
    sin0, cos0 = _rope_angles(Pos, Freqs, offs_n, mask_n, stride_pos_n, stride_pos_a,
                              0, MAIN_P, N_FREQ)
    if HAS_TAIL:
        offs_d1 = 2 * MAIN_P + tl.arange(0, 2 * TAIL_P)[None, None, :]
        mask1 = mask_nh & (offs_d1 < HEAD_DIM)
        sin1, cos1 = _rope_angles(Pos, Freqs, offs_n, mask_n, stride_pos_n, stride_pos_a,
                                  MAIN_P, TAIL_P, N_FREQ)

    for s in tl.static_range(NUM_SLICES):
        a0, b0 = _load_pairs(x_rows + s * stride_x_s + offs_d0, mask0, BLOCK_N, BLOCK_H, MAIN_P)
        if HAS_TAIL:
            a1, b1 = _load_pairs(x_rows + s * stride_x_s + offs_d1, mask1,
                                 BLOCK_N, BLOCK_H, TAIL_P)
        if HAS_GAMMA:
            if s == 0:
                G = QGamma
                g_head = offs_h * HEAD_DIM if GAMMA_PACKED else offs_h * stride_qg_h
            else:
                G = KGamma
                g_head = offs_h * HEAD_DIM if GAMMA_PACKED else offs_h * stride_kg_h
            g_rows = G + tl.broadcast_to(g_head[None, :, None], (BLOCK_N, BLOCK_H, 1))
            # F.normalize: u / max(||u||, 1e-12) over all D channels (masked lanes are 0). One
            # correctly rounded reciprocal per head instead of a division per channel.
            sumsq = tl.sum(a0 * a0 + b0 * b0, axis=2)
            if HAS_TAIL:
                sumsq += tl.sum(a1 * a1 + b1 * b1, axis=2)
            norm = tl.maximum(tl.sqrt_rn(sumsq), 1e-12)
            inv = tl.div_rn(tl.full(norm.shape, 1.0, tl.float32), norm)[:, :, None]
            a0, b0 = _qk_scale(a0, b0, inv, g_rows + offs_d0, mask0, sqrt_d, X.dtype.element_ty,
                               BLOCK_N, BLOCK_H, MAIN_P)
            if HAS_TAIL:
                a1, b1 = _qk_scale(a1, b1, inv, g_rows + offs_d1, mask1, sqrt_d,
                                   X.dtype.element_ty, BLOCK_N, BLOCK_H, TAIL_P)
        _rotate_store(a0, b0, sin0, cos0, out_rows + s * stride_out_s + offs_d0, mask0,
                      BLOCK_N, BLOCK_H, MAIN_P)
        if HAS_TAIL:
            _rotate_store(a1, b1, sin1, cos1, out_rows + s * stride_out_s + offs_d1, mask1,
                          BLOCK_N, BLOCK_H, TAIL_P)


def _config(h: int, d: int, interpreter: bool | None = None) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_H, MAIN_P, TAIL_P, num_warps) for H heads of dim D.

    A head's D / 2 pairs are split into MAIN_P (largest power of two) + TAIL_P (the rest, padded
    to a power of two): D = 72 -> 32 + 4 pairs, no padding. GPU: up to 8192 lanes per program
    (AToken: 4 tokens x 16 heads x 72 channels, 4 warps: ~10 SASS instructions per element for
    RoPE, ~25 with the QK-norm, 58 / 116 registers, no spills, sm_90, triton 3.6). The interpreter
    pays a fixed cost per program and per op, so it gets tiles of up to 64K lanes (same code,
    fewer programs).
    """
    if interpreter is None:
        interpreter = interpreter_active()
    budget, max_n = (1 << 16, 256) if interpreter else (8192, 16)
    pairs = d // 2
    main_p = 1 << (pairs.bit_length() - 1)
    tail_p = next_pow2(pairs - main_p) if pairs > main_p else 0
    lanes_per_head = 2 * (main_p + tail_p)
    block_h = min(next_pow2(h), max(1, 4096 // lanes_per_head))
    lanes = block_h * lanes_per_head
    block_n = max(1, min(max_n, budget // lanes))
    block_n = 1 << (block_n.bit_length() - 1)  # a power of two (tl.arange)
    return block_n, block_h, main_p, tail_p, 4 if block_n * lanes <= 8192 else 8


def _check_common(name: str, positions: torch.Tensor, freqs: torch.Tensor, n: int,
                  d: int) -> None:
    if d % 2 != 0 or d < 8:
        raise ValueError(f"{name}: head dim D must be even and >= 8 (4 axes x D//8 frequencies), "
                         f"got {d}")
    check_tensor("positions", positions, shape=(n, 4), dtypes=(torch.int32, torch.int64),
                 unit_last_stride=False)
    check_tensor("freqs", freqs, shape=(d // 8,), dtypes=(torch.float32,))


def _launch(x4: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, q_gamma, k_gamma,
            out4: torch.Tensor, num_slices: int) -> None:
    n, _, h, d = x4.shape
    if n == 0 or h == 0:
        return
    block_n, block_h, main_p, tail_p, num_warps = _config(h, d)
    has_gamma = q_gamma is not None
    grid = (triton.cdiv(n, block_n), triton.cdiv(h, block_h))
    with device_guard(x4.device):
        _rope_qk_kernel[grid](
            x4, positions, freqs,
            q_gamma if has_gamma else freqs, k_gamma if has_gamma else freqs, out4,
            x4.stride(0), x4.stride(1), x4.stride(2),
            positions.stride(0), positions.stride(1),
            q_gamma.stride(0) if has_gamma else 0, k_gamma.stride(0) if has_gamma else 0,
            out4.stride(0), out4.stride(1),
            n, h, float(math.sqrt(d)),
            NUM_SLICES=num_slices, HEAD_DIM=d, X_HEADS_PACKED=(h == 1 or x4.stride(2) == d),
            HAS_GAMMA=has_gamma, GAMMA_PACKED=has_gamma and (h == 1 or (
                q_gamma.stride(0) == d and k_gamma.stride(0) == d)),
            BLOCK_N=block_n, BLOCK_H=block_h, MAIN_P=main_p, TAIL_P=tail_p,
            num_warps=num_warps,
            # No mul+add contraction: every product is rounded, as in torch's separate ops.
            enable_fp_fusion=False,
        )


def rope_qk(qkv: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, *,
            q_gamma: torch.Tensor | None = None, k_gamma: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Optional per-head QK normalisation, then 4D RoPE, of q and k of a fused QKV tensor.

    Parameters
    ----------
    qkv : [N, 3, H, D] fp32 / fp16 / bf16, channel stride 1, any other strides (typically the
        QKV projection output viewed as [N, 3, H, D]). Only slices 0 (q) and 1 (k) are read.
        D even and >= 8; D = 72 for AToken.
    positions : [N, 4] int32 (int64 accepted), (t, x, y, z) per token, same device, any strides.
    freqs : [D // 8] fp32, contiguous: ``reference.rope_frequencies(D)`` on the device.
    q_gamma, k_gamma : [H, D] any float dtype, channel stride 1, or both None. When given (the
        decoder), u' = round(u / max(||u||, 1e-12) * gamma[h] * sqrt(D)) is applied to q and k
        before the rotation (spec §6.3); None (the encoder) means RoPE only.
    out : optional [N, 2, H, D] contiguous tensor of qkv.dtype to write into; it must not
        overlap qkv.

    Returns
    -------
    [N, 2, H, D] contiguous, qkv.dtype: out[:, 0] is q, out[:, 1] is k (fp32 math, one rounding
    after the rotation, one after the norm). qkv is not modified.
    """
    check_tensor("qkv", qkv, dims=4, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    n, s, h, d = qkv.shape
    if s != 3:
        raise ValueError(f"qkv: expected shape (N, 3, H, D), got {tuple(qkv.shape)}")
    _check_common("qkv", positions, freqs, n, d)
    if (q_gamma is None) != (k_gamma is None):
        raise ValueError("q_gamma, k_gamma: pass both (decoder QK-norm) or neither (encoder)")
    if q_gamma is not None:
        check_tensor("q_gamma", q_gamma, shape=(h, d), dtypes=FLOAT_DTYPES)
        check_tensor("k_gamma", k_gamma, shape=(h, d), dtypes=FLOAT_DTYPES)
    if out is None:
        out = torch.empty((n, 2, h, d), dtype=qkv.dtype, device=qkv.device)
    else:
        check_tensor("out", out, shape=(n, 2, h, d), dtypes=(qkv.dtype,))
        if not out.is_contiguous():
            raise ValueError(f"out: must be contiguous, got strides {out.stride()}")
        if overlap(out, qkv):
            raise ValueError("out: overlaps qkv (the kernel is not in place)")
    check_same_device(qkv=qkv, positions=positions, freqs=freqs, q_gamma=q_gamma,
                      k_gamma=k_gamma, out=out)
    check_runnable("qkv", qkv.device)
    _launch(qkv, positions, freqs, q_gamma, k_gamma, out, num_slices=2)
    return out


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, *,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """4D RoPE of one tensor (no normalisation): same math as :func:`rope_qk`.

    x: [N, H, D] fp32 / fp16 / bf16, channel stride 1, any other strides; positions: [N, 4]
    int32 (or int64); freqs: [D // 8] fp32 = ``reference.rope_frequencies(D)``; out: optional
    [N, H, D] contiguous x.dtype, not overlapping x. Returns [N, H, D] contiguous in x.dtype
    (equal to ``reference.apply_rope(x, *reference.rope_cos_sin(positions, D))``).
    """
    check_tensor("x", x, dims=3, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    n, h, d = x.shape
    _check_common("x", positions, freqs, n, d)
    if out is None:
        out = torch.empty((n, h, d), dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, shape=(n, h, d), dtypes=(x.dtype,))
        if not out.is_contiguous():
            raise ValueError(f"out: must be contiguous, got strides {out.stride()}")
        if overlap(out, x):
            raise ValueError("out: overlaps x (the kernel is not in place)")
    check_same_device(x=x, positions=positions, freqs=freqs, out=out)
    check_runnable("x", x.device)
    _launch(x.unsqueeze(1), positions, freqs, None, None, out.unsqueeze(1), num_slices=1)
    return out


__all__ = ["rope_qk", "rope"]
