"""Session(deterministic=True): a sample's outputs are bit-identical whatever it is batched with.

The reference for "batch-invariant" is the sample encoded alone (issue 9: 200 random mixed
batches of images, videos and 3D assets, each sample's indices equal to its encode alone), on
the dynamic and the static (bucketed) paths, and under the Triton interpreter at a smaller
count. The mode must stay faithful: its outputs meet the fixtures' fp32 bounds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import atoken_rt
from atoken_rt.deterministic import (DeterministicTorchOps, _padded_rows, _vector_safe_numel,
                                     make_deterministic)
from atoken_rt.static import BucketSet

from .conftest import WEIGHTS, fixture_outputs, random_voxels, rel_err, requires_cuda


def _pool(rng, n: int, max_side: int = 96, max_frames: int = 13, max_voxels: int = 60):
    """n random samples: images (any size), videos (1..max_frames frames) and 3D assets."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            h, w = rng.integers(16, max_side + 1, 2)
            out.append(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
        elif kind == 1:
            t = rng.integers(1, max_frames + 1)
            h, w = rng.integers(16, max_side // 2 + 17, 2)
            out.append(rng.integers(0, 256, (int(t), int(h), int(w), 3), dtype=np.uint8))
        else:
            out.append(random_voxels(int(rng.integers(1, max_voxels + 1)), int(rng.integers(1e6))))
    return out


def _session(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return atoken_rt.Session("tiny-sod", WEIGHTS, deterministic=True, **kw)


def _check_invariant(sess, pool, batches: int, rng, max_batch: int = 8):
    """Encode ``batches`` random mixes of ``pool``; every sample must equal its encode alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = [sess.encode([x]) for x in pool]
        for _ in range(batches):
            idx = rng.choice(len(pool), int(rng.integers(2, max_batch + 1)), replace=False)
            enc = sess.encode([pool[i] for i in idx])
            for j, i in enumerate(idx):
                a = alone[i]
                assert torch.equal(enc.indices[j], a.indices[0]), ("indices", i, list(idx))
                assert torch.equal(enc.moments[j], a.moments[0]), ("moments", i, list(idx))
                assert torch.equal(enc.latents[j], a.latents[0]), ("latents", i, list(idx))
                assert torch.equal(enc.embedding[j], a.embedding[0]), ("embedding", i, list(idx))
    return alone


@pytest.mark.parametrize("graphs", [False, True], ids=["dynamic", "static"])
def test_200_random_mixed_batches(graphs):
    rng = np.random.default_rng(1234 + graphs)
    sess = _session(graphs=graphs)
    _check_invariant(sess, _pool(rng, 48), 200, rng)


def test_without_the_mode_batches_change_bits():
    """The property is not vacuous here: the default mode gives other bits in a batch."""
    rng = np.random.default_rng(7)
    pool = _pool(rng, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sess = atoken_rt.Session("tiny-sod", WEIGHTS)
        alone = [sess.encode([x]).moments[0] for x in pool]
        enc = sess.encode(pool)
    assert any(not torch.equal(enc.moments[i], alone[i]) for i in range(len(pool)))


def test_static_equals_dynamic_bitwise():
    """Whatever bucket a sample lands in (small buckets force splits into several replays)."""
    rng = np.random.default_rng(5)
    pool = _pool(rng, 12)
    dyn = _session()
    sta = _session(graphs=True, buckets=BucketSet(tokens=(64, 128, 256, 512), seqs=(1, 2, 4, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = dyn.encode(pool), sta.encode(pool)
        da, db = dyn.decode(a), sta.decode(b)
    for name in ("indices", "latents", "moments", "features"):
        assert torch.equal(getattr(a, name).packed, getattr(b, name).packed), name
    assert torch.equal(a.embedding, b.embedding)
    assert torch.equal(da.tokens.packed, db.tokens.packed)


def test_faithful_to_the_fixtures(ref_outputs, ref_inputs):
    """Deterministic mode only reorders sums: the fp32 fixture bounds still hold."""
    for cfg in ("tiny-sod", "tiny-soc"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = atoken_rt.Session(cfg, WEIGHTS, deterministic=True)
            enc = s.encode(ref_inputs)
            dec = s.decode(enc)
        for key, ours in fixture_outputs(enc, dec, cfg == "tiny-sod").items():
            err = rel_err(ours, ref_outputs[f"{cfg}.fp32.{key}"])
            assert err < 1e-4, (cfg, key, err)


def test_tiled_gemm_rows_do_not_depend_on_position():
    """A row's GEMM result is the same at every offset and batch size, and equals F.linear to
    fp32 rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 136)
    x = torch.randn(700, 300)
    ops = DeterministicTorchOps()
    with torch.no_grad():
        full = ops.linear(x, lin)
        assert rel_err(full, torch.nn.functional.linear(x, lin.weight, lin.bias)) < 1e-6
        for lo, n in [(0, 1), (3, 1), (5, 17), (250, 300), (699, 1), (100, 600)]:
            assert torch.equal(ops.linear(x[lo:lo + n], lin), full[lo:lo + n]), (lo, n)
            assert torch.equal(ops.linear_gelu(x[lo:lo + n], lin),
                               ops.linear_gelu(x, lin)[lo:lo + n]), (lo, n)


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_vector_safe_sizes(threads):
    """Every thread chunk of an element-wise op over a vector-safe size is whole vector steps
    (the chunking rule of at::parallel_for, grain 32768)."""
    for e in [1, 255, 257, 32768, 32769, 77824, 100003, 1 << 20]:
        e2 = _vector_safe_numel(e, threads)
        assert e2 >= e
        chunks = 1 if (e2 <= 32768 or threads == 1) else min(threads, -(-e2 // 32768))
        size = -(-e2 // chunks)
        assert size % 256 == 0 and e2 % 256 == 0, (e, e2)
    n = _padded_rows(3, 304)
    assert n >= 3 and _vector_safe_numel(n * 304) == n * 304


def test_torch_graphs_on_cuda_are_refused(monkeypatch):
    """The per-sequence torch attention cannot be captured: that combination is a ValueError."""
    sess = _session()
    monkeypatch.setattr(sess, "graphs_active", True)
    with pytest.raises(ValueError, match="backend='triton'"):
        make_deterministic(sess)


def test_triton_interpreter_batches(triton_interpreter):
    """The Triton path (fixed GEMM and attention tiles) under the interpreter, dynamic and
    static, at a smaller count."""
    rng = np.random.default_rng(99)
    pool = _pool(rng, 6, max_side=40, max_frames=6, max_voxels=20)
    dyn = _session(backend="triton")
    _check_invariant(dyn, pool, 4, rng, max_batch=4)
    sta = _session(backend="triton", graphs=True,
                   buckets=BucketSet(tokens=(32, 64, 128), seqs=(1, 2, 4)))
    alone = _check_invariant(sta, pool, 2, rng, max_batch=3)
    ref_sess = _session()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, a in zip(pool, alone):  # and close to the torch path (same model)
            assert rel_err(a.moments[0], ref_sess.encode([x]).moments[0]) < 1e-4


@pytest.fixture
def triton_interpreter():
    from atoken_rt.kernels._utils import interpreter_active
    if not interpreter_active():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set without a GPU)")


@requires_cuda
@pytest.mark.gpu
def test_gpu_bf16_triton_graphs_batch_invariant():
    """On a GPU: bf16, Triton kernels, CUDA graphs: batch-invariant across buckets."""
    rng = np.random.default_rng(3)
    pool = _pool(rng, 18, max_side=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sess = atoken_rt.Session("tiny-sod", WEIGHTS, device="cuda", dtype=torch.bfloat16,
                                 backend="triton", graphs=True, deterministic=True)
    _check_invariant(sess, pool, 20, rng)
