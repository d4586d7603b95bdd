"""Backends: which implementation each op of the forward pass uses.

``"reference"`` is :class:`~atoken_rt.model.TorchOps`, the torch reference, everywhere. ``"torch"``
is the same, except for bf16 on a CPU, where it is :class:`~atoken_rt.cpu_ops.CpuOps` (prepacked
oneDNN GEMMs, GELU by table lookup, flash-style attention; same rounding points, see the
README's "bf16 on CPU"). ``"triton"`` replaces the memory-bound and attention ops by the
kernels in ``kernels/`` (importable as ``atoken_rt.kernels``):

| op            | kernel                                                   |
|---------------|----------------------------------------------------------|
| add_norm      | ``norms.add_layer_norm`` / ``norms.add_rms_norm``         |
| qkv_rope      | ``rope.rope_qk`` (QK-norm + 4D RoPE, one pass, no tables) |
| attention     | ``attention.varlen_attention`` (head dim 72 as 64 + 8)    |
| linear_gelu   | ``epilogue.linear_bias_gelu`` (``epilogue="cublas"``: torch GEMM + one fused kernel; ``"triton"``: Triton GEMM with the epilogue fused) |
| fsq           | ``fsq.fsq_quantize``                                      |

Plain GEMMs stay on torch (cuBLAS). The kernels run on CUDA tensors, or on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import torch

from . import reference as ref
from .model import Norm, TorchOps
from .packing import SequencePlan

EPILOGUES = ("cublas", "triton")


def triton_ready() -> tuple[bool, str]:
    """(usable, reason): triton imports, and there is a GPU or the interpreter is on."""
    from .kernels._utils import interpreter_active
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"triton is not importable ({exc})"
    if not (torch.cuda.is_available() or interpreter_active()):
        return False, ("no CUDA GPU; set TRITON_INTERPRET=1 before importing triton to run the "
                       "kernels on the CPU (slow, for testing)")
    return True, ""


class TritonOps(TorchOps):
    """The Triton kernels behind the :class:`TorchOps` interface (same numerics contract)."""

    name = "triton"

    def __init__(self, epilogue: str = "cublas"):
        super().__init__()
        self._freqs: dict = {}
        if epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
        from .kernels import attention, epilogue as epi, fsq, norms, rope
        self._attention, self._epi, self._fsq, self._norms, self._rope = \
            attention, epi, fsq, norms, rope
        self.epilogue = epilogue

    def linear_gelu(self, x: torch.Tensor, lin) -> torch.Tensor:
        return self._epi.linear_bias_gelu(x, lin.weight, lin.bias, impl=self.epilogue)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: Norm):
        if norm.rms:
            return self._norms.add_rms_norm(x, delta, norm.weight, norm.eps)
        return self._norms.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)

    def qkv_rope(self, qkv: torch.Tensor, plan: SequencePlan, q_gamma=None, k_gamma=None):
        dev, d = qkv.device, qkv.shape[-1]
        pos = plan.tensor("positions", dev)
        # Kept on the ops object, not the plan: a captured graph reads this tensor on every
        # replay, long after the plan it was first made for is gone.
        key = (d, str(dev))
        freqs = self._freqs.get(key)
        if freqs is None:
            freqs = self._freqs[key] = ref.rope_frequencies(d).to(dev)
        qk = self._rope.rope_qk(qkv, pos, freqs, q_gamma=q_gamma, k_gamma=k_gamma)
        return qk[:, 0], qk[:, 1], qkv[:, 2]

    def attention(self, q, k, v, plan: SequencePlan):
        cu = plan.tensor("cu_seqlens", q.device)
        return self._attention.varlen_attention(q, k, v, cu, plan.max_seqlen)

    def fsq(self, z: torch.Tensor, levels, num_codebooks: int):
        return self._fsq.fsq_quantize(z, levels, num_codebooks)


def make_ops(backend: str, epilogue: str = "cublas", device=None, dtype=None):
    """The op set for a backend name (ValueError with the reason when it cannot run here);
    ``device``/``dtype`` of the session pick the CPU bf16 fast path for ``"torch"``."""
    if backend == "reference":
        return TorchOps()
    if backend == "torch":
        if device is not None and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
            from .cpu_ops import CpuOps
            return CpuOps()
        return TorchOps()
    if backend == "triton":
        ok, why = triton_ready()
        if not ok:
            raise ValueError(f"backend 'triton' cannot run here: {why}")
        return TritonOps(epilogue)
    raise ValueError(f"unknown backend {backend!r}; available: ['torch', 'reference', 'triton']")


__all__ = ["TritonOps", "make_ops", "triton_ready", "EPILOGUES"]
