"""The Session API: result layout, decoding from latents or indices, chunking, batching, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import atoken_rt
from atoken_rt.packing import build_plan

from .conftest import make_session, random_voxels, rel_err


@pytest.fixture(scope="module")
def sod():
    return make_session("tiny-sod")


@pytest.fixture(scope="module")
def soc():
    return make_session("tiny-soc")


def _video(t=22, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_result_layout(sod, ref_inputs, quiet):
    enc = sod.encode(ref_inputs + [random_voxels(40, 1)])
    n = [6, 136, 12, 20, 40]
    assert len(enc) == 5 and enc.kinds == ["image", "image", "video", "video", "3d"]
    for i, ni in enumerate(n):
        assert enc.coords[i].shape == (ni, 4) and enc.coords[i].dtype == torch.int32
        assert enc.latents[i].shape == (ni, 48) and enc.moments[i].shape == (ni, 96)
        assert enc.indices[i].shape == (ni, 8) and enc.indices[i].dtype == torch.int32
        assert enc.features[i].shape == (ni, 144)
    assert enc.embedding.shape == (5, 144)
    assert torch.allclose(enc.embedding.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(enc.coords[3][-1], torch.tensor([4, 1, 1, 0], dtype=torch.int32))
    assert set(enc.latents[0].unique().tolist()) <= {-1.0, -0.5, 0.0, 0.5}
    dec = sod.decode(enc)
    assert dec.tokens[1].shape == (136, 3072)
    assert dec.samples[0].shape == (32, 48, 3) and dec.samples[1].shape == (272, 128, 3)
    assert dec.samples[2].shape == (8, 32, 48, 3) and dec.samples[3].shape == (20, 32, 32, 3)
    assert dec.samples[4].shape == (40, 768) and dec.gaussians[4] is None
    assert enc.cpu().latents[0].device.type == "cpu"


def test_continuous_latents_are_posterior_mean_or_seeded_sample(soc, ref_inputs, quiet):
    enc = soc.encode(ref_inputs[:2])
    assert enc.indices[0] is None
    assert torch.equal(enc.latents[0], enc.moments[0][:, :48])
    a = soc.encode(ref_inputs[:2], sample=True, seed=3)
    b = soc.encode(ref_inputs[:2], sample=True, seed=3)
    c = soc.encode(ref_inputs[:2], sample=True, seed=4)
    assert torch.equal(a.latents.packed, b.latents.packed)
    assert not torch.equal(a.latents.packed, c.latents.packed)
    m = enc.moments.packed
    eps = (a.latents.packed - m[:, :48]) / torch.exp(0.5 * m[:, 48:])
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1


def test_decode_from_latents_or_indices_alone(sod, ref_inputs, quiet):
    enc = sod.encode(ref_inputs + [random_voxels(40, 1)])
    want = sod.decode(enc)
    coords = [c.cpu().numpy() for c in enc.coords]
    by_lat = sod.decode(coords=coords, latents=list(enc.latents), kinds=enc.kinds)
    by_idx = sod.decode(coords=coords, indices=[i.cpu().numpy() for i in enc.indices])
    for i in range(5):
        assert torch.equal(by_lat.tokens[i], want.tokens[i])
        assert torch.equal(by_idx.tokens[i], want.tokens[i])
    assert by_idx.kinds == ["image", "image", "video", "video", "3d"]  # inferred from coords


def test_decode_from_shuffled_coords(sod, ref_inputs, quiet):
    enc = sod.encode(ref_inputs[3:4])
    want = sod.decode(enc)
    perm = torch.randperm(20)
    dec = sod.decode(coords=[enc.coords[0][perm]], latents=[enc.latents[0][perm]], kinds=["video"])
    assert rel_err(dec.tokens[0], want.tokens[0][perm]) < 1e-6
    assert rel_err(dec.samples[0], want.samples[0]) < 1e-6


def test_chunks_are_independent_and_exact(soc):
    vid = _video(22)
    enc = soc.encode([vid])
    # Chunk 1 (frames 16..19 -> t = 4) encoded on its own is the same computation.
    alone = soc.encode([vid[16:20]])
    assert rel_err(enc.features[0][16:], alone.features[0]) < 1e-6
    # Changing frames of chunk 1 leaves chunk 0 untouched.
    vid2 = vid.copy()
    vid2[16:] = 0
    enc2 = soc.encode([vid2])
    assert torch.equal(enc2.features[0][:16], enc.features[0][:16])
    dec = soc.decode(enc)
    assert rel_err(dec.tokens[0][16:], soc.decode(alone).tokens[0]) < 1e-5


def test_one_varlen_pass_for_all_chunks():
    coords = [atoken_rt.inputs.grid_coords(6, 2, 3).numpy(), atoken_rt.inputs.grid_coords(1, 2, 2).numpy()]
    plan = build_plan(coords, chunk=4)
    assert plan.order is None  # raster order already groups chunks
    assert plan.cu_seqlens.tolist() == [0, 24, 36, 40]
    assert plan.seq_sample.tolist() == [0, 0, 1]
    assert plan.positions[:, 0].tolist()[24:36] == [0] * 6 + [1] * 6  # t re-based per chunk
    assert plan.pe_shapes == [(2, 2), (2, 3)]


def test_batch_results_equal_single_results(sod, ref_inputs, quiet):
    batch = ref_inputs + [random_voxels(40, 1)]
    enc = sod.encode(batch)
    dec = sod.decode(enc)
    for i, x in enumerate(batch):
        e1 = sod.encode([x])
        assert rel_err(enc.features[i], e1.features[0]) < 1e-5
        assert rel_err(enc.embedding[i:i + 1], e1.embedding) < 1e-5
        assert rel_err(dec.tokens[i], sod.decode(e1).tokens[0]) < 1e-5


def test_reconstruct_equals_decode_encode(sod, ref_inputs, quiet):
    a = sod.reconstruct(ref_inputs[:2])
    b = sod.decode(sod.encode(ref_inputs[:2]))
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))


def test_bf16_casts_every_parameter(ref_inputs, quiet):
    s = make_session("tiny-sod", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in s.model.parameters())
    enc = s.encode(ref_inputs[:1])
    assert enc.features[0].dtype == torch.bfloat16 and enc.indices[0].dtype == torch.int32


def test_random_weights_warn_and_are_seeded(ref_inputs, quiet):
    with pytest.warns(atoken_rt.RandomWeightsWarning):
        a = atoken_rt.Session("tiny-soc", seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = atoken_rt.Session("tiny-soc", seed=5)
    assert torch.equal(a.encode(ref_inputs[:1]).latents[0], b.encode(ref_inputs[:1]).latents[0])


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        make_session("tiny-soc", backend="cuda-magic")
    with pytest.raises(TypeError, match="dtype"):
        make_session("tiny-soc", dtype="bf16")
    with pytest.raises(TypeError, match="dtype"):
        make_session("tiny-soc", dtype=torch.int8)


def test_decode_errors(sod, soc, ref_inputs, quiet):
    enc = sod.encode(ref_inputs[:1])
    c = enc.coords[0].cpu().numpy()
    with pytest.raises(ValueError, match="exactly one of latents or indices"):
        sod.decode(coords=[c])
    with pytest.raises(ValueError, match="1 coords but 2"):
        sod.decode(coords=[c], latents=[enc.latents[0], enc.latents[0]])
    with pytest.raises(ValueError, match=r"sample 0: indices must lie in \[0, 4096\)"):
        sod.decode(coords=[c], indices=[np.full((6, 8), 5000)])
    with pytest.raises(ValueError, match="continuous"):
        soc.decode(coords=[c], indices=[enc.indices[0]])
    with pytest.raises(ValueError, match="sample 0: latents must be float"):
        sod.decode(coords=[c], latents=[torch.zeros(6, 7)])
    with pytest.raises(ValueError, match="NaN"):
        sod.decode(coords=[c], latents=[torch.full((6, 48), float("nan"))])
    with pytest.raises(ValueError, match="duplicated"):
        sod.decode(coords=[np.zeros((6, 4), np.int32)], latents=[enc.latents[0]])
    with pytest.raises(ValueError, match="not a full"):
        sod.decode(coords=[c[:5]], latents=[enc.latents[0][:5]], kinds=["image"])
    with pytest.raises(TypeError, match="EncodeResult"):
        sod.decode("tokens")
    assert sod.decode(enc).tokens[0].shape == (6, 3072)  # still usable


def test_mixed_batch_3d_equals_3d_alone(sod, ref_inputs, quiet):
    v = random_voxels(40, 1)
    alone = sod.encode([v])
    mixed = sod.encode([ref_inputs[0], v])
    assert rel_err(mixed.features[1], alone.features[0]) < 1e-5


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            make_session("tiny-soc", backend="triton")
    else:
        with pytest.raises(ValueError, match="backend 'triton'"):
            make_session("tiny-soc", backend="triton")


def test_random_weight_gs_decoder_has_its_fixed_buffer(quiet):
    from atoken_rt.gs import hammersley_perturbation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = atoken_rt.Session("tiny-soc", gs_config="tiny-gs")
    assert torch.equal(s.gs.offset_perturbation, hammersley_perturbation(32, 1.5))


def test_decode_uses_the_host_coords_of_the_encode(sod, ref_inputs, quiet):
    """decode(enc) takes the coords from the host copy kept at encode time (reading enc.coords
    back from a GPU would wait for the encode to finish); the copy is read-only and equal."""
    enc = sod.encode(ref_inputs + [random_voxels(30, seed=2)])
    for host, dev in zip(enc.coords_host, enc.coords):
        assert np.array_equal(host, dev.cpu().numpy()) and not host.flags.writeable
    want = sod.decode(enc)
    enc.coords.packed.fill_(-1)  # the device copy is not read again
    got = sod.decode(enc)
    assert torch.equal(got.tokens.packed, want.tokens.packed)
    assert all(torch.equal(a, b) for a, b in zip(got.samples, want.samples))
    assert enc.cpu().coords_host is enc.coords_host


def test_results_are_ordinary_tensors_for_training(sod, ref_inputs, quiet):
    """Tokens feed a trainable model and results can be edited in place (no inference tensors:
    those cannot be saved for backward)."""
    enc = sod.encode(ref_inputs)
    dec = sod.decode(enc)
    head = torch.nn.Linear(enc.latents[0].shape[1], 3)
    loss = head(enc.latents.packed).square().mean() + head(enc.features.packed[:, :48]).mean()
    loss.backward()
    assert head.weight.grad is not None
    for t in (enc.coords.packed, enc.latents.packed, enc.embedding, dec.tokens.packed):
        assert not t.is_inference() and not t.requires_grad
    enc.coords[0].add_(0)


@pytest.mark.parametrize("graphs", [False, True])
def test_calls_inside_and_outside_the_callers_inference_mode(graphs, ref_inputs, quiet):
    """A first call (or warm-up) under the caller's torch.inference_mode must not leave
    persistent buffers as inference tensors that later calls outside it cannot write."""
    s = make_session("tiny-sod", graphs=graphs)
    with torch.inference_mode():
        if graphs:
            s.warmup([(256, 2)])
        first = s.encode(ref_inputs[:2])
        s.decode(first)
    again = s.encode(ref_inputs[:2])  # outside: writes the same scratch / static buffers
    assert torch.equal(again.indices.packed, first.indices.packed)
    assert rel_err(s.decode(again).tokens.packed, s.decode(first).tokens.packed) == 0


def test_a_failed_call_leaves_the_session_usable(sod, ref_inputs, quiet, monkeypatch):
    """An error in the middle of the towers (after work was queued) propagates, and the next
    call runs normally."""
    want = sod.encode(ref_inputs[:1]).features.packed
    boom = RuntimeError("injected failure inside the encoder")

    def fail(*a, **k):
        raise boom

    monkeypatch.setattr(sod.model.encoder.head, "forward", fail)
    with pytest.raises(RuntimeError, match="injected"):
        sod.encode(ref_inputs[:1])
    monkeypatch.undo()
    assert torch.equal(sod.encode(ref_inputs[:1]).features.packed, want)
