"""Shared launcher helpers for the Triton kernels: argument checks and sizing.

Launchers validate every tensor argument (shape, dtype, strides, device) and raise a ValueError
that names the argument, before any kernel runs: a kernel never reads or writes out of bounds.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(name: str, t, *, dims: int | None = None, shape: Sequence[int | None] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, device: torch.device | None = None,
                 unit_last_stride: bool = True) -> None:
    """Raise ValueError naming ``name`` unless ``t`` is a tensor with these properties.

    shape entries of None match any size. unit_last_stride: the innermost dim is contiguous
    (what the kernels' vectorised loads assume).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (expected one of "
                             f"{[str(d) for d in dtypes]})")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: innermost dim must be contiguous (stride 1), got strides "
                         f"{t.stride()}")


def check_same_device(**tensors) -> torch.device:
    """All tensors on one device; returns it (ValueError naming the odd one out)."""
    dev = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise ValueError(f"{name}: on {t.device}, but the other arguments are on {dev}")
    return dev


def check_runnable(name: str, device: torch.device) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreter_active():
        return
    raise ValueError(f"{name}: on {device}; the kernels need a CUDA tensor (or a CPU tensor with "
                     "TRITON_INTERPRET=1 set before triton is imported)")


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (same device) can touch a common byte."""
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the very same view: data pointer, shape and strides."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
