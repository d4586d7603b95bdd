"""Torch reference of every op in the AToken forward pass: the oracle for the Triton kernels.

Each function follows ATOKEN_SPEC.md to the letter, including where the official code rounds to
the model dtype (spec §10.5). They are written for clarity first; the only concessions to speed
are vectorisation and the padded batching in :func:`varlen_attention` (no Python loop per sequence).

Conventions: ``N`` tokens, ``H`` heads, ``D`` head dim, ``C`` width. "model dtype" is the dtype of
the activations (fp32 or bf16); "fp32 math" means upcast, compute, round once at the end.
"""

from __future__ import annotations

import functools

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Norms and activations (spec §6)
# ----------------------------------------------------------------------------------------------


def layer_norm32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm32``: fp32 layer norm with fp32-upcast affine, rounded once to ``x.dtype``.

    x: [..., C]; weight, bias: [C] (any float dtype). Returns x.dtype.
    """
    w = weight.float()
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def rms_norm32(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``RMSNorm32`` with the official double rounding (spec §6.1).

    y = round(x32 * rsqrt(mean(x32^2) + eps)); out = round(y32 * w32). x: [..., C], weight: [C].
    """
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y.float() * weight.float()).to(x.dtype)


def qk_l2_norm(u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-head QK "RMSNorm" of the decoder: L2-normalise, times gamma[h], times sqrt(D) (§6.3).

    u: [N, H, D] (model dtype), gamma: [H, D]. fp32 math, rounded once to u.dtype.
    """
    d = u.shape[-1]
    return (F.normalize(u.float(), dim=-1) * gamma.float() * math.sqrt(d)).to(u.dtype)


def gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, evaluated in fp32 and rounded once to ``u.dtype``.

    0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))). Works in place on a private fp32 copy (or on
    ``u`` itself when it is an fp32 temporary that the caller hands over: see ``gelu_tanh_``).
    """
    return F.gelu(u.float(), approximate="tanh").to(u.dtype)


def gelu_tanh_(u: torch.Tensor) -> torch.Tensor:
    """In-place :func:`gelu_tanh` for fp32 temporaries (same numbers, one less 17 MB buffer)."""
    if u.dtype != torch.float32:
        return gelu_tanh(u)
    return torch.ops.aten.gelu_(u, approximate="tanh")


# ----------------------------------------------------------------------------------------------
# 4D RoPE (spec §5.1)
# ----------------------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, num_axes: int = 4) -> torch.Tensor:
    """theta_k = 10000^(-k/head_dim), k = 0..head_dim/(2*num_axes)-1, fp32 (the exponent divides
    by the full head dim: an AToken quirk, spec §5.1)."""
    n = head_dim // (2 * num_axes)
    return 1.0 / (10000.0 ** (torch.arange(n, dtype=torch.float32) / head_dim))


@functools.lru_cache(maxsize=32)
def _rope_frequencies_on(head_dim: int, num_axes: int, device: str) -> torch.Tensor:
    """:func:`rope_frequencies` on ``device``, made once: inside a captured CUDA graph a host to
    device copy is not allowed (the untimed warm-up runs before a capture fill this cache)."""
    with torch.inference_mode(False):
        return rope_frequencies(head_dim, num_axes).to(device)


def rope_angles(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Angles [N, head_dim/2], axis-major: [t*theta, x*theta, y*theta, z*theta].

    positions: [N, 4] integer (t, x, y, z) after the per-chunk t re-basing.
    """
    freqs = _rope_frequencies_on(head_dim, positions.shape[1], str(positions.device))
    n = positions.shape[0]
    ang = torch.outer(positions.reshape(-1).float(), freqs).reshape(n, -1)
    if ang.shape[1] < head_dim // 2:  # head dims not divisible by 8 would leave identity pairs
        ang = torch.cat([ang, ang.new_zeros(n, head_dim // 2 - ang.shape[1])], dim=1)
    return ang


def rope_cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of :func:`rope_angles`, each [N, head_dim/2] fp32."""
    ang = rope_angles(positions, head_dim)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2m, 2m+1) of every head by angle m (spec §5.1).

    x: [N, ..., D] (model dtype; any number of head axes); cos, sin: [N, D/2] fp32.
    (a, b) -> (a cos - b sin, a sin + b cos) as one complex64 product, like the official code;
    fp32 math, rounded once to x.dtype.
    """
    n, d = x.shape[0], x.shape[-1]
    phases = torch.complex(cos, sin).reshape(n, *([1] * (x.dim() - 2)), d // 2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(xc * phases).reshape(x.shape).to(x.dtype)


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` written with real arithmetic (a test oracle; equal up to fp32 rounding)."""
    n, h, d = x.shape
    xf = x.float().reshape(n, h, d // 2, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1)
    return out.reshape(n, h, d).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Variable-length attention (spec §4, §9.3)
# ----------------------------------------------------------------------------------------------


def padded_layout(cu_q: np.ndarray, cu_k: np.ndarray, nq: int, nk: int, heads: int, device,
                  max_score_elems: int = 1 << 26) -> list:
    """Device index tensors that pad the live sequences to their longest, in groups whose score
    tensors stay under ``max_score_elems``: per group (q rows [G, lq], k rows [G, lk] (padding
    points at row nq / nk), key mask [G, 1, 1, lk] or None, live q rows, live-slot mask [G, lq])."""
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    live = np.nonzero((lens_q > 0) & (lens_k > 0))[0]
    if len(live) == 0:
        return []
    lq, lk = int(lens_q[live].max()), int(lens_k[live].max())
    group = max(1, max_score_elems // max(heads * lq * lk, 1))
    ar_q, ar_k = np.arange(lq), np.arange(lk)
    out = []
    for g0 in range(0, len(live), group):  # loop over memory-bounded groups, not sequences
        sel = live[g0:g0 + group]
        mq = ar_q[None, :] < lens_q[sel][:, None]
        mk = ar_k[None, :] < lens_k[sel][:, None]
        iq = np.where(mq, cu_q[sel][:, None] + ar_q[None, :], nq)
        ik = np.where(mk, cu_k[sel][:, None] + ar_k[None, :], nk)
        key_mask = None if mk.all() else torch.from_numpy(mk).to(device)[:, None, None, :]
        out.append((torch.from_numpy(iq).to(device), torch.from_numpy(ik).to(device), key_mask,
                    torch.from_numpy(iq[mq]).to(device), torch.from_numpy(mq).to(device)))
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int] | None = None,
                     scale: float | None = None, softcap: float = 0.0,
                     max_score_elems: int = 1 << 26, layout: list | None = None) -> torch.Tensor:
    """Full (bidirectional) attention within each packed sequence.

    q: [Nq, H, D]; k, v: [Nk, H, D]; cu_seqlens_*: host ints [S+1] (k defaults to q's).
    Sequence s uses rows cu_q[s]:cu_q[s+1] of q and cu_k[s]:cu_k[s+1] of k and v.
    scores = q.k * scale (default 1/sqrt(D)); with softcap > 0, scores = cap*tanh(scores/cap)
    (flash-attn semantics: the cap applies after the scale). Softmax and accumulation in fp32,
    output rounded once to q.dtype. Rows of q outside every sequence are zero.

    No Python loop per sequence: sequences are padded to the longest one and run as one batch
    (split into groups only to bound the score memory). ``layout``: a precomputed
    :func:`padded_layout` of the same cu_seqlens (callers reuse it across layers).
    """
    cu_q = np.asarray(cu_seqlens_q, dtype=np.int64)
    cu_k = cu_q if cu_seqlens_k is None else np.asarray(cu_seqlens_k, dtype=np.int64)
    if len(cu_q) != len(cu_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    nq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    live = np.nonzero((lens_q > 0) & (lens_k > 0))[0]
    if len(live) == 0:
        return q.new_zeros(q.shape)
    # Exact fp32 math on CPU; on CUDA the fused SDPA kernels already accumulate in fp32.
    cdt = torch.float32 if (q.device.type == "cpu" or softcap > 0) else q.dtype
    if (softcap == 0 and len(live) == len(lens_q) and np.all(lens_q == lens_q[0])
            and np.array_equal(cu_q, cu_k) and cu_q[0] == 0 and cu_q[-1] == nq == k.shape[0]):
        # Equal-length sequences tiling all rows (one image, a video's full chunks): a plain
        # batched attention over views, no gather.
        s, L = len(lens_q), int(lens_q[0])

        def view(t):
            return t.to(cdt).view(s, L, h, d).transpose(1, 2)

        o = F.scaled_dot_product_attention(view(q), view(k), view(v), scale=scale)
        return o.transpose(1, 2).reshape(nq, h, d).to(q.dtype)
    if layout is None:
        layout = padded_layout(cu_q, cu_k, nq, k.shape[0], h, q.device, max_score_elems)
    # Zeroed only here: the equal-length branch above writes every row (the fill cost 0.33 ms
    # per fp32 layer at 256 tokens on one Zen 4 core).
    out = q.new_zeros(q.shape)
    zq = q.new_zeros(1, h, d)
    zk = k.new_zeros(1, h, d)
    qz, kz, vz = torch.cat([q, zq]), torch.cat([k, zk]), torch.cat([v, zk])
    for iq, ik, key_mask, rows, mq in layout:  # memory-bounded groups of sequences
        qp = qz[iq].to(cdt).transpose(1, 2)  # [G, H, lq, D]
        kp = kz[ik].to(cdt).transpose(1, 2)
        vp = vz[ik].to(cdt).transpose(1, 2)
        if softcap > 0:
            s = torch.matmul(qp, kp.transpose(-1, -2)) * scale
            s = softcap * torch.tanh(s / softcap)
            if key_mask is not None:
                s = s.masked_fill(~key_mask, float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1), vp)
        else:
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask, scale=scale)
        out[rows] = o.transpose(1, 2)[mq].to(q.dtype)  # [G, lq, H, D] -> live rows
    return out


def varlen_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor, scale: float | None = None,
                            max_score_elems: int | None = None) -> torch.Tensor:
    """:func:`varlen_attention` for self-attention with everything on the device (no host reads),
    so it can be captured in a CUDA graph: a dense attention over all N rows with a
    block-diagonal mask built from ``cu_seqlens`` (device int32 [S+1], trailing entries repeated).

    max_score_elems: None: one call (mask [N, N]: meant for static buckets of a few thousand
    tokens on the torch backend); else query blocks of ``max(1, max_score_elems // (H N))`` rows,
    so the mask and scores stay O(block * N) (the block size comes from shapes only: still
    capturable). Rows past cu_seqlens[-1] are zero.
    """
    n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = torch.arange(n, device=q.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True)
    valid = rows < cu_seqlens[-1]
    cdt = torch.float32 if q.device.type == "cpu" else q.dtype
    zero = torch.zeros((), dtype=cdt, device=q.device)

    def prep(t):  # padding rows may hold anything (even NaN): 0 * NaN would leak through v
        return torch.where(valid[:, None, None], t.to(cdt), zero).transpose(0, 1)[None]

    qp, kp, vp = prep(q), prep(k), prep(v)
    block = n if max_score_elems is None else max(1, min(n, max_score_elems // max(h * n, 1)))
    parts = []
    for r0 in range(0, n, block):  # one iteration unless max_score_elems bounds the scores
        r1 = min(n, r0 + block)
        mask = (seq[r0:r1, None] == seq[None, :]) & valid[None, :]
        mask = mask | ~valid[r0:r1, None]  # padding queries see every key: finite, then zeroed
        parts.append(F.scaled_dot_product_attention(qp[:, :, r0:r1], kp, vp,
                                                    attn_mask=mask[None, None], scale=scale))
    o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    o = o[0].transpose(0, 1)
    return torch.where(valid[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device)
                       ).to(q.dtype)


def attention_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k=None, scale=None, softcap=0.0):
    """The plainest possible varlen attention (one loop per sequence): a test oracle only."""
    cu_q = list(cu_seqlens_q)
    cu_k = cu_q if cu_seqlens_k is None else list(cu_seqlens_k)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        a, b, c, e = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        if b == a or e == c:
            continue
        qs, ks, vs = q[a:b].float(), k[c:e].float(), v[c:e].float()
        sc = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap > 0:
            sc = softcap * torch.tanh(sc / softcap)
        out[a:b] = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vs).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Learned 2D position table (spec §5.2)
# ----------------------------------------------------------------------------------------------


def interpolate_pos_table(table: torch.Tensor, grid: int, out_h: int, out_w: int) -> torch.Tensor:
    """Resize the learned ``grid x grid`` table to ``out_h x out_w`` (antialiased bilinear).

    table: [grid*grid, C], row-major (x, y). Returns [out_h*out_w, C] in table.dtype, row-major.
    Computed in fp32 (PyTorch bilinear, align_corners=False, antialias=True), rounded once.
    """
    c = table.shape[1]
    g = table.float().reshape(grid, grid, c).permute(2, 0, 1)[None]
    if (out_h, out_w) == (grid, grid):
        r = g
    else:
        r = F.interpolate(g, size=(out_h, out_w), mode="bilinear", align_corners=False,
                          antialias=True)
    return r[0].permute(1, 2, 0).reshape(out_h * out_w, c).to(table.dtype)


def antialias_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The per-axis weight matrix [out, in] of antialiased bilinear resizing, from the spec's
    formula (a test oracle for :func:`interpolate_pos_table`)."""
    scale = in_size / out_size
    support = scale if scale >= 1 else 1.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = torch.tensor([max(0.0, 1.0 - abs((j - center + 0.5) * inv)) for j in range(xmin, xmax)],
                         dtype=torch.float64)
        m[i, xmin:xmax] = w / w.sum()
    return m


# ----------------------------------------------------------------------------------------------
# Latents: diagonal Gaussian and FSQ (spec §7, §8)
# ----------------------------------------------------------------------------------------------


def gaussian_sample(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mean + exp(logvar/2) * eps`` in fp32 (eps ~ N(0, 1)), rounded once to moments.dtype."""
    m = moments.float()
    mean, logvar = m.chunk(2, dim=-1)
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu")
    return (mean + torch.exp(0.5 * logvar) * eps.to(mean.device)).to(moments.dtype)


def _fsq_constants(levels: Sequence[int], device=None):
    return _fsq_constants_on(tuple(int(v) for v in levels), str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=32)
def _fsq_constants_on(levels: tuple[int, ...], device: str):
    """(levels, half_l, offset, shift) on ``device``, made once (no host to device copy inside a
    captured CUDA graph; the warm-up before a capture fills this cache). Read-only."""
    with torch.inference_mode(False):
        lv = torch.tensor(list(levels), dtype=torch.int32, device=device)
        eps = 1e-3
        half_l = (lv - 1) * (1 + eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
    return lv, half_l, offset, shift


def fsq_quantize(z: torch.Tensor, levels: Sequence[int], num_codebooks: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ codes and indices (spec §8), in fp32.

    z: [N, num_codebooks * len(levels)] (any float dtype; upcast exactly to fp32).
    Returns codes [N, same] in z.dtype (values q/(L//2), exact in bf16) and indices
    [N, num_codebooks] int32 with dim 0 the least significant digit.
    """
    lv, half_l, offset, shift = _fsq_constants(levels, z.device)
    n = z.shape[0]
    zc = z.float().reshape(n, num_codebooks, len(levels))
    bounded = (zc + shift).tanh() * half_l - offset
    q = torch.round(bounded)  # round half to even
    half_w = (lv // 2).float()
    codes = q / half_w
    digits = (codes * half_w + half_w).to(torch.int64)
    basis = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0).to(torch.int64)
    idx = (digits * basis).sum(-1).to(torch.int32)
    return codes.reshape(n, -1).to(z.dtype), idx


def fsq_indices_to_codes(indices: torch.Tensor, levels: Sequence[int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of the FSQ index map: indices [N, C] int -> codes [N, C*len(levels)] in dtype."""
    lv = torch.tensor(list(levels), dtype=torch.int64, device=indices.device)
    basis = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0)
    digits = (indices.to(torch.int64)[..., None] // basis) % lv
    half_w = (lv // 2)
    codes = (digits - half_w).float() / half_w.float()
    return codes.reshape(indices.shape[0], -1).to(dtype)


__all__ = [
    "layer_norm32", "rms_norm32", "qk_l2_norm", "gelu_tanh", "rope_frequencies", "rope_angles",
    "rope_cos_sin", "apply_rope", "apply_rope_real", "gelu_tanh_", "varlen_attention", "padded_layout", "varlen_attention_masked", "attention_per_sequence",
    "interpolate_pos_table", "antialias_bilinear_matrix", "gaussian_sample", "fsq_quantize",
    "fsq_indices_to_codes",
]
