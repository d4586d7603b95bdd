"""Render 3D Gaussians (spec §9.5-9.6): the mip-splatting rasteriser's rules, four backends.

``render(gaussians, w2c, intrinsics)`` draws V cameras at once. The conventions are those of the
mip-splatting fork of diff-gaussian-rasterization that TRELLIS (and so AToken) renders with:

- Cameras: ``w2c`` [V, 4, 4] OpenCV world-to-camera (x right, y down, z forward); ``intrinsics``
  [V, 3, 3] *normalised* (fx, cx in image widths, fy, cy in image heights). A camera point
  (x, y, z) lands at pixel-index coordinates ``u = fx*W*x/z + cx*W - 0.5``,
  ``v = fy*H*y/z + cy*H - 0.5``: pixel (row i, col j) has its centre at (u, v) = (j, i). (The
  official OpenGL matrix gives the same numbers for cx = cy = 0.5, the only principal point
  AToken uses.)
- Covariance: ``Sigma = R S^2 R^T`` from the scale and the w-first quaternion (used as given, not
  re-normalised, as the CUDA code does); EWA projection ``J W Sigma W^T J^T`` with the Jacobian
  taken at the point whose x/z, y/z are clamped to 1.3x the half-fov tangent.
- Mip-splatting 2D filter: ``kernel_size`` (pixels^2) is added to the 2D covariance diagonal and
  the opacity multiplied by ``sqrt(det / (det_filtered + 1e-6) + 1e-6)`` (zero when either
  determinant is <= 1e-6).
- Footprint: radius ``ceil(3 sqrt(lambda_max))`` with ``lambda_max = mid + sqrt(max(0.1,
  mid^2 - det))``; the Gaussian is evaluated on every pixel of the 16x16 tiles its radius square
  touches (and nowhere else). Colour is SH degree 0, ``max(SH_C0 f_dc + 0.5, 0)``.
- Compositing, front to back in (view depth, index) order: skip where the Gaussian's exponent is
  > 0; ``alpha = min(0.99, opacity * exp(power))``, skipped below 1/255; stop (without adding the
  Gaussian) once the transmittance would fall below 1e-4. ``rgb = C + T * bg``, clamped to [0, 1]
  (TRELLIS clips when it writes pictures).
- Culling: Gaussians with view depth z <= 0.2 (:data:`NEAR_CULL`, the CUDA code's
  ``in_frustum`` test) are dropped, whatever ``near`` is. ``near`` / ``far`` (0.8 / 1.6 in
  TRELLIS) only build the official OpenGL projection matrix, whose x, y do not depend on them:
  they cull nothing (a Gaussian at z = 0.5 is drawn with near = 0.8, as in the official
  renderer), and they are passed to the dgr backend's projection.

Outputs (:class:`RenderResult`): ``rgb`` [V, H, W, 3], ``alpha`` = 1 - T [V, H, W] and ``depth``
[V, H, W], the alpha-normalised expected view depth ``sum(w z) / alpha`` (0 where alpha = 0), all
float32 on the Gaussians' device. (The mip-splatting rasteriser returns colour only and TRELLIS's
Gaussian renderer no depth: ``depth`` and ``alpha`` are extras, not official outputs.)

Backends: ``torch`` (the reference, CPU or CUDA, tiled over tiles and Gaussians so that memory
stays bounded), ``triton`` (kernels/gs_raster.py: one program per tile), and, on CUDA when
installed, ``diff_gaussian_rasterization`` (the mip-splatting fork) and ``gsplat``. ``auto``: on
CUDA the first available of dgr, gsplat, triton, torch; on the CPU torch.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..gs import Gaussians

#: Tile edge of the rasteriser (pixels).
TILE = 16
#: Per-pixel compositing constants of the 3DGS rasteriser.
ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4
#: The Jacobian is evaluated with x/z, y/z clamped to this multiple of tan(fov/2).
FOV_CLAMP = 1.3
#: Gaussians at view depth z <= this are culled (the CUDA rasteriser's ``p_view.z <= 0.2``);
#: the ``near`` argument of :func:`render` does not cull (it only enters the projection matrix).
NEAR_CULL = 0.2
BACKENDS = ("auto", "torch", "triton", "diff_gaussian_rasterization", "gsplat")


@dataclass
class RenderResult:
    """rgb [V, H, W, 3] in [0, 1], alpha [V, H, W] in [0, 1], depth [V, H, W] (expected view
    depth, 0 where nothing was drawn); float32."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor

    def cpu(self) -> "RenderResult":
        return RenderResult(self.rgb.cpu(), self.alpha.cpu(), self.depth.cpu())

    def uint8(self) -> torch.Tensor:
        """rgb as uint8 [V, H, W, 3]: ``x * 255`` truncated, as TRELLIS's ``render_frames``
        converts its renders (so saved frames match the official pictures)."""
        return (self.rgb * 255).clamp(0, 255).to(torch.uint8)


@dataclass
class Projected:
    """Per-view, per-Gaussian screen-space data (one view), float32 unless noted.

    xy [N, 2] pixel-index coordinates; conic [N, 3] (a, b, c) of the inverse filtered 2D
    covariance; opacity [N] (times the mip-splatting compensation); depth [N] view z;
    color [N, 3]; rect [N, 4] int64 tile rectangle (x0, y0, x1, y1), half-open; valid [N] bool.
    """

    xy: torch.Tensor
    conic: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    color: torch.Tensor
    rect: torch.Tensor
    valid: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _resolution(resolution) -> tuple[int, int]:
    """int S -> (S, S); (H, W) -> (H, W)."""
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        h = w = resolution
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        h, w = (int(v) for v in resolution)
    else:
        raise TypeError(f"resolution must be an int or (H, W), got {resolution!r}")
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


def _check_gaussians(g) -> None:
    for name in ("xyz", "scale", "rotation", "opacity", "rgb"):
        if not isinstance(getattr(g, name, None), torch.Tensor):
            raise TypeError(f"gaussians must be an atoken_rt.gs.Gaussians (missing tensor "
                            f"{name!r}), got {type(g).__name__}")
    n = g.xyz.shape[0]
    for name, k in (("xyz", 3), ("scale", 3), ("rotation", 4), ("rgb", 3)):
        t = getattr(g, name)
        if t.shape != (n, k):
            raise ValueError(f"gaussians.{name} must be [{n}, {k}], got {list(t.shape)}")
    if g.opacity.reshape(-1).shape[0] != n:
        raise ValueError(f"gaussians.opacity must hold {n} values, got {list(g.opacity.shape)}")


def _cameras(w2c, intrinsics, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch and check the cameras: fp32 [V, 4, 4] and [V, 3, 3] on ``device``."""
    w2c = torch.as_tensor(w2c, dtype=torch.float32, device=device)
    k = torch.as_tensor(intrinsics, dtype=torch.float32, device=device)
    if w2c.dim() == 2:
        w2c = w2c[None]
    if k.dim() == 2:
        k = k[None]
    if w2c.dim() != 3 or w2c.shape[1:] != (4, 4):
        raise ValueError(f"w2c must be [V, 4, 4] (or [4, 4]), got {list(w2c.shape)}")
    if k.dim() != 3 or k.shape[1:] != (3, 3):
        raise ValueError(f"intrinsics must be [V, 3, 3] (or [3, 3]), got {list(k.shape)}")
    if k.shape[0] == 1 and w2c.shape[0] > 1:
        k = k.expand(w2c.shape[0], 3, 3)
    if k.shape[0] != w2c.shape[0]:
        raise ValueError(f"{w2c.shape[0]} extrinsics but {k.shape[0]} intrinsics")
    if not bool(torch.isfinite(w2c).all() and torch.isfinite(k).all()):
        raise ValueError("w2c and intrinsics must be finite")
    if bool((k[:, 0, 0] <= 0).any() or (k[:, 1, 1] <= 0).any()):
        raise ValueError("intrinsics: fx and fy must be positive (normalised: 0.5 / tan(fov/2))")
    return w2c, k


# ----------------------------------------------------------------------------------------------
# Projection (shared by the torch and triton backends)
# ----------------------------------------------------------------------------------------------


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(w, x, y, z) [N, 4] -> rotation [N, 3, 3], used as given (not normalised)."""
    r, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
        2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
        2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(q.shape[:-1] + (3, 3))


def covariance_3d(scale: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """World covariance R diag(scale^2) R^T, [N, 3, 3]."""
    m = quaternion_to_matrix(rotation) * scale[:, None, :]  # R S
    return m @ m.transpose(1, 2)


def project(g: Gaussians, w2c: torch.Tensor, k: torch.Tensor, height: int, width: int, *,
            near: float, kernel_size: float, cov3d: Optional[torch.Tensor] = None) -> Projected:
    """Project the Gaussians into one camera (w2c [4, 4], k [3, 3] normalised), fp32."""
    xyz = g.xyz.float()
    rot, t = w2c[:3, :3], w2c[:3, 3]
    p = xyz @ rot.T + t  # view space
    z = p[:, 2]
    valid = z > near
    zs = torch.where(valid, z, torch.ones_like(z))  # keep the culled ones finite
    fx, fy = k[0, 0] * width, k[1, 1] * height  # focal lengths in pixels
    u = fx * p[:, 0] / zs + k[0, 2] * width - 0.5
    v = fy * p[:, 1] / zs + k[1, 2] * height - 0.5

    # EWA: Jacobian of the perspective map at the (clamped) point.
    limx, limy = FOV_CLAMP * 0.5 / k[0, 0], FOV_CLAMP * 0.5 / k[1, 1]
    tx = torch.clamp(p[:, 0] / zs, -limx, limx) * zs
    ty = torch.clamp(p[:, 1] / zs, -limy, limy) * zs
    zero = torch.zeros_like(zs)
    jac = torch.stack([fx / zs, zero, -fx * tx / (zs * zs),
                       zero, fy / zs, -fy * ty / (zs * zs)], -1).reshape(-1, 2, 3)
    if cov3d is None:
        cov3d = covariance_3d(g.scale.float(), g.rotation.float())
    tmat = jac @ rot  # [N, 2, 3]
    cov = tmat @ cov3d @ tmat.transpose(1, 2)
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]

    # Mip-splatting 2D filter and its opacity compensation.
    det0 = torch.clamp(a * c - b * b, min=1e-6)
    det1 = torch.clamp((a + kernel_size) * (c + kernel_size) - b * b, min=1e-6)
    coef = torch.sqrt(det0 / (det1 + 1e-6) + 1e-6)
    coef = torch.where((det0 <= 1e-6) | (det1 <= 1e-6), torch.zeros_like(coef), coef)
    a, c = a + kernel_size, c + kernel_size
    det = a * c - b * b
    valid = valid & (det != 0)
    det_inv = 1.0 / torch.where(det != 0, det, torch.ones_like(det))
    conic = torch.stack([c * det_inv, -b * det_inv, a * det_inv], -1)

    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
    radius = torch.ceil(3.0 * torch.sqrt(lam))
    gx, gy = (width + TILE - 1) // TILE, (height + TILE - 1) // TILE
    # The CUDA code casts to int (truncation toward zero) before clamping to the grid.
    x0 = torch.trunc((u - radius) / TILE).clamp(0, gx)
    x1 = torch.trunc((u + radius + TILE - 1) / TILE).clamp(0, gx)
    y0 = torch.trunc((v - radius) / TILE).clamp(0, gy)
    y1 = torch.trunc((v + radius + TILE - 1) / TILE).clamp(0, gy)
    rect = torch.stack([x0, y0, x1, y1], -1)
    rect = torch.where(torch.isfinite(rect), rect, torch.zeros_like(rect)).to(torch.int64)
    valid = valid & ((rect[:, 2] - rect[:, 0]) * (rect[:, 3] - rect[:, 1]) > 0)

    color = torch.clamp_min(g.rgb.float(), 0.0)  # SH degree 0: SH_C0 * f_dc + 0.5, clamped at 0
    opacity = g.opacity.float().reshape(-1) * coef
    return Projected(xy=torch.stack([u, v], -1), conic=conic, opacity=opacity,
                     depth=z.contiguous(), color=color, rect=rect, valid=valid)


def bin_tiles(pr: Projected, height: int, width: int, *, cell: int = TILE, tight: bool = False):
    """Cell lists: every (cell, Gaussian) pair a valid Gaussian may draw on, grouped by cell,
    front to back inside a cell.

    With ``cell = 16`` and ``tight = False`` these are the rasteriser's tile lists: every tile
    of the Gaussian's tile rectangle. ``tight = True`` (the torch backend) also cuts the
    rectangle to the box around the ellipse where ``opacity exp(power) >= 1/255`` (half-widths
    ``sqrt(2 ln(255 opacity) cov_xx)``, ``..._yy``, widened by half a pixel): outside it every
    pixel would skip the Gaussian anyway, so the picture is the same, with far fewer pairs.

    Returns (gid [P] int64 Gaussian index per pair, ranges [cells, 2] int64 (start, end) into
    gid per cell, row-major cell order). The order inside a cell is (depth, Gaussian index), as
    the CUDA rasteriser's stable radix sort of (tile, depth) keys emitted in index order gives.
    """
    dev = pr.xy.device
    gx, gy = (width + cell - 1) // cell, (height + cell - 1) // cell
    valid = pr.valid
    # The tile rectangle in pixels: [x0, x1) x [y0, y1).
    box = (pr.rect * TILE).to(torch.float32)
    if tight:
        tau = torch.log(torch.clamp_min(pr.opacity * 255.0, 1e-30))
        valid = valid & (tau >= -1e-5)  # peak alpha < 1/255: never drawn (with fp32 slack)
        det = pr.conic[:, 0] * pr.conic[:, 2] - pr.conic[:, 1] ** 2
        det = torch.where(det > 0, det, torch.ones_like(det))
        # Sigma = conic^-1: Sigma_xx = c / det, Sigma_yy = a / det.
        hx = torch.sqrt(2 * tau.clamp_min(0) * pr.conic[:, 2] / det) + 0.5
        hy = torch.sqrt(2 * tau.clamp_min(0) * pr.conic[:, 0] / det) + 0.5
        box = torch.stack([torch.maximum(box[:, 0], torch.floor(pr.xy[:, 0] - hx)),
                           torch.maximum(box[:, 1], torch.floor(pr.xy[:, 1] - hy)),
                           torch.minimum(box[:, 2], torch.floor(pr.xy[:, 0] + hx) + 1),
                           torch.minimum(box[:, 3], torch.floor(pr.xy[:, 1] + hy) + 1)], 1)
        box = torch.where(torch.isfinite(box), box, torch.zeros_like(box))
    rect = torch.stack([torch.div(box[:, 0], cell, rounding_mode="floor"),
                        torch.div(box[:, 1], cell, rounding_mode="floor"),
                        torch.div(box[:, 2] + cell - 1, cell, rounding_mode="floor"),
                        torch.div(box[:, 3] + cell - 1, cell, rounding_mode="floor")], 1)
    rect = torch.minimum(rect.clamp_min(0), torch.tensor([gx, gy, gx, gy], device=dev))
    # int32 for the per-pair arithmetic and the sort (cell ids < 2^31): about 2x faster.
    rect = rect.to(torch.int32)
    valid = valid & (rect[:, 2] > rect[:, 0]) & (rect[:, 3] > rect[:, 1])
    idx = torch.nonzero(valid).squeeze(1)
    idx = idx[torch.argsort(pr.depth[idx], stable=True)]  # front to back, ties by index
    x0, y0, x1, y1 = (rect[idx, i].contiguous() for i in range(4))
    w = x1 - x0
    n = w * (y1 - y0)
    owner = torch.repeat_interleave(torch.arange(len(idx), device=dev, dtype=torch.int32),
                                    n.to(torch.int64))
    first = torch.cumsum(n, 0, dtype=torch.int32) - n
    local = torch.arange(len(owner), device=dev, dtype=torch.int32) - first[owner]
    wo = w[owner]
    row = torch.div(local, wo, rounding_mode="floor")
    cid = (y0[owner] + row) * gx + x0[owner] + (local - row * wo)
    order = torch.sort(cid, stable=True).indices  # keeps the depth order inside each cell
    gid = idx[owner[order].to(torch.int64)]
    counts = torch.bincount(cid, minlength=gx * gy)
    end = torch.cumsum(counts, 0)
    ranges = torch.stack([end - counts, end], -1)
    return gid, ranges


# ----------------------------------------------------------------------------------------------
# torch backend (the reference)
# ----------------------------------------------------------------------------------------------


def _composite(xy, conic, opacity, color, depth, px, py, live, state):
    """Composite one chunk of K Gaussians per tile, front to back, into the running state.

    xy [B, K, 2], conic [B, K, 3], opacity [B, K], color [B, K, 3], depth [B, K]; live [B, K]
    (False for padding); px, py [B, P] pixel-index coordinates. state = (T [B, P], C [B, P, 3],
    D [B, P], done [B, P] bool), updated in place. live may also be per pixel, [B, P, K].
    """
    t, c, d, done = state
    dx = xy[:, None, :, 0] - px[:, :, None]  # [B, P, K]
    dy = xy[:, None, :, 1] - py[:, :, None]
    ca, cb, cc = (conic[:, None, :, i] for i in range(3))
    power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
    alpha = torch.clamp_max(opacity[:, None, :] * torch.exp(power), ALPHA_MAX)
    live = live[:, None, :] if live.dim() == 2 else live
    use = live & (power <= 0) & (alpha >= ALPHA_MIN) & ~done[:, :, None]
    alpha = torch.where(use, alpha, 0.0)  # a skipped Gaussian multiplies T by exactly 1
    # Transmittance before each Gaussian, multiplied in the rasteriser's order:
    # T_k = (((T (1 - a_0)) (1 - a_1)) ...), a cumprod over [T, 1 - a_0, 1 - a_1, ...].
    tk = torch.cumprod(torch.cat([t[:, :, None], 1 - alpha], dim=2), dim=2)  # [B, P, K+1]
    stop = use & (tk[..., 1:] < T_MIN)  # would bring T below 1e-4: stop there, skip it
    if not bool(stop.any()):  # the common case: no pixel of the chunk reaches the stop
        w = alpha * tk[..., :-1]
        t.copy_(tk[..., -1])
    else:
        stopped = torch.cumsum(stop.to(torch.int32), dim=2) > 0
        w = torch.where(stopped, 0.0, alpha * tk[..., :-1])
        # New T: the product over the Gaussians before the stop.
        t.copy_(torch.gather(tk, 2, (~stopped).sum(2, keepdim=True)).squeeze(2))
        done |= stopped[..., -1]
    # Colour and depth sums as one batched matmul: [B, P, K] @ [B, K, 4].
    acc = torch.bmm(w, torch.cat([color, depth[..., None]], dim=-1))
    c += acc[..., :3]
    d += acc[..., 3]


def _render_view_torch(pr: Projected, height: int, width: int, *, cell: int = 4,
                       cells_per_batch: int = 1024, chunk: int = 32):
    """One view with the torch reference: tight cell lists (:func:`bin_tiles`), then per batch
    of cells, per chunk of each cell's list, a dense [cells, cell^2, chunk] evaluation, leaving
    out cells whose pixels have all stopped. Memory ~ cells_per_batch*cell^2*chunk*40 bytes for
    the evaluation plus ~50 bytes per (cell, Gaussian) pair for the lists. 4x4 cells: a 640k
    Gaussian 512^2 view of a decoder-like object has ~8M pairs (0.4 GB), 1/3 of the pixel work
    of 8x8 cells and 1/7 of 16x16 tiles (measured).
    Returns (C [H, W, 3], T [H, W], D [H, W]) before the background."""
    dev = pr.xy.device
    gx, gy = (width + cell - 1) // cell, (height + cell - 1) // cell
    gid, ranges = bin_tiles(pr, height, width, cell=cell, tight=True)
    n_cells, npix = gx * gy, cell * cell
    lane = torch.arange(npix, device=dev)
    ly, lx = (lane // cell).float(), (lane % cell).float()
    out_t = torch.ones(n_cells, npix, device=dev)
    out_c = torch.zeros(n_cells, npix, 3, device=dev)
    out_d = torch.zeros(n_cells, npix, device=dev)
    counts = ranges[:, 1] - ranges[:, 0]
    busy = torch.nonzero(counts > 0).squeeze(1)
    busy = busy[torch.argsort(counts[busy], descending=True, stable=True)]  # similar lengths
    # One gather per chunk instead of five: xy 0:2, conic 2:5, opacity 5, color 6:9, depth 9.
    params = torch.cat([pr.xy, pr.conic, pr.opacity[:, None], pr.color, pr.depth[:, None]], 1)
    for s in range(0, len(busy), cells_per_batch):
        cells = busy[s:s + cells_per_batch]
        b = len(cells)
        px = ((cells % gx) * cell).float()[:, None] + lx[None, :]
        py = ((cells // gx) * cell).float()[:, None] + ly[None, :]
        state = (torch.ones(b, npix, device=dev), torch.zeros(b, npix, 3, device=dev),
                 torch.zeros(b, npix, device=dev),
                 torch.zeros(b, npix, dtype=torch.bool, device=dev))
        start, cnt = ranges[cells, 0], counts[cells]
        kmax = int(cnt.max())
        active = torch.arange(b, device=dev)
        for k0 in range(0, kmax, chunk):
            # Cells with Gaussians left and a pixel still open (early stop per cell).
            open_ = (cnt[active] > k0) & ~state[3][active].all(1)
            active = active[open_]
            if len(active) == 0:
                break
            pos = k0 + torch.arange(chunk, device=dev)
            live = pos[None, :] < cnt[active, None]
            sel = gid[torch.where(live, start[active, None] + pos[None, :],
                                  torch.zeros_like(live, dtype=torch.int64))]
            q = params[sel]
            args = (q[..., 0:2], q[..., 2:5], q[..., 5], q[..., 6:9], q[..., 9])
            if len(active) == b:  # the common case (similar list lengths): in place
                _composite(*args, px, py, live, state)
                continue
            sub = tuple(x[active] for x in state)
            _composite(*args, px[active], py[active], live, sub)
            for full, part in zip(state, sub):
                full[active] = part
        out_t[cells], out_c[cells], out_d[cells] = state[0], state[1], state[2]
    return _untile(out_c, out_t, out_d, height, width, cell)


def _untile(c, t, d, height, width, cell=TILE):
    """[cells, cell^2, ...] cell-major buffers -> [H, W, ...] images (cropping the last cells)."""
    gx, gy = (width + cell - 1) // cell, (height + cell - 1) // cell

    def img(x):
        x = x.reshape(gy, gx, cell, cell, *x.shape[2:]).transpose(1, 2)
        return x.reshape(gy * cell, gx * cell, *x.shape[4:])[:height, :width]

    return img(c), img(t), img(d)


def _render_view_dense(pr: Projected, height: int, width: int):
    """The untiled reference: every pixel against every valid Gaussian at once, in (depth,
    index) order, a Gaussian counting only on pixels inside its tile rectangle. Small scenes."""
    dev = pr.xy.device
    idx = torch.nonzero(pr.valid).squeeze(1)
    idx = idx[torch.argsort(pr.depth[idx], stable=True)]
    yy, xx = torch.meshgrid(torch.arange(height, device=dev), torch.arange(width, device=dev),
                            indexing="ij")
    px, py = xx.reshape(1, -1).float(), yy.reshape(1, -1).float()
    tx, ty = (xx // TILE).reshape(1, -1, 1), (yy // TILE).reshape(1, -1, 1)
    r = pr.rect[idx][None, None]  # [1, 1, K, 4]
    inside = (tx >= r[..., 0]) & (tx < r[..., 2]) & (ty >= r[..., 1]) & (ty < r[..., 3])
    hw = height * width
    state = (torch.ones(1, hw, device=dev), torch.zeros(1, hw, 3, device=dev),
             torch.zeros(1, hw, device=dev), torch.zeros(1, hw, dtype=torch.bool, device=dev))
    _composite(pr.xy[idx][None], pr.conic[idx][None], pr.opacity[idx][None],
               pr.color[idx][None], pr.depth[idx][None], px, py, inside, state)
    t, c, d, _ = state
    return (c.reshape(height, width, 3), t.reshape(height, width), d.reshape(height, width))


def _project_views(g, w2c, k, height, width, *, near, kernel_size):
    """:func:`project` into each of the V cameras in turn, the 3D covariances computed once."""
    cov3d = covariance_3d(g.scale.float(), g.rotation.float())
    for v in range(w2c.shape[0]):
        yield project(g, w2c[v], k[v], height, width, near=near, kernel_size=kernel_size,
                      cov3d=cov3d)


def _render_torch(g, w2c, k, height, width, *, near, kernel_size, bg=None, tiled=True,
                  cell=4, cells_per_batch=1024, chunk=32, colors=None):
    """All views with the torch reference. ``colors`` [N, 3] overrides the SH colour (used by
    the adapters' tests). Returns (C, T, D) stacked over views."""
    outs = []
    for pr in _project_views(g, w2c, k, height, width, near=near, kernel_size=kernel_size):
        if colors is not None:
            pr.color = colors.float()
        if tiled:
            outs.append(_render_view_torch(pr, height, width, cell=cell,
                                           cells_per_batch=cells_per_batch, chunk=chunk))
        else:
            outs.append(_render_view_dense(pr, height, width))
    return tuple(torch.stack(x) for x in zip(*outs))


# ----------------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------------


def _render_triton(g, w2c, k, height, width, *, near, kernel_size, bg=None):
    from ..kernels.gs_raster import rasterize_tiles

    outs = []
    for pr in _project_views(g, w2c, k, height, width, near=near, kernel_size=kernel_size):
        # Tile lists cut to each alpha >= 1/255 box: same picture, shorter lists.
        gid, ranges = bin_tiles(pr, height, width, tight=True)
        outs.append(rasterize_tiles(pr.xy, pr.conic, pr.opacity, pr.color, pr.depth, gid, ranges,
                                    height, width))
    return tuple(torch.stack(x) for x in zip(*outs))


# ----------------------------------------------------------------------------------------------
# CUDA libraries: diff-gaussian-rasterization (mip-splatting fork) and gsplat
# ----------------------------------------------------------------------------------------------


def intrinsics_to_projection(k: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """The OpenGL-style projection TRELLIS builds from normalised intrinsics k [3, 3]: [4, 4]
    (row-major, column vectors): x_ndc = 2 fx x/z + 2 cx - 1, y_ndc = 2 fy y/z + 1 - 2 cy."""
    p = torch.zeros(4, 4, dtype=k.dtype, device=k.device)
    p[0, 0], p[1, 1] = 2 * k[0, 0], 2 * k[1, 1]
    p[0, 2], p[1, 2] = 2 * k[0, 2] - 1, 1 - 2 * k[1, 2]
    p[2, 2], p[2, 3], p[3, 2] = far / (far - near), near * far / (near - far), 1.0
    return p


def dgr_settings(module, w2c, k, height, width, *, near, far, kernel_size, bg):
    """GaussianRasterizationSettings of one camera, as TRELLIS fills them (view and projection
    matrices transposed: the CUDA code reads them column-major)."""
    dev = w2c.device
    proj = intrinsics_to_projection(k, near, far)
    return module.GaussianRasterizationSettings(
        image_height=int(height), image_width=int(width),
        tanfovx=float(0.5 / k[0, 0]), tanfovy=float(0.5 / k[1, 1]),
        kernel_size=float(kernel_size),
        subpixel_offset=torch.zeros(height, width, 2, dtype=torch.float32, device=dev),
        bg=bg.to(dev), scale_modifier=1.0,
        viewmatrix=w2c.T.contiguous(), projmatrix=(proj @ w2c).T.contiguous(),
        sh_degree=0, campos=torch.inverse(w2c)[:3, 3].contiguous(),
        prefiltered=False, debug=False)


def _render_dgr(g, w2c, k, height, width, *, near, far, kernel_size, bg, module=None):
    """Through diff_gaussian_rasterization (mip-splatting fork). It returns colour only, so a
    second pass with precomputed colours (1, z, 0) and a black background gives alpha and the
    alpha-weighted depth."""
    mod = module or importlib.import_module("diff_gaussian_rasterization")
    xyz = g.xyz.float().contiguous()
    shs = g.features_dc.float().reshape(-1, 1, 3).contiguous()
    opac = g.opacity.float().reshape(-1, 1).contiguous()
    scales, rots = g.scale.float().contiguous(), g.rotation.float().contiguous()
    cs, ts, ds = [], [], []
    for v in range(w2c.shape[0]):
        zv = xyz @ w2c[v, 2, :3] + w2c[v, 2, 3]
        aux = torch.stack([torch.ones_like(zv), zv, torch.zeros_like(zv)], -1).contiguous()
        out = []
        for colors, back in ((None, bg), (aux, torch.zeros_like(bg))):
            ras = mod.GaussianRasterizer(raster_settings=dgr_settings(
                mod, w2c[v], k[v], height, width, near=near, far=far, kernel_size=kernel_size,
                bg=back))
            img = ras(means3D=xyz, means2D=torch.zeros_like(xyz), opacities=opac,
                      shs=None if colors is not None else shs, colors_precomp=colors,
                      scales=scales, rotations=rots)[0]  # [3, H, W]
            out.append(img)
        acc = out[1][0]
        cs.append(out[0].permute(1, 2, 0) - (1 - acc)[..., None] * bg.to(acc.device))
        ts.append(1 - acc)
        ds.append(out[1][1])
    return torch.stack(cs), torch.stack(ts), torch.stack(ds)


def gsplat_kwargs(g, w2c, k, height, width, *, near, far, kernel_size):
    """Arguments of gsplat.rasterization for these cameras: pixel intrinsics, the
    mip-splatting filter (antialiased mode, eps2d = kernel_size), colours precomputed from
    SH degree 0 (clamped at 0), expected depth as an extra channel."""
    kpx = k.clone()
    kpx[:, 0] *= width
    kpx[:, 1] *= height
    return dict(means=g.xyz.float().contiguous(), quats=g.rotation.float().contiguous(),
                scales=g.scale.float().contiguous(), opacities=g.opacity.float().reshape(-1),
                colors=torch.clamp_min(g.rgb.float(), 0.0).contiguous(),
                viewmats=w2c.contiguous(), Ks=kpx.contiguous(), width=int(width),
                height=int(height), near_plane=float(near), far_plane=float(far) * 1e6,
                eps2d=float(kernel_size), rasterize_mode="antialiased", render_mode="RGB+ED",
                tile_size=TILE, packed=False)


def _render_gsplat(g, w2c, k, height, width, *, near, far, kernel_size, bg, module=None):
    """Through gsplat.rasterization (far_plane is not a cull in the official renderer, so it is
    passed far away)."""
    mod = module or importlib.import_module("gsplat")
    colors, alphas, _ = mod.rasterization(**gsplat_kwargs(
        g, w2c, k, height, width, near=near, far=far, kernel_size=kernel_size))
    a = alphas[..., 0]
    # gsplat's "ED" is already alpha-normalised: undo it, finish() divides again.
    return colors[..., :3], 1 - a, colors[..., 3] * a


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def available_backends(device: Union[str, torch.device]) -> list[str]:
    """Backends usable on ``device``, fastest first (what ``auto`` picks from)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["torch"] + (["triton"] if _triton_interpreting() else [])
    out = [name for name in ("diff_gaussian_rasterization", "gsplat") if _importable(name)]
    if _importable("triton"):
        out.append("triton")
    return out + ["torch"]


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return False
    return True


def _triton_interpreting() -> bool:
    from ..kernels._utils import interpreter_active
    return interpreter_active() and _importable("triton")


def render(gaussians: Gaussians, w2c, intrinsics, *, resolution: Union[int, Sequence[int]] = 512,
           near: float = 0.8, far: float = 1.6, bg: Sequence[float] = (0.0, 0.0, 0.0),
           kernel_size: float = 0.1, backend: str = "auto") -> RenderResult:
    """Render Gaussians from V cameras with the official settings (spec §9.6) as defaults.

    gaussians: :class:`atoken_rt.gs.Gaussians` (xyz, scale, rotation (w, x, y, z), opacity, rgb;
    any float dtype, computed in fp32), on the CPU or CUDA. w2c: [V, 4, 4] (or [4, 4]) OpenCV
    world-to-camera; intrinsics: [V, 3, 3] (or [3, 3], shared) normalised (fx = 0.5/tan(fov/2),
    cx = cy = 0.5). resolution: S or (H, W). near, far: the official projection's planes (no
    culling: Gaussians are culled at view depth <= :data:`NEAR_CULL` = 0.2, as the CUDA code). bg: RGB in [0, 1]. kernel_size: the
    mip-splatting 2D filter variance in pixels^2. backend: ``auto``, ``torch``, ``triton``,
    ``diff_gaussian_rasterization`` or ``gsplat`` (the last two CUDA only).

    Returns :class:`RenderResult` (rgb [V, H, W, 3], alpha [V, H, W], depth [V, H, W], fp32, on
    the Gaussians' device).
    """
    _check_gaussians(gaussians)
    height, width = _resolution(resolution)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (near > 0 and far > near):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    if kernel_size < 0:
        raise ValueError(f"kernel_size must be >= 0, got {kernel_size}")
    dev = gaussians.xyz.device
    w2c, k = _cameras(w2c, intrinsics, dev)
    bg_t = torch.as_tensor(bg, dtype=torch.float32, device=dev).reshape(-1)
    if bg_t.shape != (3,):
        raise ValueError(f"bg must be 3 values, got {bg!r}")
    if backend == "auto":
        backend = available_backends(dev)[0]
    if backend in ("diff_gaussian_rasterization", "gsplat") and dev.type != "cuda":
        raise ValueError(f"backend {backend!r} needs the Gaussians on a CUDA device, got {dev}")
    with torch.no_grad():  # inference only: no autograd graph through the adapters either
        c, t, d = _dispatch(gaussians, w2c, k, height, width, backend, near=near, far=far,
                            kernel_size=kernel_size, bg=bg_t)
    return finish(c, t, d, bg_t)


def _dispatch(gaussians, w2c, k, height, width, backend, *, near, far, kernel_size, bg):
    """(C, T, D) [V, H, W, ...] from the chosen backend."""
    dev = gaussians.xyz.device
    # The torch/triton/gsplat backends cull at the CUDA code's 0.2; near/far only reach dgr's
    # projection matrix (they cull nothing there either).
    kw = dict(near=NEAR_CULL, kernel_size=kernel_size, bg=bg)
    if gaussians.xyz.shape[0] == 0:
        v = w2c.shape[0]
        c = torch.zeros(v, height, width, 3, device=dev)
        t, d = torch.ones(v, height, width, device=dev), torch.zeros(v, height, width, device=dev)
    elif backend == "torch":
        c, t, d = _render_torch(gaussians, w2c, k, height, width, **kw)
    elif backend == "triton":
        c, t, d = _render_triton(gaussians, w2c, k, height, width, **kw)
    elif backend == "diff_gaussian_rasterization":
        c, t, d = _render_dgr(gaussians, w2c, k, height, width, far=far,
                              **{**kw, "near": near})
    else:
        c, t, d = _render_gsplat(gaussians, w2c, k, height, width, far=far, **kw)
    return c, t, d


def finish(c: torch.Tensor, t: torch.Tensor, d: torch.Tensor, bg: torch.Tensor) -> RenderResult:
    """Accumulated colour C [V, H, W, 3], transmittance T [V, H, W], weighted depth D [V, H, W]
    -> RenderResult (rgb = clamp(C + T bg, 0, 1), alpha = 1 - T, depth = D / alpha)."""
    alpha = 1 - t
    rgb = (c + t[..., None] * bg.to(c.device)).clamp(0, 1)
    depth = torch.where(alpha > 0, d / torch.where(alpha > 0, alpha, torch.ones_like(alpha)),
                        torch.zeros_like(d))
    return RenderResult(rgb=rgb.float(), alpha=alpha.float(), depth=depth.float())


# ----------------------------------------------------------------------------------------------
# Cameras: the TRELLIS orbit
# ----------------------------------------------------------------------------------------------


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenCV world-to-camera [V, 4, 4] for eyes [V, 3] looking at target [3] with ``up`` [3]
    (utils3d's convention: z = forward, x = normalize(-up x z), y = z x x, so y points down)."""
    z = torch.nn.functional.normalize(target[None] - eye, dim=-1)
    x = torch.nn.functional.normalize(torch.cross(-up.expand_as(z), z, dim=-1), dim=-1)
    y = torch.cross(z, x, dim=-1)
    rot = torch.stack([x, y, z], dim=1)  # rows
    w2c = torch.eye(4, dtype=eye.dtype).repeat(len(eye), 1, 1)
    w2c[:, :3, :3] = rot
    w2c[:, :3, 3] = -(rot @ eye[:, :, None])[:, :, 0]
    return w2c


def _z_to(up) -> torch.Tensor:
    """The smallest rotation [3, 3] (float64) taking +z to the unit vector along ``up``."""
    u = torch.as_tensor(up, dtype=torch.float64).reshape(-1)
    if u.shape != (3,) or not bool(torch.isfinite(u).all()) or float(u.norm()) == 0:
        raise ValueError(f"up must be a finite non-zero 3-vector, got {up!r}")
    u = u / u.norm()
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    c = float(z @ u)
    if c < -1 + 1e-12:  # up = -z: half a turn about x
        return torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    v = torch.linalg.cross(z, u)
    vx = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + vx + vx @ vx / (1 + c)  # Rodrigues


def yaw_pitch_cameras(yaws, pitches, radius: float = 2.0, fov: float = 40.0, *, up=(0, 0, 1)):
    """TRELLIS cameras: eye = r (sin(yaw) cos(pitch), cos(yaw) cos(pitch), sin(pitch)) looking
    at the origin with up = +z; fov in degrees. Another ``up`` turns that whole rig by the
    smallest rotation taking +z to it. Returns (w2c [V, 4, 4], intrinsics [V, 3, 3]) fp32
    (float64 maths, then cast)."""
    yaw = torch.as_tensor(yaws, dtype=torch.float64).reshape(-1)
    pitch = torch.as_tensor(pitches, dtype=torch.float64).reshape(-1)
    if yaw.shape != pitch.shape:
        raise ValueError(f"{len(yaw)} yaws but {len(pitch)} pitches")
    if not (radius > 0 and 0 < fov < 180):
        raise ValueError(f"need radius > 0 and 0 < fov < 180 degrees, got {radius}, {fov}")
    rig = _z_to(up)
    eye = torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.cos(yaw) * torch.cos(pitch),
                       torch.sin(pitch)], -1) * radius
    w2c = look_at(eye @ rig.T, torch.zeros(3, dtype=torch.float64), rig[:, 2])
    f = 0.5 / math.tan(math.radians(fov) / 2)
    k = torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], dtype=torch.float64)
    return w2c.float(), k.float().repeat(len(yaw), 1, 1)


def orbit_cameras(frames: int = 60, radius: float = 2.0, fov: float = 40.0, *, up=(0, 0, 1)):
    """The TRELLIS ``render_video`` orbit: yaw once around ``up`` (0 to 2 pi, without repeating
    the first frame, so the video loops), pitch ``0.25 + 0.5 sin(yaw)`` radians. Returns
    (w2c [F, 4, 4], intrinsics [F, 3, 3]) fp32."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    yaw = torch.arange(frames, dtype=torch.float64) * (2 * math.pi / frames)
    return yaw_pitch_cameras(yaw, 0.25 + 0.5 * torch.sin(yaw), radius, fov, up=up)


def snapshot_cameras(radius: float = 10.0, fov: float = 8.0, *, up=(0, 0, 1)):
    """Four views for a 2x2 picture, as TRELLIS ``render_snapshot`` sets them: yaw 0, 90, 180,
    270 degrees offset by -16, pitch 20 degrees, at its defaults r = 10, fov = 8 degrees (a
    near-orthographic look; about the orbit's framing, 10 tan 4 ~ 2 tan 20)."""
    yaw = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64) * math.pi - math.radians(16)
    return yaw_pitch_cameras(yaw, torch.full((4,), math.radians(20), dtype=torch.float64),
                             radius, fov, up=up)


def orbit(gaussians: Gaussians, frames: int = 60, radius: float = 2.0, fov: float = 40.0, *,
          up=(0, 0, 1), batch: int = 8, **render_kw) -> RenderResult:
    """Render the orbit of :func:`orbit_cameras` (``batch`` views at a time); ``render_kw`` go
    to :func:`render` (resolution, bg, backend, ...). Returns a RenderResult on the CPU."""
    w2c, k = orbit_cameras(frames, radius, fov, up=up)
    return render_batched(gaussians, w2c, k, batch=batch, **render_kw)


def render_batched(gaussians: Gaussians, w2c, intrinsics, *, batch: int = 8,
                   **render_kw) -> RenderResult:
    """:func:`render` over many cameras, ``batch`` at a time, results gathered on the CPU."""
    w2c = torch.as_tensor(w2c, dtype=torch.float32)
    k = torch.as_tensor(intrinsics, dtype=torch.float32)
    if k.dim() == 2:
        k = k.expand(len(w2c), 3, 3)
    parts = [render(gaussians, w2c[i:i + batch], k[i:i + batch], **render_kw).cpu()
             for i in range(0, len(w2c), batch)]
    return RenderResult(*(torch.cat(x) for x in zip(*((p.rgb, p.alpha, p.depth) for p in parts))))


def grid_2x2(images) -> torch.Tensor:
    """Four images [4, H, W, C] -> one [2H, 2W, C] picture (row-major)."""
    if images.shape[0] != 4:
        raise ValueError(f"grid_2x2 needs 4 images, got {images.shape[0]}")
    top = torch.cat([images[0], images[1]], dim=1)
    bottom = torch.cat([images[2], images[3]], dim=1)
    return torch.cat([top, bottom], dim=0)


def write_previews(gaussians: Gaussians, base, *, frames: int = 60, resolution: int = 512,
                   backend: str = "auto", fps: float = 30.0) -> list:
    """``base.mp4``: the orbit video (:func:`orbit`, ``frames`` frames at ``fps``) and
    ``base.png``: the four :func:`snapshot_cameras` views in a 2x2 grid, at ``resolution``
    (even: the video is yuv420p). Returns the written paths (none if frames is 0)."""
    from pathlib import Path

    from .. import media

    if frames <= 0:
        return []
    if resolution % 2:
        raise media.MediaError(f"preview resolution must be even (yuv420p video), got "
                               f"{resolution}")
    base = Path(base)
    video = orbit(gaussians, frames=frames, resolution=resolution, backend=backend).uint8()
    w2c, k = snapshot_cameras()
    snap = render_batched(gaussians, w2c, k, resolution=resolution, backend=backend).uint8()
    return [media.write_video(base.with_suffix(".mp4"), video.numpy(), fps),
            media.write_png(base.with_suffix(".png"), grid_2x2(snap).numpy())]


__all__ = ["render", "RenderResult", "write_previews", "orbit", "orbit_cameras", "snapshot_cameras",
           "yaw_pitch_cameras", "look_at", "render_batched", "grid_2x2", "project", "bin_tiles",
           "available_backends", "intrinsics_to_projection"]
