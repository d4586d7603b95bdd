"""pytest-benchmark timings of the CPU-side pieces of atoken_rt (opt-in, not part of the tests).

    ATOKEN_BENCH=1 python -m pytest tests/benchmarks --benchmark-only

Skipped unless ATOKEN_BENCH=1. Covered: patchify / prepare_pixels of an image and a video, the
host plan (build_plan) for a long video and for a mixed batch, preprocessing of a batch of uint8
images, the reference FSQ, PNG decoding, and an end-to-end encode with the tiny-sod config and the
fixture weights. With a CUDA GPU the end-to-end encode is also run on it, and its CUDA-event
timings (ms) are stored in ``benchmark.extra_info``.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch

import atoken_rt
from atoken_rt import reference as ref
from atoken_rt.inputs import Voxels, grid_coords, patchify, prepare_pixels, prepare_sample
from atoken_rt.packing import build_plan

from ..conftest import WEIGHTS

pytestmark = [
    pytest.mark.benchmark_suite,
    pytest.mark.skipif(os.environ.get("ATOKEN_BENCH") != "1",
                       reason="benchmark suite: set ATOKEN_BENCH=1 (bench/README.md)"),
]


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def _cuda_event_ms(fn, repeats: int = 20, warmup: int = 3) -> dict:
    """p50 / min / mean milliseconds of ``fn`` on the GPU, by CUDA events after a synchronize."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"cuda_ms_p50": float(np.median(times)), "cuda_ms_min": float(min(times)),
            "cuda_ms_mean": float(np.mean(times)), "cuda_device": torch.cuda.get_device_name()}


def test_patchify_image_512(benchmark, rng):
    frames = torch.from_numpy(rng.random((4, 512, 512, 3), dtype=np.float32))
    out = benchmark(patchify, frames)
    assert out.shape == (1024, 3072)
    if torch.cuda.is_available():
        g = frames.cuda()
        benchmark.extra_info.update(_cuda_event_ms(lambda: patchify(g).contiguous()))


def test_prepare_pixels_video(benchmark, rng):
    video = rng.integers(0, 256, (16, 256, 256, 3), dtype=np.uint8)
    out = benchmark(prepare_pixels, video, 0)
    assert out.feats.shape == (1024, 3072)
    if torch.cuda.is_available():
        benchmark.extra_info.update(_cuda_event_ms(lambda: prepare_pixels(video, 0, "cuda")))


def test_build_plan_long_video(benchmark):
    coords = grid_coords(64, 16, 16).numpy()  # 256 frames of 256x256: 16 chunks, 16384 tokens
    plan = benchmark(build_plan, [coords], 4)
    assert plan.num_tokens == 16384 and plan.num_sequences == 16


def test_build_plan_mixed_batch(benchmark, rng):
    coords = [grid_coords(1, h, w).numpy() for h, w in ((16, 16), (32, 32), (12, 20), (8, 8))]
    coords += [grid_coords(8, 16, 16).numpy(), grid_coords(3, 14, 24).numpy()]
    flat = rng.choice(64 ** 3, size=20000, replace=False)
    vox = np.stack(np.unravel_index(flat, (64, 64, 64)), axis=1)
    coords.append(np.concatenate([np.ones((20000, 1), np.int64), vox], axis=1))  # 3D, t = 1
    plan = benchmark(build_plan, coords, 4)
    assert plan.num_samples == 7


def test_preprocess_uint8_images(benchmark, rng):
    images = [rng.integers(0, 256, (256 + 16 * i, 256, 3), dtype=np.uint8) for i in range(8)]

    def run():
        return [prepare_sample(x, i) for i, x in enumerate(images)]

    out = benchmark(run)
    assert len(out) == 8


def test_read_png(benchmark, rng):
    pytest.importorskip("PIL")
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()

    def run():
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))

    assert benchmark(run).shape == (512, 512, 3)


def test_reference_fsq(benchmark, rng):
    z = torch.from_numpy(rng.standard_normal((16384, 48), dtype=np.float32))
    codes, idx = benchmark(ref.fsq_quantize, z, (4,) * 6, 8)
    assert idx.shape == (16384, 8)
    if torch.cuda.is_available():
        g = z.cuda()
        benchmark.extra_info.update(_cuda_event_ms(lambda: ref.fsq_quantize(g, (4,) * 6, 8)))


def _tiny_batch(rng):
    return [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
            Voxels(coords=np.stack(np.unravel_index(rng.choice(64 ** 3, 500, replace=False),
                                                    (64, 64, 64)), axis=1),
                   feats=rng.random((500, 768), dtype=np.float32))]


def test_encode_tiny_sod_cpu(benchmark, rng):
    batch = _tiny_batch(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sess = atoken_rt.Session("tiny-sod", WEIGHTS)
        enc = benchmark(sess.encode, batch)
    assert len(enc) == 3
    if torch.cuda.is_available():
        gpu = atoken_rt.Session("tiny-sod", WEIGHTS, device="cuda")
        benchmark.extra_info.update(_cuda_event_ms(lambda: gpu.encode(batch)))
