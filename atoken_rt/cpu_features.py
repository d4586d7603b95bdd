"""What this CPU can do for bf16 inference: matrix hardware (AMX, AVX512-BF16), vector width,
oneDNN support, a C++ compiler for ``torch.compile``.

:func:`cpu_features` is read once per process (cached). :mod:`atoken_rt.cpu_ops` picks its GEMM and
kernels from it, and ``atoken-rt info`` prints :meth:`CpuFeatures.lines`. Tests force another CPU
by passing a modified copy (``dataclasses.replace``) to :class:`~atoken_rt.cpu_ops.CpuOps`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil

import torch


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """The facts about this CPU that decide the bf16 fast path (all read from torch and the OS)."""

    model: str                 # "Intel(R) Xeon(R) Processor" (/proc/cpuinfo), else platform's
    threads: int               # torch.get_num_threads()
    capability: str           # torch's vector kernels: "AVX512", "AVX2", "DEFAULT", ...
    avx512: bool
    avx512_bf16: bool          # bf16 dot products in AVX-512 (VDPBF16PS)
    amx_bf16: bool             # AMX tiles with bf16 (TDPBF16PS): the fast bf16 GEMM
    avx512_fp16: bool
    onednn_bf16: bool          # oneDNN (mkldnn) bf16 kernels usable on this CPU
    cxx: str | None            # a C++ compiler on PATH (torch.compile's CPU backend needs one)

    @property
    def bf16_gemm(self) -> str:
        """Which hardware runs bf16 GEMMs: "amx", "avx512_bf16" or "none" (emulated: slow)."""
        if self.onednn_bf16 and self.amx_bf16:
            return "amx"
        if self.onednn_bf16 and self.avx512_bf16:
            return "avx512_bf16"
        return "none"

    def lines(self) -> list[str]:
        """Human-readable summary (``atoken-rt info``)."""
        flags = [name for name, on in (("AVX-512", self.avx512), ("AVX512-BF16", self.avx512_bf16),
                                       ("AMX-BF16", self.amx_bf16), ("AVX512-FP16", self.avx512_fp16))
                 if on]
        gemm = {"amx": "oneDNN on AMX tiles (prepacked weights)",
                "avx512_bf16": ("oneDNN on AVX512-BF16 (no AMX: bf16 GEMMs a few times slower "
                                "than with AMX tiles, still ~2x fp32's)"),
                "none": "no bf16 matrix hardware: bf16 runs correctly but slower than fp32 may"}
        return [f"cpu: {self.model}, {self.threads} threads, torch kernels {self.capability}; "
                f"features: {', '.join(flags) or 'none of AVX-512/AMX'}",
                f"cpu bf16 path: GEMMs {gemm[self.bf16_gemm]}; fused kernels via torch.compile: "
                + (f"yes (C++ compiler {self.cxx})" if self.cxx else "no C++ compiler (eager "
                   "fallback, GELU slower)")]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def find_cxx() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use ($CXX, g++, c++, clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (computed once)."""
    caps: dict = {}
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # pragma: no cover - older torch or a non-x86 CPU
        caps = {}
    try:
        onednn = bool(torch.backends.mkldnn.is_available()
                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - torch built without oneDNN
        onednn = False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        capability = "unknown"
    return CpuFeatures(
        model=_cpu_model(), threads=torch.get_num_threads(), capability=capability,
        avx512=bool(caps.get("avx512_f")), avx512_bf16=bool(caps.get("avx512_bf16")),
        amx_bf16=bool(caps.get("amx_bf16") and caps.get("amx_tile")),
        avx512_fp16=bool(caps.get("avx512_fp16")), onednn_bf16=onednn, cxx=find_cxx())


__all__ = ["CpuFeatures", "cpu_features", "find_cxx"]
