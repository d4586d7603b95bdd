"""CPU end-to-end timing of the torch backend (issue: "speed on CPU").

Measures, with random full-size weights (nothing to download):

1. one 256x256 image, ``encode`` and ``decode`` separately (p50 / min over repeats), next to the
   official code's measured 1.25 s / 1.25 s on these 2-core machines, and next to the GEMM floor:
   the same 27 layers' four Linear layers alone, with the session's own weights, on this machine now
   (every other op removed). GEMMs are ~85% of the work, so the floor says how close we are.
2. a long video: all temporal chunks in one variable-length pass versus one pass per 16-frame chunk
   (what the official code does), same weights, same tokens.

Usage::

    python bench/bench_cpu_session.py                 # full-size atoken-sod, fp32
    python bench/bench_cpu_session.py --config tiny-sod --repeats 3 --json out.json

Prints a table and, with --json, writes the numbers (with the machine, torch version and commit).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import atoken_rt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit  # noqa: E402  (bench/ helpers, shared with the kernel benches)

OFFICIAL_S = {"encode": 1.25, "decode": 1.25}  # official code, fp32, atoken-sod, 256x256 (issue 2)


def _timed(fn, repeats):
    fn()  # warm-up (first-touch of weights and buffers)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def gemm_floor(sess, tokens, repeats):
    """Seconds for the encoder's per-block Linear layers alone at `tokens` rows."""
    enc = sess.model.encoder
    cfg = sess.config.encoder
    x = torch.randn(tokens, cfg.width, dtype=sess.dtype)
    h = torch.randn(tokens, cfg.mlp_width, dtype=sess.dtype)

    def run():
        for b in enc.blocks:
            F.linear(x, b.attn.to_qkv.weight, b.attn.to_qkv.bias)
            F.linear(x, b.attn.to_out.weight, b.attn.to_out.bias)
            F.linear(x, b.mlp.mlp[0].weight, b.mlp.mlp[0].bias)
            F.linear(h, b.mlp.mlp[2].weight, b.mlp.mlp[2].bias)

    with torch.inference_mode():
        return _timed(run, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="atoken-sod")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--video", default="32x64x64", help="long video TxHxW for the chunk test")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        sess = atoken_rt.Session(a.config, dtype=torch.float32)
        build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    enc = sess.encode([img])
    n_tok = enc.coords[0].shape[0]
    enc_t = _timed(lambda: sess.encode([img]), a.repeats)
    dec_t = _timed(lambda: sess.decode(enc), a.repeats)
    floor_t = gemm_floor(sess, n_tok, a.repeats)

    t, h, w = (int(v) for v in a.video.split("x"))
    vid = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    chunks = [vid[i:i + 16] for i in range(0, t - t % 4, 16)]
    one_pass = _timed(lambda: sess.encode([vid]), max(1, a.repeats // 2))
    per_chunk = _timed(lambda: [sess.encode([c]) for c in chunks], max(1, a.repeats // 2))
    # Same numbers either way (chunks are independent), only the batching differs.
    full = sess.encode([vid]).features[0]
    parts = torch.cat([sess.encode([c]).features[0] for c in chunks])
    same = float((full - parts).abs().max())

    rows = [
        ("build session (random weights)", build_s, None),
        (f"encode {a.size}x{a.size} image ({n_tok} tokens), p50", float(np.median(enc_t)),
         OFFICIAL_S["encode"] if a.config == "atoken-sod" and a.size == 256 else None),
        ("  min", min(enc_t), None),
        (f"decode {a.size}x{a.size} image, p50", float(np.median(dec_t)),
         OFFICIAL_S["decode"] if a.config == "atoken-sod" and a.size == 256 else None),
        ("  min", min(dec_t), None),
        ("GEMM floor (encoder Linear layers only), p50", float(np.median(floor_t)), None),
        (f"video {a.video}: one varlen pass ({len(chunks)} chunks), p50",
         float(np.median(one_pass)), None),
        (f"video {a.video}: one pass per chunk (official), p50", float(np.median(per_chunk)), None),
    ]
    print(f"\natoken_rt CPU bench: {a.config} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"commit {commit()}")
    print(f"{'measurement':58s} {'seconds':>9s} {'official':>9s}")
    for name, sec, off in rows:
        print(f"{name:58s} {sec:9.3f} {off if off is not None else '':>9}")
    print(f"GEMM share of encode: {np.median(floor_t) / np.median(enc_t):.0%}; "
          f"varlen gain on the video: {np.median(per_chunk) / np.median(one_pass):.2f}x; "
          f"max |one pass - per chunk| = {same:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": a.config, "torch": torch.__version__, "commit": commit(),
                       "threads": torch.get_num_threads(), "machine": platform.machine(),
                       "date": time.strftime("%Y-%m-%d"),
                       "rows": [{"name": n, "seconds": s, "official_s": o} for n, s, o in rows],
                       "encode_s": enc_t, "decode_s": dec_t, "gemm_floor_s": floor_t,
                       "video_one_pass_s": one_pass, "video_per_chunk_s": per_chunk}, f, indent=1)


if __name__ == "__main__":
    main()
