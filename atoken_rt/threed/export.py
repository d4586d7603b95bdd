"""Viewer files for decoded Gaussians: the 3DGS PLY and the antimatter15 ``.splat``.

- :func:`save_ply`: the standard 3D Gaussian splatting PLY that SuperSplat, the INRIA viewer and
  most web viewers load: float32 columns ``x y z nx ny nz f_dc_0..2 [f_rest_0..44] opacity
  scale_0..2 rot_0..3``, binary little-endian, logit opacity, log scale, unit w-first
  quaternion. INRIA-style loaders assert ``len(f_rest) == 3 * ((degree + 1)^2 - 1)`` for the
  degree they were built for, so ``sh_degree_rest=3`` writes the 45 (zero) ``f_rest`` columns
  that degree-3 loaders expect; the colour is the same (the decoder is SH degree 0).
- :func:`save_splat`: the antimatter15/splat web viewer's format, 32 bytes a splat: position
  float32 x3, scale float32 x3 (linear), RGBA uint8 x4, quaternion uint8 x4 (``q * 128 + 128``,
  w first), sorted by descending ``scale_0 * scale_1 * scale_2 * opacity`` as that project's
  ``convert.py`` sorts (and computed as it computes: from the PLY's log scales and logit opacity,
  in float32, colours truncated after ``* 255``).

Both take positions in the model's world frame (no axis change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from ..gs import SH_C0, Gaussians, write_ply

PathLike = Union[str, Path]

#: Bytes per splat in the .splat format.
SPLAT_BYTES = 32
SPLAT_DTYPE = np.dtype([("xyz", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4),
                        ("rot", "u1", 4)])


def ply_columns(gaussians: Gaussians, *, sh_degree_rest: int = 0) -> dict[str, np.ndarray]:
    """The PLY columns of :func:`save_ply`: {name: float32 [G]}, in file order."""
    if sh_degree_rest not in (0, 3):
        raise ValueError(f"sh_degree_rest must be 0 or 3, got {sh_degree_rest!r}")
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"gaussians must be an atoken_rt.gs.Gaussians, got "
                        f"{type(gaussians).__name__}")
    base = gaussians.ply_arrays()  # x..f_dc, logit opacity, log scale (gs.Gaussians.save_ply)
    # Viewers expect a unit quaternion; the activated rotation is normalize(internal + (1,0,0,0)).
    rot = gaussians.rotation.detach().float().cpu()
    rot = (rot / rot.norm(dim=-1, keepdim=True)).numpy()
    g = gaussians.num_gaussians
    cols: dict[str, np.ndarray] = {}
    for name in ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"):
        cols[name] = base[name]
    for i in range(3 * ((sh_degree_rest + 1) ** 2 - 1)):
        cols[f"f_rest_{i}"] = np.zeros(g, np.float32)
    for name in ("opacity", "scale_0", "scale_1", "scale_2"):
        cols[name] = base[name]
    for i in range(4):
        cols[f"rot_{i}"] = np.ascontiguousarray(rot[:, i], dtype=np.float32)
    return cols


def save_ply(gaussians: Gaussians, path: PathLike, *, sh_degree_rest: int = 0) -> Path:
    """Write the 3DGS viewer PLY (see the module docstring). sh_degree_rest: 0 (no ``f_rest``)
    or 3 (45 zero ``f_rest`` columns). Returns the path."""
    path = Path(path)
    write_ply(path, ply_columns(gaussians, sh_degree_rest=sh_degree_rest))
    return path


def splat_records(gaussians: Gaussians) -> np.ndarray:
    """The .splat records, sorted: a structured array [G] of :data:`SPLAT_DTYPE` (32 bytes)."""
    c = ply_columns(gaussians)
    log_s = np.stack([c["scale_0"], c["scale_1"], c["scale_2"]], 1)
    logit = c["opacity"]
    # convert.py's key: -exp(s0 + s1 + s2) / (1 + exp(-logit)), float32. Stable for ties.
    with np.errstate(over="ignore"):
        key = -np.exp(log_s[:, 0] + log_s[:, 1] + log_s[:, 2]) / (1 + np.exp(-logit))
    order = np.argsort(key, kind="stable")
    rec = np.empty(len(order), dtype=SPLAT_DTYPE)
    rec["xyz"] = np.stack([c["x"], c["y"], c["z"]], 1)[order]
    rec["scale"] = np.exp(log_s)[order]
    f_dc = np.stack([c["f_dc_0"], c["f_dc_1"], c["f_dc_2"]], 1)
    with np.errstate(over="ignore"):
        rgba = np.concatenate([0.5 + np.float32(SH_C0) * f_dc,
                               (1 / (1 + np.exp(-logit)))[:, None]], 1)
    rec["rgba"] = (rgba * 255).clip(0, 255).astype(np.uint8)[order]  # truncation, as convert.py
    rot = np.stack([c[f"rot_{i}"] for i in range(4)], 1)
    rot = rot / np.linalg.norm(rot, axis=1, keepdims=True)
    rec["rot"] = (rot * 128 + 128).clip(0, 255).astype(np.uint8)[order]
    return rec


def save_splat(gaussians: Gaussians, path: PathLike) -> Path:
    """Write the antimatter15 ``.splat`` file (32 bytes a splat, no header). Returns the path."""
    path = Path(path)
    path.write_bytes(splat_records(gaussians).tobytes())
    return path


__all__ = ["save_ply", "save_splat", "ply_columns", "splat_records", "SPLAT_DTYPE"]
