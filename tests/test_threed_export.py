"""Viewer files (3DGS PLY read back with plyfile, .splat read back with numpy) and the scores
(PSNR, SSIM against plainly written formulas; score_views against a direct render)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from atoken_rt.threed import export as E
from atoken_rt.threed import metrics as M
from atoken_rt.threed import render as R

from .test_threed_render import make_gaussians, random_scene


def decoded_like(n: int, seed: int):
    """Gaussians with an unnormalised internal rotation, as the decoder gives."""
    g = random_scene(n, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    g.rotation_internal = torch.randn(n, 4, generator=gen) * 0.3
    g.rotation = torch.nn.functional.normalize(
        g.rotation_internal + torch.tensor([1.0, 0, 0, 0]), dim=-1)
    g.opacity = g.opacity.clamp(0.01, 0.99)
    return g


# ----------------------------------------------------------------------------------------------
# PLY
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [0, 3])
def test_ply_reads_back_with_plyfile(tmp_path, degree):
    plyfile = pytest.importorskip("plyfile")
    g = decoded_like(50, 0)
    path = E.save_ply(g, tmp_path / "g.ply", sh_degree_rest=degree)
    ply = plyfile.PlyData.read(str(path))
    assert ply.text is False and ply.byte_order == "<"
    v = ply["vertex"]
    n_rest = 45 if degree == 3 else 0
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
             + [f"f_rest_{i}" for i in range(n_rest)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert [p.name for p in v.properties] == names
    assert all(v.data.dtype[n] == np.dtype("<f4") for n in names)
    assert v.count == 50

    def col(*ns):
        return np.stack([v[n] for n in ns], 1)

    np.testing.assert_array_equal(col("x", "y", "z"), g.xyz.numpy())
    np.testing.assert_array_equal(col("nx", "ny", "nz"), 0)
    np.testing.assert_array_equal(col("f_dc_0", "f_dc_1", "f_dc_2"),
                                  g.features_dc.reshape(-1, 3).numpy())
    if n_rest:
        np.testing.assert_array_equal(col(*[f"f_rest_{i}" for i in range(45)]), 0)
    op = g.opacity.reshape(-1).double().numpy()
    np.testing.assert_allclose(v["opacity"], np.log(op / (1 - op)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(col("scale_0", "scale_1", "scale_2"),
                               np.log(g.scale.double().numpy()), rtol=1e-6, atol=1e-6)
    rot = col("rot_0", "rot_1", "rot_2", "rot_3")
    np.testing.assert_allclose(np.linalg.norm(rot, axis=1), 1.0, rtol=1e-6)
    q = g.rotation_internal.double().numpy() + [1, 0, 0, 0]
    np.testing.assert_allclose(rot, q / np.linalg.norm(q, axis=1, keepdims=True), rtol=1e-5,
                               atol=1e-6)


def test_ply_bad_degree(tmp_path):
    with pytest.raises(ValueError, match="sh_degree_rest"):
        E.save_ply(decoded_like(3, 0), tmp_path / "x.ply", sh_degree_rest=2)
    with pytest.raises(TypeError, match="Gaussians"):
        E.save_ply({"xyz": 1}, tmp_path / "x.ply")


# ----------------------------------------------------------------------------------------------
# .splat
# ----------------------------------------------------------------------------------------------


def test_splat_layout(tmp_path):
    g = decoded_like(40, 1)
    path = E.save_splat(g, tmp_path / "g.splat")
    data = path.read_bytes()
    assert len(data) == 40 * 32
    raw = np.frombuffer(data, dtype=np.uint8).reshape(40, 32)
    xyz = raw[:, 0:12].copy().view("<f4")
    scale = raw[:, 12:24].copy().view("<f4")
    rgba = raw[:, 24:28]
    rot = raw[:, 28:32]

    # Sort key of antimatter15/splat convert.py: descending scale product * opacity.
    size = g.scale.double().prod(1).numpy() * g.opacity.reshape(-1).double().numpy()
    order = np.argsort(-size, kind="stable")
    np.testing.assert_array_equal(xyz, g.xyz.numpy()[order])
    np.testing.assert_allclose(scale, g.scale.numpy()[order], rtol=1e-6)
    col = np.concatenate([g.rgb.double().numpy(), g.opacity.double().numpy()], 1)[order]
    want = np.clip(col * 255, 0, 255).astype(np.uint8)  # truncated, as the converter does
    assert np.abs(rgba.astype(int) - want.astype(int)).max() <= 1  # fp32 vs fp64 at .0 edges
    assert (rgba != want).mean() < 0.02
    q = g.rotation.double().numpy()[order]
    want_q = np.clip(q / np.linalg.norm(q, axis=1, keepdims=True) * 128 + 128, 0, 255)
    assert np.abs(rot.astype(int) - want_q.astype(np.uint8).astype(int)).max() <= 1
    # Decoding the quaternion back gives the rotation within the format's 1/128 step.
    np.testing.assert_allclose((rot.astype(np.float64) - 128) / 128, q, atol=1.5 / 128)


# ----------------------------------------------------------------------------------------------
# PSNR and SSIM
# ----------------------------------------------------------------------------------------------


def plain_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. SSIM, loops over every valid 11x11 window and channel (float64)."""
    r = np.arange(11) - 5
    g1 = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g1, g1)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, wd, ch = x.shape
    vals = []
    for c in range(ch):
        for i in range(h - 10):
            for j in range(wd - 10):
                a = x[i:i + 11, j:j + 11, c].astype(np.float64)
                b = y[i:i + 11, j:j + 11, c].astype(np.float64)
                ma, mb = (w * a).sum(), (w * b).sum()
                va = (w * (a - ma) ** 2).sum()
                vb = (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2))
                            / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_plain_formula():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 19, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    assert M.ssim(x, y, data_range=255) == pytest.approx(plain_ssim(x, y, 255), rel=1e-9)
    xf = torch.from_numpy(x).float() / 255
    assert M.ssim(xf, xf) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11"):
        M.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="shapes"):
        M.ssim(np.zeros((12, 12, 3)), np.zeros((12, 13, 3)))


def test_psnr():
    a = np.zeros((4, 5, 3))
    b = np.full((4, 5, 3), 0.1)
    assert M.psnr(a, b) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert M.psnr(a, a) == math.inf
    assert M.psnr(a.astype(np.uint8), (b * 255).astype(np.uint8), data_range=255.0) == \
        pytest.approx(10 * math.log10(255 ** 2 / 25 ** 2))


def test_score_views_against_direct_render():
    g = random_scene(20, 7)
    w2c, k = R.orbit_cameras(3)
    direct = R.render(g, w2c, k, resolution=(24, 32), backend="torch").uint8().numpy()
    got = M.score_views(g, direct, w2c, k, backend="torch")
    assert got["views"] == 3 and got["resolution"] == [24, 32]
    assert got["psnr"] == math.inf and got["ssim"] == pytest.approx(1.0)
    noisy = direct.copy()
    noisy[0] = 255 - noisy[0]
    rendered = []
    got = M.score_views(g, noisy, w2c, k, backend="torch", rendered_out=rendered)
    assert rendered[0].shape == (3, 24, 32, 3)
    assert got["psnr_views"][0] == pytest.approx(M.psnr(direct[0], noisy[0], data_range=255.0))
    assert got["ssim_views"][0] == pytest.approx(plain_ssim(direct[0], noisy[0], 255.0))
    with pytest.raises(ValueError, match="uint8"):
        M.score_views(g, direct.astype(np.float32), w2c, k)
    with pytest.raises(ValueError, match="w2c"):
        M.score_views(g, direct, w2c[:2], k)


def test_make_gaussians_helper_is_consistent():
    g = make_gaussians([[0, 0, 1.0]], [[0.1, 0.1, 0.1]], rgb=[[0.2, 0.4, 0.6]])
    torch.testing.assert_close(0.28209479177387814 * g.features_dc.reshape(1, 3) + 0.5, g.rgb)


# ----------------------------------------------------------------------------------------------
# CLI: decode previews, reconstruct scores (exact, with stand-ins for loading)
# ----------------------------------------------------------------------------------------------


def test_decode_previews(tmp_path):
    pytest.importorskip("av")
    from atoken_rt import cli, media

    g = random_scene(30, 8)
    files = cli._write_decoded(tmp_path, 3, {"source": "obj.npz"}, "3d", torch.zeros(30, 768),
                               torch.zeros(30, 4, dtype=torch.int32), g,
                               previews={"frames": 3, "resolution": 32, "backend": "torch"})
    assert [f.name for f in files] == ["0003_obj.npz", "0003_obj.ply", "0003_obj.mp4",
                                       "0003_obj.png"]
    frames, _ = media.read_video(tmp_path / "0003_obj.mp4")
    assert frames.shape == (3, 32, 32, 3)
    grid = media.read_image(tmp_path / "0003_obj.png")
    w2c, k = R.snapshot_cameras()
    want = R.render(g, w2c, k, resolution=32, backend="torch").uint8().numpy()
    np.testing.assert_array_equal(grid[:32, 32:], want[1])  # top right = second view
    np.testing.assert_array_equal(grid[32:, :32], want[2])


def test_reconstruct_scores_render_folder(tmp_path, monkeypatch, capsys):
    """`atoken-rt reconstruct` on a render folder: loading and the folder reader are stand-ins
    returning views rendered from the very Gaussians the CLI will decode, so the CLI must report
    a perfect score and write the side-by-side pictures. (The real readers are exercised end to
    end in test_cli_reconstruct_mesh_and_render_folder_end_to_end.)"""
    pytest.importorskip("av")
    import json

    import atoken_rt
    from atoken_rt import cli, media
    from atoken_rt.threed.folder import RenderViews

    from .conftest import GS_WEIGHTS, WEIGHTS, random_voxels

    vox = random_voxels(20, seed=3)
    folder = tmp_path / "renders"
    folder.mkdir()
    (folder / "transforms.json").write_text("{}")  # a render folder to the real expand_inputs
    sess = atoken_rt.Session("tiny-sod", WEIGHTS, gs_config="tiny-gs", gs_checkpoint=GS_WEIGHTS)
    g = sess.reconstruct([vox]).gaussians[0]
    yaw = torch.tensor([0.3, 2.0])
    w2c, k = R.yaw_pitch_cameras(yaw, torch.tensor([0.4, -0.2]))
    images = R.render(g, w2c, k, resolution=(24, 32), backend="torch").uint8().numpy()

    def fake_load(path, *args, **kwargs):
        return media.Loaded(path=Path(path), kind="3d", data=vox, shape=vox.feats.shape,
                            tokens=len(vox.coords))

    monkeypatch.setattr(media, "load", fake_load)
    # Set in the module dict: getattr on the lazy package would try to import the missing
    # module (monkeypatch.setattr reads the old value first).
    monkeypatch.setitem(vars(atoken_rt.threed), "read_render_folder",
                        lambda p: RenderViews(images, np.zeros(images.shape[:3]), w2c.numpy(),
                                              k.numpy()))
    out = tmp_path / "rec"
    rc = cli.main(["reconstruct", str(folder), "--out", str(out), "--config", "tiny-sod",
                   "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet",
                   "--gs-config", "tiny-gs", "--gs-checkpoint", str(GS_WEIGHTS),
                   "--render-backend", "torch"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SSIM 1.0000" in text and "2 input views at 24x32" in text
    row = json.loads((out / "reconstruct.json").read_text())["samples"][0]
    scores = row["render_scores"]
    assert scores["views"] == 2 and scores["ssim"] == pytest.approx(1.0)
    side = media.read_image(out / "0000_renders_views" / "01.png")
    np.testing.assert_array_equal(side[:, :32], images[1])
    np.testing.assert_array_equal(side[:, 32:], images[1])


# ----------------------------------------------------------------------------------------------
# End to end on the tiny configs: real mesh rendering, folder reading, packing, GS decoding,
# rendering and scoring (no stand-ins)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rod_assets(tmp_path_factory):
    """A small coloured rod (.glb), a render folder of it (RGBA PNGs, one EXR depth) and an
    .npz voxel file: a few hundred voxels, so the tiny model runs in seconds."""
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("OpenEXR")
    pytest.importorskip("av")
    import json

    import OpenEXR
    from PIL import Image

    from atoken_rt.threed import render_views, sphere_cameras

    d = tmp_path_factory.mktemp("e2e")
    m = trimesh.creation.box(extents=(0.06, 0.8, 0.06))
    m.visual.vertex_colors = np.array([200, 30, 60, 255], np.uint8)
    mesh = d / "rod.glb"
    m.export(mesh)
    folder = d / "rod_renders"
    folder.mkdir()
    images, depths, _, _ = render_views(mesh, views=3, resolution=48, seed=2)
    cams = sphere_cameras(3, seed=2)
    frames = []
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
        if i == 1:  # Blender's EXR: background far away
            raw = np.where(depths[i] < 0, np.float32(1e10), depths[i]).astype(np.float32)
            OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION,
                          "type": OpenEXR.scanlineimage}, {"Z": raw}
                         ).write(str(folder / f"{i:03d}_depth.exr"))
        else:
            np.save(folder / f"{i:03d}_depth.npy", depths[i])
        frames.append({"file_path": f"{i:03d}", "camera_angle_x": math.radians(40),
                       "transform_matrix": np.asarray(cams.c2w[i]).tolist()})
    (folder / "transforms.json").write_text(json.dumps({"frames": frames}))
    from .conftest import random_voxels
    vox = random_voxels(25, seed=5)
    npz = d / "vox.npz"
    np.savez(npz, coords=vox.coords, feats=vox.feats)
    return mesh, folder, npz


def _model_args():
    from .conftest import GS_WEIGHTS, WEIGHTS
    return ["--config", "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet",
            "--gs-config", "tiny-gs", "--gs-checkpoint", str(GS_WEIGHTS),
            "--render-backend", "torch"]


def test_cli_reconstruct_mesh_and_render_folder_end_to_end(rod_assets, tmp_path, capsys,
                                                           monkeypatch):
    import json
    import re

    from atoken_rt import cli, media
    from atoken_rt.threed import folder as folder_mod
    from atoken_rt.threed import load_render_folder
    from atoken_rt.threed import views as views_mod
    from atoken_rt.threed.views import load_mesh

    mesh, folder, _ = rod_assets
    out = tmp_path / "rec"
    reads = []  # each input's views are read once: packed and scored from the same read
    for mod, name in ((views_mod, "render_views"), (folder_mod, "_read_views")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name, **k:
                            reads.append(_n) or _real(*a, **k))
    rc = cli.main(["reconstruct", str(mesh), str(folder), "--out", str(out), *_model_args(),
                   "--views", "4", "--view-size", "40"])
    assert rc == 0
    assert sorted(reads) == ["_read_views", "render_views"]
    monkeypatch.undo()
    text = capsys.readouterr().out
    scored = re.findall(r"PSNR\s+([\d.]+|inf) dB  SSIM (-?[\d.]+)  (\S+)  \(3d: Gaussians "
                        r"rendered from the (\d+) input views at (\d+x\d+)\)", text)
    assert [(Path(s[2]).name, s[3], s[4]) for s in scored] == [
        ("rod.glb", "4", "40x40"), ("rod_renders", "3", "48x48")]
    for p, s, *_ in scored:
        assert p == "inf" or 0 < float(p) < 100
        assert -1 <= float(s) <= 1
    rows = json.loads((out / "reconstruct.json").read_text())["samples"]
    assert [r["kind"] for r in rows] == ["3d", "3d"]
    # the mesh was packed from the --views / --view-size renders, the folder as load_render_folder
    assert rows[0]["used_shape"][0] == len(load_mesh(mesh, views=4, resolution=40).coords)
    assert rows[1]["used_shape"][0] == len(load_render_folder(folder).coords)
    for row, stem, n, size in ((rows[0], "0000_rod_views", 4, 40),
                               (rows[1], "0001_rod_renders_views", 3, 48)):
        sc = row["render_scores"]
        assert sc["views"] == n and sc["resolution"] == [size, size]
        assert len(sc["psnr_views"]) == n and len(sc["ssim_views"]) == n
        sides = sorted((out / stem).glob("*.png"))
        assert len(sides) == n
        side = media.read_image(sides[0])
        assert side.shape == (size, 2 * size, 3)
        assert side[:, :size].any()  # the input view (the rod on black) is on the left
        assert any(f.endswith(".ply") for f in row["files"])


def test_cli_encode_then_decode_3d_previews(rod_assets, tmp_path):
    import json

    from safetensors import safe_open

    from atoken_rt import cli, media
    from atoken_rt.gs import load_ply

    mesh, folder, npz = rod_assets
    tok = tmp_path / "tok.safetensors"
    model = _model_args()[:6]  # encode takes no GS options
    rc = cli.main(["encode", str(mesh), str(folder), str(npz), "--out", str(tok), *model,
                   "--views", "3", "--view-size", "32"])
    assert rc == 0
    with safe_open(str(tok), framework="pt") as f:
        meta = json.loads(f.metadata()["atoken_rt"])
    assert [s["kind"] for s in meta["samples"]] == ["3d", "3d", "3d"]
    out = tmp_path / "dec"
    rc = cli.main(["decode", str(tok), "--out", str(out), *_model_args()[4:],
                   "--device", "cpu", "--render-size", "24", "--orbit-frames", "2"])
    assert rc == 0
    for stem in ("0000_rod", "0001_rod_renders", "0002_vox"):
        ply = load_ply(out / f"{stem}.ply")
        assert len(ply["x"]) > 0
        frames, _ = media.read_video(out / f"{stem}.mp4")
        assert frames.shape == (2, 24, 24, 3)
        assert media.read_image(out / f"{stem}.png").shape == (48, 48, 3)
