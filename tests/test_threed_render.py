"""atoken_rt.threed.render against analytic footprints and the 3DGS compositing rules written
plainly here; the tiled torch renderer against its untiled form; triton (interpreter on CPU)
against torch; the CUDA libraries' adapters through stand-in modules (CPU) and for real (GPU).
"""

from __future__ import annotations

import math
import sys
import types
from collections import namedtuple

import numpy as np
import pytest
import torch

from atoken_rt.gs import Gaussians
from atoken_rt.threed import render as R

from .conftest import requires_cuda, requires_triton

NEAR, KS = 0.8, 0.1


def make_gaussians(xyz, scale, rot=None, opacity=None, rgb=None) -> Gaussians:
    xyz = torch.as_tensor(xyz, dtype=torch.float32).reshape(-1, 3)
    n = len(xyz)
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(n, 3)
    rot = (torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1) if rot is None
           else torch.as_tensor(rot, dtype=torch.float32).reshape(n, 4))
    opacity = torch.as_tensor(0.5 if opacity is None else opacity,
                              dtype=torch.float32).reshape(-1, 1).expand(n, 1).contiguous()
    rgb = (torch.full((n, 3), 0.5) if rgb is None
           else torch.as_tensor(rgb, dtype=torch.float32).reshape(n, 3))
    z = torch.zeros(n, 3)
    f_dc = ((rgb - 0.5) / 0.28209479177387814)[:, None, :]
    return Gaussians(xyz=xyz, scale=scale, rotation=rot, opacity=opacity, rgb=rgb,
                     xyz_internal=z, features_dc=f_dc, scaling_internal=z,
                     rotation_internal=rot - torch.tensor([1.0, 0, 0, 0]),
                     opacity_internal=torch.logit(opacity))


def random_scene(n: int, seed: int) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) - 0.5) * 0.7
    scale = torch.rand(n, 3, generator=g) * 0.04 + 0.004
    rot = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacity = torch.rand(n, generator=g) * 0.95 + 0.05
    rgb = torch.rand(n, 3, generator=g) * 1.3 - 0.15  # some below 0: clamped
    return make_gaussians(xyz, scale, rot, opacity, rgb)


IDENTITY = torch.eye(4)


def head_on_k(f=1.0):
    return torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]])


def coef(a, c, b=0.0, k=KS):
    """Mip-splatting opacity compensation, written from its definition."""
    d0 = max(1e-6, a * c - b * b)
    d1 = max(1e-6, (a + k) * (c + k) - b * b)
    return math.sqrt(d0 / (d1 + 1e-6) + 1e-6)


# ----------------------------------------------------------------------------------------------
# One Gaussian: analytic footprint, peak, colour, tile support
# ----------------------------------------------------------------------------------------------


def test_single_gaussian_head_on_matches_analytic_footprint():
    s = 33  # odd: pixel 16 is exactly the image centre (u = cx*W - 0.5 = 16)
    z0, sx, sy, op = 1.2, 0.15, 0.09, 0.9
    col = [0.9, 0.4, 0.1]
    g = make_gaussians([0, 0, z0], [sx, sy, 0.05], opacity=op, rgb=col)
    out = R.render(g, IDENTITY, head_on_k(), resolution=s, near=NEAR, backend="torch")
    assert out.rgb.shape == (1, s, s, 3) and out.alpha.shape == (1, s, s)

    # 2D covariance of a head-on Gaussian: diag((f sx / z)^2, (f sy / z)^2) in pixels, + kernel.
    fpx = 1.0 * s
    va, vc = (fpx * sx / z0) ** 2, (fpx * sy / z0) ** 2
    pr = R.project(g, IDENTITY, head_on_k(), s, s, near=NEAR, kernel_size=KS)
    torch.testing.assert_close(pr.xy[0], torch.tensor([16.0, 16.0]))
    torch.testing.assert_close(pr.conic[0], torch.tensor([1 / (va + KS), 0.0, 1 / (vc + KS)]),
                               rtol=1e-5, atol=1e-9)
    o_eff = op * coef(va, vc)
    assert float(out.alpha[0, 16, 16]) == pytest.approx(o_eff, rel=1e-6)  # peak

    # Every pixel: alpha = o_eff exp(-0.5 d^T Sigma^-1 d) where >= 1/255, on the tiles that
    # the radius square touches, else 0.
    mid = 0.5 * (va + vc + 2 * KS)
    lam = mid + math.sqrt(max(0.1, mid * mid - (va + KS) * (vc + KS)))
    r = math.ceil(3 * math.sqrt(lam))
    t0, t1 = max(0, int((16 - r) / 16)), min(3, int((16 + r + 15) / 16))
    want = np.zeros((s, s))
    for i in range(s):
        for j in range(s):
            if not (t0 <= j // 16 < t1 and t0 <= i // 16 < t1):
                continue
            a = min(0.99, o_eff * math.exp(-0.5 * ((j - 16) ** 2 / (va + KS)
                                                    + (i - 16) ** 2 / (vc + KS))))
            want[i, j] = a if a >= 1 / 255 else 0.0
    np.testing.assert_allclose(out.alpha[0].numpy(), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(out.rgb[0].numpy(), want[..., None] * np.array(col),
                               rtol=2e-6, atol=1e-7)
    # Expected depth is the view depth wherever something was drawn.
    drawn = want > 0
    np.testing.assert_allclose(out.depth[0].numpy()[drawn], z0, rtol=2e-5)  # D / alpha in fp32
    assert np.all(out.depth[0].numpy()[~drawn] == 0)


def test_tile_rectangle_cuts_the_footprint():
    """A Gaussian is drawn only on the tiles its 3-sigma square touches, even where its alpha
    would still be >= 1/255 (the 33rd column lies in a third tile)."""
    s, z0 = 33, 1.0
    sigma_px = 5.0
    g = make_gaussians([0, 0, z0], [sigma_px * z0 / s] * 2 + [0.01], opacity=0.9)
    out = R.render(g, IDENTITY, head_on_k(), resolution=s, backend="torch")
    va = sigma_px ** 2 + KS
    a32 = 0.9 * coef(sigma_px ** 2, sigma_px ** 2) * math.exp(-0.5 * 16 ** 2 / va)
    assert a32 > 1 / 255  # would be visible...
    assert float(out.alpha[0, 16, 32]) == 0.0  # ...but its tile is not in the rectangle
    assert float(out.alpha[0, 16, 31]) > 0


def test_rotated_gaussian_covariance():
    """EWA of a rotated anisotropic Gaussian seen head-on: J R S^2 R^T J^T with J = f/z."""
    s, z0 = 32, 1.5
    ang = 0.6
    q = [math.cos(ang / 2), 0, 0, math.sin(ang / 2)]  # rotation about the view axis
    g = make_gaussians([0, 0, z0], [0.1, 0.03, 0.02], rot=[q])
    pr = R.project(g, IDENTITY, head_on_k(), s, s, near=NEAR, kernel_size=KS)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    cov = (s / z0) ** 2 * rot @ np.diag([0.1 ** 2, 0.03 ** 2]) @ rot.T + KS * np.eye(2)
    inv = np.linalg.inv(cov)
    np.testing.assert_allclose(pr.conic[0].numpy(), [inv[0, 0], inv[0, 1], inv[1, 1]],
                               rtol=1e-4)
    assert float(pr.opacity[0]) == pytest.approx(
        0.5 * coef(cov[0, 0] - KS, cov[1, 1] - KS, cov[0, 1]), rel=1e-5)


def test_colour_is_clamped_at_zero_not_one():
    g = make_gaussians([[0, 0, 1.0]], [[0.2, 0.2, 0.2]], opacity=0.5, rgb=[[-0.3, 0.5, 1.6]])
    pr = R.project(g, IDENTITY, head_on_k(), 16, 16, near=NEAR, kernel_size=KS)
    torch.testing.assert_close(pr.color[0], torch.tensor([0.0, 0.5, 1.6]))


# ----------------------------------------------------------------------------------------------
# Compositing rules
# ----------------------------------------------------------------------------------------------


def _peak_alpha(op, sigma_px):
    return min(0.99, op * coef(sigma_px ** 2, sigma_px ** 2))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["near-first", "far-first"])
def test_two_gaussians_composite_front_to_back(order):
    s, sigma_px = 33, 3.0
    zs = [1.0, 1.4]  # Gaussian 0 is in front
    cols = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    ops = [0.6, 0.8]
    xyz = [[0, 0, zs[i]] for i in order]
    sc = [[sigma_px * zs[i] / s] * 3 for i in order]
    g = make_gaussians(xyz, sc, opacity=[ops[i] for i in order], rgb=[cols[i] for i in order])
    out = R.render(g, IDENTITY, head_on_k(), resolution=s, backend="torch")
    a0, a1 = _peak_alpha(ops[0], sigma_px), _peak_alpha(ops[1], sigma_px)
    want = np.array(cols[0]) * a0 + np.array(cols[1]) * a1 * (1 - a0)
    np.testing.assert_allclose(out.rgb[0, 16, 16].numpy(), want, rtol=1e-5)
    assert float(out.alpha[0, 16, 16]) == pytest.approx(1 - (1 - a0) * (1 - a1), rel=1e-6)
    d = (zs[0] * a0 + zs[1] * a1 * (1 - a0)) / (1 - (1 - a0) * (1 - a1))
    assert float(out.depth[0, 16, 16]) == pytest.approx(d, rel=1e-5)


def test_alpha_cap_skip_and_early_stop():
    s, sigma_px, z0 = 33, 3.0, 1.0
    sc = [sigma_px * z0 / s] * 3
    # Opacity 1 on a wide Gaussian (compensation ~0.999): the peak alpha is capped at 0.99.
    wide = [10.0 * z0 / s] * 3
    assert coef(100.0, 100.0) > 0.99
    out = R.render(make_gaussians([0, 0, z0], wide, opacity=1.0), IDENTITY, head_on_k(),
                   resolution=s, backend="torch")
    assert float(out.alpha[0, 16, 16]) == pytest.approx(0.99, rel=1e-6)
    # Peak alpha below 1/255: not drawn at all.
    out = R.render(make_gaussians([0, 0, z0], sc, opacity=0.0035), IDENTITY, head_on_k(),
                   resolution=s, backend="torch")
    assert float(out.alpha.max()) == 0.0
    # Stack of equal Gaussians with alpha a = 0.95 at the centre: T goes 0.05, 0.0025,
    # 0.000125; the 4th would take it to 6.25e-6 < 1e-4, so it and all behind are dropped.
    n = 6
    op = 0.95 / coef(sigma_px ** 2, sigma_px ** 2)
    cols = np.eye(3)[[0, 1, 2, 0, 1, 2]] * np.arange(1, n + 1)[:, None] / n
    zs = [z0 + 0.01 * i for i in range(n)]  # same pixel size at every depth
    g = make_gaussians([[0, 0, z] for z in zs], [[sigma_px * z / s] * 3 for z in zs],
                       opacity=op, rgb=cols)
    out = R.render(g, IDENTITY, head_on_k(), resolution=s, backend="torch", bg=(0.2, 0.3, 0.4))
    a = float(op * coef(sigma_px ** 2, sigma_px ** 2))
    t = [1.0, 1 - a, (1 - a) ** 2]
    want_c = sum(cols[i] * a * t[i] for i in range(3))
    t_end = (1 - a) ** 3
    np.testing.assert_allclose(out.rgb[0, 16, 16].numpy(),
                               want_c + t_end * np.array([0.2, 0.3, 0.4]), rtol=1e-5)
    assert float(out.alpha[0, 16, 16]) == pytest.approx(1 - t_end, abs=1e-7)


def test_near_plane_culling():
    """The CUDA rasteriser culls at view depth z <= 0.2 (in_frustum); near / far (0.8 / 1.6)
    only build its projection matrix, so a Gaussian between 0.2 and near is still drawn."""
    s = 32
    sc = [[0.02, 0.02, 0.02]]
    for z, drawn in ((0.19, False), (0.2, False), (0.21, True), (0.5, True), (0.79, True),
                     (0.81, True), (2.0, True), (-1.0, False)):
        for backend in ("torch", "triton") if R._triton_interpreting() else ("torch",):
            out = R.render(make_gaussians([0, 0, z], sc, opacity=0.9), IDENTITY, head_on_k(),
                           resolution=s, near=0.8, far=1.6, backend=backend)
            assert bool(out.alpha.max() > 0) == drawn, (z, backend)
            if drawn:  # the centre pixel: peak alpha, view depth
                assert float(out.depth[0, 16, 16]) == pytest.approx(z, rel=1e-5)


def test_background_and_empty():
    g = make_gaussians(np.zeros((0, 3)), np.zeros((0, 3)))
    out = R.render(g, IDENTITY, head_on_k(), resolution=(8, 12), bg=(0.1, 0.2, 0.3))
    assert out.rgb.shape == (1, 8, 12, 3)
    torch.testing.assert_close(out.rgb[0, 3, 4], torch.tensor([0.1, 0.2, 0.3]))
    assert float(out.alpha.max()) == 0


def test_bad_inputs():
    g = random_scene(4, 0)
    with pytest.raises(ValueError, match="w2c"):
        R.render(g, torch.eye(3), head_on_k())
    with pytest.raises(ValueError, match="intrinsics"):
        R.render(g, IDENTITY, torch.eye(4))
    with pytest.raises(ValueError, match="backend"):
        R.render(g, IDENTITY, head_on_k(), backend="opengl")
    with pytest.raises(ValueError, match="near"):
        R.render(g, IDENTITY, head_on_k(), near=2.0, far=1.0)
    with pytest.raises(TypeError, match="Gaussians"):
        R.render(object(), IDENTITY, head_on_k())
    with pytest.raises(TypeError, match="resolution"):
        R.render(g, IDENTITY, head_on_k(), resolution="big")
    with pytest.raises(ValueError, match="CUDA"):
        R.render(g, IDENTITY, head_on_k(), backend="gsplat")


# ----------------------------------------------------------------------------------------------
# Backends against the torch reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", [4, 16])
def test_torch_tiled_equals_untiled(cell):
    """Cell lists cut to each Gaussian's alpha >= 1/255 box, batches of cells, chunks of
    lists and per-cell early exit give the picture of the plain all-pixels-all-Gaussians form
    (which uses the untrimmed tile rectangles)."""
    g = random_scene(40, 1)
    w2c, k = R.orbit_cameras(3)
    kw = dict(near=NEAR, kernel_size=KS)
    tiled = R._render_torch(g, w2c, k, 40, 56, cell=cell, cells_per_batch=2, chunk=3, **kw)
    dense = R._render_torch(g, w2c, k, 40, 56, tiled=False, **kw)
    for a, b in zip(tiled, dense):  # only the summation order differs
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float((1 - tiled[1]).max()) > 0.5  # the scene is actually drawn


def opaque_scene(n: int, seed: int) -> Gaussians:
    """Large, nearly opaque Gaussians piled in the middle: pixels stop early (T < 1e-4)."""
    g = random_scene(n, seed)
    g.xyz = g.xyz * 0.2
    g.scale = g.scale + 0.05
    g.opacity = torch.full_like(g.opacity, 0.98)
    return g


def test_tile_lists():
    """bin_tiles: each 16x16 tile lists the Gaussians whose tile rectangle holds it, by (depth,
    index); the tight lists keep, in the same order, those whose alpha >= 1/255 box reaches the
    tile."""
    g = random_scene(40, 9)
    w2c, k = R.orbit_cameras(1)
    h, w = 40, 56
    pr = R.project(g, w2c[0], k[0], h, w, near=NEAR, kernel_size=KS)
    gid, ranges = R.bin_tiles(pr, h, w)
    tight_gid, tight_ranges = R.bin_tiles(pr, h, w, tight=True)
    order = sorted((float(pr.depth[i]), i) for i in range(40) if bool(pr.valid[i]))
    gx = (w + 15) // 16
    for tile in range(gx * ((h + 15) // 16)):
        tx, ty = tile % gx, tile // gx
        want = [i for _, i in order
                if pr.rect[i, 0] <= tx < pr.rect[i, 2] and pr.rect[i, 1] <= ty < pr.rect[i, 3]]
        s0, s1 = ranges[tile].tolist()
        assert gid[s0:s1].tolist() == want
        t0, t1 = tight_ranges[tile].tolist()
        sub = tight_gid[t0:t1].tolist()
        assert sub == [i for i in want if i in set(sub)]  # a subsequence, same order
    assert len(tight_gid) < len(gid)


@requires_triton
@pytest.mark.parametrize("scene", [random_scene, opaque_scene], ids=["random", "opaque"])
def test_triton_matches_torch_interpreter(scene):
    g = scene(30, 2)
    w2c, k = R.orbit_cameras(2)
    a = R.render(g, w2c, k, resolution=(24, 40), backend="triton", bg=(0.1, 0.5, 0.9))
    b = R.render(g, w2c, k, resolution=(24, 40), backend="torch", bg=(0.1, 0.5, 0.9))
    for name in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=2e-6)
    assert float(b.alpha.max()) > 0.5
    if scene is opaque_scene:  # some pixels ran into the T < 1e-4 stop
        assert float((1 - b.alpha).min()) < 2e-4


def _standin_dgr(calls):
    """A diff_gaussian_rasterization stand-in: decodes the settings back into cameras and draws
    with the torch reference, so the adapter's result must equal torch's."""
    Settings = namedtuple("GaussianRasterizationSettings", [
        "image_height", "image_width", "tanfovx", "tanfovy", "kernel_size", "subpixel_offset",
        "bg", "scale_modifier", "viewmatrix", "projmatrix", "sh_degree", "campos",
        "prefiltered", "debug"])

    class Rasterizer:
        def __init__(self, raster_settings):
            self.s = raster_settings

        def __call__(self, means3D, means2D, opacities, shs=None, colors_precomp=None,
                     scales=None, rotations=None, cov3D_precomp=None):
            s = self.s
            calls.append(s)
            w2c = s.viewmatrix.T
            k = torch.tensor([[0.5 / s.tanfovx, 0, 0.5], [0, 0.5 / s.tanfovy, 0.5], [0, 0, 1]])
            proj = R.intrinsics_to_projection(k, NEAR, 1.6)
            torch.testing.assert_close(s.projmatrix, (proj @ w2c).T)
            torch.testing.assert_close(s.campos, torch.inverse(w2c)[:3, 3])
            assert s.subpixel_offset.shape == (s.image_height, s.image_width, 2)
            assert s.scale_modifier == 1.0 and s.sh_degree == 0
            g = make_gaussians(means3D, scales, rotations, opacities.reshape(-1),
                               0.28209479177387814 * shs.reshape(-1, 3) + 0.5
                               if shs is not None else colors_precomp)
            c, t, _ = R._render_torch(g, w2c[None], k[None], s.image_height, s.image_width,
                                      near=R.NEAR_CULL, kernel_size=s.kernel_size,
                                      colors=colors_precomp)
            img = c[0] + t[0][..., None] * s.bg
            return img.permute(2, 0, 1), None

    return types.SimpleNamespace(GaussianRasterizationSettings=Settings,
                                 GaussianRasterizer=Rasterizer)


def test_dgr_adapter_with_standin():
    g = random_scene(25, 3)
    w2c, k = R.orbit_cameras(2)
    calls = []
    bg = torch.tensor([0.2, 0.1, 0.0])
    c, t, d = R._render_dgr(g, w2c, k, 24, 32, near=NEAR, far=1.6, kernel_size=KS, bg=bg,
                            module=_standin_dgr(calls))
    ours = R.finish(c, t, d, bg)
    ref = R.render(g, w2c, k, resolution=(24, 32), bg=bg, backend="torch")
    for name in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-4,
                                   atol=1e-5)
    assert len(calls) == 4 and calls[0].image_height == 24 and calls[0].image_width == 32


def test_gsplat_adapter_arguments():
    g = random_scene(5, 4)
    w2c, k = R.orbit_cameras(3)
    kw = R.gsplat_kwargs(g, w2c, k, 30, 40, near=NEAR, far=1.6, kernel_size=KS)
    assert kw["rasterize_mode"] == "antialiased" and kw["eps2d"] == KS
    assert kw["width"] == 40 and kw["height"] == 30 and kw["near_plane"] == NEAR
    assert kw["render_mode"] == "RGB+ED" and kw["tile_size"] == 16
    # Pixel intrinsics: fx * W, cx * W (gsplat puts pixel centres at +0.5, as we do).
    torch.testing.assert_close(kw["Ks"][:, 0, 0], k[:, 0, 0] * 40)
    torch.testing.assert_close(kw["Ks"][:, 1, 2], k[:, 1, 2] * 30)
    torch.testing.assert_close(kw["quats"], g.rotation)
    assert kw["opacities"].shape == (5,) and kw["colors"].min() >= 0

    def rasterization(**a):  # stand-in: torch reference from the same arguments
        knorm = a["Ks"].clone()
        knorm[:, 0] /= a["width"]
        knorm[:, 1] /= a["height"]
        gg = make_gaussians(a["means"], a["scales"], a["quats"], a["opacities"], a["colors"])
        c, t, d = R._render_torch(gg, a["viewmats"], knorm, a["height"], a["width"],
                                  near=a["near_plane"], kernel_size=a["eps2d"])
        alpha = 1 - t
        ed = torch.where(alpha > 0, d / alpha.clamp_min(1e-30), torch.zeros_like(d))
        return torch.cat([c, ed[..., None]], -1), alpha[..., None], {}

    c, t, d = R._render_gsplat(g, w2c, k, 30, 40, near=NEAR, far=1.6, kernel_size=KS,
                               bg=torch.zeros(3),
                               module=types.SimpleNamespace(rasterization=rasterization))
    ref = R._render_torch(g, w2c, k, 30, 40, near=NEAR, kernel_size=KS)
    for a, b in zip((c, t, d), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_backend_on_cpu_is_torch():
    assert R.available_backends("cpu")[0] == "torch"


# ----------------------------------------------------------------------------------------------
# Orbit cameras
# ----------------------------------------------------------------------------------------------


def test_orbit_cameras_trellis_convention():
    w2c, k = R.orbit_cameras(8, radius=2.0, fov=40)
    assert w2c.shape == (8, 4, 4) and k.shape == (8, 3, 3)
    f = 0.5 / math.tan(math.radians(20))
    torch.testing.assert_close(k[0], torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]))
    for i in range(8):
        yaw = 2 * math.pi * i / 8
        pitch = 0.25 + 0.5 * math.sin(yaw)
        eye = 2 * torch.tensor([math.sin(yaw) * math.cos(pitch),
                                math.cos(yaw) * math.cos(pitch), math.sin(pitch)])
        c2w = torch.inverse(w2c[i].double()).float()
        torch.testing.assert_close(c2w[:3, 3], eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(w2c[i, :3, :3] @ w2c[i, :3, :3].T, torch.eye(3), atol=1e-6,
                                   rtol=0)
        # The origin is straight ahead at distance r; world +z points up in the image (y down).
        torch.testing.assert_close(w2c[i, :3, 3], torch.tensor([0, 0, 2.0]), atol=1e-5, rtol=0)
        up_cam = w2c[i, :3, :3] @ torch.tensor([0, 0, 1.0])
        assert up_cam[1] < 0 and abs(float(up_cam[0])) < 1e-6


def test_snapshot_cameras_trellis_defaults():
    """TRELLIS render_snapshot: yaw k pi/2 - 16 deg, pitch 20 deg, r = 10, fov = 8 deg."""
    w2c, k = R.snapshot_cameras()
    assert w2c.shape == (4, 4, 4) and k.shape == (4, 3, 3)
    f = 0.5 / math.tan(math.radians(4))
    for i in range(4):
        torch.testing.assert_close(k[i], torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]))
        yaw, pitch = i * math.pi / 2 - math.radians(16), math.radians(20)
        eye = 10 * torch.tensor([math.sin(yaw) * math.cos(pitch),
                                 math.cos(yaw) * math.cos(pitch), math.sin(pitch)])
        c2w = torch.inverse(w2c[i].double()).float()
        torch.testing.assert_close(c2w[:3, 3], eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(w2c[i, :3, 3], torch.tensor([0, 0, 10.0]), atol=1e-5, rtol=0)


def test_orbit_other_up_axis():
    """up = +y: the same rig turned by the rotation taking +z to +y (x stays, z -> y)."""
    wz, _ = R.orbit_cameras(5)
    wy, _ = R.orbit_cameras(5, up=(0, 2.0, 0))
    turn = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # +z -> +y: -90 degrees about x
    torch.testing.assert_close(wy[:, :3, :3], wz[:, :3, :3] @ turn.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(wy[:, :3, 3], wz[:, :3, 3], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="up"):
        R.orbit_cameras(2, up=(0, 0, 0))


def test_orbit_renders_frames():
    g = random_scene(10, 5)
    out = R.orbit(g, frames=3, resolution=16, backend="torch", batch=2)
    assert out.rgb.shape == (3, 16, 16, 3) and out.uint8().dtype == torch.uint8
    assert float(out.alpha.max()) > 0


# ----------------------------------------------------------------------------------------------
# GPU: triton compiled, and the CUDA libraries against torch
# ----------------------------------------------------------------------------------------------


def _gpu_scene():
    g = random_scene(300, 6).to("cuda")
    w2c, k = R.orbit_cameras(3)
    return g, w2c, k


@pytest.mark.gpu
@requires_cuda
@requires_triton
def test_triton_matches_torch_gpu():
    g, w2c, k = _gpu_scene()
    a = R.render(g, w2c, k, resolution=128, backend="triton")
    b = R.render(g, w2c, k, resolution=128, backend="torch")
    for name in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["diff_gaussian_rasterization", "gsplat"])
def test_cuda_library_matches_torch(backend):
    pytest.importorskip(backend)
    g, w2c, k = _gpu_scene()
    a = R.render(g, w2c, k, resolution=128, backend=backend)
    b = R.render(g, w2c, k, resolution=128, backend="torch")
    # dgr is the same algorithm (FMA and exp rounding apart); gsplat caps alpha at 0.999 and
    # stops on T <= 1e-4, so allow small differences on average and a few pixels.
    assert float((a.rgb - b.rgb).abs().mean()) < 2e-3
    assert float((a.alpha - b.alpha).abs().mean()) < 2e-3
    assert float(((a.rgb - b.rgb).abs() > 0.05).float().mean()) < 0.01


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
