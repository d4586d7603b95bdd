"""Zero-copy inputs from other array libraries (DLPack and the CUDA array interface).

Any object with ``__dlpack__`` (numpy >= 1.22, CuPy, JAX, NVIDIA Holoscan tensors, TensorFlow, ...)
becomes a torch tensor sharing its memory through :func:`torch.from_dlpack`; device arrays stay on
their device. DLPack's stream handshake makes the producer's pending writes visible on torch's
current CUDA stream (the producer is asked to order them before that stream; no host sync). Objects
with only ``__cuda_array_interface__`` (older Numba/CuPy) are wrapped by :func:`torch.as_tensor`,
also without a copy; that protocol has no stream handshake, so the producer must have finished
writing (CAI v3 ``stream`` field aside) before the call.

Negative strides (a flipped view: ``frame[..., ::-1]``, a BGR -> RGB swap) are not something
torch can import: ``torch.from_dlpack`` of such a tensor raises a C++ error that terminates the
whole process (uncatchable). So the strides are read first, from the DLPack capsule itself (or the
interface dict), before torch sees the tensor:

* host memory with a negative stride is read through numpy (``np.from_dlpack``) and **copied** to
  a contiguous array (the only copy on this path; positive strides stay zero-copy);
* device memory with a negative stride is refused with a ``ValueError`` (make it contiguous
  first, e.g. ``cupy.ascontiguousarray``): a silent device copy would hide a per-frame cost.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

__all__ = ["from_foreign"]

_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_ROCM = 1, 2, 3, 10
_HOST_DEVICES = (_KDL_CPU, _KDL_CUDA_HOST)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):  # DLPack >= 1.0 ("dltensor_versioned")
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype, _capsule_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _capsule_strides(capsule) -> tuple | None:
    """The element strides of an unconsumed DLPack capsule (None: compact row-major), read
    without importing it. ValueError for something that is not a DLPack capsule."""
    name = _capsule_name(capsule)
    if name not in (b"dltensor", b"dltensor_versioned"):
        raise ValueError(f"__dlpack__ returned a capsule named {name!r}, not a DLPack tensor")
    ptr = _capsule_ptr(capsule, name)
    if not ptr:
        raise ValueError("__dlpack__ returned an empty capsule")
    if name == b"dltensor_versioned":
        t = _DLManagedTensorVersioned.from_address(ptr).dl_tensor
    else:  # DLManagedTensor starts with its DLTensor
        t = _DLTensor.from_address(ptr)
    if not t.strides:
        return None
    return tuple(int(t.strides[i]) for i in range(t.ndim))


def _export(x: Any, device: tuple):
    """``x.__dlpack__(...)`` as torch.from_dlpack asks for it (the consumer's current stream for
    CUDA producers; DLPack 1.0 when the producer speaks it)."""
    kw: dict = {}
    if device[0] in (_KDL_CUDA, _KDL_ROCM):
        stream = torch.cuda.current_stream(f"cuda:{device[1]}")
        # The array API spells CUDA's legacy default stream 1.
        kw["stream"] = 1 if device[0] == _KDL_CUDA and stream.cuda_stream == 0 \
            else stream.cuda_stream
    try:
        return x.__dlpack__(**kw, max_version=(1, 0))
    except TypeError:  # a pre-1.0 producer
        return x.__dlpack__(**kw)


def _from_dlpack(x: Any) -> torch.Tensor:
    device = tuple(int(v) for v in x.__dlpack_device__()) if hasattr(x, "__dlpack_device__") \
        else None
    if device is None:
        return torch.from_dlpack(x)  # no device to hand: torch's own protocol handling
    capsule = _export(x, device)
    strides = _capsule_strides(capsule)
    if strides is not None and any(s < 0 for s in strides):
        # Never hand this to torch (the process would abort). The capsule is dropped unconsumed:
        # its destructor returns the memory to the producer.
        del capsule
        if device[0] in _HOST_DEVICES:
            a = np.from_dlpack(x)  # numpy reads negative strides; copied to a compact array
            return torch.from_numpy(np.ascontiguousarray(a))
        raise ValueError(f"device array with negative strides {strides} (a flipped view such "
                         "as frame[..., ::-1]): torch cannot import it; make it contiguous first "
                         "(e.g. cupy.ascontiguousarray)")
    return torch.from_dlpack(capsule)


def _check_cai_strides(x: Any) -> None:
    cai = x.__cuda_array_interface__
    strides = cai.get("strides") if isinstance(cai, dict) else None
    if strides is not None and any(int(s) < 0 for s in strides):
        raise ValueError(f"device array with negative strides {tuple(strides)} (a flipped view "
                         "such as frame[..., ::-1]): make it contiguous first (e.g. "
                         "cupy.ascontiguousarray)")


def from_foreign(x: Any, where: str) -> torch.Tensor:
    """A torch tensor sharing the memory of a ``__dlpack__`` / ``__cuda_array_interface__``
    object (no copy, same device; host arrays with negative strides are copied, device arrays
    with negative strides raise ``ValueError`` naming ``where``). TypeError naming ``where``
    when neither protocol works."""
    errors = []
    if hasattr(x, "__dlpack__"):
        try:
            return _from_dlpack(x)
        except ValueError as exc:
            if "negative strides" in str(exc):
                raise ValueError(f"{where}: {exc}") from None
            errors.append(f"__dlpack__: {exc}")
        except (BufferError, RuntimeError, TypeError, AttributeError) as exc:
            errors.append(f"__dlpack__: {exc}")
    if hasattr(x, "__cuda_array_interface__"):
        try:
            _check_cai_strides(x)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available here")
            return torch.as_tensor(x, device="cuda")
        except (RuntimeError, TypeError, ValueError) as exc:
            errors.append(f"__cuda_array_interface__: {exc}")
    raise TypeError(f"{where}: cannot read a {type(x).__name__} without a copy ("
                    f"{'; '.join(errors) or 'no array protocol'})")
