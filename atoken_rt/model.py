"""The AToken autoencoder as plain torch modules, with the official state-dict names.

Pure model code: no batching, no I/O. Every forward takes packed tokens ``[N, ...]`` plus a
:class:`~atoken_rt.packing.SequencePlan` that says which rows form one attention sequence.
Numerics follow ATOKEN_SPEC §3-§8 and the rounding points of §10.5 (see :mod:`atoken_rt.reference`).

Module tree (matches ``keys-atoken-soc.txt``)::

    encoder.pos_embedder.position_embedding, encoder.input_layer, encoder.blocks.{i}.{norm1, norm2,
    attn.to_qkv, attn.to_out, mlp.mlp.0, mlp.mlp.2}, encoder.post_layernorm, encoder.head.{probe,
    attention.{to_q, to_kv, to_out}, layernorm, mlp.mlp.0, mlp.mlp.2}, proj,
    decoder.pos_embedder.position_embedding, decoder.input_layer, decoder.blocks.{i}.{norm1, norm2,
    attn.{to_qkv, q_rms_norm.gamma, k_rms_norm.gamma, to_out}, mlp.mlp.0, mlp.mlp.2},
    decoder.out_norm, decoder.out_layer
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .caches import LRUCache
from .config import ATokenConfig, TowerConfig
from .packing import SequencePlan

PE_GRID = 16  # the learned table is 16 x 16 (SigLIP2 So400M/16 at 256 px)
# Resized position tables kept per tower (LRU): a service sees few grid shapes in steady state,
# but one fed arbitrary sizes must not keep one table per shape ever seen. 256 MiB holds the
# largest table Limits allow by default (65536 x 1152 fp32 = 302 MB is not kept; bf16 is) or
# dozens of typical ones (a 512^2 image's 1024 x 1152 bf16 table is 2.4 MB).
PE_CACHE_ENTRIES = 64
PE_CACHE_BYTES = 256 << 20
# CPU GEMM scratch buffers larger than this are not kept between calls (a 65536-token batch's
# fc1 output alone is 1.1 GB in fp32: kept, it would pin the high-water mark forever).
WORKSPACE_MAX_BYTES = 64 << 20
# Static (bucketed) attention off CUDA: score elements per query block (256 MB in fp32).
STATIC_ATTENTION_SCORE_ELEMS = 1 << 26


class TorchOps:
    """The op set a tower calls: the torch reference. ``backend="triton"`` swaps in kernels
    (:class:`atoken_rt.backends.TritonOps`) behind the same methods.

    The ops are shaped for fusion: the residual add rides in the next norm (``add_norm``), the
    GELU in the fc1 epilogue (``linear_gelu``), QK-norm + RoPE in one pass over q and k
    (``qkv_rope``). Rounding points are the reference's in every case (spec §10.5).
    """

    name = "torch"

    def __init__(self):
        # CPU only: reusable output buffers for the per-layer GEMMs whose result dies within the
        # layer (role -> tensor). A fresh multi-MB tensor per GEMM costs ~6 ms of first-touch
        # page faults on these 2-core VMs (profiled: the bias copy inside addmm into a new
        # [256, 3456] or [256, 4304] tensor), ~0.3 s per tower; CUDA's caching allocator needs no
        # help and captured graphs must not see these buffers.
        self._workspace: dict = {}

    def _scratch(self, role: str, shape, dtype) -> torch.Tensor:
        buf = self._workspace.get(role)
        if math.prod(shape) * dtype.itemsize > WORKSPACE_MAX_BYTES:
            self._workspace.pop(role, None)
            return torch.empty(shape, dtype=dtype)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            # A normal tensor even when the first call runs under the caller's inference_mode:
            # an inference tensor could not be written by later calls outside it.
            with torch.inference_mode(False):
                buf = self._workspace[role] = torch.empty(shape, dtype=dtype)
        return buf

    def linear(self, x: torch.Tensor, lin: nn.Linear, scratch: str | None = None) -> torch.Tensor:
        """x [N, in] -> round(x W^T + b) [N, out].

        scratch: a role name ("qkv", "out", "fc1", "fc2") for outputs the caller consumes before
        the next call with that role; on CPU they are written into a reused buffer.
        """
        if scratch is None or x.device.type != "cpu" or x.dim() != 2:
            return F.linear(x, lin.weight, lin.bias)
        buf = self._scratch(scratch, (x.shape[0], lin.out_features), x.dtype)
        if lin.bias is None:
            return torch.mm(x, lin.weight.t(), out=buf)
        return torch.addmm(lin.bias, x, lin.weight.t(), out=buf)

    def linear_gelu(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """gelu_tanh(round(x W^T + b)), GELU in fp32, rounded once (on CPU into the "fc1"
        scratch buffer: the MLP consumes it at once)."""
        return ref.gelu_tanh_(self.linear(x, lin, scratch="fc1"))

    @staticmethod
    def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: "Norm"):
        """(x', norm(x')) with x' = round(x + delta) (or x when delta is None)."""
        if delta is not None:
            x = x + delta
        if norm.rms:
            return x, ref.rms_norm32(x, norm.weight, norm.eps)
        return x, ref.layer_norm32(x, norm.weight, norm.bias, norm.eps)

    def qkv_rope(self, qkv: torch.Tensor, plan: SequencePlan, q_gamma=None, k_gamma=None):
        """qkv [N, 3, H, D] -> (q, k, v) [N, H, D] each: optional QK-norm, then 4D RoPE on q, k."""
        cos, sin = rope_for(plan, qkv.shape[-1], qkv.device)
        if q_gamma is not None:
            q, k, v = qkv.unbind(1)
            q = ref.apply_rope(ref.qk_l2_norm(q, q_gamma), cos, sin)
            k = ref.apply_rope(ref.qk_l2_norm(k, k_gamma), cos, sin)
            return q, k, v
        qk = qkv[:, :2]  # rotate q and k in one pass
        if qkv.device.type == "cpu" and qkv.dtype == torch.float32:
            # ref.apply_rope's complex product, written into a reused buffer (see __init__).
            n, _, h, d = qkv.shape
            phases = torch.complex(cos, sin).reshape(n, 1, 1, d // 2)
            buf = self._scratch("rope", (n, 2, h, d // 2), torch.complex64)
            torch.mul(torch.view_as_complex(qk.reshape(n, 2, h, d // 2, 2)), phases, out=buf)
            rot = torch.view_as_real(buf).reshape(n, 2, h, d)
        else:
            rot = ref.apply_rope(qk, cos, sin)
        return rot[:, 0], rot[:, 1], qkv[:, 2]

    @staticmethod
    def attention(q, k, v, plan: SequencePlan):
        """Full attention within each planned sequence: [N, H, D] -> [N, H, D]."""
        if getattr(plan, "device_only", False):  # static plans: capturable, reads no host data
            # On CPU in query blocks (scores of at most 2^26 elements at a time): the dense
            # [heads, bucket, bucket] scores of a 32768-token bucket would be 69 GB in fp32.
            # (CUDA: one call; its SDPA kernels do not materialise the scores.)
            block = None if q.device.type == "cuda" else STATIC_ATTENTION_SCORE_ELEMS
            return ref.varlen_attention_masked(q, k, v, plan.tensor("cu_seqlens", q.device),
                                               max_score_elems=block)
        # The padded gather layout depends only on the plan: built once, reused by every layer.
        cu = plan.cu_seqlens
        layout = plan.cached(("attn_layout", q.shape[1], str(q.device)), lambda: ref.padded_layout(
            cu, cu, q.shape[0], k.shape[0], q.shape[1], q.device))
        return ref.varlen_attention(q, k, v, cu, layout=layout)

    @staticmethod
    def fsq(z: torch.Tensor, levels, num_codebooks: int):
        """FSQ codes (z.dtype) and int32 indices of z [N, C*d]."""
        return ref.fsq_quantize(z, levels, num_codebooks)


TORCH_OPS = TorchOps()


class Norm(nn.Module):
    """LayerNorm32 (weight + bias, encoder) or RMSNorm32 (weight only, decoder); eps 1e-6."""

    def __init__(self, width: int, rms: bool, eps: float = 1e-6):
        super().__init__()
        self.rms = rms
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        if not rms:
            self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, ops=TORCH_OPS) -> torch.Tensor:
        return ops.add_norm(x, None, self)[1]


class HeadNorm(nn.Module):
    """Per-head QK normalisation parameter holder (``gamma [H, D]``)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))


class MLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2; named ``mlp.mlp.0`` / ``mlp.mlp.2`` as in the checkpoints."""

    def __init__(self, width: int, hidden: int, bias: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=bias), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width, bias=bias))
        self.scratch: str | None = None  # "fc2" inside blocks (the output is consumed at once)

    def forward(self, x: torch.Tensor, ops=TORCH_OPS) -> torch.Tensor:
        fc1, _, fc2 = self.mlp
        return ops.linear(ops.linear_gelu(x, fc1), fc2, scratch=self.scratch)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 4D RoPE (and the decoder's QK normalisation)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.use_bias)
        if cfg.qk_rms_norm:
            self.q_rms_norm = HeadNorm(cfg.num_heads, cfg.head_dim)
            self.k_rms_norm = HeadNorm(cfg.num_heads, cfg.head_dim)
        self.qk_norm = cfg.qk_rms_norm
        self.to_out = nn.Linear(cfg.width, cfg.width, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, plan: SequencePlan, ops=TORCH_OPS):
        """x [N, C] (normed) -> to_out(attention) [N, C]."""
        n = x.shape[0]
        qkv = ops.linear(x, self.to_qkv, scratch="qkv").view(n, 3, self.heads, self.head_dim)
        # ^ [s][h][d] (spec §3.2); q, k, v die within this layer
        if self.qk_norm:
            q, k, v = ops.qkv_rope(qkv, plan, self.q_rms_norm.gamma, self.k_rms_norm.gamma)
        else:
            q, k, v = ops.qkv_rope(qkv, plan)
        o = ops.attention(q, k, v, plan)
        # The caller adds it to the residual stream at once (add_norm).
        return ops.linear(o.reshape(n, self.heads * self.head_dim), self.to_out, scratch="out")


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(Norm1(x)); x += MLP(Norm2(x)).

    :meth:`forward` takes the residual stream and the block's normed input (computed by the
    previous ``add_norm``) and returns the new residual stream and the MLP output still to add.
    """

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.norm1 = Norm(cfg.width, cfg.use_rms_norm)
        self.norm2 = Norm(cfg.width, cfg.use_rms_norm)
        self.attn = SelfAttention(cfg)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.use_bias)
        self.mlp.scratch = "fc2"  # consumed by the next add_norm before the next block runs

    def forward(self, x, y, plan, ops=TORCH_OPS):
        x, y = ops.add_norm(x, self.attn(y, plan, ops), self.norm2)
        return x, self.mlp(y, ops)


class PositionTable(nn.Module):
    """Learned 2D absolute position table, resized per sequence grid (spec §5.2)."""

    def __init__(self, width: int):
        super().__init__()
        self.position_embedding = nn.Embedding(PE_GRID * PE_GRID, width)
        self._cache = LRUCache(PE_CACHE_ENTRIES, PE_CACHE_BYTES)

    def table(self, rows: int, cols: int) -> torch.Tensor:
        """The table resized to rows x cols: [rows*cols, C] in the weight's dtype, cached by grid
        shape in a bounded LRU (PE_CACHE_ENTRIES tables, PE_CACHE_BYTES; the weights never change
        after loading; :meth:`clear_cache` if they do)."""
        w = self.position_embedding.weight
        key = (rows, cols, w.dtype, w.device, w.data_ptr())
        return self._cache.get_or_build(
            key, lambda: ref.interpolate_pos_table(w, PE_GRID, rows, cols))

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, plan: SequencePlan) -> torch.Tensor:
        """Per-token embeddings [N, C] in sequence order."""
        tables = [self.table(r, c) for r, c in plan.pe_shapes]  # one per distinct grid shape
        full = tables[0] if len(tables) == 1 else torch.cat(tables)
        return full[plan.tensor("pe_rows", full.device)]


def rope_for(plan: SequencePlan, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim/2] fp32 for the plan's positions, computed once per plan."""
    return plan.cached(("rope", head_dim, str(device)), lambda: ref.rope_cos_sin(
        plan.tensor("positions", device), head_dim))


class Tower(nn.Module):
    """Encoder or decoder body: input linear, + PE, blocks, final norm (and decoder out linear)."""

    def __init__(self, cfg: TowerConfig, in_ch: int, out_ch: int | None):
        super().__init__()
        self.cfg = cfg
        self.pos_embedder = PositionTable(cfg.width)
        self.input_layer = nn.Linear(in_ch, cfg.width, bias=cfg.use_bias)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        if out_ch is None:  # encoder
            self.post_layernorm = Norm(cfg.width, rms=False)
        else:
            self.out_norm = Norm(cfg.width, rms=cfg.use_rms_norm)
            self.out_layer = nn.Linear(cfg.width, out_ch, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, plan: SequencePlan, ops=TORCH_OPS) -> torch.Tensor:
        """x: [N, in_ch] in sequence order (model dtype) -> [N, width or out_ch]."""
        h = ops.linear(x, self.input_layer)
        h = h + plan.position_embeddings(self.pos_embedder).to(h.dtype)
        delta = None  # each block's last residual add is fused into the next norm
        for blk in self.blocks:
            h, y = ops.add_norm(h, delta, blk.norm1)
            h, delta = blk(h, y, plan, ops)
        final = self.post_layernorm if hasattr(self, "post_layernorm") else self.out_norm
        h, y = ops.add_norm(h, delta, final)
        return y if hasattr(self, "post_layernorm") else ops.linear(y, self.out_layer)


class MAPHead(nn.Module):
    """SigLIP attention-pooling head: one probe query attends over all tokens of a sample."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(width))
        self.attention = nn.Module()
        self.attention.to_q = nn.Linear(width, width)
        self.attention.to_kv = nn.Linear(width, 2 * width)
        self.attention.to_out = nn.Linear(width, width)
        self.layernorm = Norm(width, rms=False)
        self.mlp = MLP(width, mlp, bias=True)

    def forward(self, feats: torch.Tensor, sample_offsets: np.ndarray, ops=TORCH_OPS):
        """feats: [N, C] post-LN encoder output, samples contiguous -> [B, C] (not normalised)."""
        n, c = feats.shape
        b = len(sample_offsets) - 1
        d = c // self.heads
        q = ops.linear(self.probe[None], self.attention.to_q).view(1, self.heads, d).expand(b, -1, -1)
        kv = ops.linear(feats, self.attention.to_kv).view(n, 2, self.heads, d)
        cu_q = np.arange(b + 1)
        a = ref.varlen_attention(q.contiguous(), kv[:, 0], kv[:, 1], cu_q, sample_offsets)
        a = ops.linear(a.reshape(b, c), self.attention.to_out)
        return a + self.mlp(self.layernorm(a, ops), ops)

    def forward_static(self, feats: torch.Tensor, sample_cu: torch.Tensor, ops=TORCH_OPS):
        """Capturable form: feats [T, C] (rows past sample_cu[-1] are padding, any value),
        sample_cu [Sb+1] device int32 (trailing entries repeated) -> [Sb, C]; rows of empty
        sample slots are zero. Reads nothing on the host."""
        t, c = feats.shape
        sb = sample_cu.numel() - 1
        d = c // self.heads
        rows = torch.arange(t, device=feats.device, dtype=sample_cu.dtype)
        sample = torch.searchsorted(sample_cu[1:].contiguous(), rows, right=True)  # >= sb: pad
        mask = sample[None, :] == torch.arange(sb, device=feats.device)[:, None]   # [Sb, T]
        q = self.attention.to_q(self.probe[None]).view(1, self.heads, d).expand(sb, -1, -1)
        kv = self.attention.to_kv(feats).view(t, 2, self.heads, d)
        cdt = torch.float32 if feats.device.type == "cpu" else feats.dtype
        zero = torch.zeros((), dtype=cdt, device=feats.device)
        valid = (rows < sample_cu[-1])[:, None, None]
        k = torch.where(valid, kv[:, 0].to(cdt), zero).transpose(0, 1)[None]    # [1, H, T, D]
        v = torch.where(valid, kv[:, 1].to(cdt), zero).transpose(0, 1)[None]
        live = mask.any(-1)
        attn_mask = (mask | ~live[:, None])[None, None]  # empty slots see all keys, then zeroed
        o = F.scaled_dot_product_attention(q.to(cdt).transpose(0, 1)[None], k, v,
                                           attn_mask=attn_mask, scale=1.0 / math.sqrt(d))
        o = torch.where(live[:, None, None], o[0].transpose(0, 1), zero).to(feats.dtype)
        a = ops.linear(o.reshape(sb, c), self.attention.to_out)
        return a + self.mlp(self.layernorm(a, ops), ops)


class AToken(nn.Module):
    """The autoencoder: ``encoder`` (+ ``encoder.head``), ``proj``, ``decoder``."""

    def __init__(self, cfg: ATokenConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Tower(cfg.encoder, cfg.in_channels, None)
        e = cfg.encoder
        self.encoder.head = MAPHead(e.width, e.num_heads, e.mlp_width)
        self.proj = nn.Linear(e.width, 2 * cfg.latent_channels, bias=False)
        self.decoder = Tower(cfg.decoder, cfg.latent_channels, cfg.out_channels)

    def clear_caches(self) -> None:
        self.encoder.pos_embedder.clear_cache()
        self.decoder.pos_embedder.clear_cache()


def init_random_(model: nn.Module, seed: int = 0) -> None:
    """Seeded random weights for demos and benchmarks (not a trained model).

    Linear weights ~ N(0, 0.25/fan_in) so the residual stream stays O(1) through the stack; norm
    weights 1; biases, position tables and the probe ~ N(0, 0.02^2). Values are windows of one
    seeded 16M-entry normal pool at random offsets: drawing 846M fresh normals on a 2-core CPU
    takes ~15 s, the pool ~1 s, and GEMM speed does not depend on the values.
    """
    params = list(model.named_parameters())
    if not params:
        return
    dev = params[0][1].device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool_n = min(1 << 24, sum(p.numel() for _, p in params))
    pool = torch.randn(pool_n, generator=gen).to(dev)
    offsets = torch.randint(0, pool_n, (len(params),), generator=gen).tolist()
    with torch.no_grad():
        for (name, p), off in zip(params, offsets):
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "out_norm.weight",
                              "post_layernorm.weight", "gamma")):
                p.fill_(1.0)
                continue
            if p.dim() == 2 and "position_embedding" not in name:
                std = 0.5 / math.sqrt(p.shape[1])
            else:
                std = 0.02
            flat = p.view(-1)
            done = 0
            while done < flat.numel():  # a few windows per tensor (pool is 16M, tensors <= 13M)
                take = min(flat.numel() - done, pool_n - off)
                flat[done:done + take].copy_(pool[off:off + take]).mul_(std)
                done += take
                off = 0


__all__ = ["AToken", "Tower", "MAPHead", "TorchOps", "TORCH_OPS", "init_random_", "rope_for"]
