"""Scores for rendered Gaussians against the input views: PSNR and SSIM.

- :func:`psnr`: ``10 log10(data_range^2 / MSE)`` over all pixels and channels given.
- :func:`ssim`: Wang et al. (2004) SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, per channel, weighted (biased) local statistics, averaged over the *valid* window
  positions (no padding, as the original MATLAB code's ``filter2(..., 'valid')`` and
  pytorch-msssim), then over channels. Implementations that zero-pad (the 3DGS training loss)
  or reflect-pad differ only near the border.
- :func:`score_views`: render the Gaussians from the given cameras at the images' resolution
  (official settings: black background, kernel 0.1, near 0.8 / far 1.6) and score every view;
  this is the 3D reconstruction metric of the paper (TRELLIS-style appearance PSNR / SSIM of
  renders against the ground-truth views), here on the input views themselves.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _as_float(x, name: str) -> torch.Tensor:
    """A [..., H, W, C] image (uint8 -> [0, 255] values, float kept) as float64 CPU tensor."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x.detach().to("cpu", torch.float64)


def psnr(a, b, *, data_range: float = 1.0) -> float:
    """PSNR in dB between two images (or stacks) of the same shape; inf when they are equal."""
    x, y = _as_float(a, "a"), _as_float(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {list(x.shape)} vs {list(y.shape)}")
    mse = float(torch.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range * data_range / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """Normalised 2D Gaussian window [size, size], float64 (outer product of the 1D one)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, *, data_range: float = 1.0) -> float:
    """Mean SSIM of two [H, W, C] (or [H, W], or [V, H, W, C]: mean over views) images with the
    same shape and H, W >= 11, values on the scale of ``data_range``."""
    x, y = _as_float(a, "a"), _as_float(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {list(x.shape)} vs {list(y.shape)}")
    if x.dim() == 2:
        x, y = x[..., None], y[..., None]
    if x.dim() == 3:
        x, y = x[None], y[None]
    if x.dim() != 4:
        raise ValueError(f"ssim: expected [H, W], [H, W, C] or [V, H, W, C], got {list(x.shape)}")
    if x.shape[1] < WINDOW or x.shape[2] < WINDOW:
        raise ValueError(f"ssim: images must be at least {WINDOW}x{WINDOW}, got "
                         f"{x.shape[1]}x{x.shape[2]}")
    c = x.shape[-1]
    x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)  # [V, C, H, W]
    w = gaussian_window().expand(c, 1, WINDOW, WINDOW)

    def filt(t):
        return F.conv2d(t, w, groups=c)  # 'valid': no padding

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (((2 * mu_x * mu_y + c1) * (2 * sxy + c2))
         / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2)))
    return float(s.mean())


def score_views(gaussians, images, w2c, intrinsics, *, backend: str = "auto",
                bg: Sequence[float] = (0.0, 0.0, 0.0), batch: int = 4,
                rendered_out: Optional[list] = None) -> dict:
    """Render ``gaussians`` from V input cameras and score the renders against the views.

    images: uint8 [V, H, W, 3] (the input views; compared on the [0, 1] scale after the render
    is rounded to uint8, as a saved picture would be); w2c [V, 4, 4] OpenCV world-to-camera;
    intrinsics [V, 3, 3] normalised. Renders at H x W with :func:`render.render` defaults
    otherwise. If ``rendered_out`` is a list, the uint8 renders [V, H, W, 3] are appended to it.

    Returns {"psnr": mean dB over views, "ssim": mean, "psnr_views": [V], "ssim_views": [V],
    "views": V, "resolution": [H, W]}.
    """
    from .render import render_batched

    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [V, H, W, 3], got {imgs.dtype} {list(imgs.shape)}")
    v, h, w, _ = imgs.shape
    w2c_t = torch.as_tensor(np.asarray(w2c), dtype=torch.float32)
    k_t = torch.as_tensor(np.asarray(intrinsics), dtype=torch.float32)
    if w2c_t.shape != (v, 4, 4) or k_t.shape != (v, 3, 3):
        raise ValueError(f"need w2c [{v}, 4, 4] and intrinsics [{v}, 3, 3] for {v} images, got "
                         f"{list(w2c_t.shape)} and {list(k_t.shape)}")
    res = render_batched(gaussians, w2c_t, k_t, batch=batch, resolution=(h, w), bg=bg,
                         backend=backend)
    ours = res.uint8().numpy()
    if rendered_out is not None:
        rendered_out.append(ours)
    p = [psnr(ours[i], imgs[i], data_range=255.0) for i in range(v)]
    s = [ssim(ours[i], imgs[i], data_range=255.0) for i in range(v)]
    finite = [x for x in p if math.isfinite(x)]
    return {"psnr": float(np.mean(finite)) if finite else math.inf, "ssim": float(np.mean(s)),
            "psnr_views": p, "ssim_views": s, "views": v, "resolution": [h, w]}


def input_views(path, *, views: Optional[int] = None, resolution: Optional[int] = None,
                seed: int = 0):
    """The views a 3D input was packed from, for :func:`score_views`: a render folder is read
    (``read_render_folder``), a mesh is rendered (``render_views``, ``views`` x ``resolution``^2,
    default ``threed.views.DEFAULT_VIEWS`` / ``DEFAULT_RESOLUTION`` read at call time, the same
    as ``load_mesh`` packs). Returns (images uint8 [V, H, W, 3], RGBA composited on black,
    w2c [V, 4, 4], intrinsics [V, 3, 3]); None for a voxel file (no views)."""
    from pathlib import Path

    from .. import threed
    from . import views as views_mod

    path = Path(path)
    if path.is_dir():
        got = threed.read_render_folder(path)
        return on_black(got.images), got.w2c, got.intrinsics
    if path.suffix.lower() in (".npz", ".safetensors"):
        return None
    images, _depths, w2c, k = threed.render_views(
        path, views or views_mod.DEFAULT_VIEWS, resolution or views_mod.DEFAULT_RESOLUTION, seed)
    return on_black(images), w2c, k


def on_black(images) -> np.ndarray:
    """uint8 ``[..., 3|4]`` views -> ``[..., 3]`` on the renderer's black background: RGBA
    (mesh renders, transparent PNGs) is composited as ``round(rgb * alpha / 255)``."""
    imgs = np.asarray(images)
    if imgs.shape[-1] != 4:
        return imgs
    a = imgs[..., 3:].astype(np.float32) / 255
    return np.rint(imgs[..., :3].astype(np.float32) * a).astype(np.uint8)


def score_input(path, gaussians, out_dir, stem: str, *, backend: str = "auto",
                views: Optional[int] = None, resolution: Optional[int] = None,
                seed: int = 0, known_views=None) -> Optional[dict]:
    """``atoken-rt reconstruct`` for a mesh or render folder: render the decoded Gaussians from
    the input's own cameras (:func:`input_views`, or ``known_views`` = (images, w2c, intrinsics)
    already read with the input, e.g. ``media.Loaded.views``), score them (:func:`score_views`)
    and write ``out_dir/stem_views/NN.png`` = input | render side by side. Returns the scores
    plus ``files``, or None when the input has no views (a voxel file)."""
    from pathlib import Path

    from .. import media

    if known_views is not None:
        images, w2c, k = known_views
        got = on_black(images), w2c, k
    else:
        got = input_views(path, views=views, resolution=resolution, seed=seed)
    if got is None:
        return None
    images, w2c, k = (np.asarray(x) for x in got)
    rendered: list = []
    scores = score_views(gaussians, images, w2c, k, backend=backend, rendered_out=rendered)
    folder = Path(out_dir) / f"{stem}_views"
    folder.mkdir(parents=True, exist_ok=True)
    files = [media.write_png(folder / f"{i:02d}.png", np.concatenate([images[i], r], axis=1))
             for i, r in enumerate(rendered[0])]
    return {**scores, "files": [str(f) for f in files]}


__all__ = ["psnr", "ssim", "score_views", "score_input", "gaussian_window", "input_views",
           "on_black"]
