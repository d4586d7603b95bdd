"""The fast bf16 CPU op set: :class:`CpuOps`, a :class:`~atoken_rt.model.TorchOps` with the same
numerics contract (spec §10.5 rounding points), chosen by measurement on an AMX Xeon
(``bench/bench_cpu_session.py``; the README's "bf16 on CPU").

What differs from the reference, and why it keeps the rounding points:

- **GEMMs**: oneDNN with weights prepacked once per Linear into its blocked layout
  (``torch.ops.mkldnn._linear_pointwise``); on AMX 1.5-1.8x the throughput of ``addmm`` at 256-1024
  rows, because the per-call weight reorder is gone. Same math: bf16 inputs, fp32 accumulate, bias
  in the epilogue, one rounding. Costs one extra copy of the Linear weights (packed on first use).
- **GELU**: GELU-tanh of a bf16 value has only 65536 possible inputs, so it is a table lookup:
  ``table[bits(u)]`` with the table made by the reference's own fp32 GELU, rounded once, i.e. equal
  to :func:`~atoken_rt.reference.gelu_tanh` bit for bit. Compiled by ``torch.compile`` into one
  gather pass (4.5x faster than evaluating tanh); without a C++ compiler, aten's in-place GELU on
  bf16 (fp32 inside, one rounding: also equal bit for bit).
- **Norms, residual adds**: aten's bf16 kernels compute in fp32 and round once, so the ``.float()``
  / ``.to(bf16)`` round trips of the reference are dropped (RMSNorm keeps its two roundings).
- **QK-norm + RoPE**: q and k in one pass each (fp32 math, the reference's rounding points).
- **Attention** (``attention="flash"``, the default for bf16): PyTorch's CPU flash kernel on the
  bf16 tensors: scores, softmax and accumulation in fp32, one rounding of the output, and the
  probabilities fed to the second product in bf16, as flash-attn (the official code) and this
  project's Triton kernel do. ``attention="exact"`` keeps the reference (fp32 SDPA on upcast
  copies: bit-equal to :class:`TorchOps`, 2.8-3.6x slower at 256-4096 tokens).

fp32 (and fp16) tensors take the reference path unchanged. On a CPU without oneDNN bf16 support
the GEMMs fall back to the reference ``addmm``; on one without AMX they still run on oneDNN
(AVX512-BF16), several times slower: correct either way. (Measured on a 2-core AMD EPYC Zen 4, no
AMX: bf16 prepacked GEMMs at 209 GFLOP/s per core, 2.4x fp32's; head dim 72 is no slow path of the
flash kernel there, and padding it to 80/96/128 only costs more: ``bench/results/
2026-12-07-cpu-bf16-zen4``.)
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import reference as ref
from .cpu_features import CpuFeatures, cpu_features
from .model import Norm, TorchOps, rope_for
from .packing import SequencePlan

ATTENTION_MODES = ("flash", "exact")
COMPILE_MODES = ("auto", True, False)
# Outputs above this go through the reference addmm into a reused buffer instead: a fresh tensor
# over glibc's 32 MiB mmap threshold is mapped anew on every call (first-touch page faults).
PACKED_MAX_OUTPUT_BYTES = 32 << 20


class CompileWarning(UserWarning):
    """torch.compile of the fused CPU kernels is starting (one-time cost) or failed (eager used)."""


# ----------------------------------------------------------------------------------------------
# The compiled kernels (plain torch functions: torch.compile fuses each into one C++ loop)
# ----------------------------------------------------------------------------------------------


def gelu_table(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[65536] GELU-tanh of every bf16 bit pattern, by the reference (fp32 math, one rounding).

    Index = the 16 bits of the input read as an unsigned integer.
    """
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return ref.gelu_tanh(bits).to(dtype)


def gelu_lookup(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """GELU of bf16 ``u`` [..] by table lookup (same shape and dtype; equal to ref.gelu_tanh)."""
    return table[u.view(torch.int16).to(torch.int32) & 0xFFFF]


# RMSNorm on bf16 in eager aten is ~9 passes (upcast, pow, mean, add, rsqrt, mul, downcast, mul,
# ...): 0.48 ms per [256, 1152] call on one Zen 4 core, vs 0.23-0.33 ms for this kernel compiled
# into one pass with the residual add. The reference's ops are written out in fp32 with the
# rounding points of spec §10.5 as explicit ``.to(bf16)`` casts (kept inside the fused kernel:
# ``emulate_precision_casts``). Fusing LayerNorm and RoPE the same way was measured slower than
# aten's own bf16 kernels on that CPU (0.26-0.41 vs 0.24 ms; 0.38-0.76 vs 0.33 ms): not done.


def add_rms_norm(x, delta, w, eps: float):
    """(s, RMSNorm32(s)) with s = round(x + delta), the official double rounding (spec §6.1)."""
    s = (x.float() + delta.float()).to(x.dtype)      # rounding point: the residual add
    s32 = s.float()
    y = (s32 * torch.rsqrt(s32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return s, (y.float() * w.float()).to(x.dtype)


class _Compiled:
    """A torch.compile'd kernel with the eager function as fallback.

    Compiled lazily on first use (dynamic shapes: one compile serves every token count), after a
    :class:`CompileWarning` that says so. Any failure (no compiler, an inductor error) is reported
    once and the eager function is used from then on. ``enabled=False``: always eager.
    """

    def __init__(self, fn, enabled: bool, label: str, ulps: float = 0.0):
        self.fn, self.label = fn, label
        # 0: the compiled result must equal the eager one bit for bit (elementwise kernels);
        # else within ``ulps`` bf16 ulps, with at most 1% of elements differing (reductions:
        # another fp32 summation order; a dropped rounding point would differ far more often).
        self.ulps = ulps
        self._compiled = None
        self._state = "pending" if enabled else "off"   # pending | ready | failed | off
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return self._state

    def __call__(self, *args):
        if self._state == "ready":
            return self._compiled(*args)
        if self._state == "pending":
            with self._lock:
                if self._state == "pending":
                    self._compile(args)
            if self._state == "ready":
                return self._compiled(*args)
        return self.fn(*args)

    def _compile(self, args) -> None:
        warnings.warn(f"atoken_rt: compiling the fused CPU kernel '{self.label}' with "
                      "torch.compile (first use in this process: ~5-10 s, then cached on disk; "
                      "ATOKEN_RT_CPU_COMPILE=0 runs eager kernels instead)", CompileWarning,
                      stacklevel=4)
        try:
            import torch._inductor.config as inductor_config
            # One compile thread: the default pool of compile workers competes with the model's
            # own threads for the cores (measured: GEMMs 2-5x slower while the pool warms up).
            # emulate_precision_casts: keep every explicit .to(bf16) (the rounding points) inside
            # a fused kernel instead of carrying the fp32 value on.
            with inductor_config.patch(compile_threads=1, emulate_precision_casts=True):
                compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
                want = self.fn(*args)
                got = compiled(*args)
            if not _agrees(got, want, self.ulps):
                raise RuntimeError("compiled result differs from the eager kernel")
        except Exception as exc:  # no compiler, inductor failure, ...: eager from now on
            self._state = "failed"
            warnings.warn(f"atoken_rt: torch.compile of '{self.label}' failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                          "using the eager kernel", CompileWarning, stacklevel=4)
            return
        self._compiled = compiled
        self._state = "ready"


def _agrees(got, want, ulps: float) -> bool:
    """Compiled vs eager result (a tensor or a tuple of them): equal, or for ``ulps`` > 0 within
    ``ulps`` bf16 ulps (2^-7 relative, plus 1e-3 of the largest magnitude near zero) with at most
    1% of the elements differing."""
    if isinstance(want, tuple):
        return len(got) == len(want) and all(_agrees(g, w, ulps) for g, w in zip(got, want))
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if torch.equal(got, want) or ulps <= 0:
        return torch.equal(got, want)
    g, w = got.double(), want.double()
    bound = ulps * 2.0 ** -7 * w.abs() + 1e-3 * float(w.abs().max())
    return bool(((g - w).abs() <= bound).all()) and float((got != want).double().mean()) <= 0.01


def _env_compile():
    v = os.environ.get("ATOKEN_RT_CPU_COMPILE", "auto").strip().lower()
    return {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}.get(
        v, "auto")


def _env_attention() -> str:
    v = os.environ.get("ATOKEN_RT_CPU_ATTENTION", "flash").strip().lower()
    return v if v in ATTENTION_MODES else "flash"


class CpuOps(TorchOps):
    """The bf16 CPU fast path behind the :class:`TorchOps` interface (see the module docstring).

    attention: "flash" (default; ``$ATOKEN_RT_CPU_ATTENTION``) or "exact" (the reference).
    compile: "auto" (default; ``$ATOKEN_RT_CPU_COMPILE``): torch.compile the GELU lookup when a
        C++ compiler is on PATH, eager otherwise; True: try even without one found; False: eager.
    features: the CPU to plan for (default: this one; tests pass a modified copy).
    """

    name = "cpu"

    def __init__(self, attention: str | None = None, compile=None,
                 features: CpuFeatures | None = None):
        super().__init__()
        attention = _env_attention() if attention is None else attention
        compile = _env_compile() if compile is None else compile
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.features = features or cpu_features()
        self.attention_mode = attention
        # Prepacked oneDNN GEMMs wherever oneDNN has bf16 kernels (AMX or AVX512-BF16).
        self.gemm = "onednn" if self.features.onednn_bf16 else "torch"
        use_compile = bool(self.features.cxx) if compile == "auto" else compile
        self._gelu = _Compiled(gelu_lookup, use_compile, "gelu_lookup")
        # Residual add + RMSNorm (decoder) fused; eager: the aten sequence in add_norm.
        self._add_rms = _Compiled(add_rms_norm, use_compile, "add_rms_norm", ulps=2.0)
        self._table: torch.Tensor | None = None
        self._packed = WeakIdKeyDictionary()  # weight Parameter -> (version, data_ptr, packed)
        self._pack_lock = threading.Lock()

    def describe(self) -> str:
        return (f"cpu ops: GEMM {self.gemm} ({self.features.bf16_gemm}), attention "
                f"{self.attention_mode}, GELU {'compiled lookup' if self._gelu.state == 'ready' else 'lookup (pending compile)' if self._gelu.state == 'pending' else 'eager'}")

    @staticmethod
    def _fast(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.bfloat16

    # -- GEMMs ----------------------------------------------------------------------------------

    def packed_weight(self, lin: nn.Linear) -> torch.Tensor:
        """oneDNN's prepacked copy of ``lin.weight`` (made once; remade if the weight changes)."""
        w = lin.weight
        entry = self._packed.get(w)
        if entry is not None and entry[0] == w._version and entry[1] == w.data_ptr():
            return entry[2]
        with self._pack_lock, torch.inference_mode(False), torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed[w] = (w._version, w.data_ptr(), packed)
        return packed

    def linear(self, x: torch.Tensor, lin: nn.Linear, scratch: str | None = None) -> torch.Tensor:
        """round(x W^T + b), x [N, in] bf16 -> [N, out] (one oneDNN call on prepacked weights)."""
        if (not self._fast(x) or self.gemm != "onednn" or x.dim() != 2
                or x.shape[0] * lin.out_features * 2 > PACKED_MAX_OUTPUT_BYTES):
            return super().linear(x, lin, scratch)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(lin), lin.bias, "none",
                                                  [], "")

    def linear_gelu(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """gelu_tanh(round(x W^T + b)): the GEMM, then the GELU table (bit-equal to the reference
        GELU of the rounded GEMM output)."""
        if not self._fast(x):
            return super().linear_gelu(x, lin)
        u = self.linear(x, lin, scratch="fc1")
        if self._gelu.state == "off" or self._gelu.state == "failed":
            return torch.ops.aten.gelu_(u, approximate="tanh")  # fp32 inside, one rounding
        if self._table is None:
            with torch.inference_mode(False):
                self._table = gelu_table()
        return self._gelu(u, self._table)

    # -- norms ----------------------------------------------------------------------------------

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: Norm):
        """(x', norm(x')), x' = round(x + delta): aten's bf16 add/norm kernels work in fp32 and
        round once, as the reference's explicit upcasts do; add + RMSNorm in one compiled pass
        (:func:`add_rms_norm`) when torch.compile is on."""
        if not (x.device.type == "cpu" and x.dtype == torch.bfloat16
                and norm.weight.dtype == torch.bfloat16):
            return TorchOps.add_norm(x, delta, norm)
        if (norm.rms and delta is not None and x.dim() == 2 and x.shape == delta.shape
                and self._add_rms.state in ("pending", "ready")):
            return self._add_rms(x, delta, norm.weight, norm.eps)
        if delta is not None:
            x = x + delta
        c = x.shape[-1]
        if norm.rms:  # the official double rounding: round(x * rsqrt(...)), then round(y * w)
            return x, F.rms_norm(x, (c,), None, norm.eps).mul_(norm.weight)
        return x, F.layer_norm(x, (c,), norm.weight, norm.bias, norm.eps)

    # -- QK-norm + RoPE -------------------------------------------------------------------------

    def qkv_rope(self, qkv: torch.Tensor, plan: SequencePlan, q_gamma=None, k_gamma=None):
        """qkv [N, 3, H, D] -> (q, k, v): QK-norm (optional) and RoPE on q and k together."""
        if not self._fast(qkv):
            return super().qkv_rope(qkv, plan, q_gamma, k_gamma)
        n, _, h, d = qkv.shape
        cos, sin = rope_for(plan, d, qkv.device)
        qk = qkv[:, :2]
        phases = plan.cached(("rope_phases", d, str(qkv.device)),
                             lambda: torch.complex(cos, sin).reshape(n, 1, 1, d // 2))
        if q_gamma is not None:
            # ref.qk_l2_norm on q and k in one pass: fp32 math, rounded once to bf16.
            # Same ops and product order as the reference (F.normalize's x / max(|x|, 1e-12),
            # then (n * gamma) * sqrt(D)): bit-equal in fp32. In place on one fp32 copy, rounded
            # back into it: 3 fewer 2.4 MB fp32 temporaries at 256 tokens (0.89 -> 0.73 ms per
            # layer on one Zen 4 core; 5.4 -> 4.1 ms at 1024 tokens).
            gamma = torch.stack((q_gamma, k_gamma)).float()  # [2, H, D]
            x32 = qk.float()
            den = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).clamp_min_(1e-12)
            x32.div_(den).mul_(gamma).mul_(math.sqrt(d))
            x32.copy_(x32.to(qkv.dtype))  # rounding point: the qk-norm output
            rot = torch.view_as_complex(x32.view(n, 2, h, d // 2, 2)).mul_(phases)
        else:
            rot = torch.view_as_complex(qk.float().reshape(n, 2, h, d // 2, 2)).mul_(phases)
        rot = torch.view_as_real(rot).reshape(n, 2, h, d).to(qkv.dtype)
        return rot[:, 0], rot[:, 1], qkv[:, 2]

    # -- attention ------------------------------------------------------------------------------

    def attention(self, q, k, v, plan: SequencePlan):
        """Full attention within each planned sequence, [N, H, D] -> [N, H, D]."""
        if (self.attention_mode == "exact" or not self._fast(q)
                or getattr(plan, "device_only", False)):
            return super().attention(q, k, v, plan)
        cu = plan.cu_seqlens
        nq, h, d = q.shape
        lens = np.diff(cu)
        if len(lens) and np.all(lens == lens[0]) and lens[0] > 0 and cu[0] == 0 and cu[-1] == nq:
            # Equal-length sequences tiling all rows: batched views, no gather.
            s, length = len(lens), int(lens[0])

            def view(t):
                return t.view(s, length, h, d).transpose(1, 2)

            o = F.scaled_dot_product_attention(view(q), view(k), view(v))
            return o.transpose(1, 2).reshape(nq, h, d)
        layout = plan.cached(("attn_layout", h, str(q.device)), lambda: ref.padded_layout(
            cu, cu, nq, k.shape[0], h, q.device))
        return flash_varlen(q, k, v, layout)


def flash_varlen(q, k, v, layout) -> torch.Tensor:
    """Variable-length attention in the input dtype over a :func:`~atoken_rt.reference.
    padded_layout` (the reference's gather, without its fp32 upcast): [N, H, D] -> [N, H, D]."""
    out = q.new_zeros(q.shape)
    h, d = q.shape[1:]
    z = q.new_zeros(1, h, d)
    qz, kz, vz = torch.cat([q, z]), torch.cat([k, z]), torch.cat([v, z])
    for iq, ik, key_mask, rows, mq in layout:
        o = F.scaled_dot_product_attention(qz[iq].transpose(1, 2), kz[ik].transpose(1, 2),
                                           vz[ik].transpose(1, 2), attn_mask=key_mask)
        out[rows] = o.transpose(1, 2)[mq]
    return out


__all__ = ["CpuOps", "CompileWarning", "gelu_table", "gelu_lookup", "add_rms_norm",
           "flash_varlen", "ATTENTION_MODES"]
