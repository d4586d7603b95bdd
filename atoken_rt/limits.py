"""Resource limits for one Session: every sample is checked against them before any work.

A service fed arbitrary requests must fail fast with a ``ValueError`` naming the sample, the size
and the limit, never allocate gigabytes first. The defaults are sizes the full model can run.

This module holds the interface (shared by encode, decode, the CLI and the dataset engine);
enforcement lives where the samples are prepared.
"""

from __future__ import annotations

from dataclasses import dataclass


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


DEFAULT_LIMITS = Limits()

__all__ = ["Limits", "DEFAULT_LIMITS"]
