"""Variable-length, full bidirectional attention forward over a packed batch (spec §4.1, §9.3).

For each sequence s, head h and query row i of that sequence::

    S[i, j] = scale * <q_i, k_j>                       (j over the keys of sequence s only)
    S[i, j] = cap * tanh(S[i, j] / cap)                (only when softcap = cap > 0)
    O[i]    = sum_j softmax_j(S[i, :]) v_j

Queries of sequence s are rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q; its keys and values are
rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of k and v. Rows of q outside every sequence come out
zero. The torch reference is :func:`atoken_rt.reference.varlen_attention`.

One program owns BLOCK_M query rows of one (sequence, head) and streams that sequence's keys in
tiles of BLOCK_N with an online softmax (FlashAttention-2 forward). Head dim 72 (AToken) can be
split into a 64-wide and a 16-wide (8 live) piece, each its own ``tl.dot``, so a tile does 80
columns of work instead of 128; that is how fp32 and the CPU interpreter run it. fp16/bf16 on a
GPU pad it to one 128-wide piece, because Triton 3.6 miscompiles the split there (see
:func:`varlen_attention`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check_same_device, check_tensor, interpreter_active, next_pow2

_LOG2E = 1.4426950408889634
# Grid dims 1 and 2 are capped at 65535 by CUDA; dim 1 holds num_seqs + 1 programs.
_MAX_GRID_YZ = 65535


@triton.jit
def _tanh(x):
    """tanh from exp2 (no libdevice in the interpreter). Uses e^(-2|x|) in (0, 1], so it never
    overflows: large |x| gives exactly +-1, and x = 0 gives 0."""
    t = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    th = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -th, th)


@triton.jit
def _attention_tile(acc0, acc1, m_i, l_i, q0, q1, k0_ptrs, k1_ptrs, v0_ptrs, v1_ptrs,
                    start_n, seqlen_k, stride_k_n, stride_v_n, qk_scale, softcap_log2e,
                    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                    SPLIT_D: tl.constexpr, SOFTCAP: tl.constexpr, MASK_N: tl.constexpr,
                    BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax; returns the new state.

    k*_ptrs / v*_ptrs address key rows [0, BLOCK_N) of the sequence (piece 0: columns
    [0, BLOCK_D0), piece 1: [BLOCK_D0, BLOCK_D0 + BLOCK_D1)); this tile is start_n rows further.
    MASK_N is constexpr so the full tiles (all but the last) load and score without row masks.
    """
    # ALIGN hints keep the tile addresses provably 16-byte aligned, so loads vectorise and can be
    # pipelined asynchronously even when a stride (the head stride 72) is not a multiple of 16.
    k_step = tl.multiple_of(tl.cast(start_n, tl.int64) * stride_k_n, [ALIGN])
    v_step = tl.multiple_of(tl.cast(start_n, tl.int64) * stride_v_n, [ALIGN])
    offs_d0 = tl.arange(0, BLOCK_D0)
    if MASK_N:
        mask_n = (start_n + tl.arange(0, BLOCK_N)) < seqlen_k
        mask0 = mask_n[:, None] & (offs_d0[None, :] < HEAD_DIM)
    else:
        mask0 = offs_d0[None, :] < HEAD_DIM  # all-true (BLOCK_D0 <= HEAD_DIM when split)
    k0 = tl.load(k0_ptrs + k_step, mask=mask0, other=0.0)
    qk = tl.dot(q0, tl.trans(k0), input_precision=INPUT_PRECISION)
    if SPLIT_D:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        if MASK_N:
            mask1 = mask_n[:, None] & (offs_d1[None, :] < HEAD_DIM)
        else:
            mask1 = offs_d1[None, :] < HEAD_DIM
        k1 = tl.load(k1_ptrs + k_step, mask=mask1, other=0.0)
        qk += tl.dot(q1, tl.trans(k1), input_precision=INPUT_PRECISION)
    # Scores in base-2 units (log2(e) is folded into the constants) so the softmax uses exp2.
    if SOFTCAP:
        qk = softcap_log2e * _tanh(qk * qk_scale)
    else:
        qk = qk * qk_scale
    if MASK_N:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    # Online softmax in fp32. A tile always holds >= 1 live key, so m_new is finite and
    # alpha = exp2(-inf) = 0 on the first tile.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to the value dtype for the tensor-core dot (as FlashAttention does);
    # accumulation stays fp32. Masked value rows load 0, never garbage times p = 0.
    pv = p.to(v0_ptrs.dtype.element_ty)
    v0 = tl.load(v0_ptrs + v_step, mask=mask0, other=0.0)
    acc0 = acc0 * alpha[:, None] + tl.dot(pv, v0, input_precision=INPUT_PRECISION)
    if SPLIT_D:
        v1 = tl.load(v1_ptrs + v_step, mask=mask1, other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision=INPUT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _store_rows(o_base, rows, row_mask, stride_o_n, acc0, acc1,
                HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                SPLIT_D: tl.constexpr, ALIGN: tl.constexpr):
    """Store the [BLOCK_M, HEAD_DIM] tile (acc0 | acc1) to rows ``rows`` of one head."""
    row_offs = tl.multiple_of(rows[:, None] * stride_o_n, [ALIGN, ALIGN])
    offs_d0 = tl.arange(0, BLOCK_D0)
    tl.store(o_base + row_offs + offs_d0[None, :], acc0.to(o_base.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d0[None, :] < HEAD_DIM))
    if SPLIT_D:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        tl.store(o_base + row_offs + offs_d1[None, :], acc1.to(o_base.dtype.element_ty),
                 mask=row_mask[:, None] & (offs_d1[None, :] < HEAD_DIM))


@triton.jit
def _varlen_attention_kernel(
    Q, K, V, Out, Cu_seqlens_q, Cu_seqlens_k,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_v_n, stride_v_h,
    stride_o_n, stride_o_h,
    n_q, n_k, num_seqs, qk_scale, softcap_log2e, seqlen_q_bucket, seqlen_k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    SPLIT_D: tl.constexpr, SOFTCAP: tl.constexpr, ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PACKED_GRID: tl.constexpr, SEQ_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Varlen attention forward; grid (cdiv(max_seqlen_q, BLOCK_M), num_seqs + 1, H), or with
    PACKED_GRID (cdiv(n_q, BLOCK_M) + num_seqs, 2, H).

    Q [n_q, H, HEAD_DIM], K and V [n_k, H, HEAD_DIM] (any row/head strides, unit last stride),
    Out [n_q, H, HEAD_DIM]; Cu_seqlens_q/k int32 [>= num_seqs + 1].
    Program (m, s, h) with s < num_seqs computes query rows [m*BLOCK_M, (m+1)*BLOCK_M) of
    sequence s, head h. Programs with s == num_seqs write zeros to the rows of head h outside
    [cu_q[0], cu_q[num_seqs]) (padding), so every output row is written without a host read.

    PACKED_GRID (for static plans, where max_seqlen_q is only a capacity): program (p, 0, h) finds
    its sequence on the device. Sequence s owns the virtual tiles [v_s, v_s + cdiv(len_s, BLOCK_M))
    with v_s = cu_q[s] // BLOCK_M + s; these ranges are disjoint and end by n_q // BLOCK_M +
    num_seqs, so cdiv(n_q, BLOCK_M) + num_seqs programs cover every sequence whatever the length
    mix (a per-sequence grid would need cdiv(capacity, BLOCK_M) per sequence, nearly all of them
    exiting at once). Programs (p, 1, h) zero the padding rows. SEQ_BLOCK: a power of two
    >= num_seqs (the search loads cu_q[0:num_seqs] as one vector).

    qk_scale: scale * log2(e), or scale / softcap with SOFTCAP (then softcap_log2e = cap * log2(e)).
    seqlen_q_bucket, seqlen_k_bucket: power-of-two buckets of the host max lengths; the autotune
    key only (the kernel does not read them).
    Head dim: columns [0, BLOCK_D0) are one dot piece; with SPLIT_D, [BLOCK_D0, BLOCK_D0 + BLOCK_D1)
    are a second piece masked to HEAD_DIM. ALIGN: every row and head stride is a multiple of it
    (elements per 16 bytes, or less), checked by the launcher.
    fp32 softmax and accumulation; Out rounded once.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    o_base = Out + tl.multiple_of(head * stride_o_h, [ALIGN])
    if PACKED_GRID:
        is_padding = tl.program_id(1) == 1
    else:
        is_padding = tl.program_id(1) == num_seqs

    if is_padding:
        # Padding rows: outside [cu_q[0], cu_q[num_seqs]). Tiles are strided over the programs of
        # grid dim 0; the trip count comes from host ints, tiles with no padding row are skipped.
        lo = tl.load(Cu_seqlens_q).to(tl.int64)
        hi = tl.load(Cu_seqlens_q + num_seqs).to(tl.int64)
        num_pid_m = tl.num_programs(0)
        n_tiles = tl.cdiv(n_q, BLOCK_M)
        zero0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        zero1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        for i in range(0, tl.cdiv(n_tiles, num_pid_m)):
            tile_start = (pid_m + i * num_pid_m) * BLOCK_M
            if (tile_start < lo) | (tile_start + BLOCK_M > hi):
                rows = tile_start + offs_m
                row_mask = ((rows < lo) | (rows >= hi)) & (rows < n_q)
                _store_rows(o_base, rows, row_mask, stride_o_n, zero0, zero1,
                            HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, ALIGN)
        return

    if PACKED_GRID:
        # The sequence owning virtual tile pid_m: the last s with v_s <= pid_m (see above).
        offs_s = tl.arange(0, SEQ_BLOCK)
        live = offs_s < num_seqs
        cu_s = tl.load(Cu_seqlens_q + offs_s, mask=live, other=0).to(tl.int64)
        cu_s = tl.minimum(tl.maximum(cu_s, 0), n_q)
        v_s = tl.where(live, cu_s // BLOCK_M + offs_s, n_q + num_seqs + 1)
        owned = v_s <= pid_m
        seq = tl.sum(owned.to(tl.int32), 0).to(tl.int64) - 1
        if seq < 0:
            return  # before the first sequence's first tile (cu_q[0] > 0)
        pid_m = pid_m - tl.max(tl.where(owned, v_s, 0), 0)
    else:
        seq = tl.program_id(1).to(tl.int64)

    # Sequence bounds, clamped to the tensors so that no cu_seqlens value can send a load or
    # store out of bounds.
    start_q = tl.minimum(tl.maximum(tl.load(Cu_seqlens_q + seq).to(tl.int64), 0), n_q)
    end_q = tl.minimum(tl.load(Cu_seqlens_q + seq + 1).to(tl.int64), n_q)
    seqlen_q = end_q - start_q
    if pid_m * BLOCK_M >= seqlen_q:
        return  # past this sequence's end (or an empty sequence)
    start_k = tl.minimum(tl.maximum(tl.load(Cu_seqlens_k + seq).to(tl.int64), 0), n_k)
    end_k = tl.minimum(tl.load(Cu_seqlens_k + seq + 1).to(tl.int64), n_k)
    seqlen_k = tl.maximum(end_k - start_k, 0)

    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)  # only used when SPLIT_D
    offs_qm = pid_m * BLOCK_M + offs_m
    mask_m = offs_qm < seqlen_q
    rows_q = start_q + offs_qm
    q_ptrs = (Q + tl.multiple_of(head * stride_q_h, [ALIGN])
              + tl.multiple_of(rows_q[:, None] * stride_q_n, [ALIGN, ALIGN]))
    q0 = tl.load(q_ptrs + offs_d0[None, :],
                 mask=mask_m[:, None] & (offs_d0[None, :] < HEAD_DIM), other=0.0)
    if SPLIT_D:
        q1 = tl.load(q_ptrs + offs_d1[None, :],
                     mask=mask_m[:, None] & (offs_d1[None, :] < HEAD_DIM), other=0.0)
    else:
        q1 = q0  # unused: every use is under SPLIT_D

    # Pointers to key/value rows [0, BLOCK_N) of this sequence and head, built once: the loop
    # only adds a scalar row offset.
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    k_ptrs = (K + tl.multiple_of(start_k * stride_k_n + head * stride_k_h, [ALIGN])
              + tl.multiple_of(offs_n[:, None] * stride_k_n, [ALIGN, ALIGN]))
    v_ptrs = (V + tl.multiple_of(start_k * stride_v_n + head * stride_v_h, [ALIGN])
              + tl.multiple_of(offs_n[:, None] * stride_v_n, [ALIGN, ALIGN]))
    k0_ptrs = k_ptrs + offs_d0[None, :]
    v0_ptrs = v_ptrs + offs_d0[None, :]
    k1_ptrs = k_ptrs + offs_d1[None, :]
    v1_ptrs = v_ptrs + offs_d1[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    # Full key tiles without row masks, then at most one masked tail tile.
    n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _attention_tile(
            acc0, acc1, m_i, l_i, q0, q1, k0_ptrs, k1_ptrs, v0_ptrs, v1_ptrs, start_n, seqlen_k,
            stride_k_n, stride_v_n, qk_scale, softcap_log2e, HEAD_DIM, BLOCK_D0, BLOCK_D1,
            SPLIT_D, SOFTCAP, False, BLOCK_N, ALIGN, INPUT_PRECISION)
    if n_full < seqlen_k:
        acc0, acc1, m_i, l_i = _attention_tile(
            acc0, acc1, m_i, l_i, q0, q1, k0_ptrs, k1_ptrs, v0_ptrs, v1_ptrs, n_full, seqlen_k,
            stride_k_n, stride_v_n, qk_scale, softcap_log2e, HEAD_DIM, BLOCK_D0, BLOCK_D1,
            SPLIT_D, SOFTCAP, True, BLOCK_N, ALIGN, INPUT_PRECISION)

    # No keys (seqlen_k == 0): l = 0 and acc = 0, so the rows come out 0 like the reference.
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    acc0 = acc0 * inv_l[:, None]
    acc1 = acc1 * inv_l[:, None]
    _store_rows(o_base, rows_q, mask_m, stride_o_n, acc0, acc1,
                HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, ALIGN)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _split_head_dim(d: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the head dim as one power-of-two piece, or two pieces (BLOCK_D1 > 0)
    when that does less padded work, e.g. 72 -> (64, 16): 80 columns instead of 128; 96 -> (64, 32).
    Pieces are >= 16 wide (the smallest tl.dot K)."""
    whole = max(16, next_pow2(d))
    lo = 1 << (d.bit_length() - 1)  # largest power of two <= d
    if lo == d or lo < 16:
        return whole, 0
    rest = max(16, next_pow2(d - lo))
    return (lo, rest) if lo + rest < whole else (whole, 0)


def _stride_align(tensors, elem_size: int) -> int:
    """Largest power of two <= 16 / elem_size dividing every row and head stride: the ALIGN hint
    (16-byte aligned rows let the kernel vectorise and pipeline its loads)."""
    align = max(1, 16 // elem_size)
    strides = [t.stride(i) for t in tensors for i in (0, 1)]
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


def _bucket(n: int) -> int:
    """Power-of-two bucket of a max sequence length, clamped to [64, 16384]: the autotune key."""
    return min(max(next_pow2(n), 64), 16384)


# Autotune space (GPU only): (BLOCK_M, BLOCK_N, num_warps, num_stages). Kept small because
# every config is compiled once per (head dim, dtype) and benchmarked once per key. Compiled
# offline for sm_90a with Triton 3.9 (ptxas -v, bf16, D = 72 as 64 + 16): BLOCK_M 128 at 8 warps
# (two warpgroups of 64 rows) uses 174 registers with 64-key tiles and 220 with 128-key tiles, no
# spills; BLOCK_M 128 at 4 warps hits 255 registers and spills, so it is left out. BLOCK_M 64
# (174 registers at 4 warps) keeps enough programs in flight for short sequences (GS windows,
# 256-token images). 2-3 stages multi-buffer the K/V tiles in shared memory (cp.async).
# Re-checked for the packed grid (Triton 3.9, sm_90a, all configs compile, wgmma, no spills in
# bf16): its device-side sequence search costs up to ~26 registers (64 x 64: 200 vs 174); with
# softcap the 128-key tiles sit at 254-255 registers (no spills, no headroom), which the
# autotuner simply measures as slower if a toolchain starts spilling there.
# Measured on an H200 (Triton 3.6, bf16, head dim 72 padded to 128, 2026-12-04): 64 x 64 at
# 4 warps was fastest at 256-token sequences (0.130 ms for 64 x 256 tokens x 16 heads), and
# 128 x 128 / 64 x 64 at 3 stages at 4096 (1.17-1.22 ms for 4 x 4096); 1 stage was 1.5x slower.
_GPU_CONFIGS = [
    (64, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
]
# Whether fp16/bf16 on a GPU may split the head dim (see varlen_attention): off until a Triton
# release compiles it correctly (device_check's attention rows would show it).
_SPLIT_16BIT = False
# fp32 (a parity path, not a speed path) runs one fixed config: 3xTF32 products need about twice
# the registers, so small tiles (ptxas: 255 registers; spills at D = 72 of 232 bytes, 424 with
# the packed grid, under Triton 3.9, and ~300 bytes under 3.6).
_FP32_CONFIG = (64, 32, 4, 2)
_TUNE_KEY = ["HEAD_DIM", "SOFTCAP", "PACKED_GRID", "seqlen_q_bucket", "seqlen_k_bucket"]
_tuned_kernel = None


def _gpu_kernel():
    """The autotuned kernel, built on first GPU use (nothing touches the driver at import)."""
    global _tuned_kernel
    if _tuned_kernel is None:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in _GPU_CONFIGS]
        _tuned_kernel = triton.autotune(configs=configs, key=_TUNE_KEY)(_varlen_attention_kernel)
    return _tuned_kernel


def _interpreter_blocks() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) under the CPU interpreter: small fixed tiles keep the tests fast."""
    return 64, 64


# The packed grid loads cu_seqlens_q[0:num_seqs] as one vector per program: every program
# reads 4 * SEQ_BLOCK bytes (from L2) before its tile. "auto" takes it up to 512 sequences (2 KB,
# the default static buckets hold at most 256); an explicit grid="packed" up to 4096.
_MAX_PACKED_SEQS = 4096
_AUTO_PACKED_SEQS = 512


def _packed_is_smaller(max_seqlen_q: int, n_q: int, num_seqs: int, block_m: int = 64) -> bool:
    """Whether "auto" takes the packed grid: it launches fewer programs than the per-sequence one
    (both counted with their padding programs, at the smallest BLOCK_M of the tuning space; the
    ratio barely depends on it), and the sequence search stays small."""
    if num_seqs > _AUTO_PACKED_SEQS or num_seqs == 0:
        return False
    per_sequence = triton.cdiv(max_seqlen_q, block_m) * (num_seqs + 1)
    packed = 2 * (triton.cdiv(n_q, block_m) + num_seqs)
    return packed < per_sequence


def _host_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected a host int, got {type(value).__name__} "
                         "(never a device tensor: the grid is sized on the host)")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, max_seqlen_q: int, *,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None,
                     num_seqs: int | None = None, scale: float | None = None,
                     softcap: float = 0.0, out: torch.Tensor | None = None,
                     grid: str = "auto", split_head_dim: bool | None = None) -> torch.Tensor:
    """Full (non-causal) attention within each sequence of a packed batch.

    Parameters
    ----------
    q : (Nq, H, D) fp32, fp16 or bf16
        Queries. Any row and head strides (e.g. ``qkv[:, 0]`` of a (N, 3, H, D) tensor, read in
        place), unit last stride. D is a multiple of 8 in [8, 128] (72 runs as 64 + 8).
    k, v : (Nk, H, D), same dtype and device as q
        Keys and values, same stride rules.
    cu_seqlens_q : (cap + 1,) int32, on q's device
        Query offsets: sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``. Non-decreasing,
        within [0, Nq]. A fixed-capacity buffer: entries past the live sequences repeat the last
        value (empty sequences).
    max_seqlen_q : host int >= 1
        A bound >= the longest query sequence (e.g. a bucket); it sizes the grid (query rows past
        it would be left unwritten). It is never read from the device, so the call can be
        captured in a CUDA graph.
    cu_seqlens_k : (cap + 1,) int32, optional
        Key/value offsets (default: cu_seqlens_q, i.e. self-attention). Lengths may differ from
        the query lengths (queries are the current tokens, keys include cached ones).
    max_seqlen_k : host int >= 1, optional
        Bound on the key lengths (default max_seqlen_q). A tuning hint only: the kernel loops over
        each sequence's real key length.
    num_seqs : host int, optional
        Sequences to run, 0 <= num_seqs <= cap (default cap). Empty ones cost one exiting program.
    scale : float, optional
        Score scale (default 1/sqrt(D)).
    softcap : float
        If > 0, scores become ``softcap * tanh(scale * q.k / softcap)`` (flash-attn semantics: the
        cap applies after the scale; the GS decoder uses 30). 0 disables it.
    out : (Nq, H, D) tensor of q's dtype, optional
        Output buffer (unit last stride); allocated contiguous if None. Must not alias q, k, v.
    grid : "auto", "per_sequence" or "packed"
        How programs map to query tiles. "per_sequence": cdiv(max_seqlen_q, BLOCK_M) programs per
        sequence (best when max_seqlen_q is the real longest length). "packed": about
        cdiv(Nq, BLOCK_M) + num_seqs programs in all, each finding its sequence in cu_seqlens_q on
        the device (best when max_seqlen_q is only a capacity, as in a static bucket: 64 images of
        256 tokens in a 16384-token bucket launch 640 programs per head, padding programs
        included, instead of 16640). "auto" picks the one with fewer programs (the packed grid
        up to 512 sequences; an explicit "packed" takes up to 4096).
    split_head_dim : bool, optional
        Run a head dim that is not a power of two as two dot pieces (72 = 64 + 16: 80 columns of
        work instead of 128). Default: on for fp32 and under the interpreter, off for fp16/bf16
        on a GPU (Triton 3.6 miscompiles the split there; see the comment in the body).

    Returns
    -------
    (Nq, H, D) tensor of q's dtype: softmax in fp32 (exp2 with log2(e) folded into the scale),
    fp32 accumulation, rounded once. Every row is written: rows outside
    ``cu_seqlens_q[0]:cu_seqlens_q[num_seqs]`` and rows of sequences with no keys are zero.

    On a GPU the first fp16/bf16 call for a new (D, dtype, softcap, length bucket) autotunes: run
    it once before capturing a CUDA graph.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dims=3, dtypes=FLOAT_DTYPES)
    n_q, n_heads, head_dim = q.shape
    n_k = k.shape[0]
    check_tensor("k", k, shape=(None, n_heads, head_dim))
    check_tensor("v", v, shape=(n_k, n_heads, head_dim))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= 128:
        raise ValueError(f"q: head dim must be a multiple of 8 in [8, 128], got {head_dim}")
    if n_heads < 1 or n_heads > _MAX_GRID_YZ:
        raise ValueError(f"q: number of heads must be in [1, {_MAX_GRID_YZ}], got {n_heads}")
    device = q.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_active()):
        raise ValueError(f"q: on {device}; Triton needs a CUDA tensor (or CPU tensors with "
                         "TRITON_INTERPRET=1)")
    check_tensor("cu_seqlens_q", cu_seqlens_q, dims=1, dtypes=(torch.int32,), device=device)
    cap = cu_seqlens_q.numel() - 1
    if cap < 1:
        raise ValueError(f"cu_seqlens_q: needs at least 2 entries, got {cu_seqlens_q.numel()}")
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    check_tensor("cu_seqlens_k", cu_seqlens_k, shape=(cap + 1,), dtypes=(torch.int32,),
                 device=device)
    max_seqlen_q = _host_int("max_seqlen_q", max_seqlen_q, 1)
    max_seqlen_k = max_seqlen_q if max_seqlen_k is None else _host_int("max_seqlen_k",
                                                                       max_seqlen_k, 1)
    num_seqs = cap if num_seqs is None else _host_int("num_seqs", num_seqs, 0)
    if num_seqs > cap:
        raise ValueError(f"num_seqs: {num_seqs} exceeds the capacity of cu_seqlens_q ({cap})")
    if num_seqs + 1 > _MAX_GRID_YZ:
        raise ValueError(f"num_seqs: at most {_MAX_GRID_YZ - 1} sequences per launch, "
                         f"got {num_seqs}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap: expected a finite float >= 0, got {softcap!r}")
    if out is None:
        out = torch.empty((n_q, n_heads, head_dim), dtype=q.dtype, device=device)
    else:
        check_tensor("out", out, shape=(n_q, n_heads, head_dim), dtypes=(q.dtype,))
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      out=out)
    if n_q == 0:
        return out

    if grid not in ("auto", "per_sequence", "packed"):
        raise ValueError(f"grid: expected 'auto', 'per_sequence' or 'packed', got {grid!r}")
    if grid == "packed" and num_seqs > _MAX_PACKED_SEQS:
        raise ValueError(f"grid: 'packed' takes at most {_MAX_PACKED_SEQS} sequences, got "
                         f"{num_seqs}")
    packed = grid == "packed" or (grid == "auto" and _packed_is_smaller(max_seqlen_q, n_q,
                                                                         num_seqs))

    # Split head dim (72 as 64 + 16) only where it is known to compile correctly: fp32, and the
    # CPU interpreter. Triton 3.6 on sm_90 miscompiles the split in fp16/bf16 (two dot pieces per
    # tile): wrong rows and illegal shared-memory accesses whenever a masked key tile runs, for
    # every tuning config (measured on an H200, bench/results/2026-12-04-h200-attention-diag.md;
    # the fault class of triton-lang/triton #10486/#11366). One padded 128-wide piece passed every
    # case there, in every config.
    split = _SPLIT_16BIT or q.dtype == torch.float32 or device.type == "cpu"
    if split_head_dim is not None:
        split = bool(split_head_dim)
    block_d0, block_d1 = _split_head_dim(head_dim) if split else (max(16, next_pow2(head_dim)), 0)
    use_softcap = softcap > 0
    if use_softcap:
        qk_scale, softcap_log2e = float(scale) / softcap, softcap * _LOG2E
    else:
        qk_scale, softcap_log2e = float(scale) * _LOG2E, 1.0
    args = (q, k, v, out, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            n_q, n_k, num_seqs, qk_scale, softcap_log2e,
            _bucket(max_seqlen_q), _bucket(max_seqlen_k))
    meta = dict(HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=max(block_d1, 16),
                SPLIT_D=block_d1 > 0, SOFTCAP=use_softcap,
                ALIGN=_stride_align((q, k, v, out), q.element_size()),
                # fp32 inputs: 3xTF32 tensor-core products, fp32-accurate (plain tf32, the default,
                # keeps only 10 mantissa bits; "ieee" runs on CUDA cores and spills).
                INPUT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
                PACKED_GRID=packed, SEQ_BLOCK=next_pow2(max(num_seqs, 1)) if packed else 1)

    def grid_of(m):
        if packed:
            return (triton.cdiv(n_q, m["BLOCK_M"]) + num_seqs, 2, n_heads)
        return (triton.cdiv(max_seqlen_q, m["BLOCK_M"]), num_seqs + 1, n_heads)

    if device.type == "cpu":
        block_m, block_n = _interpreter_blocks()
        _varlen_attention_kernel[grid_of({"BLOCK_M": block_m})](*args, **meta, BLOCK_M=block_m,
                                                                 BLOCK_N=block_n)
        return out

    # The device guard makes Triton launch on q's GPU, not the current one.
    with torch.cuda.device(device):
        if q.dtype == torch.float32:
            block_m, block_n, warps, stages = _FP32_CONFIG
            _varlen_attention_kernel[grid_of](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n,
                                              num_warps=warps, num_stages=stages)
        else:
            _gpu_kernel()[grid_of](*args, **meta)
    return out


__all__ = ["varlen_attention"]
