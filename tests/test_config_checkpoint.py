"""Configs (official YAML layout, presets) and checkpoints (safe loading, strict report, converter)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import atoken_rt
from atoken_rt.checkpoint import CheckpointMismatch, convert_checkpoint, read_state_dict
from atoken_rt.config import load_config, load_gs_config

from .conftest import DATA, WEIGHTS, make_session, rel_err


def _official_keys(name):
    out = {}
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


@pytest.mark.parametrize("preset", ["atoken-soc", "atoken-sod"])
def test_expected_keys_equal_official_list(preset):
    ours = atoken_rt.expected_checkpoint_keys(preset)
    want = _official_keys("keys-atoken-soc.txt")
    assert list(ours.items()) == list(want.items())  # same keys, shapes and order
    assert sum(torch.Size(s).numel() for s in ours.values()) == 845_738_048


def test_expected_keys_gs_equal_official_list():
    assert list(atoken_rt.expected_checkpoint_keys("3d-decode-gs").items()) == \
        list(_official_keys("keys-3d_decode_gs.txt").items())


def test_s1_preset_has_32_latents():
    keys = atoken_rt.expected_checkpoint_keys("atoken-soc-s1")
    assert keys["proj.weight"] == (64, 1152) and keys["decoder.input_layer.weight"] == (1152, 32)


def test_full_presets_values():
    sod = load_config("atoken-sod")
    assert sod.encoder.width == 1152 and sod.encoder.num_blocks == 27 and sod.encoder.head_dim == 72
    assert sod.encoder.use_bias and not sod.encoder.use_rms_norm and not sod.encoder.qk_rms_norm
    assert sod.decoder.qk_rms_norm and sod.decoder.use_rms_norm and not sod.decoder.use_bias
    assert sod.quantizer.levels == (4,) * 6 and sod.quantizer.num_codebooks == 8
    assert load_config("atoken-soc").quantizer is None
    gs = load_gs_config("3d-decode-gs")
    assert (gs.model_channels, gs.num_blocks, gs.num_heads, gs.window_size) == (768, 12, 12, 8)


def test_config_by_path_equals_preset():
    assert load_config(DATA / "tiny-sod.yaml").encoder == load_config("tiny-sod").encoder


def test_unknown_preset_is_clear():
    with pytest.raises(ValueError, match="unknown config preset 'atoken-xyz'"):
        load_config("atoken-xyz")
    with pytest.raises(ValueError, match="unknown config preset"):
        load_config("atoken")  # no fuzzy matching


def _write_yaml(tmp_path, doc, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def test_missing_and_unknown_fields(tmp_path):
    doc = yaml.safe_load((DATA / "tiny-soc.yaml").read_text())
    arch = doc["model"]["model_cfg"]["arch_cfg"]
    del arch["decoder_num_heads"]
    arch["encoder_magic"] = 3
    with pytest.raises(ValueError, match=r"missing field\(s\) \['decoder_num_heads'\].*"
                                         r"unknown field\(s\) \['encoder_magic'\]"):
        load_config(_write_yaml(tmp_path, doc))


def test_incomplete_quantizer_and_bad_types(tmp_path):
    doc = yaml.safe_load((DATA / "tiny-sod.yaml").read_text())
    del doc["model"]["model_cfg"]["arch_cfg"]["quantizer_num_codebooks"]
    with pytest.raises(ValueError, match="quantizer_num_codebooks"):
        load_config(_write_yaml(tmp_path, doc))
    doc = yaml.safe_load((DATA / "tiny-soc.yaml").read_text())
    doc["model"]["model_cfg"]["arch_cfg"]["encoder_num_blocks"] = "two"
    with pytest.raises(ValueError, match="encoder_num_blocks"):
        load_config(_write_yaml(tmp_path, doc))


def test_wrong_layout_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="model.model_cfg.arch_cfg"):
        load_config(DATA / "tiny-gs.yaml")
    with pytest.raises(ValueError, match="GS decoder"):
        load_gs_config(DATA / "tiny-soc.yaml")
    with pytest.raises(OSError):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(TypeError):
        load_config(42)


def test_gs_missing_representation_field(tmp_path):
    doc = yaml.safe_load((DATA / "tiny-gs.yaml").read_text())
    del doc["model"]["representation_config"]["num_gaussians"]
    with pytest.raises(ValueError, match="num_gaussians"):
        load_gs_config(_write_yaml(tmp_path, doc))


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def test_missing_checkpoint_is_oserror(tmp_path):
    with pytest.raises(OSError):
        atoken_rt.Session("tiny-soc", tmp_path / "missing.pt")


def test_garbage_checkpoint(tmp_path):
    # Many fixed seeds: random bytes trip the weights-only unpickler in many different ways
    # (IndexError, KeyError, UnicodeDecodeError, ...); each must become a ValueError naming the file.
    p = tmp_path / "garbage.pt"
    for seed in range(200):
        p.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(ValueError, match="garbage.pt"):
            read_state_dict(p)
    with pytest.raises(ValueError, match="garbage.pt"):
        atoken_rt.Session("tiny-soc", p)
    st = tmp_path / "garbage.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}.....")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        read_state_dict(st)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_carrying_checkpoint_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"encoder.input_layer.weight": torch.zeros(1), "x": _Evil()}, p)
    with pytest.raises(ValueError, match="evil.pt.*refused"):
        read_state_dict(p)
    raw = tmp_path / "evil_raw.pt"  # a legacy (non-zip) pickle
    with open(raw, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(ValueError, match="evil_raw.pt"):
        read_state_dict(raw)


def test_mismatched_checkpoint_report(tmp_path):
    sd = torch.load(WEIGHTS, weights_only=True)
    del sd["proj.weight"]
    sd["encoder.extra"] = torch.zeros(3)
    sd["decoder.out_layer.weight"] = torch.zeros(5, 5)
    p = tmp_path / "mismatch.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointMismatch) as exc:
        atoken_rt.Session("tiny-soc", p)
    msg = str(exc.value)
    assert "mismatch.pt" in msg and "missing keys (1)" in msg and "proj.weight" in msg
    assert "unexpected keys (1)" in msg and "encoder.extra" in msg
    assert "decoder.out_layer.weight: [5, 5] vs [3072, 144]" in msg
    from atoken_rt.checkpoint import check_state_dict
    full = atoken_rt.expected_checkpoint_keys("atoken-sod")  # shapes only, nothing allocated
    with pytest.raises(CheckpointMismatch, match="wrong shapes"):  # tiny weights vs full preset
        check_state_dict(torch.load(WEIGHTS, weights_only=True), full, "tiny-weights.pt")


def test_lpips_keys_ignored_in_gs_checkpoint(tmp_path, ref_outputs):
    from .conftest import GS_WEIGHTS
    sd = torch.load(GS_WEIGHTS, weights_only=True)
    sd["lpips_loss.net.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    p = tmp_path / "gs_with_lpips.pt"
    torch.save(sd, p)
    s = make_session("tiny-soc", gs_config="tiny-gs", gs_checkpoint=p)
    assert s.gs is not None


def test_safetensors_and_converter_roundtrip(tmp_path, ref_inputs, quiet):
    base = make_session("tiny-sod")
    want = base.encode(ref_inputs[:1])
    st32 = convert_checkpoint(WEIGHTS, tmp_path / "w32.safetensors", torch.float32, "tiny-sod")
    s32 = atoken_rt.Session("tiny-sod", st32)
    got = s32.encode(ref_inputs[:1])
    assert torch.equal(got.features[0], want.features[0])
    st16 = convert_checkpoint(WEIGHTS, tmp_path / "w16.safetensors", torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in read_state_dict(st16).values())
    s16 = atoken_rt.Session("tiny-sod", st16, dtype=torch.bfloat16)
    ref16 = make_session("tiny-sod", torch.bfloat16).encode(ref_inputs[:1])
    assert torch.equal(s16.encode(ref_inputs[:1]).features[0], ref16.features[0])
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(WEIGHTS, tmp_path / "x.safetensors", torch.float16)


def test_checkpoint_is_memory_mapped_and_strict_loaded():
    sd = read_state_dict(WEIGHTS)
    assert len(sd) == 63
    s = make_session("tiny-soc")
    assert rel_err(s.model.proj.weight, sd["proj.weight"]) == 0.0


def test_session_usable_after_checkpoint_error(tmp_path, ref_inputs, quiet):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"nonsense")
    with pytest.raises(ValueError):
        atoken_rt.Session("tiny-soc", p)
    s = make_session("tiny-soc")
    assert s.encode(ref_inputs[:1]).features[0].shape == (6, 144)


def test_convert_command(tmp_path):
    import subprocess
    import sys
    dst = tmp_path / "w.safetensors"
    p = subprocess.run([sys.executable, "-m", "atoken_rt.convert", str(WEIGHTS), str(dst),
                        "--dtype", "bf16", "--config", "tiny-sod"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr
    sd = read_state_dict(dst)
    assert len(sd) == 63 and sd["proj.weight"].dtype == torch.bfloat16
