"""Gaussian-splat tile rasteriser: one program per 16x16 tile, front-to-back over its list.

Per pixel p of the tile, for each Gaussian g of the tile's depth-sorted list (the 3DGS rules,
see atoken_rt/threed/render.py):

    power = -0.5 (a dx^2 + c dy^2) - b dx dy,   d = xy_g - p     (skip if power > 0)
    alpha = min(0.99, opacity_g exp(power))                      (skip if alpha < 1/255)
    if T (1 - alpha) < 1e-4: the pixel stops (g is not added)
    C += alpha T color_g,  D += alpha T depth_g,  T *= 1 - alpha

A program walks its list one Gaussian at a time (each of the 256 lanes is one pixel, as the CUDA
rasteriser's threads) and leaves the loop once every pixel of the tile has stopped. Projection,
depth sorting and tile binning happen before, in torch (render.project / render.bin_tiles).

Public API: :func:`rasterize_tiles`. Reference: ``render._render_torch`` (backend "torch").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_runnable, check_same_device, check_tensor, device_guard

TILE = 16


@triton.jit
def _gs_raster_kernel(
    Gid, Ranges, XY, Conic, Opacity, Color, Depth, OutC, OutT, OutD,
    H, W, GRID_X,
    TILE: tl.constexpr,  # constexpr: the lane -> pixel map folds into shifts
):
    """One program = one tile. Gid: [P] int64 Gaussian ids, tile lists back to back; Ranges:
    [tiles, 2] int64 (start, end) into Gid; XY [N, 2], Conic [N, 3], Opacity [N], Color [N, 3],
    Depth [N] fp32 contiguous. OutC [H, W, 3], OutT [H, W], OutD [H, W] fp32 contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    tx = pid % GRID_X
    ty = pid // GRID_X
    lane = tl.arange(0, TILE * TILE)
    px = tx * TILE + lane % TILE
    py = ty * TILE + lane // TILE
    inside = (px < W) & (py < H)
    pxf = px.to(tl.float32)
    pyf = py.to(tl.float32)

    start = tl.load(Ranges + 2 * pid)
    end = tl.load(Ranges + 2 * pid + 1)
    t = tl.full((TILE * TILE,), 1.0, tl.float32)
    c0 = tl.zeros((TILE * TILE,), tl.float32)
    c1 = tl.zeros((TILE * TILE,), tl.float32)
    c2 = tl.zeros((TILE * TILE,), tl.float32)
    d = tl.zeros((TILE * TILE,), tl.float32)
    done = ~inside
    n_open = tl.sum(inside.to(tl.int32), axis=0)
    i = start
    while (i < end) & (n_open > 0):
        g = tl.load(Gid + i)
        dx = tl.load(XY + 2 * g) - pxf
        dy = tl.load(XY + 2 * g + 1) - pyf
        ca = tl.load(Conic + 3 * g)
        cb = tl.load(Conic + 3 * g + 1)
        cc = tl.load(Conic + 3 * g + 2)
        power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
        alpha = tl.minimum(tl.load(Opacity + g) * tl.exp(power), 0.99)
        use = (~done) & (power <= 0.0) & (alpha >= 1.0 / 255.0)
        test_t = t * (1.0 - alpha)
        stop = use & (test_t < 0.0001)
        add = use & (~stop)
        w = tl.where(add, alpha * t, 0.0)
        c0 += w * tl.load(Color + 3 * g)
        c1 += w * tl.load(Color + 3 * g + 1)
        c2 += w * tl.load(Color + 3 * g + 2)
        d += w * tl.load(Depth + g)
        t = tl.where(add, test_t, t)
        done = done | stop
        n_open = tl.sum((~done).to(tl.int32), axis=0)
        i += 1

    pix = py.to(tl.int64) * W + px
    tl.store(OutT + pix, t, mask=inside)
    tl.store(OutD + pix, d, mask=inside)
    tl.store(OutC + 3 * pix, c0, mask=inside)
    tl.store(OutC + 3 * pix + 1, c1, mask=inside)
    tl.store(OutC + 3 * pix + 2, c2, mask=inside)


def rasterize_tiles(xy: torch.Tensor, conic: torch.Tensor, opacity: torch.Tensor,
                    color: torch.Tensor, depth: torch.Tensor, gid: torch.Tensor,
                    ranges: torch.Tensor, height: int, width: int):
    """Composite the binned Gaussians of one view.

    xy [N, 2] pixel-index coordinates, conic [N, 3] (a, b, c), opacity [N], color [N, 3],
    depth [N]: fp32; gid [P] int64 and ranges [tiles, 2] int64 from ``render.bin_tiles``
    (tiles = ceil(H/16) * ceil(W/16), row-major). Returns (C [H, W, 3], T [H, W], D [H, W]) fp32:
    accumulated colour, final transmittance, alpha-weighted depth.
    """
    n = xy.shape[0]
    gx, gy = (width + TILE - 1) // TILE, (height + TILE - 1) // TILE
    check_tensor("xy", xy, shape=(n, 2), dtypes=(torch.float32,))
    check_tensor("conic", conic, shape=(n, 3), dtypes=(torch.float32,))
    check_tensor("opacity", opacity, shape=(n,), dtypes=(torch.float32,))
    check_tensor("color", color, shape=(n, 3), dtypes=(torch.float32,))
    check_tensor("depth", depth, shape=(n,), dtypes=(torch.float32,))
    check_tensor("gid", gid, dims=1, dtypes=(torch.int64,))
    check_tensor("ranges", ranges, shape=(gx * gy, 2), dtypes=(torch.int64,))
    dev = check_same_device(xy=xy, conic=conic, opacity=opacity, color=color, depth=depth,
                            gid=gid, ranges=ranges)
    check_runnable("xy", dev)
    # The kernel indexes flat rows: make every input contiguous (cheap, N-sized).
    xy, conic, opacity, color, depth, gid, ranges = (
        x.contiguous() for x in (xy, conic, opacity, color, depth, gid, ranges))
    out_c = torch.zeros(height, width, 3, dtype=torch.float32, device=dev)
    out_t = torch.ones(height, width, dtype=torch.float32, device=dev)
    out_d = torch.zeros(height, width, dtype=torch.float32, device=dev)
    if gid.numel() == 0:
        return out_c, out_t, out_d
    with device_guard(dev):
        _gs_raster_kernel[(gx * gy,)](gid, ranges, xy, conic, opacity, color, depth,
                                      out_c, out_t, out_d, height, width, gx, TILE=TILE,
                                      num_warps=8)
    return out_c, out_t, out_d


__all__ = ["rasterize_tiles"]
