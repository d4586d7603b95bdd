"""``backend="triton"`` reproduces the official fixtures (fp32 on CPU through the Triton
interpreter; bf16 on a GPU), within the bounds of tests/data/README.md."""

from __future__ import annotations

import warnings

import pytest
import torch

import atoken_rt

from .conftest import (GS_WEIGHTS, WEIGHTS, fixture_outputs, rel_err, requires_cuda,
                       requires_triton)

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(cfg, dtype, inputs, epilogue="cublas"):
    sess = atoken_rt.Session(cfg, WEIGHTS, device=DEVICE, dtype=dtype, backend="triton",
                             epilogue=epilogue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = sess.encode(inputs)
    return enc, sess.decode(enc)


@pytest.mark.parametrize("cfg", ["tiny-soc", "tiny-sod"])
def test_triton_fp32_matches_fixtures(cfg, ref_outputs, ref_inputs):
    enc, dec = _run(cfg, torch.float32, ref_inputs)
    for key, ours in fixture_outputs(enc, dec, cfg == "tiny-sod").items():
        err = rel_err(ours, ref_outputs[f"{cfg}.fp32.{key}"])
        assert err < 1e-4, (key, err)
    if cfg == "tiny-sod":
        agree = (enc.indices.packed.cpu() == ref_outputs["tiny-sod.fp32.fsq_indices"]).float()
        assert float(agree.mean()) > 0.99


@pytest.mark.parametrize("buckets", [None, "small"])
def test_triton_static_path_matches_fixtures(buckets, ref_outputs, ref_inputs):
    """The static (bucketed) path with the Triton kernels, run eagerly on CPU: what a CUDA graph
    captures. Default buckets put several sequences in one bucket (the attention kernel's packed
    grid); small ones split the batch across buckets and replays."""
    from atoken_rt.static import BucketSet
    bs = BucketSet(tokens=(64, 160), seqs=(1, 2)) if buckets else None
    sess = atoken_rt.Session("tiny-sod", WEIGHTS, device=DEVICE, backend="triton", graphs=True,
                             buckets=bs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = sess.encode(ref_inputs)
        dec = sess.decode(enc)
    for key, ours in fixture_outputs(enc, dec, True).items():
        err = rel_err(ours, ref_outputs[f"tiny-sod.fp32.{key}"])
        assert err < 1e-4, (key, err)


def test_triton_epilogue_gemm_matches_fixtures(ref_outputs, ref_inputs):
    enc, dec = _run("tiny-sod", torch.float32, ref_inputs[:1], epilogue="triton")
    assert rel_err(enc.features[0], ref_outputs["tiny-sod.fp32.encoder_out"][:6]) < 1e-4
    assert rel_err(dec.tokens[0], ref_outputs["tiny-sod.fp32.decoded"][:6]) < 1e-4


def test_triton_3d_and_gaussians(ref_outputs):
    sess = atoken_rt.Session("tiny-soc", WEIGHTS, device=DEVICE, backend="triton",
                             gs_config="tiny-gs", gs_checkpoint=GS_WEIGHTS)
    vox = atoken_rt.Voxels(ref_outputs["input3d.coords"], ref_outputs["input3d.feats"])
    enc = sess.encode([vox])
    dec = sess.decode(enc)
    assert rel_err(dec.tokens[0], ref_outputs["3d.tiny-soc.fp32.decoded"]) < 1e-4
    assert rel_err(dec.gaussians[0].xyz, ref_outputs["gs.fp32.xyz"]) < 1e-4


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ["tiny-soc", "tiny-sod"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_on_gpu_matches_fixtures(cfg, backend, ref_outputs, ref_inputs):
    sess = atoken_rt.Session(cfg, WEIGHTS, device="cuda", dtype=torch.bfloat16, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = sess.encode(ref_inputs)
    dec = sess.decode(enc)
    for key, ours in fixture_outputs(enc, dec, cfg == "tiny-sod").items():
        fp32_ref = ref_outputs[f"{cfg}.fp32.{key}"]
        own = rel_err(ref_outputs[f"{cfg}.bf16.{key}"], fp32_ref)
        err = rel_err(ours, fp32_ref)
        assert err <= 2 * own + 1e-3, (key, err, own)


def test_triton_backend_unavailable_is_clear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton backend is available")
    from atoken_rt.backends import make_ops
    with pytest.raises(ValueError, match="backend 'triton' cannot run here"):
        make_ops("triton")
