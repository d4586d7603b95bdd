"""Resource limits for one Session: every sample is checked against them before any work.

A service fed arbitrary requests must fail fast with a ``ValueError`` naming the sample, the size
and the limit, never allocate gigabytes first. The defaults are sizes the full model can run.

This module holds the interface (shared by encode, decode, the CLI and the dataset engine) and
the shape-only checks :class:`~atoken_rt.Session` runs on every sample before touching its data
(:func:`check_sample` for encode, :func:`check_decode_coords` for decode); :mod:`atoken_rt.media`
and :mod:`atoken_rt.data.readers` check files as they read them.

Why the defaults: 65536 tokens is a 4096 x 4096 image (or 16 frames of 1024 x 1024), a size the
full model runs in one pass on one GPU (activations ~0.6 GB per tower in bf16); 4096^2 pixels
match it, so an image within max_pixels is within max_tokens_per_sample too. 4096 frames bounds
a video's frame count before the token limit is even reached (a 4096-frame 64 x 64 clip is 16384
tokens); 65536 voxels is a quarter of the 64^3 grid, far above real assets (~10-30k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Limits:
    """Per-sample size limits (all counts; ``None`` is never allowed: pass a large number).

    max_tokens_per_sample: tokens of one sample after patchify (an image of H x W gives
        (H/16)(W/16); a video of T frames T/4 times that; a 3D asset one per voxel).
    max_pixels: pixels of one frame (H x W) as given, before cropping.
    max_frames: frames of one video as given, before the 4-frame rule.
    max_voxels: occupied voxels of one 3D asset (the grid is 64^3 = 262144).
    """

    max_tokens_per_sample: int = 65536
    max_pixels: int = 4096 * 4096
    max_frames: int = 4096
    max_voxels: int = 65536

    def __post_init__(self):
        for name in ("max_tokens_per_sample", "max_pixels", "max_frames", "max_voxels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {v!r}")


DEFAULT_LIMITS = Limits()

_PATCH_T, _PATCH_HW, _VOXEL_GRID = 4, 16, 64  # spec §1.2 / §1.3 (inputs.py imports nothing here)


def tokens_of_shape(shape: tuple[int, ...]) -> int:
    """Tokens of an image (H, W, C) or video (T, H, W, C) of this shape (spec §1.2): videos
    shorter than 4 frames pad to 4, longer ones truncate to a multiple of 4."""
    if len(shape) == 3:
        return (shape[0] // _PATCH_HW) * (shape[1] // _PATCH_HW)
    t, h, w = shape[0], shape[1], shape[2]
    return max(t, _PATCH_T) // _PATCH_T * (h // _PATCH_HW) * (w // _PATCH_HW)


def check_sample(x: Any, index: int, limits: Limits) -> None:
    """Raise ``ValueError`` if sample ``index`` of an encode batch is over a limit.

    Reads only shapes (no data is touched, nothing is allocated), so a 20000 x 20000 image fails
    in microseconds. Inputs that are not an image/video array or a Voxels pass through: the
    preparation's own checks report them.
    """
    from .inputs import Voxels  # lazy: inputs.py is the heavier module

    if isinstance(x, Voxels):
        m = int(getattr(x.coords, "shape", (0,))[0] or 0)
        where = f"sample {index} (Voxels)"
        if m > limits.max_voxels:
            raise ValueError(f"{where}: {m} voxels exceed the limit of {limits.max_voxels} "
                             "(Limits.max_voxels)")
        if m > limits.max_tokens_per_sample:
            raise ValueError(f"{where}: {m} tokens exceed the limit of "
                             f"{limits.max_tokens_per_sample} (Limits.max_tokens_per_sample)")
        return
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) not in (3, 4):
        return
    shape = tuple(int(d) for d in shape)
    where = f"sample {index}"
    h, w = shape[-3], shape[-2]
    if h * w > limits.max_pixels:
        raise ValueError(f"{where}: frames of {w}x{h} = {h * w} pixels exceed the limit of "
                         f"{limits.max_pixels} pixels per frame (Limits.max_pixels; resize it)")
    if len(shape) == 4 and shape[0] > limits.max_frames:
        raise ValueError(f"{where}: {shape[0]} frames exceed the limit of {limits.max_frames} "
                         "(Limits.max_frames; cut the video into clips)")
    tokens = tokens_of_shape(shape)
    if tokens > limits.max_tokens_per_sample:
        raise ValueError(f"{where}: shape {shape} makes {tokens} tokens, more than the limit of "
                         f"{limits.max_tokens_per_sample} (Limits.max_tokens_per_sample)")


def check_decode_coords(coords: np.ndarray, index: int, kind: str | None, limits: Limits) -> None:
    """Raise ``ValueError`` unless token coords [n, 4] (t, x, y, z) (already checked to lie in
    [0, 4096)) are within what encode could have produced under ``limits``.

    Why: decoding resizes the learned position table to each sequence's (max x + 1) x
    (max y + 1) grid (spec §5.2): one token at x = y = 4095 would make a 16.7M-row table (77 GB
    at the full width in fp32). So the grid a sample spans is bounded like an encoded sample's:
    pixels (kind "image"/"video", or None with z == 0): rows * cols <= max_pixels / 256 and
    (max t - min t + 1) <= max_frames / 4; 3D (z != 0 or kind "3d"): x, y, z < 64 and n <= max_voxels;
    all: n <= max_tokens_per_sample.
    """
    where = f"sample {index}"
    n = len(coords)
    if n > limits.max_tokens_per_sample:
        raise ValueError(f"{where}: {n} tokens exceed the limit of "
                         f"{limits.max_tokens_per_sample} (Limits.max_tokens_per_sample)")
    hi = coords.max(axis=0)
    if kind == "3d" or (kind is None and hi[3] != 0):
        if (hi[1:] >= _VOXEL_GRID).any():
            raise ValueError(f"{where}: 3D coords (x, y, z) must lie in [0, {_VOXEL_GRID}) (the "
                             f"voxel grid), got maxima {tuple(int(v) for v in hi[1:])}")
        if n > limits.max_voxels:
            raise ValueError(f"{where}: {n} voxels exceed the limit of {limits.max_voxels} "
                             "(Limits.max_voxels)")
        return
    rows, cols = int(hi[1]) + 1, int(hi[2]) + 1
    max_grid = limits.max_pixels // (_PATCH_HW * _PATCH_HW)
    if rows * cols > max_grid:
        raise ValueError(f"{where}: coords span a {rows}x{cols} token grid ({rows * cols} "
                         f"positions), more than the {max_grid} an image within Limits.max_pixels="
                         f"{limits.max_pixels} can make")
    # The temporal span, not the largest t: the temporal splitter re-bases t per 16-frame chunk
    # (spec §2), so nothing is sized by t itself, and streamed chunks carry their stream time.
    max_t = max(limits.max_frames, _PATCH_T) // _PATCH_T
    span = int(hi[0]) - int(coords[:, 0].min()) + 1
    if span > max_t:
        raise ValueError(f"{where}: coords span {span} temporal tokens, more than the "
                         f"{max_t} a video within Limits.max_frames={limits.max_frames} can make")


__all__ = ["Limits", "DEFAULT_LIMITS", "check_sample", "check_decode_coords", "tokens_of_shape"]
