"""Token files, configs and CLI arguments are untrusted input (issue 10).

Every edited or broken input must give one line naming the file and the field (a ValueError or
TypeError from the API, exit code 2 from the CLI), before anything is written. The model is
`tiny-sod` with the fixture weights; every input is made here.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("PIL")
pytest.importorskip("tqdm")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import atoken_rt  # noqa: E402
from atoken_rt import cli, media, tokenfile  # noqa: E402
from atoken_rt.checkpoint import file_sha256  # noqa: E402

from .conftest import WEIGHTS  # noqa: E402

MODEL = ["--config", "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 32x48 PNG, a 10-frame 32x32 MP4 (2 temporal tokens) and a 20-voxel .npz."""
    d = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(d / "img.png")
    media.write_video(d / "clip.mp4", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), 12)
    flat = rng.choice(64 ** 3, size=20, replace=False)
    coords = np.stack(np.unravel_index(flat, (64, 64, 64)), axis=1).astype(np.int32)
    np.savez(d / "vox.npz", coords=coords, feats=rng.random((20, 768), dtype=np.float32))
    return [d / "img.png", d / "clip.mp4", d / "vox.npz"]


@pytest.fixture(scope="module")
def tokens(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokens.safetensors"
    assert cli.main(["encode", *map(str, inputs), "--out", str(out), *MODEL]) == 0
    return out


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["atoken_rt"])


def _edited(src, dst, edit_meta=None, edit_tensors=None, raw_meta=None):
    tensors, meta = _read(src)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst),
              metadata={"atoken_rt": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dst


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("atoken-rt: error: ") and "Traceback" not in err
    return err


def _set(path, value):
    def f(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


# ------------------------------------------------------------------------------------------------
# token files
# ------------------------------------------------------------------------------------------------

BAD_META = [
    ("list-json", None, "[1, 2]", "metadata: must be a JSON object"),
    ("samples-not-list", _set(["samples"], {"a": 1}), None, "field 'samples'"),
    ("sample-not-dict", _set(["samples", 0], "x"), None, "sample 0: metadata must be"),
    ("too-few-samples", lambda m: m["samples"].pop(), None, "field 'samples' describes 2"),
    ("kind-type", _set(["samples", 0, "kind"], 5), None, "sample 0: field 'kind'"),
    ("fps-huge", _set(["samples", 1, "fps"], 1e300), None, "sample 1: field 'fps'"),
    ("fps-string", _set(["samples", 1, "fps"], "12"), None, "sample 1: field 'fps'"),
    ("video-as-image", _set(["samples", 1, "kind"], "image"), None,
     "sample 1: field 'kind' is 'image'"),
    ("image-as-3d", _set(["samples", 0, "kind"], "3d"), None, "sample 0: field 'kind' is '3d'"),
    ("3d-as-video", _set(["samples", 2, "kind"], "video"), None, "sample 2: field 'kind'"),
    ("frames-negative", _set(["samples", 1, "frames_used"], -2), None,
     "sample 1: field 'frames_used'"),
    ("frames-too-many", _set(["samples", 1, "frames_used"], 99), None,
     "sample 1: field 'frames_used' must lie in [1, 8]"),
    ("video-used-shape", _set(["samples", 1, "used_shape"], [4, 32, 32, 3]), None,
     "sample 1: field 'used_shape' is [4, 32, 32, 3] but the tokens decode to [8, 32, 32, 3]"),
    ("used-shape", _set(["samples", 0, "used_shape"], [64, 48, 3]), None,
     "sample 0: field 'used_shape'"),
    ("tokens", _set(["samples", 0, "tokens"], 7), None, "sample 0: field 'tokens'"),
    ("source", _set(["samples", 0, "source"], 5), None, "sample 0: field 'source'"),
    ("original-shape", _set(["samples", 0, "original_shape"], "32x48"), None,
     "sample 0: field 'original_shape'"),
    ("dtype", _set(["dtype"], "fp8"), None, "metadata: field 'dtype'"),
    ("sha", _set(["checkpoint_sha256"], 12), None, "field 'checkpoint_sha256'"),
    ("format", _set(["format"], "other/2"), None, "field 'format'"),
    ("arch-discrete", _set(["architecture", "discrete"], False), None, "discrete"),
]


@pytest.mark.parametrize("name,edit,raw,message", BAD_META, ids=[b[0] for b in BAD_META])
def test_decode_rejects_edited_metadata(tokens, tmp_path, capsys, name, edit, raw, message):
    bad = _edited(tokens, tmp_path / "bad.safetensors", edit_meta=edit, raw_meta=raw)
    out = tmp_path / "out"
    rc = cli.main(["decode", str(bad), "--out", str(out), *MODEL[2:]])
    err = _one_error(capsys)
    assert rc == 2 and str(bad) in err and message in err, err
    assert not out.exists()  # nothing written, not even the folder


def _tensor(name, fn):
    def f(t):
        t[name] = fn(t[name])
    return f


BAD_TENSORS = [
    ("coords-float", _tensor("sample.0.coords", lambda c: c.float()), "tensor 'coords' has dtype"),
    ("coords-shape", _tensor("sample.0.coords", lambda c: c[:, :3].contiguous()),
     "tensor 'coords' must have shape"),
    ("coords-range", _tensor("sample.0.coords", lambda c: c - 1), "must lie in [0, 4096)"),
    ("coords-dup", _tensor("sample.0.coords", lambda c: torch.cat([c[:1], c[:-1]])),
     "duplicated"),
    ("indices-range", _tensor("sample.0.indices", lambda x: x + 10_000), "tensor 'indices' must lie"),
    ("indices-u64", _tensor("sample.0.indices", lambda x: x.to(torch.uint64)),
     "tensor 'indices' has dtype uint64"),
    ("indices-bool", _tensor("sample.0.indices", lambda x: x.bool()), "dtype bool"),
    ("indices-rows", _tensor("sample.0.indices", lambda x: x[:-1].contiguous()), "rows for"),
    ("indices-width", _tensor("sample.0.indices", lambda x: x[:, :3].contiguous()),
     "tensor 'indices' must have shape [n, 8]"),
    ("embedding", _tensor("sample.0.embedding", lambda e: e[:5].contiguous()),
     "tensor 'embedding' must have shape [144]"),
    ("latents-both", lambda t: t.update({"sample.0.latents": torch.zeros(6, 48)}),
     "exactly one of indices/latents"),
]


@pytest.mark.parametrize("name,edit,message", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_decode_rejects_edited_tensors(tokens, tmp_path, capsys, name, edit, message):
    bad = _edited(tokens, tmp_path / "bad.safetensors", edit_tensors=edit)
    out = tmp_path / "out"
    rc = cli.main(["decode", str(bad), "--out", str(out), *MODEL[2:]])
    err = _one_error(capsys)
    assert rc == 2 and str(bad) in err and "sample 0" in err and message in err, err
    assert not out.exists()


def test_late_bad_sample_writes_nothing(tokens, tmp_path, capsys):
    """The last sample is broken: the first ones must not have been decoded and written."""
    bad = _edited(tokens, tmp_path / "bad.safetensors",
                  edit_meta=_set(["samples", 2, "frames_used"], 3))  # a 3D sample with frames: ok
    assert cli.main(["decode", str(bad), "--out", str(tmp_path / "ok"), *MODEL[2:]]) == 0
    capsys.readouterr()
    bad = _edited(tokens, tmp_path / "bad2.safetensors",
                  edit_tensors=_tensor("sample.2.coords", lambda c: c * 0 + 70))
    rc = cli.main(["decode", str(bad), "--out", str(tmp_path / "out"), "--max-tokens", "8",
                   *MODEL[2:]])
    err = _one_error(capsys)
    assert rc == 2 and "sample 2" in err and not (tmp_path / "out").exists()


def test_tokenfile_api(tokens):
    meta, samples = tokenfile.load(tokens, atoken_rt.load_config("tiny-sod"))
    assert len(samples) == 3 and meta["samples"][1]["kind"] == "video"
    with pytest.raises(tokenfile.TokenFileError, match="continuous"):
        tokenfile.validate(tokens, meta, samples, atoken_rt.load_config("tiny-soc"))
    assert issubclass(tokenfile.TokenFileError, ValueError)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

DATA = Path(__file__).parent / "data"


def _config(tmp_path, section, **changes):
    import yaml
    doc = yaml.safe_load((Path(atoken_rt.config._config_dir()) / section).read_text())
    target = doc["model"]["model_cfg"]["arch_cfg"] if "model_cfg" in doc["model"] \
        else doc["model"]
    for k, v in changes.items():
        if k.startswith("rep_"):
            target["representation_config"][k[4:]] = v
        else:
            target[k] = v
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


BAD_AE = [
    ({"encoder_num_heads": 0}, "encoder_num_heads"),
    ({"encoder_model_channels": -144}, "encoder_model_channels"),
    ({"decoder_num_blocks": 0}, "decoder_num_blocks"),
    ({"latent_channels": 0, "quantizer_feature_dim": 0}, "latent_channels"),
    ({"encoder_num_heads": 5}, "encoder_num_heads"),
    ({"decoder_num_blocks": 10 ** 6}, "decoder_num_blocks"),
    ({"encoder_mlp_channels": 10 ** 9}, "encoder_mlp_channels"),
    ({"quantizer_num_codebooks": 0}, "quantizer_num_codebooks"),
    ({"quantizer_chunk_size": 0}, "quantizer_chunk_size"),
    ({"quantizer_codebook_size": 10 ** 30}, "quantizer_codebook_size"),
    ({"patch_size": [4, 16, "x"]}, "patch_size"),
]


@pytest.mark.parametrize("changes,field", BAD_AE, ids=[b[1] + str(i) for i, b in enumerate(BAD_AE)])
def test_bad_config_sizes_are_valueerrors(tmp_path, changes, field):
    p = _config(tmp_path, "tiny-sod.yaml", **changes)
    with pytest.raises(ValueError, match=field) as e:
        atoken_rt.load_config(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes,field", [
    ({"num_heads": 0}, "num_heads"), ({"model_channels": 0}, "model_channels"),
    ({"num_blocks": 100000}, "num_blocks"), ({"window_size": -1}, "window_size"),
    ({"rep_num_gaussians": 0}, "num_gaussians"), ({"rep_voxel_size": 0}, "voxel_size"),
    ({"rep_voxel_size": float("nan")}, "voxel_size")])
def test_bad_gs_config_sizes_are_valueerrors(tmp_path, changes, field):
    p = _config(tmp_path, "tiny-gs.yaml", **changes)
    with pytest.raises(ValueError, match=field) as e:
        atoken_rt.config.load_gs_config(p)
    assert str(p) in str(e.value)


def test_config_files_that_are_not_configs(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 20000 + "]" * 20000)
    with pytest.raises(ValueError, match="nested too deeply") as e:
        atoken_rt.load_config(deep)
    assert str(deep) in str(e.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8") as e:
        atoken_rt.load_config(latin)
    assert str(latin) in str(e.value)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        atoken_rt.load_config(folder)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # and does not block
        atoken_rt.load_config(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ValueError, match="larger than"):
        atoken_rt.load_config(big)
    for p in (deep, latin, folder):
        assert cli.main(["info", "--config", str(p)]) == 2
        err = _one_error(capsys)
        assert str(p) in err


def test_config_dataclasses_reject_zero_sizes():
    with pytest.raises(ValueError, match="num_codebooks"):
        atoken_rt.FSQConfig(4096, 48, 0, 1)
    with pytest.raises(ValueError, match="num_heads"):
        atoken_rt.TowerConfig(144, 2, 0, 304, "full", "joint", False, True, False)


# ------------------------------------------------------------------------------------------------
# API arguments: the right error types
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sess():
    return atoken_rt.Session("tiny-sod", WEIGHTS)


def test_meta_tensors_are_valueerrors(sess):
    with pytest.raises(ValueError, match="sample 0: a meta-device tensor"):
        sess.encode([torch.empty(32, 32, 3, device="meta")])
    vox = atoken_rt.Voxels(coords=torch.zeros(1, 3, dtype=torch.int32, device="meta"),
                           feats=torch.zeros(1, 768))
    with pytest.raises(ValueError, match="sample 0 coords: a meta-device tensor"):
        sess.encode([vox])
    good_c, good_i = np.zeros((1, 4), np.int32), torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="sample 0: coords: a meta-device"):
        sess.decode(coords=[torch.zeros(1, 4, dtype=torch.int32, device="meta")], indices=[good_i])
    with pytest.raises(ValueError, match="sample 0: latents/indices: a meta-device"):
        sess.decode(coords=[good_c], indices=[good_i.to("meta")])
    with pytest.raises(ValueError, match="meta"):
        sess.indices_to_codes(good_i.to("meta"))


def test_indices_dtypes_and_empty(sess):
    for bad in (torch.zeros(2, 8, dtype=torch.uint64), torch.zeros(2, 8, dtype=torch.bool),
                np.zeros((2, 8), np.uint64), np.array([["a"] * 8])):
        with pytest.raises(TypeError, match="indices must be"):
            sess.indices_to_codes(bad)
    codes = sess.indices_to_codes(torch.zeros(0, 8, dtype=torch.int32))
    assert codes.shape == (0, 48)
    with pytest.raises(TypeError, match="sample 0: indices must be"):
        sess.decode(coords=[np.zeros((1, 4), np.int32)],
                    indices=[torch.zeros(1, 8, dtype=torch.uint64)])


@pytest.mark.parametrize("seed,exc", [("x", TypeError), (1.5, TypeError), (True, TypeError),
                                      (2 ** 70, ValueError)])
def test_bad_seed(sess, seed, exc):
    with pytest.raises(exc, match="seed"):
        atoken_rt.Session("tiny-sod", WEIGHTS, seed=seed)
    with pytest.raises(exc, match="seed"):
        sess.encode([np.zeros((16, 16, 3), np.uint8)], sample=True, seed=seed)


@pytest.mark.parametrize("device,exc", [("tpu", ValueError), ("gpu0", ValueError),
                                        ("meta", ValueError), (3.5, TypeError)])
def test_bad_device(device, exc):
    with pytest.raises(exc, match="device"):
        atoken_rt.Session("tiny-sod", WEIGHTS, device=device)


def test_checkpoint_that_is_not_a_file(tmp_path, capsys):
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    for p in (tmp_path, fifo):
        with pytest.raises(ValueError, match="not a regular file"):
            atoken_rt.Session("tiny-sod", p)
        rc = cli.main(["encode", str(WEIGHTS), "--out", str(tmp_path / "t.safetensors"),
                       "--config", "tiny-sod", "--checkpoint", str(p), "-q", "--device", "cpu"])
        err = _one_error(capsys)
        assert rc == 2 and "not a regular file" in err and "no such file" not in err
        assert cli.main(["info", "--checkpoint", str(p)]) == 2
        assert "not a regular file" in _one_error(capsys)


def test_close_racing_submit(sess):
    """Submits from two threads while a third closes the session over and over: every request
    completes, none fails with "cannot schedule new futures after shutdown"."""
    import threading
    img = np.zeros((16, 16, 3), np.uint8)
    errors, handles = [], []
    done = threading.Event()

    def submitter():
        for _ in range(40):
            try:
                handles.append(sess.encode_async([img]))
            except Exception as exc:  # noqa: BLE001 - the test records any failure
                errors.append(exc)

    def closer():
        while not done.is_set():
            sess.close()

    threads = [threading.Thread(target=submitter) for _ in range(2)]
    c = threading.Thread(target=closer)
    c.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    c.join()
    sess.close()
    assert errors == []
    assert len(handles) == 80 and all(len(h.wait(timeout=60)) == 1 for h in handles)


# ------------------------------------------------------------------------------------------------
# a CLI that never loses work
# ------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_skipped(inputs, tmp_path, capsys, monkeypatch):
    from PIL import Image
    d = tmp_path / "folder"
    d.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "bomb.png")
    (d / "ok.png").write_bytes(inputs[0].read_bytes())
    # 64x64 = 4096 pixels > 2 x 2000: Pillow raises DecompressionBombError (not an OSError);
    # ok.png (32x48 = 1536) is under Pillow's warning threshold too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    out = tmp_path / "t.safetensors"
    rc = cli.main(["encode", str(d), "--out", str(out), *MODEL, "--on-error", "skip"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err
    assert "skipped: " in err and "bomb.png" in err and "DecompressionBomb" in err
    _, meta = _read(out)
    assert [Path(s["source"]).name for s in meta["samples"]] == ["ok.png"]
    assert [Path(f["source"]).name for f in meta["failed"]] == ["bomb.png"]
    rc = cli.main(["encode", str(d), "--out", str(out), *MODEL, "--on-error", "fail"])
    assert rc == 2 and "bomb.png" in _one_error(capsys)


def test_runtime_error_of_one_file_is_skipped(inputs, tmp_path, capsys, monkeypatch):
    """A file the model fails on (here: a RuntimeError for the video) is skipped, the rest of
    its batch is still encoded."""
    from atoken_rt import session as session_mod
    real = session_mod.Session.encode

    def encode(self, batch, **kw):
        if any(getattr(x, "ndim", 0) == 4 for x in batch):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(self, batch, **kw)

    monkeypatch.setattr(session_mod.Session, "encode", encode)
    out = tmp_path / "t.safetensors"
    assert cli.main(["encode", *map(str, inputs), "--out", str(out), *MODEL]) == 0
    err = capsys.readouterr().err
    assert "clip.mp4: cannot encode (RuntimeError" in err
    _, meta = _read(out)
    assert [Path(s["source"]).name for s in meta["samples"]] == ["img.png", "vox.npz"]


@pytest.mark.parametrize("case", ["parent-is-file", "out-is-dir", "unwritable"])
def test_bad_out_found_before_encoding(inputs, tmp_path, capsys, monkeypatch, case):
    from atoken_rt import session as session_mod
    monkeypatch.setattr(session_mod.Session, "encode",
                        lambda *a, **k: pytest.fail("encoded before checking --out"))
    if case == "parent-is-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "sub" / "t.safetensors"
    elif case == "out-is-dir":
        out = tmp_path / "d.safetensors"
        out.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "t.safetensors"
    rc = cli.main(["encode", *map(str, inputs), "--out", str(out), *MODEL])
    err = _one_error(capsys)
    assert rc == 2 and "--out" in err
    file_out = tmp_path / "plain"
    file_out.write_text("x")
    for cmd in (["decode", str(WEIGHTS)], ["reconstruct", str(inputs[0]), *MODEL],
                ["bench", "--config", "tiny-sod", "--device", "cpu"]):
        rc = cli.main([*cmd, "--out", str(file_out)])
        assert rc == 2 and "not a folder" in _one_error(capsys)


def test_unwritable_out_as_user(inputs, tmp_path, monkeypatch, capsys):
    """The unwritable case through os.access, so that it also runs as root."""
    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(cli.os, "access", lambda p, m: False if Path(p) == ro else real(p, m))
    rc = cli.main(["encode", str(inputs[0]), "--out", str(ro / "t.safetensors"), *MODEL])
    assert rc == 2 and "is not writable" in _one_error(capsys)


def test_token_file_mode_follows_umask(inputs, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "t.safetensors"
        assert cli.main(["encode", str(inputs[0]), "--out", str(out), *MODEL]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        os.umask(0o027)
        out2 = tmp_path / "t2.safetensors"
        assert cli.main(["encode", str(inputs[0]), "--out", str(out2), *MODEL]) == 0
        assert stat.S_IMODE(out2.stat().st_mode) == 0o640
        conv = atoken_rt.convert_checkpoint(WEIGHTS, tmp_path / "w.safetensors")
        assert stat.S_IMODE(conv.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_checkpoint_path_stored_resolved(inputs, tmp_path, monkeypatch):
    local = tmp_path / "w.pt"
    local.write_bytes(WEIGHTS.read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "t.safetensors"
    assert cli.main(["encode", str(inputs[0]), "--out", str(out), "--config", "tiny-sod",
                     "--checkpoint", "w.pt", "--device", "cpu", "-q"]) == 0
    _, meta = _read(out)
    assert meta["checkpoint"] == str(local.resolve()) and Path(meta["checkpoint"]).is_absolute()
    assert meta["checkpoint_sha256"] == file_sha256(WEIGHTS)
    # decoded from another folder: the recorded absolute path still finds it
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert cli.main(["decode", str(out), "--out", "d", "--device", "cpu", "-q"]) == 0


def test_notes_name_ignored_files_and_shapes_are_hxwxc(tmp_path, capsys):
    from PIL import Image
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.zeros((40, 70, 3), np.uint8)).save(d / "a.png")
    (d / "notes.txt").write_text("x")
    (d / "data.csv").write_text("x")
    assert cli.main(["encode", str(d), "--out", str(tmp_path / "t.safetensors"),
                     *MODEL[:-1]]) == 0
    err = capsys.readouterr().err
    assert "ignored 2 file(s)" in err and "notes.txt" in err and "data.csv" in err
    assert "centre-cropped 40x70x3 -> 32x64x3" in err  # H x W x C, as the PSNR lines
    assert cli.main(["reconstruct", str(d / "a.png"), "--out", str(tmp_path / "r"),
                     *MODEL]) == 0
    assert "(image 32x64x3)" in capsys.readouterr().out


def test_bench_progress_estimate_and_noise(tmp_path, monkeypatch):
    from atoken_rt import benchmark
    lines = []
    report = benchmark.run_bench(config="tiny-sod", shapes=["image:32", "image:48"], batches=[1],
                                 backends=["torch"], graphs=["off"], device=torch.device("cpu"),
                                 repeats=3, warmup=0, log=lines.append)
    text = "\n".join(lines)
    assert "building a session" in text
    assert "[1/2] image:32 x1" in text and "[2/2] image:48 x1" in text
    assert "s left for 1 case(s)" in text
    assert all("noisy" in r for r in report["results"])
    # noisy timings: the slowest calls far above the median
    monkeypatch.setattr(benchmark, "time_calls", lambda fn, r, w, d: [0.01, 0.01, 0.01, 0.05])
    lines.clear()
    report = benchmark.run_bench(config="tiny-sod", shapes=["image:32"], batches=[1],
                                 backends=["torch"], graphs=["off"], device=torch.device("cpu"),
                                 repeats=4, warmup=0, log=lines.append)
    assert report["results"][0]["noisy"] is True
    assert any(ln.startswith("warning: noisy timings for image:32 x1") for ln in lines)


def test_shard_rows_validated_before_writing(inputs, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    src = tmp_path / "src"
    src.mkdir()
    (src / "img.png").write_bytes(inputs[0].read_bytes())
    out = tmp_path / "tok"
    assert cli.main(["tokenize", str(src), "--out", str(out), *MODEL]) == 0
    shard = next(out.glob("shard-*.parquet"))
    table = pq.read_table(shard)
    i = table.schema.get_field_index("kind")
    pq.write_table(table.set_column(i, "kind", pa.array(["3d"] * table.num_rows)), shard)
    capsys.readouterr()
    dec = tmp_path / "dec"
    rc = cli.main(["decode", str(shard), "--out", str(dec), "--device", "cpu", "-q"])
    err = _one_error(capsys)
    assert rc == 2 and "field 'kind' is '3d'" in err and "img.png" in err and str(shard) in err
    assert not dec.exists()


def test_decode_api_kind_image_with_temporal_tokens(sess):
    from atoken_rt.inputs import grid_coords
    c = grid_coords(2, 1, 1)  # two temporal tokens: a video
    with pytest.raises(ValueError, match=r"kinds\[0\] is 'image' but the coords span 2"):
        sess.decode(coords=[c], indices=[torch.zeros(2, 8, dtype=torch.int32)], kinds=["image"])
    assert sess.decode(coords=[c], indices=[torch.zeros(2, 8, dtype=torch.int32)],
                       kinds=["video"]).samples[0].shape == (8, 16, 16, 3)


def test_decode_finds_moved_checkpoint_beside_the_token_file(inputs, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "w.pt").write_bytes(WEIGHTS.read_bytes())
    tok = a / "t.safetensors"
    assert cli.main(["encode", str(inputs[0]), "--out", str(tok), "--config", "tiny-sod",
                     "--checkpoint", str(a / "w.pt"), "--device", "cpu", "-q"]) == 0
    for name in ("w.pt", "t.safetensors"):  # the folder moved
        (a / name).rename(b / name)
    capsys.readouterr()
    assert cli.main(["decode", str(b / "t.safetensors"), "--out", str(tmp_path / "d"),
                     "--device", "cpu"]) == 0
    assert f"using {b / 'w.pt'} (same sha256" in capsys.readouterr().err
