"""Input validation and patchification: images, videos and 3D voxels -> sparse tokens.

Images ``(H, W, 3)`` and videos ``(T, H, W, 3)`` are channels-last, uint8 in [0, 255] or float in
[-1, 1], torch tensors or numpy arrays. They are turned into tokens exactly as the official
``image_to_sparse`` does (spec §1.2): temporal zero-pad to 4 frames, truncation to a multiple of 4,
centre crop to multiples of 16, patches flattened in ``(pt, ph, pw, c)`` order, raster token order.

3D assets are :class:`Voxels`: ``coords [M, 3]`` (i, j, k) in [0, 64) and ``feats [M, 768]`` in
[0, 1], entered as the official ``inference_3d`` does (spec §1.3): ``feats*2-1`` zero-padded to
3072 channels at coords ``(t=1, i, j, k)``.

Every check raises a ``ValueError`` or ``TypeError`` naming the sample (its position in the batch)
and the problem. Nothing is dropped silently: crops and dropped frames are recorded in
:class:`SampleInfo`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

PATCH_T, PATCH_H, PATCH_W = 4, 16, 16
TOKEN_CHANNELS = PATCH_T * PATCH_H * PATCH_W * 3  # 3072
VOXEL_GRID = 64
VOXEL_CHANNELS = 768
VOXEL_T = 1  # the official 3D loader puts every voxel at t = 1 (spec §1.3)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Voxels:
    """One 3D asset on the 64^3 grid.

    coords: [M, 3] integer voxel indices (i, j, k) in [0, 64), unique.
    feats:  [M, 768] float multiview features in [0, 1] (the official packing's output).
    """

    coords: Any
    feats: Any

    def __repr__(self) -> str:
        shape = getattr(self.coords, "shape", None)
        return f"Voxels(coords={tuple(shape) if shape is not None else '?'})"


@dataclass
class SampleInfo:
    """What happened to one sample on the way into the model (never silent).

    kind: "image", "video" or "3d".
    original_shape: the input's shape ((H, W, 3), (T, H, W, 3) or (M, 768)).
    used_shape: the pixels actually tokenised ((H', W', 3) or (T', H', W', 3)); equal to the
        output shape of decoding.
    crop_offset: (top, left) of the centre crop in the original frame.
    frames_used / frames_dropped: input frames kept and trailing frames dropped by the 4-frame rule
        (images: 1 / 0; zero frames padded for videos shorter than 4 are in frames_padded).
    grid: token grid (T_tokens, H_tokens, W_tokens); 3D: None.
    """

    kind: str
    original_shape: tuple[int, ...]
    used_shape: tuple[int, ...]
    crop_offset: tuple[int, int] = (0, 0)
    frames_used: int = 0
    frames_dropped: int = 0
    frames_padded: int = 0
    grid: tuple[int, int, int] | None = None

    @property
    def cropped(self) -> bool:
        if self.kind == "3d":
            return False
        return tuple(self.original_shape[-3:-1]) != tuple(self.used_shape[-3:-1])

    def as_dict(self) -> dict:
        return {"kind": self.kind, "original_shape": list(self.original_shape),
                "used_shape": list(self.used_shape), "crop_offset": list(self.crop_offset),
                "frames_used": self.frames_used, "frames_dropped": self.frames_dropped,
                "frames_padded": self.frames_padded,
                "grid": list(self.grid) if self.grid is not None else None}


@dataclass
class Prepared:
    """One sample as tokens: feats [n, 3072] float32 in [-1, 1] (on the session device) and
    coords [n, 4] int32 (t, x, y, z) on the CPU, where batches are planned."""

    feats: torch.Tensor
    coords: torch.Tensor
    info: SampleInfo
    # Float pixels that all lie in [0, 1] (e.g. torchvision's ToTensor): probably not the
    # [-1, 1] the model takes; the Session warns (the values are used as given).
    unit_range: bool = False


def as_frames_tensor(x: Any, where: str) -> torch.Tensor:
    """A torch view of ``x`` where it lives (no copy, no device move): a torch.Tensor, a numpy
    array, or any ``__dlpack__`` / ``__cuda_array_interface__`` object (CuPy, JAX, Holoscan...)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise TypeError(f"{where}: unsupported numpy dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    if hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__"):
        from .interop import from_foreign
        return from_foreign(x, where)
    raise TypeError(f"{where}: expected a torch.Tensor, numpy array, a __dlpack__ / "
                    f"__cuda_array_interface__ array or Voxels, got {type(x).__name__}")


def _as_tensor(x: Any, where: str, device: torch.device) -> torch.Tensor:
    t = as_frames_tensor(x, where)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # Stage host data through pinned memory so the copy is asynchronous on the current stream.
        try:
            pinned = t.pin_memory()
        except RuntimeError:  # no pinnable memory here (some sandboxes): a plain copy
            return t.to(device)
        return pinned.to(device, non_blocking=True)
    return t.to(device)


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: contains NaN or Inf")


def prepare_pixels(x: Any, index: int, device: torch.device | str = "cpu") -> Prepared:
    """Validate and patchify one image or video (spec §1.2). Returns float32 tokens."""
    device = torch.device(device)
    where = f"sample {index}"
    t = _as_tensor(x, where, device)
    if t.dim() not in (3, 4):
        raise ValueError(f"{where}: expected an image (H, W, 3) or a video (T, H, W, 3), "
                         f"got a tensor of shape {tuple(t.shape)}")
    if t.shape[-1] != 3:
        raise ValueError(f"{where}: expected 3 channels last (H, W, 3) / (T, H, W, 3), got shape "
                         f"{tuple(t.shape)}")
    unit_range = False
    if t.dtype == torch.uint8:
        t = _normalise_u8(t)
    elif t.dtype in _FLOAT_DTYPES:
        t = t.float()
        # One reduction and one host read for the NaN/Inf and range checks (min/max propagate NaN).
        lo, hi = (float(v) for v in torch.aminmax(t)) if t.numel() else (0.0, 0.0)
        unit_range = 0.0 <= lo and hi <= 1.0 and hi > 0.0
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{where}: contains NaN or Inf")
        if lo < -1.0 or hi > 1.0:
            raise ValueError(f"{where}: float pixels must lie in [-1, 1], got values in "
                             f"[{lo:.4g}, {hi:.4g}] (pass uint8 for [0, 255] data)")
    else:
        raise TypeError(f"{where}: unsupported dtype {t.dtype}; use uint8 in [0, 255] or a float "
                        "dtype in [-1, 1]")
    info = _pixel_info(tuple(t.shape), where)
    return Prepared(feats=_frames_to_tokens(t[None], info), coords=_coords_of(info), info=info,
                    unit_range=unit_range)


def _normalise_u8(t: torch.Tensor) -> torch.Tensor:
    """The README normalisation (u8 / 255) * 2 - 1, in fp32."""
    return (t.float() / 255.0) * 2.0 - 1.0


def _pixel_info(shape: tuple[int, ...], where: str) -> SampleInfo:
    """The patch rules for an image (H, W, 3) or video (T, H, W, 3) of this shape (ValueError
    for no frames or frames smaller than a patch): crop, frames kept/dropped/padded, grid."""
    kind = "image" if len(shape) == 3 else "video"
    frames, h, w = (1, *shape[:2]) if kind == "image" else shape[:3]
    if frames == 0:
        raise ValueError(f"{where}: video has no frames")
    if h < PATCH_H or w < PATCH_W:
        raise ValueError(f"{where}: frames of {h}x{w} pixels are smaller than one "
                         f"{PATCH_H}x{PATCH_W} patch")
    padded = max(0, PATCH_T - frames)  # zero (mid-grey) frames, as the reference pads
    kept = ((frames + padded) // PATCH_T) * PATCH_T
    dropped = frames + padded - kept
    h2, w2 = (h // PATCH_H) * PATCH_H, (w // PATCH_W) * PATCH_W
    top, left = (h - h2) // 2, (w - w2) // 2
    grid = (kept // PATCH_T, h2 // PATCH_H, w2 // PATCH_W)
    if kind == "image":
        return SampleInfo(kind=kind, original_shape=shape, used_shape=(h2, w2, 3),
                          crop_offset=(top, left), frames_used=1, grid=grid)
    # Decoding returns every tokenised frame, padding included.
    return SampleInfo(kind=kind, original_shape=shape, used_shape=(kept, h2, w2, 3),
                      crop_offset=(top, left), frames_used=min(frames, kept),
                      frames_dropped=dropped, frames_padded=padded, grid=grid)


def _frames_to_tokens(t: torch.Tensor, info: SampleInfo) -> torch.Tensor:
    """[B, H, W, 3] images or [B, T, H, W, 3] videos of one shape (float, normalised) -> tokens
    [B * n, 3072], sample by sample: pad/truncate frames, centre crop, patchify."""
    if info.kind == "image":
        t = t[:, None]
    b, frames, h, w, _ = t.shape
    kept, (h2, w2, _) = info.grid[0] * PATCH_T, info.used_shape[-3:]
    top, left = info.crop_offset
    if frames < PATCH_T:
        # Images (and videos under 4 frames): write the real frames straight into zeroed
        # tokens [B, H'/16, W'/16, 4, 16, 16, 3] (the zero frames' channels are the zeros),
        # instead of padding to 4 frames first. The padded copy was 4x the frames on top of the
        # tokens (the 4-frame rule made a 20000^2 image ~10 GB before anything ran); now the
        # only allocation is the tokens themselves. Same values, same layout as patchify.
        th, tw = h2 // PATCH_H, w2 // PATCH_W
        out = t.new_zeros(b, th, tw, PATCH_T, PATCH_H, PATCH_W, 3)
        src = t[:, :, top:top + h2, left:left + w2].reshape(b, frames, th, PATCH_H, tw, PATCH_W, 3)
        out[:, :, :, :frames] = src.permute(0, 2, 4, 1, 3, 5, 6)
        return out.reshape(-1, TOKEN_CHANNELS)
    return patchify(t[:, :kept, top:top + h2, left:left + w2])


def _coords_of(info: SampleInfo) -> torch.Tensor:
    return _raster_coords(*info.grid).clone()  # host (planning happens on the CPU); own copy


def _groupable(x: Any) -> tuple | None:
    """The shape of a host uint8 image/video that passes every check of :func:`prepare_pixels`
    (so it can be prepared together with others of its shape), else None."""
    if isinstance(x, np.ndarray):
        ok = x.dtype == np.uint8
    elif isinstance(x, torch.Tensor):
        ok = x.dtype == torch.uint8 and x.device.type == "cpu"
    else:
        return None
    shape = tuple(x.shape)
    if not ok or len(shape) not in (3, 4) or shape[-1] != 3:
        return None
    try:
        _pixel_info(shape, "")
    except ValueError:
        return None
    return shape


_CPU_GROUP_BYTES = 64 * 64 * 3 * 4  # e.g. four 64x64 frames per sample


def _stack_for(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack host tensors; for a GPU straight into pinned memory (one host copy, and the transfer
    can be asynchronous: pin_memory() of a pinned tensor is the tensor itself)."""
    if device.type == "cuda":
        try:
            out = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype,
                              pin_memory=True)
            return torch.stack(parts, out=out)
        except RuntimeError:  # no pinnable memory here: _as_tensor falls back to a plain copy
            pass
    return torch.stack(parts)


def prepare_pixel_batch(batch: Sequence[Any], device: torch.device | str = "cpu"
                        ) -> dict[int, Prepared]:
    """Host uint8 images/videos of the batch that share a shape, prepared together: one stacked
    host copy, one transfer, one normalisation and patchify per shape (per-sample preparation
    costs ~10 tensor ops each). Returns {batch index: Prepared}, bit-identical to
    :func:`prepare_pixels`; samples alone in their shape, or not plain uint8, are left out."""
    device = torch.device(device)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(batch):
        shape = _groupable(x)
        # On a GPU every sample's ~10 ops are launches (host-bound): always group. On the CPU
        # the ops are the work itself, and one large group runs out of cache (8 images of
        # 256x256: 14.6 -> 32 ms measured): group only samples small enough to be
        # overhead-bound (64 images of 16x16: 5.0 -> 1.1 ms).
        if shape is not None and (device.type != "cpu" or math.prod(shape) <= _CPU_GROUP_BYTES):
            groups.setdefault(shape, []).append(i)
    out: dict[int, Prepared] = {}
    for shape, idx in groups.items():
        if len(idx) < 2:
            continue
        parts = [torch.from_numpy(np.ascontiguousarray(batch[i]))
                 if isinstance(batch[i], np.ndarray) else batch[i] for i in idx]
        host = _stack_for(parts, device)
        t = _normalise_u8(_as_tensor(host, f"samples {idx}", device))
        info = _pixel_info(shape, "")
        feats = _frames_to_tokens(t, info)
        n = feats.shape[0] // len(idx)
        for k, i in enumerate(idx):
            out[i] = Prepared(feats=feats[k * n:(k + 1) * n], coords=_coords_of(info),
                              info=dataclasses.replace(info))
    return out


def patchify(frames: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] (T % 4 == 0, H, W % 16 == 0) -> tokens [T/4 * H/16 * W/16, 3072]; or
    [B, T, H, W, 3] -> [B * n, 3072], sample after sample.

    Token order is raster (t slowest, then row, then column); channel order (pt, ph, pw, c).
    """
    *b, t, h, w, c = frames.shape
    x = frames.reshape(*b, t // PATCH_T, PATCH_T, h // PATCH_H, PATCH_H, w // PATCH_W, PATCH_W, c)
    lead = len(b)
    x = x.permute(*range(lead), *(lead + i for i in (0, 2, 4, 1, 3, 5, 6)))
    return x.reshape(-1, PATCH_T * PATCH_H * PATCH_W * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: tokens [tt*th*tw, 3072] in raster order -> [4tt, 16th, 16tw, 3]."""
    tt, th, tw = grid
    x = tokens.reshape(tt, th, tw, PATCH_T, PATCH_H, PATCH_W, 3)
    x = x.permute(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(tt * PATCH_T, th * PATCH_H, tw * PATCH_W, 3)


def grid_coords(tt: int, th: int, tw: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Raster-order coords [tt*th*tw, 4] int32 (t, x=row, y=col, z=0)."""
    t, x, y = torch.meshgrid(torch.arange(tt), torch.arange(th), torch.arange(tw), indexing="ij")
    c = torch.stack([t.reshape(-1), x.reshape(-1), y.reshape(-1), torch.zeros(tt * th * tw,
                     dtype=torch.int64)], dim=1)
    return c.to(torch.int32).to(device)


@functools.lru_cache(maxsize=16)
def _raster_coords(tt: int, th: int, tw: int) -> torch.Tensor:
    """:func:`grid_coords` on the host, memoised per grid (callers get a clone)."""
    return grid_coords(tt, th, tw)


def prepare_voxels(v: Voxels, index: int, device: torch.device | str = "cpu") -> Prepared:
    """Validate one :class:`Voxels` and enter it as the official ``inference_3d`` does."""
    device = torch.device(device)
    where = f"sample {index} (Voxels)"
    coords = _as_tensor(v.coords, f"{where} coords", device)
    feats = _as_tensor(v.feats, f"{where} feats", device)
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"{where}: coords must have shape [M, 3], got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool or coords.is_complex():
        raise TypeError(f"{where}: coords must be integers, got {coords.dtype}")
    if feats.dim() != 2 or feats.shape[1] != VOXEL_CHANNELS:
        raise ValueError(f"{where}: feats must have shape [M, {VOXEL_CHANNELS}], "
                         f"got {tuple(feats.shape)}")
    if feats.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: feats must be a float dtype, got {feats.dtype}")
    if coords.shape[0] != feats.shape[0]:
        raise ValueError(f"{where}: {coords.shape[0]} coords but {feats.shape[0]} feature rows")
    if coords.shape[0] == 0:
        raise ValueError(f"{where}: no voxels")
    c64 = coords.to(torch.int64)
    if bool((c64 < 0).any()) or bool((c64 >= VOXEL_GRID).any()):
        raise ValueError(f"{where}: coords outside the grid [0, {VOXEL_GRID})")
    key = (c64[:, 0] * VOXEL_GRID + c64[:, 1]) * VOXEL_GRID + c64[:, 2]
    if torch.unique(key).numel() != key.numel():
        raise ValueError(f"{where}: duplicated voxel coordinates")
    f32 = feats.float()
    _check_finite(f32, where)
    if bool((f32 < 0).any()) or bool((f32 > 1).any()):
        raise ValueError(f"{where}: feats must lie in [0, 1], got values in "
                         f"[{float(f32.min()):.4g}, {float(f32.max()):.4g}]")
    m = coords.shape[0]
    tokens = torch.zeros(m, TOKEN_CHANNELS, dtype=torch.float32, device=device)
    tokens[:, :VOXEL_CHANNELS] = f32 * 2 - 1
    tcoords = torch.cat([torch.full((m, 1), VOXEL_T, dtype=torch.int32, device=device),
                         coords.to(torch.int32)], dim=1)
    info = SampleInfo(kind="3d", original_shape=(m, VOXEL_CHANNELS),
                      used_shape=(m, VOXEL_CHANNELS))
    return Prepared(feats=tokens, coords=tcoords.cpu(), info=info)


def prepare_sample(x: Any, index: int, device: torch.device | str = "cpu") -> Prepared:
    """Dispatch on the sample type: :class:`Voxels` or an image/video array."""
    if isinstance(x, Voxels):
        return prepare_voxels(x, index, device)
    return prepare_pixels(x, index, device)


Sample = Union[torch.Tensor, np.ndarray, Voxels]

__all__ = ["Voxels", "SampleInfo", "Prepared", "prepare_pixels", "prepare_pixel_batch",
           "prepare_voxels",
           "prepare_sample", "patchify", "unpatchify", "grid_coords", "TOKEN_CHANNELS",
           "VOXEL_CHANNELS", "VOXEL_GRID", "Sample"]
