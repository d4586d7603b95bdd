"""Zero-copy inputs from other array libraries (DLPack and the CUDA array interface).

Any object with ``__dlpack__`` (numpy >= 1.22, CuPy, JAX, NVIDIA Holoscan tensors, TensorFlow, ...)
becomes a torch tensor sharing its memory through :func:`torch.from_dlpack`; device arrays stay on
their device. DLPack's stream handshake makes the producer's pending writes visible on torch's
current CUDA stream (the producer is asked to order them before that stream; no host sync). Objects
with only ``__cuda_array_interface__`` (older Numba/CuPy) are wrapped by :func:`torch.as_tensor`,
also without a copy; that protocol has no stream handshake, so the producer must have finished
writing (CAI v3 ``stream`` field aside) before the call.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["from_foreign"]


def from_foreign(x: Any, where: str) -> torch.Tensor:
    """A torch tensor sharing the memory of a ``__dlpack__`` / ``__cuda_array_interface__``
    object (no copy, same device). TypeError naming ``where`` when neither protocol works."""
    errors = []
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
            errors.append(f"__dlpack__: {exc}")
    if hasattr(x, "__cuda_array_interface__"):
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available here")
            return torch.as_tensor(x, device="cuda")
        except (RuntimeError, TypeError, ValueError) as exc:
            errors.append(f"__cuda_array_interface__: {exc}")
    raise TypeError(f"{where}: cannot read a {type(x).__name__} without a copy ("
                    f"{'; '.join(errors) or 'no array protocol'})")
