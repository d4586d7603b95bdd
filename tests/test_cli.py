"""The `atoken-rt` command line: encode / decode / reconstruct / bench / info, and its errors.

Every input file is made inside the test (Pillow PNGs, a PyAV MP4, an .npz voxel file); the model
is `tiny-sod` with the fixture weights. Commands run in-process through `atoken_rt.cli.main`, plus
one subprocess smoke test of `python -m atoken_rt.cli`.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("PIL")
pytest.importorskip("tqdm")

from safetensors import safe_open  # noqa: E402

import atoken_rt  # noqa: E402
from atoken_rt import cli, media  # noqa: E402
from atoken_rt.checkpoint import file_sha256  # noqa: E402
from atoken_rt.gs import load_ply  # noqa: E402

from .conftest import GS_WEIGHTS, WEIGHTS  # noqa: E402

MODEL = ["--config", "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet"]


def _voxels(rng, m=30):
    flat = rng.choice(64 ** 3, size=m, replace=False)
    coords = np.stack(np.unravel_index(flat, (64, 64, 64)), axis=1).astype(np.int32)
    return coords, rng.random((m, 768), dtype=np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs: a PNG to crop (40x70), a clean PNG (32x48), a 6-frame 48x64 MP4, a voxel .npz."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(d / "b.png")
    media.write_video(d / "clip.mp4", rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8), 12)
    coords, feats = _voxels(rng)
    np.savez(d / "vox.npz", coords=coords, feats=feats)
    return {"dir": d, "list": [d / "a.png", d / "b.png", d / "clip.mp4", d / "vox.npz"]}


@pytest.fixture(scope="module")
def session():
    return atoken_rt.Session("tiny-sod", WEIGHTS)


@pytest.fixture(scope="module")
def encoded(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokens.safetensors"
    rc = cli.main(["encode", *map(str, files["list"]), "--out", str(out), *MODEL])
    assert rc == 0
    return out


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["atoken_rt"])


def _loaded(paths):
    return [media.load(p).data for p in paths]


# ------------------------------------------------------------------------------------------------
# encode / decode / reconstruct
# ------------------------------------------------------------------------------------------------

def test_encode_file_layout_and_metadata(encoded, files):
    tensors, meta = _read(encoded)
    n_tokens = [2 * 4, 2 * 3, 1 * 3 * 4, 30]  # 32x64 crop, 32x48, 4 frames 48x64, 30 voxels
    assert len(tensors) == 3 * 4
    for i, n in enumerate(n_tokens):
        assert tensors[f"sample.{i}.coords"].dtype == torch.int32
        assert tuple(tensors[f"sample.{i}.coords"].shape) == (n, 4)
        assert tensors[f"sample.{i}.indices"].dtype == torch.int32
        assert tuple(tensors[f"sample.{i}.indices"].shape) == (n, 8)
        assert tuple(tensors[f"sample.{i}.embedding"].shape) == (144,)
        assert f"sample.{i}.latents" not in tensors
    assert meta["config"] == "tiny-sod"
    assert meta["architecture"]["discrete"] is True and meta["architecture"]["width"] == 144
    assert meta["architecture"]["latent_channels"] == 48
    assert meta["checkpoint_sha256"] == file_sha256(WEIGHTS)
    assert meta["dtype"] == "fp32" and meta["backend"] == "torch"
    assert meta["atoken_rt_version"] == atoken_rt.__version__
    assert meta["failed"] == []
    a, b, clip, vox = meta["samples"]
    assert a["source"] == str(files["list"][0]) and a["kind"] == "image"
    assert a["original_shape"] == [40, 70, 3] and a["used_shape"] == [32, 64, 3]
    assert a["crop_offset"] == [4, 3]
    assert b["used_shape"] == [32, 48, 3] and b["crop_offset"] == [0, 0]
    assert clip["kind"] == "video" and clip["original_shape"] == [6, 48, 64, 3]
    assert (clip["frames_used"], clip["frames_dropped"], clip["frames_padded"]) == (4, 2, 0)
    assert clip["fps"] == pytest.approx(12.0)
    assert vox["kind"] == "3d" and vox["original_shape"] == [30, 768]


def test_encode_equals_session(encoded, files, session):
    tensors, _ = _read(encoded)
    with pytest.warns(atoken_rt.InputWarning):
        enc = session.encode(_loaded(files["list"]))
    for i in range(4):
        assert torch.equal(tensors[f"sample.{i}.coords"], enc.coords[i])
        assert torch.equal(tensors[f"sample.{i}.indices"], enc.indices[i])
        torch.testing.assert_close(tensors[f"sample.{i}.embedding"], enc.embedding[i])


def test_decode_equals_session_reconstruct(encoded, files, session, tmp_path, quiet):
    out = tmp_path / "dec"
    rc = cli.main(["decode", str(encoded), "--out", str(out), "--device", "cpu", "--quiet",
                   "--gs-config", "tiny-gs", "--gs-checkpoint", str(GS_WEIGHTS),
                   "--orbit-frames", "2", "--render-size", "32"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "0000_a.png", "0001_b.png", "0002_clip.mp4", "0003_vox.mp4", "0003_vox.npz",
        "0003_vox.ply", "0003_vox.png"]
    ref = session.reconstruct(_loaded(files["list"]))
    for name, i in (("0000_a.png", 0), ("0001_b.png", 1)):
        got = media.read_image(out / name)
        want = media.to_uint8(ref.samples[i])
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert (got != want).mean() < 1e-3
    frames, fps = media.read_video(out / "0002_clip.mp4")
    assert frames.shape == (4, 48, 64, 3) and fps == pytest.approx(12.0)
    vox = np.load(out / "0003_vox.npz")
    torch.testing.assert_close(torch.from_numpy(vox["feats_model"]), ref.samples[3])
    assert np.array_equal(vox["coords"], media.read_voxels(files["list"][3]).coords)
    assert vox["feats"].min() >= 0 and vox["feats"].max() <= 1
    gs_sess = atoken_rt.Session("tiny-sod", WEIGHTS, gs_config="tiny-gs", gs_checkpoint=GS_WEIGHTS)
    g = gs_sess.reconstruct(_loaded(files["list"][3:])).gaussians[0]
    ply = load_ply(out / "0003_vox.ply")
    np.testing.assert_allclose(ply["x"], g.xyz[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_continuous_config_roundtrip(files, tmp_path, quiet):
    tok = tmp_path / "soc.safetensors"
    args = ["--config", "tiny-soc", "--checkpoint", str(WEIGHTS), "--device", "cpu", "-q"]
    assert cli.main(["encode", str(files["list"][1]), "--out", str(tok), *args]) == 0
    tensors, meta = _read(tok)
    assert tensors["sample.0.latents"].shape == (6, 48) and "sample.0.indices" not in tensors
    assert meta["architecture"]["discrete"] is False
    assert cli.main(["decode", str(tok), "--out", str(tmp_path / "d"), "--device", "cpu",
                     "-q"]) == 0  # config and checkpoint default to the file's
    ref = atoken_rt.Session("tiny-soc", WEIGHTS).reconstruct(_loaded(files["list"][1:2]))
    got = media.read_image(tmp_path / "d" / "0000_b.png")
    assert np.abs(got.astype(int) - media.to_uint8(ref.samples[0]).astype(int)).max() <= 1


def test_reconstruct_side_by_side_and_psnr(files, session, tmp_path, capsys, quiet):
    out = tmp_path / "rec"
    assert cli.main(["reconstruct", *map(str, files["list"]), "--out", str(out), *MODEL]) == 0
    stdout = capsys.readouterr().out
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PSNR")]
    assert len(lines) == 4
    side = media.read_image(out / "0000_a.png")
    assert side.shape == (32, 128, 3)
    original = media.read_image(files["list"][0])[4:36, 3:67]
    assert np.array_equal(side[:, :64], original)
    rec = media.to_uint8(session.reconstruct([media.read_image(files["list"][0])]).samples[0])
    assert np.abs(side[:, 64:].astype(int) - rec.astype(int)).max() <= 1
    printed = float(re.search(r"PSNR\s+([\d.]+) dB\s+\S*a\.png", stdout).group(1))
    assert printed == pytest.approx(cli.psnr(original, side[:, 64:]), abs=0.01)
    frames, _ = media.read_video(out / "0002_clip.mp4")
    assert frames.shape == (4, 48, 128, 3)
    summary = json.loads((out / "reconstruct.json").read_text())
    assert [s["kind"] for s in summary["samples"]] == ["image", "image", "video", "3d"]


def test_psnr_and_uint8_mapping():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert media.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 -> 128, 191.25 -> 191
    a = np.zeros((4, 4), np.uint8)
    assert math.isinf(cli.psnr(a, a))
    assert cli.psnr(a, a + 1) == pytest.approx(20 * math.log10(255))


def test_token_estimates_and_expansion(tmp_path):
    assert media.estimate_tokens("image", (40, 70, 3)) == 2 * 4
    assert media.estimate_tokens("video", (2, 32, 32, 3)) == 4       # T < 4 pads to 4
    assert media.estimate_tokens("video", (7, 32, 32, 3)) == 4       # floor(7 / 4) = 1
    assert media.estimate_tokens("video", (8, 32, 32, 3)) == 8
    assert media.estimate_tokens("3d", (123, 768)) == 123
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ("sub/deep/z.png", "sub/a.jpg", "sub/notes.txt", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    paths, ignored = media.expand_inputs([tmp_path / "sub", str(tmp_path / "*.mp4")])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["sub/a.jpg", "sub/deep/z.png",
                                                                    "b.mp4"]
    assert ignored == 1
    with pytest.raises(media.MediaError, match="matches no file"):
        media.expand_inputs([str(tmp_path / "*.webm")])


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_bad_files_skipped_or_fatal(files, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    tiny = tmp_path / "tiny.png"
    from PIL import Image
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tiny)
    coords, feats = _voxels(np.random.default_rng(1), 8)
    feats[0, 0] = 3.0  # outside [0, 1]: rejected by the model's input checks, not by the reader
    np.savez(tmp_path / "badvox.npz", coords=coords, feats=feats)
    good = str(files["list"][1])
    tok = tmp_path / "t.safetensors"
    inputs = [str(bad), good, str(txt), str(tiny), str(tmp_path / "badvox.npz"),
              str(tmp_path / "missing.png")]
    assert cli.main(["encode", *inputs, "--out", str(tok), *MODEL]) == 0
    err = capsys.readouterr().err
    for name in ("broken.png", "notes.txt", "tiny.png", "badvox.npz", "missing.png"):
        assert re.search(rf"skipped: \S*{re.escape(name)}: ", err), (name, err)
    assert "unsupported file type '.txt'" in err and "smaller than one 16x16 patch" in err
    assert "feats must lie in [0, 1]" in err
    tensors, meta = _read(tok)
    assert [s["source"] for s in meta["samples"]] == [good]
    assert [Path(f["source"]).name for f in meta["failed"]] == [
        "broken.png", "notes.txt", "tiny.png", "badvox.npz", "missing.png"]

    rc = cli.main(["encode", good, str(bad), "--out", str(tmp_path / "u.safetensors"),
                   "--on-error", "fail", *MODEL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("atoken-rt: error: ") and "broken.png" in err
    assert not (tmp_path / "u.safetensors").exists()

    assert cli.main(["encode", str(bad), "--out", str(tmp_path / "v.safetensors"), *MODEL]) == 2
    assert "none of the 1 input file(s)" in capsys.readouterr().err


def test_token_file_from_other_config(encoded, tmp_path, capsys):
    rc = cli.main(["decode", str(encoded), "--out", str(tmp_path), "--config", "tiny-soc",
                   "--checkpoint", str(WEIGHTS), "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(encoded) in err and "'tiny-sod'" in err and "tiny-soc" in err
    not_tokens = tmp_path / "x.safetensors"
    not_tokens.write_bytes(b"garbage")
    assert cli.main(["decode", str(not_tokens), "--out", str(tmp_path), "-q"]) == 2
    assert "x.safetensors" in capsys.readouterr().err


def test_mismatched_checkpoint(files, tmp_path, capsys):
    rc = cli.main(["encode", str(files["list"][1]), "--out", str(tmp_path / "t.safetensors"),
                   "--config", "tiny-sod", "--checkpoint", str(GS_WEIGHTS), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "tiny-gs-weights.pt" in err and "does not match" in err and "missing keys" in err


# ------------------------------------------------------------------------------------------------
# info and bench
# ------------------------------------------------------------------------------------------------

def test_info(capsys):
    assert cli.main(["info", "--config", "tiny-sod", "--checkpoint", str(WEIGHTS)]) == 0
    out = capsys.readouterr().out
    assert "63 keys" in out and "matches config tiny-sod" in out
    assert "CUDA available" in out and "triton" in out and "atoken-sod" in out
    assert cli.main(["info", "--checkpoint", str(WEIGHTS)]) == 0
    assert "matches presets: tiny-soc, tiny-sod" in capsys.readouterr().out
    assert cli.main(["info", "--config", "tiny-sod", "--checkpoint", str(GS_WEIGHTS)]) == 1
    out = capsys.readouterr().out
    assert "does NOT match config tiny-sod" in out and "missing keys" in out


def test_info_subprocess():
    r = subprocess.run([sys.executable, "-m", "atoken_rt.cli", "info"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "presets:" in r.stdout and "tiny-sod" in r.stdout


def test_bench_cpu(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--config", "tiny-sod", "--shapes", "image:32,video:4x32,3d:40",
                   "--batch", "1,2", "--backend", "torch,triton", "--device", "cpu",
                   "--repeats", "1", "--warmup", "0", "--graphs", "off,on", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipping backend triton" in captured.err
    report = json.loads((out / "bench.json").read_text())
    rows = report["results"]
    combos = [(s, b) for s in ("image:32", "video:4x32", "3d:40") for b in (1, 2)]
    assert [(r["graphs"], r["shape"], r["batch"]) for r in rows] == \
        [("off", *c) for c in combos] + [("on", *c) for c in combos]
    assert [r["tokens"] for r in rows] == [4, 8, 4, 8, 40, 80] * 2
    for r in rows:
        assert r["encode_s"]["p50"] > 0 and r["encode_decode_tflops"] > 0
        assert r["encode_decode_s"]["n"] == 1 and r["peak_memory_bytes"] > 0
        assert r["encode_pct_peak"] is None  # a peak is only known for bf16 on the H200
    assert report["skipped"][0]["backend"] == "triton"
    assert report["settings"]["graphs"] == ["off", "on"] and report["settings"]["graphs_note"]
    assert report["baselines"]["official (atoken_inference)"] in (
        "not installed", "installed (timing hook not implemented)")
    md = (out / "bench.md").read_text()
    assert "| image:32 | 1 | torch | off | 4 |" in md and "skipped backend `triton`" in md
    assert "| 3d:40 | 2 | torch | on | 80 |" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_formula_matches_engineering_notes():
    from atoken_rt.benchmark import parse_shape, tower_flops
    cfg = atoken_rt.load_config("atoken-sod")
    dense = tower_flops(cfg, "encoder", [256]) - 4 * 27 * 1152 * 256 * 256
    assert dense / 256 == pytest.approx(822e6, rel=1e-3)          # 822 MFLOP per token per tower
    share = lambda L: 1 - 822e6 * L / tower_flops(cfg, "encoder", [L])  # noqa: E731
    assert share(256) == pytest.approx(0.037, abs=0.002)           # attention share, ENGINEERING.md
    assert share(4096) == pytest.approx(0.38, abs=0.01)
    both = tower_flops(cfg, "encoder", [256]) + tower_flops(cfg, "decoder", [256])
    assert both == pytest.approx(441e9, rel=0.02)                  # 256^2 image, encode + decode
    assert parse_shape("video:16x256").dims == (16, 256, 256, 3)
    with pytest.raises(ValueError, match="bad shape"):
        parse_shape("audio:3")


def test_bench_times_flash_attn_varlen_when_installed(tmp_path, monkeypatch):
    """With flash-attn importable, ``bench`` times its varlen attention on each batch's packed
    sequences next to the torch reference. flash-attn is CUDA-only, so a stand-in module with the
    same function signature (exact per-sequence attention) plays it on the CPU."""
    import importlib.machinery
    import types

    from atoken_rt import benchmark
    from atoken_rt import reference as ref
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((tuple(q.shape), cu_q.dtype, int(max_q)))
        return ref.varlen_attention(q, k, v, cu_q.cpu().numpy())

    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert "timed" in benchmark.detect_baselines()[
        "flash-attn varlen (flash_attn.flash_attn_varlen_func)"]
    report = benchmark.run_bench("tiny-sod", shapes=["image:32", "video:20x32"], batches=[2],
                                 backends=["torch"], device="cpu", repeats=1, warmup=0,
                                 log=lambda m: None)
    rows = report["attention"]
    assert [(r["shape"], r["provider"]) for r in rows] == [
        ("image:32", "flash-attn varlen"), ("image:32", "torch reference"),
        ("video:20x32", "flash-attn varlen"), ("video:20x32", "torch reference")]
    assert calls[0] == ((8, 2, 72), torch.int32, 4)  # 2 images x 4 tokens, 2 heads of 72
    for r in rows:
        assert r["rel_err_vs_fp32"] < 1e-5 and r["tflops"] > 0
        assert r["encode_decode_attention_s"] > r["s"]["p50"]
    # Two 20-frame videos: 5 latent frames each, chunks of 4 + 1 -> 4 sequences of 16 and 4.
    assert (rows[2]["sequences"], rows[2]["max_seqlen"], rows[2]["tokens"]) == (4, 16, 40)
    md = benchmark.markdown(report)
    assert "| video:20x32 | 2 | flash-attn varlen |" in md


def test_attention_baseline_survives_a_failing_provider():
    """A provider that fails with an empty message becomes an error row; the other providers
    still run."""
    from atoken_rt import benchmark

    def broken(*args):
        raise RuntimeError()

    cfg = atoken_rt.load_config("tiny-sod")
    rows = benchmark.attention_baseline(cfg, [4, 3], torch.device("cpu"), torch.float32, 1, 0,
                                        flash_fn=broken)
    assert rows[0]["provider"] == "flash-attn varlen" and rows[0]["error"] == "RuntimeError: "
    assert rows[1]["provider"] == "torch reference" and rows[1]["rel_err_vs_fp32"] < 1e-6


def test_checkpoint_hashed_once_per_process(files, tmp_path, monkeypatch):
    """encode records the checkpoint's SHA-256, decode checks the token file's record against
    it, info prints it: one hash of the file for all of them (it is GBs for the real models);
    a changed file is hashed again."""
    import shutil

    from atoken_rt import checkpoint
    ckpt = tmp_path / ("weights" + "".join(Path(WEIGHTS).suffixes))
    shutil.copyfile(WEIGHTS, ckpt)
    reads = []
    real = checkpoint._sha256_stream

    def counting(path, limit):
        reads.append(Path(path).resolve())
        return real(path, limit)
    monkeypatch.setattr(checkpoint, "_sha256_stream", counting)
    args = ["--config", "tiny-sod", "--checkpoint", str(ckpt), "--device", "cpu", "--quiet"]
    tok = tmp_path / "t.safetensors"
    assert cli.main(["encode", str(files["list"][1]), "--out", str(tok), *args]) == 0
    assert cli.main(["decode", str(tok), "--out", str(tmp_path / "d"), *args]) == 0
    assert cli.main(["info", *args[:4]]) == 0
    assert reads.count(ckpt.resolve()) == 1
    assert _read(tok)[1]["checkpoint_sha256"] == file_sha256(WEIGHTS)
    with open(ckpt, "ab") as f:  # a new version of the file: hashed anew, new digest
        f.write(b"\0")
    assert checkpoint.file_sha256(ckpt) != file_sha256(WEIGHTS)
    assert reads.count(ckpt.resolve()) == 2
