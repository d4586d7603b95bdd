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
# CLI: decode previews, reconstruct scores (stand-ins for the input side's folder reader)
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
    """`atoken-rt reconstruct` on a render folder: the folder reader (another branch) is a
    stand-in returning views rendered from the very Gaussians the CLI will decode, so the CLI
    must report a perfect score and write the side-by-side pictures."""
    pytest.importorskip("av")
    import json

    import atoken_rt
    from atoken_rt import cli, media

    from .conftest import GS_WEIGHTS, WEIGHTS, random_voxels

    vox = random_voxels(20, seed=3)
    folder = tmp_path / "renders"
    folder.mkdir()
    sess = atoken_rt.Session("tiny-sod", WEIGHTS, gs_config="tiny-gs", gs_checkpoint=GS_WEIGHTS)
    g = sess.reconstruct([vox]).gaussians[0]
    yaw = torch.tensor([0.3, 2.0])
    w2c, k = R.yaw_pitch_cameras(yaw, torch.tensor([0.4, -0.2]))
    images = R.render(g, w2c, k, resolution=(24, 32), backend="torch").uint8().numpy()

    def fake_load(path):
        return media.Loaded(path=Path(path), kind="3d", data=vox, shape=vox.feats.shape,
                            tokens=len(vox.coords))

    monkeypatch.setattr(media, "expand_inputs", lambda inputs: ([folder], 0))
    monkeypatch.setattr(media, "load", fake_load)
    # Set in the module dict: getattr on the lazy package would try to import the missing
    # module (monkeypatch.setattr reads the old value first).
    monkeypatch.setitem(vars(atoken_rt.threed), "read_render_folder",
                        lambda p: (images, np.zeros(images.shape[:3]), w2c.numpy(), k.numpy()))
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
