"""3D asset in (issue 8 §1): occupancy, packing, render folders, the CPU mesh renderer, the CLI.

References are written plainly in this file: a brute-force closed-cube occupancy over every voxel,
a per-voxel loop over views for the features (spec §1.3 read literally), analytic depth maps of a
sphere and a box, and colours set on the mesh by the test.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from atoken_rt.threed import occupancy, pack_views  # noqa: E402
from atoken_rt.threed.pack import view_features  # noqa: E402

# ------------------------------------------------------------------------------------------------
# helpers: cameras and brute-force references
# ------------------------------------------------------------------------------------------------


def look_at_w2c(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """OpenCV world-to-camera (x right, y down, z forward) looking from eye at target."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        x = np.cross(z, (0.0, 1.0, 0.0))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    r = np.stack([x, y, z])  # rows: camera axes in world
    w2c = np.eye(4)
    w2c[:3, :3] = r
    w2c[:3, 3] = -r @ eye
    return w2c


def norm_k(fov):
    f = 0.5 / math.tan(fov / 2)
    return np.array([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], np.float64)


def ring_cameras(n=16, radius=2.0, fov=math.radians(40), seed=0):
    """n cameras at `radius` around the origin, spread over the sphere (deterministic)."""
    rng = np.random.default_rng(seed)
    w2c, ks = [], []
    for i in range(n):
        yaw = 2 * math.pi * (i + rng.random() * 0.5) / n
        pitch = math.asin(-0.8 + 1.6 * (i + 0.5) / n)
        eye = radius * np.array([math.cos(yaw) * math.cos(pitch),
                                 math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        w2c.append(look_at_w2c(eye))
        ks.append(norm_k(fov))
    return np.stack(w2c), np.stack(ks)


def _grid(resolution, radius):
    interval = 2 * radius / resolution
    lo = torch.linspace(-radius, radius - interval, resolution, dtype=torch.float32)
    hi = lo + interval
    return (lo + hi) / 2, (hi[0] - lo[0]) / 2  # the official corner -> centre arithmetic


def brute_occupancy_3d(points, resolution=64, radius=0.5):
    """Every voxel centre [R^3, 3] against every point: |centre - p| <= half on all axes."""
    c1, half = _grid(resolution, radius)
    centres = torch.stack(torch.meshgrid(c1, c1, c1, indexing="ij"), dim=-1).view(-1, 3)
    occ = torch.zeros(centres.shape[0], dtype=torch.bool)
    pts = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    for s in range(0, pts.shape[0], 16):
        d = (centres[None] - pts[s:s + 16, None]).abs()  # [n, R^3, 3]
        occ |= (d <= half).all(dim=-1).any(dim=0)
    return occ.view(resolution, resolution, resolution)


def brute_occupancy(points, resolution=64, radius=0.5):
    """The same comparisons for every (point, voxel) pair, laid out per axis: the x component of
    voxel (i, j, k)'s centre is the 1-D centre i, so ``all(|c - p| <= half)`` over the three axes
    is the AND of the three per-axis tables (an outer product over all R^3 voxels)."""
    c1, half = _grid(resolution, radius)
    pts = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    ok = (c1[None, None, :] - pts[:, :, None]).abs() <= half  # [N, 3, R]
    occ = torch.zeros(resolution, resolution, resolution, dtype=torch.bool)
    for s in range(0, pts.shape[0], 64):
        o = ok[s:s + 64]
        occ |= (o[:, 0, :, None, None] & o[:, 1, None, :, None] & o[:, 2, None, None, :]).any(0)
    return occ


def adversarial_points(resolution=64, radius=0.5, n=600, seed=0):
    """Points on voxel faces, edges and corners, one float32 step either side of them, and just
    outside the grid, plus non-finite and far-away points."""
    rng = np.random.default_rng(seed)
    interval = 2 * radius / resolution
    corners = (-radius + np.arange(resolution + 1) * interval).astype(np.float32)
    out = []
    for _ in range(n):
        p = rng.uniform(-radius * 1.05, radius * 1.05, 3).astype(np.float32)
        for ax in range(3):
            r = rng.random()
            if r < 0.6:  # on a corner plane: faces (1 axis), edges (2), corners (3)
                p[ax] = rng.choice(corners)
            if r < 0.3:  # and one ulp either side
                p[ax] = np.nextafter(p[ax], np.float32(rng.choice([-np.inf, np.inf])),
                                     dtype=np.float32)
        out.append(p)
    extra = [[radius, radius, radius], [-radius, -radius, -radius],
             [radius + 1e-6, 0, 0], [-radius - 1e-6, 0.1, 0.2],
             [np.nextafter(np.float32(radius), np.float32(1)), 0, 0],
             [-1e-12, 1e-12, 0.0], [1e-30, -1e-30, -0.0], [3.0, -7.0, 0.1],
             [np.inf, 0, 0], [-np.inf, 0.1, 0.1], [np.nan, 0, 0], [1e30, 1e30, -1e30]]
    return np.concatenate([np.stack(out), np.asarray(extra, np.float32)])


# ------------------------------------------------------------------------------------------------
# occupancy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,radius", [(64, 0.5), (7, 0.37), (10, 1.3)])
def test_occupancy_equals_brute_force(resolution, radius):
    rng = np.random.default_rng(resolution)
    rand = rng.uniform(-radius * 1.1, radius * 1.1, (500, 3)).astype(np.float32)
    for pts in (rand, adversarial_points(resolution, radius)):
        got = occupancy(torch.from_numpy(pts), resolution, radius)
        want = brute_occupancy(pts, resolution, radius)
        assert got.shape == (resolution,) * 3 and got.dtype == torch.bool
        assert torch.equal(got, want), int((got ^ want).sum())


def test_brute_force_layouts_agree():
    pts = adversarial_points(64, 0.5, n=12, seed=3)
    assert torch.equal(brute_occupancy(pts), brute_occupancy_3d(pts))


def test_occupancy_shared_faces_edges_corners():
    # Closed cubes: a point on a face occupies 2 voxels, on an edge 4, on a corner 8.
    c = 1 / 64  # corner planes at -0.5 + k/64
    cases = {(0.5 / 64 + 0.001, 0.003, 0.002): 1,  # inside one voxel
             (0.0, 0.003, 0.002): 2, (0.0, 0.0, 0.002): 4, (0.0, 0.0, 0.0): 8,
             (c, -c, 2 * c): 8, (0.5, 0.5, 0.5): 1, (-0.5, 0.0, 0.002): 2}
    for p, n in cases.items():
        assert int(occupancy(torch.tensor([p]), 64, 0.5).sum()) == n, p
    # float32 rounding decides as in the official: |c - p| for p = -1e-12 rounds to 1/128.
    got = occupancy(torch.tensor([[-1e-12, 0.003, 0.003]]), 64, 0.5)
    assert torch.equal(got, brute_occupancy([[-1e-12, 0.003, 0.003]]))
    assert int(got.sum()) == 2


# ------------------------------------------------------------------------------------------------
# features: a literal per-voxel loop over views
# ------------------------------------------------------------------------------------------------


def reference_view_features(images):
    """Spec §1.3 literally: LANCZOS 256, paste on black, /255, 16x16 patches in (p1, p2, c)."""
    out = torch.zeros(len(images), 768, 16, 16)
    for v, im in enumerate(images):
        im = (im if isinstance(im, Image.Image) else Image.fromarray(im)).resize(
            (256, 256), Image.LANCZOS)
        canvas = Image.new("RGB", (256, 256), (0, 0, 0))
        canvas.paste(im, (0, 0))
        a = torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255)
        for p1 in range(16):
            for p2 in range(16):
                for c in range(3):
                    out[v, (p1 * 16 + p2) * 3 + c] = a[p1::16, p2::16, c]
    return out


def reference_voxel_features(coords, feats, w2c, ks):
    """For each voxel: project the centre into every view, keep the smallest projected depth
    (first on ties), sample that view with nearest grid_sample at uv*2-1 (align_corners=True,
    zero padding)."""
    w2c = torch.as_tensor(w2c, dtype=torch.float32)
    ks = torch.as_tensor(ks, dtype=torch.float32)
    out = torch.zeros(len(coords), feats.shape[1])
    for m, (i, j, k) in enumerate(coords.tolist()):
        centre = torch.tensor([-0.5 + (i + 0.5) / 64, -0.5 + (j + 0.5) / 64,
                               -0.5 + (k + 0.5) / 64, 1.0])
        best, best_z, best_uv = None, None, None
        for v in range(len(w2c)):
            p = ks[v] @ (w2c[v] @ centre)[:3]
            if best is None or p[2] < best_z:
                best, best_z, best_uv = v, p[2], p[:2] / p[2]
        g = (best_uv * 2 - 1).view(1, 1, 1, 2)
        out[m] = F.grid_sample(feats[best:best + 1], g, mode="nearest", padding_mode="zeros",
                               align_corners=True).view(-1)
    return out


def sphere_depths(w2c, ks, size, r=0.35, centre=(0.0, 0.0, 0.0)):
    """Analytic z-depth of a sphere at pixel corners (u, v) = (col/S, row/S), -1 on a miss."""
    out = np.full((len(w2c), size, size), -1.0, np.float32)
    u = np.arange(size) / size
    uu, vv = np.meshgrid(u, u, indexing="xy")  # uu: column, vv: row
    for v in range(len(w2c)):
        k = ks[v]
        d_cam = np.stack([(uu - k[0, 2]) / k[0, 0], (vv - k[1, 2]) / k[1, 1],
                          np.ones_like(uu)], -1)  # ray with z = 1 in the camera
        r_wc = w2c[v][:3, :3].T
        eye = -r_wc @ w2c[v][:3, 3]
        d = d_cam @ r_wc.T  # world direction, length = depth scale
        oc = eye - np.asarray(centre)
        a = (d * d).sum(-1)
        b = 2 * (d @ oc)
        c = oc @ oc - r * r
        disc = b * b - 4 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)  # z-depth, since d has z_cam = 1
        out[v][disc >= 0] = t[disc >= 0]
    return out


def _scene(depth_size):
    w2c, ks = ring_cameras(16)
    depths = sphere_depths(w2c, ks, depth_size)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(8)] + \
             [rng.integers(0, 256, (80, 120, 4), dtype=np.uint8) for _ in range(8)]
    return images, depths, w2c, ks


@pytest.fixture(scope="module")
def sphere_scene():
    """16 random RGB/RGBA images (two sizes) and 64x64 analytic sphere depths."""
    return _scene(64)


def test_view_features_literal(sphere_scene):
    images = sphere_scene[0][:3] + [Image.fromarray(sphere_scene[0][-1], "RGBA")]
    assert torch.equal(view_features(images), reference_view_features(images))


def test_features_equal_per_voxel_loop(sphere_scene):
    images, depths, w2c, ks = sphere_scene
    vox = pack_views(images, depths, w2c, ks)
    coords = vox.coords
    assert coords.dtype == torch.int32 and vox.feats.dtype == torch.float16
    assert vox.feats.shape == (coords.shape[0], 768)
    # argwhere (lexicographic) order, unique
    key = (coords[:, 0].long() * 64 + coords[:, 1]) * 64 + coords[:, 2]
    assert torch.equal(key, torch.sort(torch.unique(key)).values)
    # the literal loop on a random subset of voxels (it is slow), every view chosen at least once
    pick = torch.from_numpy(np.random.default_rng(0).permutation(len(coords))[:700])
    want = reference_voxel_features(coords[pick], reference_view_features(images), w2c, ks)
    assert torch.equal(vox.feats[pick], want.to(torch.float16))
    assert float(vox.feats.float().min()) >= 0 and float(vox.feats.float().max()) <= 1


def test_sphere_voxels_on_the_surface():
    images, depths, w2c, ks = _scene(192)
    r = 0.35
    vox = pack_views(images, depths, w2c, ks)
    got = torch.zeros(64, 64, 64, dtype=torch.bool)
    got[tuple(vox.coords.long().T)] = True
    # analytic: the closed cube of voxel (i, j, k) meets the sphere surface iff its nearest
    # point is at most r from the centre and its farthest point at least r
    lo = -0.5 + np.arange(64) / 64
    hi = lo + 1 / 64
    near = np.where(lo > 0, lo, np.where(hi < 0, -hi, 0.0)) ** 2
    far = np.maximum(lo ** 2, hi ** 2)
    nsum = near[:, None, None] + near[None, :, None] + near[None, None, :]
    fsum = far[:, None, None] + far[None, :, None] + far[None, None, :]
    eps = 1e-5
    meets = torch.from_numpy((nsum <= (r + eps) ** 2) & (fsum >= (r - eps) ** 2))
    assert not bool((got & ~meets).any()), "a voxel off the surface is occupied"
    # and every voxel whose centre lies within 1/256 of the surface is found
    c = -0.5 + (np.arange(64) + 0.5) / 64
    dist = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    near = torch.from_numpy(np.abs(dist - r) < 1 / 256)
    assert bool(got[near].all()), float(got[near].float().mean())


def test_subsampling_is_seeded(sphere_scene):
    images, depths, w2c, ks = sphere_scene
    full = pack_views(images, depths, w2c, ks)
    a = pack_views(images, depths, w2c, ks, max_points=3000, seed=1)
    b = pack_views(images, depths, w2c, ks, max_points=3000, seed=1)
    c = pack_views(images, depths, w2c, ks, max_points=3000, seed=2)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    assert not torch.equal(a.coords, c.coords)
    fullset = set(map(tuple, full.coords.tolist()))
    assert set(map(tuple, a.coords.tolist())) <= fullset
    assert len(a.coords) < len(full.coords)


def test_pack_views_inputs(sphere_scene):
    images, depths, w2c, ks = sphere_scene
    # float images in [0, 1] equal their uint8 version; a stacked array equals a list
    u8 = np.stack([im[..., :3] for im in images[:8]])
    a = pack_views(list(u8), depths[:8], w2c[:8], ks[:8])
    b = pack_views(u8.astype(np.float32) / 255, depths[:8], w2c[:8], ks[:8])
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)


def test_pack_views_errors(sphere_scene):
    images, depths, w2c, ks = sphere_scene
    with pytest.raises(ValueError, match="mismatched view counts"):
        pack_views(images[:15], depths, w2c, ks)
    with pytest.raises(ValueError, match="square"):
        pack_views(images, depths[:, :, :40], w2c, ks)
    bad = depths.copy()
    bad[3, 5, 5] = np.nan
    with pytest.raises(ValueError, match="view 3: depth contains NaN"):
        pack_views(images, bad, w2c, ks)
    badk = ks.copy()
    badk[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="view 2: intrinsics"):
        pack_views(images, depths, w2c, badk)
    with pytest.raises(ValueError, match="empty occupancy"):
        pack_views(images, np.full_like(depths, -1), w2c, ks)
    with pytest.raises(ValueError, match="empty occupancy"):
        pack_views(images, depths + 5, w2c, ks)  # the surface moved outside the grid
    with pytest.raises(ValueError, match="w2c must have shape"):
        pack_views(images, depths, w2c[:, :3], ks)
    with pytest.raises(TypeError, match="view 0"):
        pack_views([np.zeros((8, 8, 3), np.int64)] + images[1:], depths, w2c, ks)
    with pytest.raises(ValueError, match=r"view 1: a float image must lie in \[0, 1\]"):
        pack_views([images[0], np.full((8, 8, 3), 2.0)] + images[2:], depths, w2c, ks)


# ------------------------------------------------------------------------------------------------
# cameras (TRELLIS convention) and the OpenGL -> OpenCV flip
# ------------------------------------------------------------------------------------------------


def test_sphere_cameras_follow_trellis():
    from atoken_rt.threed import sphere_cameras

    n, seed = 16, 5
    cams = sphere_cameras(n, 2.0, math.radians(40), seed)
    # TRELLIS dataset_toolkits: Hammersley (i/n, base-2 radical inverse of i), offset (o1/n, o2),
    # u remapped 2u below 0.25 else 2u/3 + 1/3; pitch = acos(1 - 2u) - pi/2, yaw = 2 pi v.
    o1, o2 = np.random.default_rng(seed).random(2)
    for i in range(n):
        bits = format(i, "b")[::-1]
        v = sum(int(b) / 2 ** (j + 1) for j, b in enumerate(bits)) + o2
        u = i / n + o1 / n
        u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
        pitch, yaw = math.acos(1 - 2 * u) - math.pi / 2, 2 * math.pi * v
        assert cams.pitch[i] == pytest.approx(pitch) and cams.yaw[i] == pytest.approx(yaw)
        eye = 2 * np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch),
                            math.sin(pitch)])
        w2c = cams.w2c[i].astype(np.float64)
        np.testing.assert_allclose(-w2c[:3, :3].T @ w2c[:3, 3], eye, atol=1e-5)
        # the origin is straight ahead at distance 2; world +Z appears upwards (y < 0 in OpenCV)
        np.testing.assert_allclose(w2c[:3, 3], [0, 0, 2], atol=1e-5)
        assert (w2c[:3, :3] @ [0, 0, 1])[1] < 0
        np.testing.assert_allclose(cams.c2w[i][:3, 3], eye, atol=1e-9)
    f = 0.5 / math.tan(math.radians(20))
    np.testing.assert_allclose(cams.intrinsics[0], [[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]],
                               rtol=1e-6)


def test_opengl_to_opencv_flip_analytic():
    from atoken_rt.threed.folder import c2w_opengl_to_w2c_opencv

    # Blender camera at (2, 0, 0) looking at the origin, up +Z: right is +Y, its local +Y is +Z,
    # it looks down its local -Z, i.e. local +Z = +X (world).
    c2w = [[0, 0, 1, 2], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    w2c = c2w_opengl_to_w2c_opencv(c2w).double().numpy()
    cam = lambda p: (w2c @ np.append(p, 1.0))[:3]  # noqa: E731
    np.testing.assert_allclose(cam([0, 0, 0]), [0, 0, 2], atol=1e-6)  # ahead, 2 away
    np.testing.assert_allclose(cam([0, 0.1, 0]), [0.1, 0, 2], atol=1e-6)  # world +Y: right
    np.testing.assert_allclose(cam([0, 0, 0.1]), [0, -0.1, 2], atol=1e-6)  # world +Z: up (y<0)
    np.testing.assert_allclose(cam([1, 0, 0]), [0, 0, 1], atol=1e-6)  # nearer along z


# ------------------------------------------------------------------------------------------------
# render_views on a coloured box
# ------------------------------------------------------------------------------------------------

FACE_COLOURS = {  # outward normal in the FILE's axes -> colour
    (1, 0, 0): (255, 0, 0), (-1, 0, 0): (0, 255, 0), (0, 1, 0): (0, 0, 255),
    (0, -1, 0): (255, 255, 0), (0, 0, 1): (0, 255, 255), (0, 0, -1): (255, 0, 255)}
BOX = (0.6, 0.4, 0.8)  # extents in the file's axes


@pytest.fixture(scope="module")
def box_files(tmp_path_factory):
    trimesh = pytest.importorskip("trimesh")
    d = tmp_path_factory.mktemp("box")
    m = trimesh.creation.box(extents=BOX)
    m.unmerge_vertices()  # per-face vertices: face colours stay exact through glb/obj export
    normals = np.rint(m.face_normals).astype(int)
    m.visual.face_colors = np.array([FACE_COLOURS[tuple(n)] + (255,) for n in normals], np.uint8)
    paths = {}
    for ext in ("glb", "obj", "ply", "stl", "off"):  # stl / off carry no colours
        paths[ext] = d / f"box.{ext}"
        m.export(paths[ext])
    return paths


def analytic_box(w2c, ks, size, half, to_file):
    """Pixel-centre rays against the box [-half, half] (slab method): z-depth (-1 on a miss) and
    the hit face's outward normal in the file's axes."""
    depth = np.full((size, size), -1.0)
    normal = np.zeros((size, size, 3), int)
    pix = (np.arange(size) + 0.5) / size
    cc, rr = np.meshgrid(pix, pix, indexing="xy")
    d_cam = np.stack([(cc - ks[0, 2]) / ks[0, 0], (rr - ks[1, 2]) / ks[1, 1], np.ones_like(cc)], -1)
    w2c = w2c.astype(np.float64)
    rot = w2c[:3, :3].T
    eye = -rot @ w2c[:3, 3]
    d = d_cam @ rot.T  # z_cam = 1: the ray parameter is the z-depth
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - eye) / d
        t2 = (half - eye) / d
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = tmin.max(-1), tmax.min(-1)
    hit = (t_near <= t_far) & (t_far > 0)
    depth[hit] = t_near[hit]
    axis = tmin.argmax(-1)
    sign = -np.sign(np.take_along_axis(d, axis[..., None], -1)[..., 0]).astype(int)
    world_n = np.zeros((size, size, 3), int)
    np.put_along_axis(world_n, axis[..., None], sign[..., None], -1)
    normal[hit] = to_file(world_n[hit])
    # how far the hit is from the face's edges (the second-largest entry time)
    margin = t_near - np.sort(tmin, -1)[..., 1]
    return depth, normal, hit, margin


@pytest.mark.parametrize("ext", ["glb", "obj", "ply", "stl", "off"])
def test_render_views_box(box_files, ext):
    from atoken_rt.threed import render_views

    size, views = 64, 4
    images, depths, w2c, ks = render_views(box_files[ext], views=views, resolution=size, seed=3)
    assert images.shape == (views, size, size, 4) and images.dtype == np.uint8
    assert depths.shape == (views, size, size) and depths.dtype == np.float32
    # normalised as Blender: glb/obj are Y-up -> Z-up, (x, y, z) -> (x, -z, y); ply is Z-up
    if ext in ("ply", "stl", "off"):
        ext_world = np.array(BOX)
        to_file = lambda n: n  # noqa: E731
    else:
        ext_world = np.array([BOX[0], BOX[2], BOX[1]])
        to_file = lambda n: np.stack([n[:, 0], n[:, 2], -n[:, 1]], 1)  # noqa: E731
    half = ext_world / ext_world.max() / 2
    for v in range(views):
        want_d, want_n, hit, margin = analytic_box(w2c[v], ks[v], size, half, to_file)
        got_hit = depths[v] >= 0
        assert (got_hit != hit).mean() < 0.01  # silhouette pixels may go either way
        both = got_hit & hit
        assert both.sum() > 100
        np.testing.assert_allclose(depths[v][both], want_d[both], atol=1e-4)
        inner = both & (margin > 1e-3)  # away from the box's edges
        if ext in ("stl", "off"):  # no colours: Blender's default grey, 0.8 linear as sRGB
            want_c = np.tile([231, 231, 231], (int(inner.sum()), 1))
        else:
            want_c = np.array([FACE_COLOURS[tuple(n)] for n in want_n[inner]])
        assert np.array_equal(images[v][inner][:, :3], want_c)
        assert (images[v][~got_hit] == 0).all()  # transparent black background
        assert (images[v][got_hit][:, 3] == 255).all()


def test_render_then_pack_is_near_the_box(box_files):
    from atoken_rt.threed import render_views

    images, depths, w2c, ks = render_views(box_files["ply"], views=16, resolution=96)
    vox = pack_views(list(images), depths, w2c, ks)
    half = np.array(BOX) / max(BOX) / 2
    centres = -0.5 + (vox.coords.numpy() + 0.5) / 64
    # every occupied voxel's closed cube touches the box surface
    inside = (np.abs(centres) <= half + 1 / 128 + 1e-4).all(1)
    deep = (np.abs(centres) < half - 1 / 128 - 1e-4).all(1)
    assert inside.all() and not deep.any()


def test_render_views_errors(tmp_path):
    pytest.importorskip("trimesh")
    from atoken_rt.media import MediaError
    from atoken_rt.threed import render_views

    with pytest.raises(MediaError, match="no such file"):
        render_views(tmp_path / "missing.glb")
    pts = tmp_path / "gaussians.ply"  # a point PLY (as a Gaussian PLY): vertices, no faces
    pts.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
                   "property float z\nend_header\n0 0 0\n1 1 1\n")
    with pytest.raises(MediaError, match="no triangle faces.*Gaussian"):
        render_views(pts)


# ------------------------------------------------------------------------------------------------
# render folders
# ------------------------------------------------------------------------------------------------


def write_render_folder(root, images, depths, c2w, fov, exr_views=(), top_level_fov=False):
    """The official layout: transforms.json (NeRF/Blender), NNN.png, NNN_depth.npy / .exr."""
    root.mkdir(parents=True, exist_ok=True)
    frames = []
    for i, (im, d) in enumerate(zip(images, depths)):
        Image.fromarray(im).save(root / f"{i:03d}.png")
        if i in exr_views:
            import OpenEXR
            raw = np.where(d < 0, np.float32(1e10), d).astype(np.float32)  # Blender background
            OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION,
                          "type": OpenEXR.scanlineimage}, {"R": raw, "G": raw, "B": raw}
                         ).write(str(root / f"{i:03d}_depth.exr"))
        else:
            np.save(root / f"{i:03d}_depth.npy", d)
        fr = {"file_path": f"{i:03d}.png", "transform_matrix": np.asarray(c2w[i]).tolist()}
        if not top_level_fov:
            fr["camera_angle_x"] = fov
        frames.append(fr)
    doc = {"frames": frames}
    if top_level_fov:
        doc["camera_angle_x"] = fov
    (root / "transforms.json").write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def render_folder(box_files, tmp_path_factory):
    pytest.importorskip("OpenEXR")
    from atoken_rt.threed import render_views, sphere_cameras

    images, depths, w2c, ks = render_views(box_files["glb"], views=16, resolution=64, seed=4)
    cams = sphere_cameras(16, seed=4)
    root = write_render_folder(tmp_path_factory.mktemp("renders") / "box", images, depths,
                               cams.c2w, math.radians(40), exr_views=(0, 5))
    return root, (images, depths, w2c, ks)


def test_read_render_folder_round_trip(render_folder):
    from atoken_rt.threed import load_render_folder, read_render_folder

    root, (images, depths, w2c, ks) = render_folder
    got = read_render_folder(root)
    assert got.images.dtype == np.uint8 and np.array_equal(got.images, images)
    assert got.depths.dtype == np.float32 and got.depths.shape == depths.shape
    for v in range(16):
        if v in (0, 5):  # EXR: background 1e10 -> -1, then float16 as the official stores it
            want = depths[v].astype(np.float16).astype(np.float32)
        else:
            want = depths[v]
        assert np.array_equal(got.depths[v], want), v
    np.testing.assert_allclose(got.w2c, w2c, atol=2e-6)
    np.testing.assert_allclose(got.intrinsics, ks, rtol=1e-6)
    vox = load_render_folder(root)
    ref = pack_views(list(got.images), got.depths, got.w2c, got.intrinsics)
    assert torch.equal(vox.coords, ref.coords) and torch.equal(vox.feats, ref.feats)


def test_render_folder_top_level_fov_and_rgba(tmp_path):
    from atoken_rt.threed import read_render_folder, sphere_cameras

    cams = sphere_cameras(2, seed=0)
    rgba = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 4), dtype=np.uint8)
    depths = np.full((2, 16, 16), 2.0, np.float32)
    root = write_render_folder(tmp_path / "r", rgba, depths, cams.c2w, 0.5, top_level_fov=True)
    got = read_render_folder(root)
    assert got.images.shape == (2, 24, 24, 4) and np.array_equal(got.images, rgba)
    f = 0.5 / math.tan(0.25)
    np.testing.assert_allclose(got.intrinsics[:, 0, 0], [f, f], rtol=1e-6)


def test_render_folder_errors(render_folder, tmp_path, monkeypatch):
    from atoken_rt.media import MediaError
    from atoken_rt.threed import read_render_folder, sphere_cameras

    root, (images, depths, _, _) = render_folder
    cams = sphere_cameras(2, seed=0)

    def folder(name, mutate=None, **kw):
        r = write_render_folder(tmp_path / name, images[:2], depths[:2], cams.c2w, 0.7, **kw)
        if mutate:
            doc = json.loads((r / "transforms.json").read_text())
            mutate(doc)
            (r / "transforms.json").write_text(json.dumps(doc))
        return r

    with pytest.raises(MediaError, match="no transforms.json"):
        read_render_folder(tmp_path)
    bad = folder("json")
    (bad / "transforms.json").write_text("{not json")
    with pytest.raises(MediaError, match="not valid JSON"):
        read_render_folder(bad)
    cases = [
        ("noframes", lambda d: d.update(frames=[]), "'frames' is empty"),
        ("frameslist", lambda d: d.update(frames={"a": 1}), "'frames' list"),
        ("matrix", lambda d: d["frames"][1].update(transform_matrix=[[1, 0], [0, 1]]),
         "frame 1: transform_matrix must be a 4x4"),
        ("nan", lambda d: d["frames"][0]["transform_matrix"][0].__setitem__(0, float("nan")),
         "frame 0: transform_matrix must be a 4x4 list of finite"),
        ("lastrow", lambda d: d["frames"][0]["transform_matrix"].__setitem__(3, [0, 0, 1, 1]),
         "last row"),
        ("fov", lambda d: d["frames"][1].update(camera_angle_x=7), "camera_angle_x"),
        ("nofov", lambda d: d["frames"][1].pop("camera_angle_x"), "no camera_angle_x"),
        ("escape", lambda d: d["frames"][0].update(file_path="../000.png"), "inside the folder"),
        ("abs", lambda d: d["frames"][0].update(file_path="/etc/passwd"), "inside the folder"),
        ("path", lambda d: d["frames"][0].update(file_path=3), "file_path must be"),
    ]
    for name, mutate, msg in cases:
        with pytest.raises(MediaError, match=msg):
            read_render_folder(folder(name, mutate))
    r = folder("nodepth")
    (r / "001_depth.npy").unlink()
    with pytest.raises(MediaError, match="001.png: no depth map"):
        read_render_folder(r)
    r = folder("size")
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(r / "001.png")
    with pytest.raises(MediaError, match="all views must match"):
        read_render_folder(r)
    with pytest.raises(MediaError, match="each side must be in"):
        read_render_folder(folder("big"), max_side=32)
    with pytest.raises(MediaError, match="more than max_views=1"):
        read_render_folder(folder("many"), max_views=1)
    from atoken_rt.threed import folder as folder_mod
    monkeypatch.setattr(folder_mod, "MAX_TOTAL_PIXELS", 64 * 64 * 3)  # 1.5 views' worth
    with pytest.raises(MediaError, match="image and depth pixels in all views"):
        read_render_folder(folder("total"))
    monkeypatch.undo()
    r = folder("mode")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8), "RGB").save(r / "001.png")  # others RGBA
    with pytest.raises(MediaError, match="all views must match"):
        read_render_folder(r)
    r = folder("depthdtype")
    np.save(r / "000_depth.npy", np.zeros((64, 64), np.int32))
    with pytest.raises(MediaError, match="float16/32/64"):
        read_render_folder(r)
    r = folder("depthnan")
    np.save(r / "000_depth.npy", np.full((64, 64), np.nan, np.float32))
    with pytest.raises(MediaError, match="NaN"):
        read_render_folder(r)
    # EXR without the OpenEXR package: a clear message naming the extra
    r = folder("exr", exr_views=(0,))
    monkeypatch.setitem(sys.modules, "OpenEXR", None)
    with pytest.raises(MediaError, match=r"atoken_rt\[3d\]"):
        read_render_folder(r)


# ------------------------------------------------------------------------------------------------
# media and the command line: meshes and render folders beside voxel files
# ------------------------------------------------------------------------------------------------


def test_media_kinds_and_expansion(render_folder, box_files, tmp_path):
    from atoken_rt import media

    root, _ = render_folder
    assert media.kind_of(root) == "3d" and media.kind_of(box_files["glb"]) == "3d"
    assert media.kind_of(tmp_path / "x.stl") == "3d" and media.kind_of(tmp_path / "x.off") == "3d"
    # a folder holding a render folder, a mesh and a PNG: the render folder is ONE input
    top = tmp_path / "assets"
    (top / "sub").mkdir(parents=True)
    import shutil
    shutil.copytree(root, top / "sub" / "chair")
    shutil.copy(box_files["glb"], top / "box.glb")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(top / "a.png")
    paths, ignored = media.expand_inputs([top])
    assert paths == [top / "a.png", top / "box.glb", top / "sub" / "chair"] and ignored == 0
    assert media.expand_inputs([root]) == ([root], 0)
    assert media.expand_inputs([str(top / "sub" / "*")]) == ([top / "sub" / "chair"], 0)


@pytest.fixture
def small_renders(monkeypatch):
    # the command line renders meshes at the official 16 x 512^2; smaller keeps the test fast
    from atoken_rt.threed import views

    monkeypatch.setattr(views, "DEFAULT_RESOLUTION", 96)


@pytest.fixture(scope="module")
def rod(tmp_path_factory):
    """A thin coloured rod (.glb) and a render folder of it: few voxels, a fast tiny model."""
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("OpenEXR")
    from atoken_rt.threed import render_views, sphere_cameras

    d = tmp_path_factory.mktemp("rod")
    m = trimesh.creation.box(extents=(0.03, 1.0, 0.03))
    m.visual.vertex_colors = np.array([200, 30, 60, 255], np.uint8)
    m.export(d / "rod.glb")
    images, depths, _, _ = render_views(d / "rod.glb", views=16, resolution=64, seed=1)
    folder = write_render_folder(d / "renders" / "rod", images, depths,
                                 sphere_cameras(16, seed=1).c2w, math.radians(40),
                                 exr_views=(3,))
    return d / "rod.glb", folder


def test_cli_encodes_meshes_and_render_folders(rod, tmp_path, small_renders):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    from atoken_rt import cli
    from atoken_rt.threed import load_render_folder
    from atoken_rt.threed.views import load_mesh

    from .conftest import WEIGHTS

    mesh, root = rod
    out = tmp_path / "tok.safetensors"
    rc = cli.main(["encode", str(mesh), str(root), "--out", str(out),
                   "--config", "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu",
                   "--quiet"])
    assert rc == 0
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["atoken_rt"])
        coords = [f.get_tensor(f"sample.{i}.coords") for i in range(2)]
        assert f.get_tensor("sample.0.indices").shape[1] == 8
    assert [s["kind"] for s in meta["samples"]] == ["3d", "3d"]
    assert meta["samples"][1]["source"] == str(root)
    for c, vox in zip(coords, (load_mesh(mesh), load_render_folder(root))):
        # 3D tokens: t = 1 (spec §1.3) at the packed voxels
        assert 50 < len(c) < 1500
        assert (c[:, 0] == 1).all()
        assert torch.equal(c[:, 1:], vox.coords)


def test_cli_reports_bad_3d_inputs(tmp_path, small_renders, capsys):
    from atoken_rt import cli

    from .conftest import WEIGHTS

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "transforms.json").write_text("[]")
    gs = tmp_path / "gs.ply"
    gs.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                  "property float z\nend_header\n0 0 0\n")
    rc = cli.main(["encode", str(tmp_path / "r"), str(gs), "--out", str(tmp_path / "t.safetensors"),
                   "--config", "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu",
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "transforms.json: expected an object with a 'frames' list" in err
    assert "no triangle faces" in err


def _hit_points(depths, w2c, ks, size):
    """World points of pixel-centre rays at the rendered z-depth ([V, S, S, 3])."""
    pix = (np.arange(size) + 0.5) / size
    cc, rr = np.meshgrid(pix, pix, indexing="xy")
    out = []
    for v in range(len(w2c)):
        k, e = ks[v].astype(np.float64), w2c[v].astype(np.float64)
        d_cam = np.stack([(cc - k[0, 2]) / k[0, 0], (rr - k[1, 2]) / k[1, 1], np.ones_like(cc)],
                         -1) * depths[v][..., None]
        out.append((d_cam - e[:3, 3]) @ e[:3, :3])  # R^T (X_cam - t)
    return np.stack(out)


def test_render_views_texture_and_vertex_colours(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    from atoken_rt.threed import render_views

    size = 48
    # a unit quad in the file's z = 0 plane, UV (x + 0.5, y + 0.5), a 4x4 RGB texture
    tex = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    verts = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], float)
    quad = trimesh.Trimesh(verts, [[0, 1, 2], [0, 2, 3], [0, 2, 1], [0, 3, 2]], process=False)
    quad.visual = trimesh.visual.TextureVisuals(
        uv=verts[:, :2] + 0.5,
        material=trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(tex)))
    quad.export(tmp_path / "quad.glb")
    images, depths, w2c, ks = render_views(tmp_path / "quad.glb", views=6, resolution=size)
    p = _hit_points(depths, w2c, ks, size)
    # glb is Y-up: world (x, y, z) = file (x, -z, y), so u = x + 0.5 and v = z_world + 0.5;
    # v = 0 is the image's bottom row. Bilinear between texel centres, repeat wrap.
    u, v = p[..., 0] + 0.5, p[..., 2] + 0.5
    fx, fy = u * 4 - 0.5, (1 - v) * 4 - 0.5
    x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
    ax, ay = (fx - x0)[..., None], (fy - y0)[..., None]
    t = tex.astype(float)
    want = (t[y0 % 4, x0 % 4] * (1 - ax) * (1 - ay) + t[y0 % 4, (x0 + 1) % 4] * ax * (1 - ay) +
            t[(y0 + 1) % 4, x0 % 4] * (1 - ax) * ay + t[(y0 + 1) % 4, (x0 + 1) % 4] * ax * ay)
    hit = depths >= 0
    assert hit.sum() > 500
    err = np.abs(images[hit][:, :3].astype(float) - want[hit])
    assert err.max() <= 1.0, err.max()

    # one triangle with red, green and blue corners: colours interpolate barycentrically
    tri_v = np.array([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    tri = trimesh.Trimesh(tri_v, [[0, 1, 2], [0, 2, 1]], process=False)
    tri.visual.vertex_colors = np.array([[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255]],
                                        np.uint8)
    tri.export(tmp_path / "tri.ply")  # PLY: Z-up, no axis change
    images, depths, w2c, ks = render_views(tmp_path / "tri.ply", views=6, resolution=size)
    p = _hit_points(depths, w2c, ks, size)
    hit = depths >= 0
    # normalised: bbox [-0.5, 0.5] x [-0.5, 0.5] x {0} is already centred with side 1
    a = np.c_[tri_v[:, :2], np.ones(3)].T  # solve [x, y, 1] = sum_k b_k [x_k, y_k, 1]
    bary = np.linalg.solve(a, np.c_[p[hit][:, :2], np.ones(hit.sum())].T).T
    inner = (bary > 0.02).all(1)  # away from the edges
    want = bary[inner] * 255  # R, G, B = the three barycentric weights
    assert inner.sum() > 200
    assert np.abs(images[hit][inner][:, :3].astype(float) - want).max() <= 1.0


# ------------------------------------------------------------------------------------------------
# review fixes: hostile folders, memory bounds, official palette / float16 behaviour
# ------------------------------------------------------------------------------------------------


def _two_view_folder(root, size=32, exr_views=(), depth=None):
    from atoken_rt.threed import sphere_cameras

    cams = sphere_cameras(2, seed=0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    depths = np.full((2, size, size), 2.0, np.float32) if depth is None else depth
    return write_render_folder(root, images, depths, cams.c2w, 0.7, exr_views=exr_views)


def test_render_folder_hostile_json(tmp_path):
    from atoken_rt.media import MediaError
    from atoken_rt.threed import read_render_folder

    r = _two_view_folder(tmp_path / "deep")
    (r / "transforms.json").write_text('{"frames": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(MediaError, match=r"deep[/\\]transforms.json: not valid JSON \(nested"):
        read_render_folder(r)
    big = "1" + "0" * 400  # a valid JSON integer that float() cannot hold
    for name, mutate, msg in (
            ("bigmatrix", lambda fr: fr["transform_matrix"][0].__setitem__(3, 12345.678),
             "frame 0: transform_matrix must be a 4x4 list of finite numbers"),
            ("bigfov", lambda fr: fr.update(camera_angle_x=12345.678),
             "frame 0: camera_angle_x must be a number")):
        r = _two_view_folder(tmp_path / name)
        doc = json.loads((r / "transforms.json").read_text())
        mutate(doc["frames"][0])
        (r / "transforms.json").write_text(json.dumps(doc).replace("12345.678", big))
        with pytest.raises(MediaError, match=f"{name}.transforms.json {msg}"):
            read_render_folder(r)
    r = _two_view_folder(tmp_path / "longpath")
    doc = json.loads((r / "transforms.json").read_text())
    for path, msg in (("a" * 5000, "frame 1: file_path is 5000 characters"),
                      ("b" * 300, "cannot read the render folder")):  # name > 255
        doc["frames"][1]["file_path"] = path
        (r / "transforms.json").write_text(json.dumps(doc))
        with pytest.raises(MediaError, match=msg):
            read_render_folder(r)
    r = _two_view_folder(tmp_path / "f32")
    doc = json.loads((r / "transforms.json").read_text())
    doc["frames"][1]["transform_matrix"][0][3] = 1e300
    (r / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(MediaError, match="frame 1: transform_matrix has entries beyond float32"):
        read_render_folder(r)


def test_render_folder_symlinks_stay_inside(tmp_path):
    from atoken_rt.media import MediaError
    from atoken_rt.threed import read_render_folder

    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(outside / "x.png")
    np.save(outside / "x_depth.npy", np.full((32, 32), 2.0, np.float32))
    (outside / "transforms.json").write_text("{}")

    r = _two_view_folder(tmp_path / "img")
    (r / "001.png").unlink()
    (r / "001.png").symlink_to(outside / "x.png")
    with pytest.raises(MediaError, match=r"frame 1: file_path '001.png'.*outside the folder"):
        read_render_folder(r)
    r = _two_view_folder(tmp_path / "depth")
    (r / "000_depth.npy").unlink()
    (r / "000_depth.npy").symlink_to(outside / "x_depth.npy")
    with pytest.raises(MediaError, match=r"000_depth.npy: depth map resolves to .*secret"):
        read_render_folder(r)
    r = _two_view_folder(tmp_path / "subdir")
    (r / "sub").symlink_to(outside, target_is_directory=True)
    doc = json.loads((r / "transforms.json").read_text())
    doc["frames"][0]["file_path"] = "sub/x.png"
    (r / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(MediaError, match="outside the folder"):
        read_render_folder(r)
    r = _two_view_folder(tmp_path / "json")
    (r / "transforms.json").unlink()
    (r / "transforms.json").symlink_to(outside / "transforms.json")
    with pytest.raises(MediaError, match="transforms.json.*outside the folder"):
        read_render_folder(r)
    # a symlink that stays inside the folder is fine
    r = _two_view_folder(tmp_path / "ok")
    (r / "links").mkdir()
    (r / "links" / "a.png").symlink_to(r / "000.png")
    (r / "links" / "a_depth.npy").symlink_to(r / "000_depth.npy")
    doc = json.loads((r / "transforms.json").read_text())
    doc["frames"][0]["file_path"] = "links/a"
    (r / "transforms.json").write_text(json.dumps(doc))
    assert read_render_folder(r).images.shape == (2, 32, 32, 3)


def test_exr_reads_only_the_depth_channel(tmp_path, monkeypatch):
    OpenEXR = pytest.importorskip("OpenEXR")
    from atoken_rt.media import MediaError
    from atoken_rt.threed import folder as folder_mod
    from atoken_rt.threed import read_render_folder

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    r = _two_view_folder(tmp_path / "many", size=16)
    chans = {f"C{i:03d}": np.zeros((16, 16), np.float32) for i in range(65)}
    OpenEXR.File(header, chans | {"Z": np.ones((16, 16), np.float32)}).write(
        str(r / "000_depth.exr"))
    with pytest.raises(MediaError, match=r"000_depth.exr: 66 channels, more than the 64"):
        read_render_folder(r)
    # a HALF depth channel beside others: only that channel is decoded (no full-file read)
    r = _two_view_folder(tmp_path / "half", size=16)
    depth = np.full((16, 16), 2.5, np.float16)
    depth[0, 0] = 0.75
    OpenEXR.File(header, {"B": depth, "G": np.zeros((16, 16), np.float32),
                          "R": np.zeros((16, 16), np.float32)}).write(str(r / "000_depth.exr"))
    real_file = OpenEXR.File

    def header_only(*args, **kwargs):
        assert kwargs.get("header_only"), "an EXR was decoded in full"
        return real_file(*args, **kwargs)

    monkeypatch.setattr(OpenEXR, "File", header_only)
    got = read_render_folder(r)
    assert np.array_equal(got.depths[0], depth.astype(np.float32))
    monkeypatch.undo()
    # an OpenEXR without the legacy single-channel reader: all channels, within a budget
    monkeypatch.delattr(OpenEXR, "InputFile")
    assert np.array_equal(read_render_folder(r).depths[0], depth.astype(np.float32))
    monkeypatch.setattr(folder_mod, "MAX_EXR_DECODE", 3 * 16 * 16 - 1)
    with pytest.raises(MediaError, match="3 channels of 16x16: decoding them all"):
        read_render_folder(r)
    assert folder_mod.MAX_VIEWS <= 256


def test_exr_depths_above_float16_are_kept_as_the_official(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR")
    from atoken_rt.threed import load_render_folder, read_render_folder

    size = 32
    depth = np.full((2, size, size), -1.0, np.float32)
    depth[:, 8:24, 8:24] = 2.0
    r = _two_view_folder(tmp_path / "far", size=size, depth=depth)
    raw = np.where(depth[0] < 0, np.float32(1e10), depth[0])
    raw[0:4, 0:4] = 1e5  # above float16's 65504 and below the 1e6 background threshold
    OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"Z": raw}).write(str(r / "000_depth.exr"))
    (r / "000_depth.npy").unlink()
    got = read_render_folder(r)
    assert np.isposinf(got.depths[0, 0:4, 0:4]).all() and (got.depths[0, 4:8, 0:4] == -1).all()
    vox = load_render_folder(r)
    # the far points occupy nothing: the same voxels as without them
    near = got.depths.copy()
    near[0, 0:4, 0:4] = -1
    ref = pack_views(list(got.images), near, got.w2c, got.intrinsics)
    assert torch.equal(vox.coords, ref.coords) and torch.equal(vox.feats, ref.feats)


def test_palette_pngs_are_resized_as_the_official(tmp_path):
    from atoken_rt.threed import load_render_folder, read_render_folder

    r = _two_view_folder(tmp_path / "pal", size=40)
    rng = np.random.default_rng(3)
    for i in range(2):
        rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(rgb).quantize(32).save(r / f"{i:03d}.png")
    got = read_render_folder(r)
    # the official passes the opened PIL images: Pillow resizes P-mode images with NEAREST
    official = [Image.open(r / f"{i:03d}.png") for i in range(2)]
    assert official[0].mode == "P"
    ref = pack_views(official, got.depths, got.w2c, got.intrinsics)
    vox = load_render_folder(r)
    assert torch.equal(vox.coords, ref.coords) and torch.equal(vox.feats, ref.feats)
    lanczos = pack_views(list(got.images), got.depths, got.w2c, got.intrinsics)
    assert not torch.equal(lanczos.feats, ref.feats)  # the RGB-first resize differs


def test_voxel_features_memory_is_per_view(monkeypatch):
    from atoken_rt.threed import pack as pack_mod

    g = torch.Generator().manual_seed(0)
    n_views, m = 24, 3000
    c = (torch.randint(0, 64, (m, 3), generator=g).float() + 0.5) / 64 - 0.5
    f = torch.rand(n_views, 768, 16, 16, generator=g)
    w = torch.eye(4).repeat(n_views, 1, 1)
    w[:, :3, :3] += 0.3 * torch.randn(n_views, 3, 3, generator=g)
    w[:, 2, 3] = 2 + torch.rand(n_views, generator=g)
    w[5] = w[2]  # exact ties: the first view wins
    k = torch.tensor([[1.3, 0, .5], [0, 1.3, .5], [0, 0, 1]]).repeat(n_views, 1, 1)
    # the former all-views-at-once computation, for bit-identity
    homo = torch.cat([c, torch.ones(m, 1)], dim=1).T
    proj = torch.bmm(k, torch.bmm(w, homo.unsqueeze(0).repeat(n_views, 1, 1))[:, :3])
    proj = proj.transpose(1, 2)
    nearest = proj[..., 2].argmin(dim=0)
    grid = (proj[..., :2] / proj[..., 2:3]) * 2 - 1
    want = torch.zeros(m, 768)
    for v in range(n_views):
        sel = torch.nonzero(nearest == v).squeeze(1)
        if len(sel):
            want[sel] = F.grid_sample(f[v:v + 1], grid[v, sel].view(1, 1, -1, 2), mode="nearest",
                                      padding_mode="zeros", align_corners=True)[0, :, 0].T
    real_bmm = torch.bmm

    def one_view_bmm(a, b):
        assert a.shape[0] == 1 and b.shape[0] == 1, "a [V, ., M] projection"
        return real_bmm(a, b)

    monkeypatch.setattr(pack_mod.torch, "bmm", one_view_bmm)
    got = pack_mod.voxel_features(c, f, w, k)
    monkeypatch.undo()
    assert torch.equal(got, want)
