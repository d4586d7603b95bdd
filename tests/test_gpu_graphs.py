"""CUDA-graph capture and replay on a GPU (skipped without CUDA): captured runs equal eager ones,
replays with other batches in the same bucket are correct, split batches equal one pass, and the
non-blocking API works on a caller's stream."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import atoken_rt
from atoken_rt.static import BucketSet

from .conftest import WEIGHTS, fixture_outputs, rel_err, requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]

BUCKETS = BucketSet(tokens=(64, 256), seqs=(2, 8))


def _session(backend, graphs, dtype=torch.float32, buckets=BUCKETS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return atoken_rt.Session("tiny-sod", WEIGHTS, device="cuda", dtype=dtype,
                                 backend=backend, graphs=graphs, buckets=buckets)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graphs_match_fixtures_and_eager(backend, ref_outputs, ref_inputs, quiet):
    eager = _session(backend, False)
    graphs = _session(backend, True)
    assert graphs.graphs_active
    want = eager.encode(ref_inputs)
    for _ in range(2):  # first call captures, second replays
        got = graphs.encode(ref_inputs)
        dec = graphs.decode(got)
    for key, ours in fixture_outputs(got, dec, True).items():
        assert rel_err(ours, ref_outputs[f"tiny-sod.fp32.{key}"]) < 1e-4, key
    assert rel_err(got.features.packed, want.features.packed) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_replays_with_other_batches_in_the_same_bucket(backend, ref_inputs, quiet):
    eager = _session(backend, False)
    graphs = _session(backend, True)
    batches = [[ref_inputs[0]], [ref_inputs[2]], [ref_inputs[0], ref_inputs[2]], [ref_inputs[3]]]
    for b in batches * 2:
        got, want = graphs.encode(b), eager.encode(b)
        assert rel_err(got.features.packed, want.features.packed) < 1e-5
        assert rel_err(got.embedding, want.embedding) < 1e-5
        assert rel_err(graphs.decode(got).tokens.packed, eager.decode(want).tokens.packed) < 1e-5


def test_warmup_then_bf16_replay_is_within_fixture_bounds(ref_outputs, ref_inputs, quiet):
    sess = _session("triton", True, torch.bfloat16, BucketSet(tokens=(256,), seqs=(8,)))
    rep = sess.warmup()
    assert rep["memory_bytes"] >= 0 and rep["seconds"] > 0
    enc = sess.encode(ref_inputs)
    out = fixture_outputs(enc, sess.decode(enc), True)
    for key, ours in out.items():
        fp32_ref = ref_outputs[f"tiny-sod.fp32.{key}"]
        own = rel_err(ref_outputs[f"tiny-sod.bf16.{key}"], fp32_ref)
        assert rel_err(ours, fp32_ref) <= 2 * own + 1e-3, key


def test_async_on_a_caller_stream(ref_inputs, quiet):
    sess = _session("triton", True)
    want = sess.encode(ref_inputs[:2]).indices.packed
    stream = torch.cuda.Stream()
    handle = sess.encode_async(ref_inputs[:2], stream=stream)
    got = handle.wait()
    assert handle.done()
    assert torch.equal(got.indices.packed, want)
    sess.close()


def test_long_video_streams_through_small_buckets(quiet):
    vid = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    one = _session("triton", True, buckets=BucketSet(tokens=(256,), seqs=(16,))).encode([vid])
    many = _session("triton", True, buckets=BucketSet(tokens=(16,), seqs=(1,))).encode([vid])
    assert rel_err(many.features[0], one.features[0]) < 1e-5


def test_capture_while_another_thread_uses_cuda(ref_inputs, quiet):
    """A first call (capture) on the async worker while the application's own thread allocates,
    computes and synchronises on its own stream: the capture is thread-local, so neither fails."""
    import threading
    sess = _session("triton", True)
    stop = threading.Event()
    errors = []

    def busy():
        s = torch.cuda.Stream()
        try:
            with torch.cuda.stream(s):
                while not stop.is_set():
                    # (no default-generator randomness: every capture puts the default CUDA
                    # generator in capture mode, process-wide; README, "Real-time use")
                    x = torch.full((256, 256), 0.5, device="cuda")
                    (x @ x).sum().item()  # allocation, kernels and a host sync
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=busy)
    t.start()
    try:
        got = sess.encode_async(ref_inputs[:2]).wait()
    finally:
        stop.set()
        t.join()
        sess.close()
    assert not errors, errors
    assert torch.equal(got.indices.packed, sess.encode(ref_inputs[:2]).indices.packed)  # replay
    assert any(stage == "encode" for stage, _ in sess._graphs.graphs)  # it did capture
