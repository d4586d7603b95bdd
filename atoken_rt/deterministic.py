"""Batch-invariant ops: a sample's outputs do not depend on what it is batched with.

``Session(..., deterministic=True)`` swaps the session's op set for one of the classes below
and its MAP head for :class:`BatchInvariantMAPHead`. Every op then computes each row with a
reduction order that depends only on that row (and its own attention sequence), never on the
number of rows in the call, the bucket, or the row's position:

* GEMMs (``linear``, ``linear_gelu``). The CPU BLAS and cuBLAS pick kernels by the problem's
  M: on the dev machine an fp32 ``addmm`` of [M, 1152] x [1152, 3456] gives different bits
  for every M < 256 than for M = 600. Torch ops: the rows are cut into tiles of exactly
  :data:`ROW_TILE` rows, copied into one aligned scratch buffer (the tail tile zero-padded),
  and every tile is one GEMM of the same shape, so a row's bits depend only on the row (tested
  at every offset). Triton ops: one Triton GEMM with fixed tiles (BLOCK_M/N/K, warps, stages
  that never depend on M; no split-K): every output tile runs the same K loop.
* Attention: one call per sequence (torch: SDPA on ``[1, H, L, D]``; Triton: the varlen
  kernel with one fixed tile config instead of the autotuned, length-keyed choice). The official
  padded batching of :func:`atoken_rt.reference.varlen_attention` pads every sequence to the
  batch's longest and takes a different code path when all lengths agree; neither is allowed
  here.
* The MAP head's key/value GEMM and its pooling attention go through the same ops (the default
  head calls ``nn.Linear`` directly on all rows of the batch).
* Norms, RoPE, GELU and FSQ are row-wise already (one row's reduction never sees another row;
  the Triton kernels' tile configs depend on widths only).

Cost: on the CPU the tiles are within ~1.0-1.3x of one large GEMM (``bench/bench_tokenize.py``
reports the whole encode); attention loses the batched SDPA call. Numerics stay those of the
reference (same rounding points); only summation orders change, so results stay within the
fixture bounds but are not bit-equal to ``deterministic=False``.

"From run to run": on one machine with the same torch/Triton build and the same CPU thread
count (``torch.get_num_threads()``), fresh processes give the same bits (tested in a
subprocess). Different machines or thread counts may differ in the last bit.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .backends import TritonOps
from .model import MAPHead, TorchOps
from .packing import SequencePlan

ROW_TILE = 256  # rows per GEMM tile on the torch path (CPU: 1.0-1.3x of one large GEMM)


# PyTorch's CPU element-wise kernels run a vectorised loop over each thread's chunk and a scalar
# loop over its last few elements; for GELU, cos, sin and complex products the two loops round
# differently (measured: gelu of a [1, 304] row differs from the same row inside [2, 304] in 4
# elements). So an element's bits depend on where the chunk boundaries fall, i.e. on the batch.
# The fix: run those ops on tensors whose every thread chunk is a whole number of vector steps
# (:func:`_vector_safe_numel`), so every element takes the vectorised loop.
_GRAIN = 32768       # at::internal::GRAIN_SIZE: elements per thread chunk of an element-wise op
_VECTOR_STEP = 256   # a multiple of 2 x the widest CPU vector (AVX-512: 2 x 16 fp32, 2 x 32 bf16)


def _vector_safe_numel(e: int, threads: int | None = None) -> int:
    """The smallest E' >= e for which every thread chunk of an element-wise op over E' contiguous
    elements (at::parallel_for: min(threads, ceil(E'/GRAIN)) chunks of ceil(E'/chunks)) is a
    multiple of _VECTOR_STEP."""
    threads = torch.get_num_threads() if threads is None else threads
    e2 = -(-max(e, 1) // _VECTOR_STEP) * _VECTOR_STEP
    while True:
        chunks = 1 if (e2 <= _GRAIN or threads <= 1) else min(threads, -(-e2 // _GRAIN))
        if (-(-e2 // chunks)) % _VECTOR_STEP == 0:
            return e2
        e2 += _VECTOR_STEP


def _padded_rows(n: int, width: int) -> int:
    """The smallest n' >= n such that n' x width elements are vector-safe."""
    n2 = max(n, 1)
    while _vector_safe_numel(n2 * width) != n2 * width:
        n2 += 1
    return n2


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] -> a contiguous [rows, ...] copy (rows >= n), zero rows appended."""
    out = x.new_zeros((rows, *x.shape[1:]))
    out[:x.shape[0]].copy_(x)
    return out


class DeterministicTorchOps(TorchOps):
    """:class:`~atoken_rt.model.TorchOps` with batch-invariant GEMMs, element-wise ops and
    attention (see the module docstring)."""

    name = "torch-deterministic"

    def __init__(self, row_tile: int = ROW_TILE):
        super().__init__()
        if row_tile < 1:
            raise ValueError(f"row_tile must be >= 1, got {row_tile}")
        self.row_tile = int(row_tile)

    def _tile_buffers(self, k: int, n: int, dtype, device):
        """The fixed [R', K] input and [R', N] output tiles (one pair per shape and device);
        R' >= ROW_TILE is the row count that makes the output tile vector-safe on the CPU."""
        if device.type != "cpu":
            r = self.row_tile
            return (torch.empty((r, k), dtype=dtype, device=device),
                    torch.empty((r, n), dtype=dtype, device=device))
        r = _padded_rows(self.row_tile, n)
        return (self._scratch(("tile_in", r, k, dtype), (r, k), dtype),
                self._scratch(("tile_out", r, n, dtype), (r, n), dtype))

    def _tiled(self, x: torch.Tensor, lin: nn.Linear, scratch: str | None, gelu: bool
               ) -> torch.Tensor:
        """x [M, in] -> round(x W^T + b) [M, out] (then GELU), one fixed-shape tile at a time."""
        m, k = x.shape
        n = lin.out_features
        if scratch is not None and x.device.type == "cpu":
            out = self._scratch(scratch, (m, n), x.dtype)
        else:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m == 0:
            return out
        a, o = self._tile_buffers(k, n, x.dtype, x.device)
        r = a.shape[0]
        wt = lin.weight.t()
        for lo in range(0, m, r):
            rows = min(r, m - lo)
            a[:rows].copy_(x[lo:lo + rows])
            if rows < r:
                a[rows:].zero_()  # padding rows never reach a real row; zeros keep them finite
            if lin.bias is None:
                torch.mm(a, wt, out=o)
            else:
                torch.addmm(lin.bias, a, wt, out=o)
            y = ref.gelu_tanh_(o) if gelu else o  # on the whole (vector-safe) tile
            out[lo:lo + rows].copy_(y[:rows])
        return out

    def linear(self, x: torch.Tensor, lin: nn.Linear, scratch: str | None = None) -> torch.Tensor:
        """x [M, in] -> round(x W^T + b) [M, out], computed ROW_TILE rows at a time."""
        if x.dim() != 2:
            return F.linear(x, lin.weight, lin.bias)
        return self._tiled(x, lin, scratch, gelu=False)

    def linear_gelu(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        return self._tiled(x, lin, "fc1", gelu=True)

    def qkv_rope(self, qkv: torch.Tensor, plan: SequencePlan, q_gamma=None, k_gamma=None):
        """As TorchOps, with cos/sin computed on vector-safe rows and the rotation written with
        real products (each an exactly rounded multiply or add, equal in both CPU loops)."""
        n, _, h, d = qkv.shape
        dev = qkv.device

        def build():
            ang = ref.rope_angles(plan.tensor("positions", dev), d)
            if dev.type == "cpu":
                ang = _pad_rows(ang, _padded_rows(n, ang.shape[1]))
            return torch.cos(ang)[:n], torch.sin(ang)[:n]

        cos, sin = plan.cached(("rope-deterministic", d, str(dev)), build)
        q, k, v = qkv.unbind(1)
        if q_gamma is not None:
            q, k = ref.qk_l2_norm(q, q_gamma), ref.qk_l2_norm(k, k_gamma)
        return ref.apply_rope_real(q, cos, sin), ref.apply_rope_real(k, cos, sin), v

    def fsq(self, z: torch.Tensor, levels, num_codebooks: int):
        """FSQ on vector-safe rows (its tanh is an element-wise op over all of z)."""
        n = z.shape[0]
        if z.device.type != "cpu" or n == 0:
            return ref.fsq_quantize(z, levels, num_codebooks)
        codes, idx = ref.fsq_quantize(_pad_rows(z, _padded_rows(n, z.shape[1])), levels,
                                      num_codebooks)
        return codes[:n], idx[:n]

    def attention(self, q, k, v, plan: SequencePlan):
        """Full attention per sequence, one SDPA call each ([1, H, L, D], fp32 on the CPU)."""
        if getattr(plan, "device_only", False) and q.device.type == "cuda":
            raise ValueError("deterministic torch attention reads the sequence lengths on the "
                             "host: not capturable (use backend='triton' with graphs on CUDA)")
        cu = np.asarray(plan.cu_seqlens, dtype=np.int64)
        return _per_sequence_attention(q, k, v, cu, cu)

    def pool_attention(self, q, k, v, sample_offsets: np.ndarray):
        """MAP-head pooling: query row b attends over key rows of sample b ([B, H, D])."""
        cu_q = np.arange(q.shape[0] + 1, dtype=np.int64)
        return _per_sequence_attention(q, k, v, cu_q, np.asarray(sample_offsets, np.int64))


def _per_sequence_attention(q, k, v, cu_q: np.ndarray, cu_k: np.ndarray) -> torch.Tensor:
    """Attention of q rows cu_q[s]:cu_q[s+1] over k/v rows cu_k[s]:cu_k[s+1], one call per
    sequence; rows outside every sequence are zero. Softmax and accumulation in fp32 on the CPU
    (as the reference), the model dtype's fused kernel on CUDA; output rounded once."""
    cdt = torch.float32 if q.device.type == "cpu" else q.dtype
    out = q.new_zeros(q.shape)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for s in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if b <= a or e <= c:
            continue
        qs = q[a:b].to(cdt).transpose(0, 1)[None]
        ks = k[c:e].to(cdt).transpose(0, 1)[None]
        vs = v[c:e].to(cdt).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[a:b] = o[0].transpose(0, 1).to(q.dtype)
    return out


# ------------------------------------------------------------------------------------------------
# Triton: fixed tile configs
# ------------------------------------------------------------------------------------------------

def _gemm_config(dtype: torch.dtype) -> dict:
    """One GEMM tile config per dtype, never per M (the default launcher switches to 64-row
    tiles for M <= 64, which changes the instruction shapes and thus the bits)."""
    from .kernels._utils import interpreter_active
    if interpreter_active():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _attention_config(dtype: torch.dtype, device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), fixed: the first config of the autotune space
    for fp16/bf16 (fastest at 256-token sequences on an H200, within 5% at 4096), the fixed fp32
    config, or the interpreter's tiles."""
    from .kernels import attention as att
    if device.type == "cpu":
        bm, bn = att._interpreter_blocks()
        return bm, bn, 4, 1
    if dtype == torch.float32:
        return att._FP32_CONFIG
    return att._GPU_CONFIGS[0]


class DeterministicTritonOps(TritonOps):
    """:class:`~atoken_rt.backends.TritonOps` with fixed-config GEMMs and attention.

    Every Linear (with or without the GELU epilogue) is the project's Triton GEMM
    (``kernels/epilogue.py``) launched with :func:`_gemm_config`; attention is the varlen kernel
    with :func:`_attention_config`. Norms, RoPE and FSQ are the default kernels (their configs
    depend on the row width only).
    """

    name = "triton-deterministic"

    def __init__(self):
        super().__init__(epilogue="triton")
        self._zero: dict = {}

    def _gemm(self, x: torch.Tensor, lin: nn.Linear, gelu: bool) -> torch.Tensor:
        epi = self._epi
        x = x if x.stride(-1) == 1 else x.contiguous()
        m, k = x.shape
        n = lin.out_features
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m == 0:
            return out
        cfg = _gemm_config(x.dtype)
        w, bias = lin.weight, lin.bias
        # A plain Linear is the residual epilogue with a residual of 0 read through zero strides
        # (one cached element): round(0 + h) = h, and the kernel is the same tested one.
        key = (x.dtype, str(x.device))
        zero = self._zero.get(key)
        if zero is None:
            with torch.inference_mode(False):
                zero = self._zero[key] = torch.zeros(1, dtype=x.dtype, device=x.device)
        res = out if gelu else zero
        rs = (res.stride(0), res.stride(1)) if gelu else (0, 0)
        grid = (epi.triton.cdiv(m, cfg["BLOCK_M"]) * epi.triton.cdiv(n, cfg["BLOCK_N"]),)
        with torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext():
            epi._linear_epilogue_kernel[grid](
                x, w, bias if bias is not None else w, res, out,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), rs[0], rs[1],
                out.stride(0), out.stride(1), m, n, k,
                HAS_BIAS=bias is not None, EPILOGUE=epi._GELU if gelu else epi._RESIDUAL,
                IEEE_FP32=x.dtype == torch.float32, **cfg)
        return out

    def linear(self, x: torch.Tensor, lin: nn.Linear, scratch: str | None = None) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, lin.weight, lin.bias)
        return self._gemm(x, lin, gelu=False)

    def linear_gelu(self, x: torch.Tensor, lin) -> torch.Tensor:
        return self._gemm(x, lin, gelu=True)

    def _varlen(self, q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
                ) -> torch.Tensor:
        """The varlen attention kernel at a fixed tile config (same arguments as
        ``kernels.attention.varlen_attention``, self- or cross-attention, no softcap)."""
        att = self._attention
        n_q, heads, d = q.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if n_q == 0:
            return out
        num_seqs = cu_q.numel() - 1
        split = q.dtype == torch.float32 or q.device.type == "cpu"  # as the default launcher
        d0, d1 = att._split_head_dim(d) if split else (max(16, att.next_pow2(d)), 0)
        bm, bn, warps, stages = _attention_config(q.dtype, q.device)
        packed = att._packed_is_smaller(max_q, n_q, num_seqs, bm)
        grid = ((att.triton.cdiv(n_q, bm) + num_seqs, 2, heads) if packed
                else (att.triton.cdiv(max_q, bm), num_seqs + 1, heads))
        scale = 1.0 / math.sqrt(d)
        kw = {} if q.device.type == "cpu" else dict(num_warps=warps, num_stages=stages)
        with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
            att._varlen_attention_kernel[grid](
                q, k, v, out, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), n_q, k.shape[0], num_seqs, scale * att._LOG2E, 1.0,
                64, 64,  # autotune-key arguments, unused by the kernel: constant
                HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=max(d1, 16), SPLIT_D=d1 > 0, SOFTCAP=False,
                ALIGN=att._stride_align((q, k, v, out), q.element_size()),
                INPUT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
                PACKED_GRID=packed, SEQ_BLOCK=att.next_pow2(max(num_seqs, 1)) if packed else 1,
                BLOCK_M=bm, BLOCK_N=bn, **kw)
        return out

    def attention(self, q, k, v, plan: SequencePlan):
        cu = plan.tensor("cu_seqlens", q.device)
        return self._varlen(q, k, v, cu, cu, plan.max_seqlen, plan.max_seqlen)

    def pool_attention(self, q, k, v, sample_offsets: np.ndarray):
        b = q.shape[0]
        dev = q.device
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
        offs = np.asarray(sample_offsets, dtype=np.int64)
        cu_k = torch.from_numpy(offs.astype(np.int32)).to(dev)
        return self._varlen(q.contiguous(), k, v, cu_q, cu_k, 1, max(1, int(np.diff(offs).max())))


class BatchInvariantMAPHead(MAPHead):
    """The MAP head with its key/value GEMM and pooling attention batch-invariant (through the
    session's deterministic ops). Shares the parameters (and state-dict names) of ``head``."""

    def __init__(self, head: MAPHead):
        nn.Module.__init__(self)
        self.heads = head.heads
        self.probe = head.probe
        self.attention = head.attention
        self.layernorm = head.layernorm
        self.mlp = head.mlp

    def forward(self, feats: torch.Tensor, sample_offsets: np.ndarray, ops=None):
        """feats: [N, C] post-LN encoder output, samples contiguous -> [B, C] (not normalised)."""
        n, c = feats.shape
        b = len(sample_offsets) - 1
        d = c // self.heads
        # One probe row: the same [1, C] GEMM for every batch.
        q = self.attention.to_q(self.probe[None]).view(1, self.heads, d).expand(b, -1, -1)
        kv = ops.linear(feats, self.attention.to_kv).view(n, 2, self.heads, d)
        a = ops.pool_attention(q.contiguous(), kv[:, 0], kv[:, 1], sample_offsets)
        a = ops.linear(a.reshape(b, c), self.attention.to_out)
        return a + self.mlp(self.layernorm(a, ops), ops)

    def forward_static(self, *args, **kw):  # pragma: no cover - the session never calls it
        raise RuntimeError("the batch-invariant MAP head runs outside the static buckets")


def make_deterministic(session) -> None:
    """Switch a freshly built :class:`~atoken_rt.Session` to batch-invariant ops and MAP head
    (``Session(..., deterministic=True)`` calls this). ValueError for combinations that cannot
    be both captured and invariant."""
    if session.backend == "triton":
        session.ops = DeterministicTritonOps()
    else:
        if session.graphs_active:
            raise ValueError("deterministic=True with CUDA graphs needs backend='triton' (the "
                             "torch backend's capturable attention is one masked pass over the "
                             "whole bucket, not one call per sequence)")
        session.ops = DeterministicTorchOps()
    head = session.model.encoder.head
    if not isinstance(head, BatchInvariantMAPHead):
        session.model.encoder.head = BatchInvariantMAPHead(head)


__all__ = ["DeterministicTorchOps", "DeterministicTritonOps", "BatchInvariantMAPHead",
           "make_deterministic", "ROW_TILE"]
