"""Multi-view renders -> :class:`~atoken_rt.Voxels`: the official 3D packing (spec §1.3).

``pack_views`` reproduces ``compute_feat_coords_pair`` of the official ``pack_multiview_feat.py``:

1. per view, the image is resized to 256x256 (PIL LANCZOS), pasted on a black RGB canvas with no
   mask (alpha is ignored), scaled to [0, 1] and cut into 16x16 patches: a ``[768, 16, 16]``
   feature map whose channels are in ``(p1, p2, c)`` order (row in patch, column in patch, RGB);
2. every valid depth pixel (``depth >= 0``) is unprojected with ``(u, v) = (col/W, row/H)`` (pixel
   corners, no +0.5), ``X_cam = K^-1 depth [u, v, 1]`` and ``X_world = w2c^-1 X_cam``;
3. more than ``max_points`` points are subsampled to ``max_points``. The official draws an
   **unseeded** ``torch.randperm``; here the permutation comes from a ``torch.Generator`` seeded
   with ``seed``, so packing is deterministic (the kept subset differs from any given official
   run, which is itself not reproducible);
4. a voxel of the ``resolution^3`` grid over ``[-radius, radius]^3`` is occupied when a point lies
   in its **closed** cube, ``|centre - p| <= half`` on every axis, in the official float32
   arithmetic (see :func:`occupancy`);
5. each occupied voxel's centre is projected into every view; the view with the smallest projected
   depth wins (no visibility test) and its feature map is sampled with
   ``grid_sample(mode="nearest", align_corners=True, padding_mode="zeros")`` at ``uv*2-1``.

The output is ``Voxels(coords [M, 3] int32 (i, j, k) in argwhere order, feats [M, 768] float16 in
[0, 1])``; float16 because the official script saves its features as float16 and the model was
fed those files.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..inputs import VOXEL_CHANNELS, Voxels

IMAGE_SIZE = 256  # every view is resized to this square before patchifying
PATCH = 16  # patch size: a 16x16 feature map of 768 = 16*16*3 channels per view
FEATURE_GRID = IMAGE_SIZE // PATCH


# ------------------------------------------------------------------------------------------------
# per-view image features
# ------------------------------------------------------------------------------------------------

def _to_pil(image: Any, view: int):
    """A PIL image, or a uint8 / float-in-[0, 1] array ``[H, W, 3|4]`` or ``[H, W]``, as PIL."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"view {view}: image must be a PIL image or an array, "
                        f"got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"view {view}: image array must be [H, W], [H, W, 3] or [H, W, 4], "
                         f"got {list(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"view {view}: empty image {list(image.shape)}")
    if image.dtype == np.uint8:
        arr = image
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"view {view}: image contains NaN or Inf")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"view {view}: a float image must lie in [0, 1], got "
                             f"[{float(image.min()):.4g}, {float(image.max()):.4g}]")
        # Renders are stored as 8-bit PNGs; round to the nearest 8-bit value as a PNG writer would.
        arr = np.rint(image.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise TypeError(f"view {view}: image dtype must be uint8 or float in [0, 1], "
                        f"got {image.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def view_features(images: Sequence[Any]) -> torch.Tensor:
    """Images -> float32 ``[V, 768, 16, 16]`` patch features (official ``MvFeatExtractor``).

    ``feat[v, (p1*16 + p2)*3 + c, h, w] = img256[v, 16h + p1, 16w + p2, c] / 255``.
    """
    from PIL import Image

    planes = []
    for v, image in enumerate(images):
        im = _to_pil(image, v).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
        # Pasting without a mask copies the stored RGB of transparent pixels too (spec §1.3).
        canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
        canvas.paste(im, (0, 0))
        planes.append(np.asarray(canvas.convert("RGB")).astype(np.float32) / 255)
    x = torch.from_numpy(np.stack(planes))  # [V, 256, 256, 3]
    n = x.shape[0]
    x = x.view(n, FEATURE_GRID, PATCH, FEATURE_GRID, PATCH, 3)  # v, h, p1, w, p2, c
    return x.permute(0, 2, 4, 5, 1, 3).reshape(n, PATCH * PATCH * 3, FEATURE_GRID, FEATURE_GRID)


# ------------------------------------------------------------------------------------------------
# surface points and occupancy
# ------------------------------------------------------------------------------------------------

def unproject(depths: torch.Tensor, w2c: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Valid depth pixels -> float32 world points ``[N, 3]``, view-major, row-major per view.

    depths ``[V, S, S]`` float32 (square; ``< 0`` invalid), w2c ``[V, 4, 4]`` and intrinsics
    ``[V, 3, 3]`` float32. Pixel ``(row, col)`` sits at ``(u, v) = (col/S, row/S)``;
    ``X_cam = K^-1 (depth [u, v, 1])``, ``X_world = w2c^-1 [X_cam, 1]``, in float32.
    """
    n, h, w = depths.shape
    k_inv = torch.inverse(intrinsics).numpy()  # float32 inverses, as the official
    c2w = torch.inverse(w2c).numpy()
    # (u, v) per pixel, row-major: u = col / W, v = row / H
    u = np.broadcast_to(np.arange(w, dtype=np.float32) / np.float32(w), (h, w)).reshape(-1)
    v = np.broadcast_to((np.arange(h, dtype=np.float32) / np.float32(h))[:, None],
                        (h, w)).reshape(-1)
    dep = depths.numpy().reshape(n, -1)
    out = []
    # numpy, one view at a time: bounded memory, and elementwise passes on one thread (torch's
    # intra-op threads stall badly on shared cores for work this small)
    for i in range(n):
        keep = ~(dep[i] < 0)
        d = dep[i][keep]
        # +inf depths (the official float16 store of depths above 65504) give inf/NaN points,
        # as in the official; they occupy no voxel
        with np.errstate(invalid="ignore", over="ignore"):
            hom = (u[keep] * d, v[keep] * d, d)
            cam = [sum(k_inv[i, r, c] * hom[c] for c in range(3)) for r in range(3)]
            world = [sum(c2w[i, r, c] * cam[c] for c in range(3)) + c2w[i, r, 3]
                     for r in range(3)]
        out.append(np.stack(world, axis=1))
    return torch.from_numpy(np.concatenate(out).astype(np.float32, copy=False)) if out \
        else torch.zeros(0, 3)


def voxel_centres(resolution: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``[R]`` and half-size (0-dim) of the grid, float32, in the official arithmetic.

    The official builds corners with ``linspace(-r, r - 2r/R, R)``, adds ``2r/R`` for the far
    corners, averages the two and takes half the first cube's width as the radius. For
    ``R = 64, r = 0.5`` every value is exact: centres ``-0.5 + (i + 0.5)/64``, half-size 1/128.
    """
    interval = 2 * radius / resolution
    lo = torch.linspace(-radius, radius - interval, resolution, dtype=torch.float32)
    hi = lo + interval
    return (lo + hi) / 2, (hi[0] - lo[0]) / 2


def occupancy(points: Any, resolution: int = 64, radius: float = 0.5) -> torch.Tensor:
    """Closed-cube occupancy of the ``resolution^3`` grid over ``[-radius, radius]^3``.

    points: ``[N, 3]`` world (x, y, z), cast to float32. Returns bool ``[R, R, R]`` indexed
    (i, j, k) = (x, y, z): voxel occupied iff some point has ``|centre - p| <= half`` on all
    three axes, evaluated in float32 exactly as the official does, so a point on a shared face,
    edge or corner occupies 2, 4 or 8 voxels, and float32 rounding decides the same way.

    Instead of the official O(points x voxels) loop, each point is binned directly: the test is
    separable per axis, and on one axis only the cell the point falls in and its two neighbours
    can pass, so the three candidates are tested with the official comparison and the
    occupied voxels are the products of the passing candidates. O(N) time and memory.
    """
    pts = torch.as_tensor(points)
    if pts.dim() != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3], got {list(pts.shape)}")
    if resolution < 1 or not radius > 0:
        raise ValueError(f"need resolution >= 1 and radius > 0, got {resolution}, {radius}")
    # numpy, single-threaded: these are a few passes over up to 500k points, where torch's
    # intra-op threads gain little and stall badly when the cores are shared. float32 IEEE
    # arithmetic is the same in both, so the comparisons are the official ones.
    pts = pts.detach().to("cpu", torch.float32).numpy()
    centres_t, half_t = voxel_centres(resolution, radius)
    centres, half = centres_t.numpy(), np.float32(half_t.item())
    grid = np.zeros(resolution ** 3, dtype=bool)
    if pts.shape[0] == 0:
        return torch.from_numpy(grid.reshape(resolution, resolution, resolution))
    cand, hits = [], []
    with np.errstate(invalid="ignore", over="ignore"):
        for axis in range(3):
            p = pts[:, axis]
            # Approximate cell; exactness comes from testing it and its neighbours with the
            # official comparison. Non-finite points fail every comparison; nan_to_num and the
            # clamp only keep the integer cast defined.
            cell = np.floor((p.astype(np.float64) + radius) / (2 * radius / resolution))
            cell = np.minimum(np.maximum(np.nan_to_num(cell, nan=-2.0), -1), resolution)
            cell = cell.astype(np.int64)
            c = cell[:, None] + np.arange(-1, 2)  # [N, 3] candidate indices
            inside = (c >= 0) & (c < resolution)
            safe = np.minimum(np.maximum(c, 0), resolution - 1)
            ok = (np.abs(centres[safe] - p[:, None]) <= half) & inside
            cand.append(c)
            hits.append(ok)
    for a in range(3):
        for b in range(3):
            mab = hits[0][:, a] & hits[1][:, b]
            if not mab.any():
                continue
            for c in range(3):
                m = mab & hits[2][:, c]
                if m.any():
                    flat = (cand[0][m, a] * resolution + cand[1][m, b]) * resolution + cand[2][m, c]
                    grid[flat] = True
    return torch.from_numpy(grid.reshape(resolution, resolution, resolution))


# ------------------------------------------------------------------------------------------------
# per-voxel features
# ------------------------------------------------------------------------------------------------

def voxel_features(centres_xyz: torch.Tensor, feats: torch.Tensor, w2c: torch.Tensor,
                   intrinsics: torch.Tensor) -> torch.Tensor:
    """Sample each voxel's feature from its nearest view (official ``get_feature_volume``).

    centres_xyz ``[M, 3]``, feats ``[V, C, h, w]``, w2c ``[V, 4, 4]``, intrinsics ``[V, 3, 3]``,
    all float32. Returns float32 ``[M, C]``: the view with the smallest projected depth (first on
    ties), sampled with nearest ``grid_sample`` at ``uv*2-1``, align_corners=True, zero padding.
    Only the chosen view is sampled (the official samples all views, then gathers one).

    The nearest view is a running argmin over views, one view's projection at a time: memory
    O(M), not O(V x M), with the same float32 products as projecting all views at once (each
    view is the same ``[4, 4] x [4, M]`` and ``[3, 3] x [3, M]`` batched product) and the same
    choice as ``argmin(dim=0)``: strict ``<`` keeps the first view on ties, and a NaN depth wins
    as it does in torch's argmin.
    """
    n_views = w2c.shape[0]
    m = centres_xyz.shape[0]
    homo = torch.cat([centres_xyz, torch.ones(m, 1)], dim=1).T.unsqueeze(0)  # [1, 4, M]
    best_z = best_uv = None
    nearest = torch.zeros(m, dtype=torch.long)
    for v in range(n_views):
        cam = torch.bmm(w2c[v:v + 1], homo)[:, :3]  # [1, 3, M]
        proj = torch.bmm(intrinsics[v:v + 1], cam).transpose(1, 2)[0]  # [M, 3]
        z = proj[:, 2]
        uv = proj[:, :2] / proj[:, 2:3]
        if best_z is None:
            best_z, best_uv = z.clone(), uv.clone()
            continue
        better = (z < best_z) | (torch.isnan(z) & ~torch.isnan(best_z))
        best_z = torch.where(better, z, best_z)
        best_uv[better] = uv[better]
        nearest[better] = v
    grid = best_uv * 2 - 1  # [M, 2]
    out = torch.zeros(m, feats.shape[1], dtype=feats.dtype)
    for v in range(n_views):
        sel = torch.nonzero(nearest == v).squeeze(1)
        if sel.numel() == 0:
            continue
        s = F.grid_sample(feats[v:v + 1], grid[sel].view(1, 1, -1, 2), mode="nearest",
                          padding_mode="zeros", align_corners=True)  # [1, C, 1, n]
        out[sel] = s[0, :, 0].T
    return out


# ------------------------------------------------------------------------------------------------
# validation and the public entry point
# ------------------------------------------------------------------------------------------------

def _float_stack(x: Any, name: str, shape_tail: tuple[int, ...] | None) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(e) for e in x]) if len(x) else np.zeros((0,))
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.int16,
                                                     torch.uint8)):
        raise TypeError(f"{name} must be numeric, got {t.dtype}")
    t = t.detach().to("cpu", torch.float32)
    if shape_tail is not None and (t.dim() != 1 + len(shape_tail) or
                                   tuple(t.shape[1:]) != shape_tail):
        want = "[V, " + ", ".join(map(str, shape_tail)) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    return t


def pack_views(images: Sequence[Any], depths: Any, w2c: Any, intrinsics: Any, *,
               resolution: int = 64, radius: float = 0.5, max_points: int = 500_000,
               seed: int = 0) -> Voxels:
    """Multi-view renders of one object -> :class:`~atoken_rt.Voxels` (spec §1.3).

    Parameters
    ----------
    images : V PIL images or arrays ``[H, W, 3|4]`` (uint8, or float in [0, 1]), any size; also a
        stacked ``[V, H, W, 3|4]`` array. Alpha is ignored, as in the official paste.
    depths : ``[V, S, S]`` float z-depth (distance along the camera axis), ``< 0`` = no surface.
        ``+inf`` is accepted (what the official's float16 depth store makes of depths above
        65504): such pixels count as surface points, as in the official, but occupy no voxel.
        Must be square: the official unprojection pairs an ``arange(H)/H`` with an
        ``arange(W)/W`` meshgrid in a way that only matches pixels when H == W.
    w2c : ``[V, 4, 4]`` world-to-camera, OpenCV axes (x right, y down, z forward).
    intrinsics : ``[V, 3, 3]`` normalised (``fx = fy = 0.5/tan(fov/2)``, ``cx = cy = 0.5``).
    resolution, radius : grid of ``resolution^3`` voxels over ``[-radius, radius]^3``.
    max_points : keep at most this many surface points (a seeded random subset).
    seed : seed of that subset's permutation (the official one is unseeded).

    Returns ``Voxels(coords [M, 3] int32, feats [M, 768] float16 in [0, 1])``.
    Raises ValueError / TypeError naming the view and the problem.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4 or \
            isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of images or a [V, H, W, C] array, "
                        f"got {type(images).__name__}")
    if resolution < 1 or not radius > 0 or max_points < 1:
        raise ValueError(f"need resolution >= 1, radius > 0 and max_points >= 1, got "
                         f"{resolution}, {radius}, {max_points}")
    d = _float_stack(depths, "depths", None)
    if d.dim() != 3:
        raise ValueError(f"depths must have shape [V, H, W], got {list(d.shape)}")
    ext = _float_stack(w2c, "w2c", (4, 4))
    k = _float_stack(intrinsics, "intrinsics", (3, 3))
    counts = {"images": len(images), "depths": d.shape[0], "w2c": ext.shape[0],
              "intrinsics": k.shape[0]}
    if len(set(counts.values())) != 1:
        raise ValueError("mismatched view counts: " +
                         ", ".join(f"{n} {c}" for n, c in counts.items()))
    if counts["images"] == 0:
        raise ValueError("no views")
    if d.shape[1] != d.shape[2]:
        raise ValueError(f"depth maps are {d.shape[1]}x{d.shape[2]} (H x W); they must be "
                         f"square: the official unprojection (u, v) = (col/W, row/H) is only "
                         f"consistent when H == W")
    for name, t in (("depth", d), ("w2c", ext), ("intrinsics", k)):
        # numpy: one pass on one thread (torch's threads stall on shared cores for this)
        a = t.numpy().reshape(t.shape[0], -1)
        # depths may be +-inf (see above; -inf is simply invalid), never NaN
        bad = np.isnan(a).any(axis=1) if name == "depth" else ~np.isfinite(a).all(axis=1)
        if bad.any():
            what = "NaN" if name == "depth" else "NaN or Inf"
            raise ValueError(f"view {int(np.argmax(bad))}: {name} contains {what}")
    for name, t in (("w2c", ext), ("intrinsics", k)):
        singular = np.abs(np.linalg.det(t.numpy().astype(np.float64))) < 1e-12
        if singular.any():
            raise ValueError(f"view {int(np.argmax(singular))}: {name} is not invertible")

    feats = view_features(images)
    points = unproject(d, ext, k)
    if points.shape[0] > max_points:
        gen = torch.Generator().manual_seed(int(seed))
        points = points[torch.randperm(points.shape[0], generator=gen)[:max_points]]
    occ = occupancy(points, resolution, radius)
    coords = torch.argwhere(occ)  # (i, j, k), lexicographic = the official boolean-mask order
    if coords.shape[0] == 0:
        raise ValueError(f"empty occupancy: none of the {points.shape[0]} surface points lies in "
                         f"the grid [-{radius}, {radius}]^3 (is the object normalised to the "
                         f"unit cube, and are the depths valid?)")
    centres, _ = voxel_centres(resolution, radius)
    xyz = centres[coords]  # [M, 3]
    f = voxel_features(xyz, feats, ext, k)
    assert f.shape[1] == VOXEL_CHANNELS
    return Voxels(coords=coords.to(torch.int32), feats=f.to(torch.float16))


__all__ = ["pack_views", "occupancy", "view_features", "unproject", "voxel_centres",
           "voxel_features", "IMAGE_SIZE", "PATCH"]
