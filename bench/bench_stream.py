"""Live-video encoding through ``atoken_rt.VideoStream``: chunk latency and frames/s.

    python bench/bench_stream.py                      # CPU: tiny-sod fp32, 64² and 256² frames
    python bench/bench_stream.py --out bench/results/<date>-cpu-stream.md
    python bench/bench_stream.py --device cuda        # GPU: atoken-sod (random weights) bf16,
                                                      # backend triton + CUDA graphs, 256² and 512²

Frames are uint8 ``[H, W, 3]`` on the host, pushed one at a time, as a camera delivers them.
Two measurements per frame size, after an untimed warm-up stream (compiles, captures, plans):

* latency: push 16 frames, then wait for that chunk's tokens; the time from the start of the
  push of the chunk's last frame to the moment its tokens are delivered (``StreamChunk
  .latency_s``: on CUDA, its event has completed). p50 / p99 over ``--chunks`` chunks (with few
  chunks p99 is close to the max).
* frames/s: push ``--chunks`` chunks back to back (the encode of chunk k overlaps the pushes of
  chunk k+1 on CUDA), then ``flush()``; frames / wall time.

GPU targets (issue 12): a 16-frame 256² chunk in <= 2 ms p99 on the H200, >= 1,000 frames/s at
512². Nothing here claims they are met: run it on the GPU and commit what it prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
from _common import ROOT, commit, cpu_model  # noqa: E402

if str(ROOT) not in sys.path:  # this checkout's atoken_rt, even if another one is installed
    sys.path.insert(0, str(ROOT))


def make_session(args):
    import atoken_rt
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atoken_rt.RandomWeightsWarning)
        return atoken_rt.Session(args.config, args.checkpoint, device=args.device, dtype=dtype,
                                 backend=args.backend, graphs=args.graphs)


def frames_pool(size: int, n: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def measure(sess, size: int, chunks: int, chunk_frames: int) -> dict:
    import atoken_rt
    pool = frames_pool(size)
    # Warm-up: two chunks (first call: plan, bucket buffers, graph capture / kernel compile).
    warm = atoken_rt.VideoStream(sess, chunk_frames=chunk_frames)
    for i in range(2 * chunk_frames):
        warm.push(pool[i % len(pool)])
    warm.flush()
    warm.poll()
    # Latency: one chunk at a time, waiting for its tokens.
    lat = []
    stream = atoken_rt.VideoStream(sess, chunk_frames=chunk_frames)
    for k in range(chunks):
        for i in range(chunk_frames):
            stream.push(pool[(k * chunk_frames + i) % len(pool)])
        done = stream.poll(wait=True)
        assert len(done) == 1
        lat.append(done[0].latency_s * 1e3)
    stream.flush()
    # Throughput: chunks back to back.
    stream = atoken_rt.VideoStream(sess, chunk_frames=chunk_frames)
    t0 = time.perf_counter()
    for i in range(chunks * chunk_frames):
        stream.push(pool[i % len(pool)])
        stream.poll()
    stream.flush()
    wall = time.perf_counter() - t0
    lat = np.array(lat)
    return {"size": size, "chunks": chunks, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "fps": chunks * chunk_frames / wall}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--config", default=None, help="default: atoken-sod on CUDA, tiny-sod on CPU")
    p.add_argument("--checkpoint", default=None, help="default: seeded random weights")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default=None, help="default: triton on CUDA, torch on CPU")
    p.add_argument("--graphs", default="auto", type=lambda v: {"true": True, "false": False}
                   .get(v.lower(), v))
    p.add_argument("--sizes", default=None, help="comma-separated frame sides (default: "
                   "256,512 on CUDA, 64,256 on CPU)")
    p.add_argument("--chunks", type=int, default=None, help="default: 200 on CUDA, 20 on CPU")
    p.add_argument("--chunk-frames", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a loaded shared machine 1 "
                   "thread avoids OpenMP threads waiting on each other")
    p.add_argument("--out", default=None, help="write the markdown table here as well "
                   "(appended to an existing file)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    args.config = args.config or ("atoken-sod" if on_gpu else "tiny-sod")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.backend = args.backend or ("triton" if on_gpu else "torch")
    sizes = [int(s) for s in (args.sizes or ("256,512" if on_gpu else "64,256")).split(",")]
    chunks = args.chunks or (200 if on_gpu else 20)

    sess = make_session(args)
    rows = [measure(sess, s, chunks, args.chunk_frames) for s in sizes]
    machine = torch.cuda.get_device_name() if on_gpu else cpu_model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# bench_stream: {args.config} {args.dtype} on {args.device}",
        "",
        f"- machine: {machine}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"1-min load average at the end {load:.1f}",
        f"- torch {torch.__version__}, backend {args.backend}, graphs {sess.static} "
        f"(CUDA graphs {sess.graphs_active}), weights: "
        f"{args.checkpoint or 'seeded random'}",
        f"- commit {commit()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- {args.chunk_frames}-frame chunks of uint8 host frames pushed one at a time; latency "
        "= push of a chunk's last frame -> its tokens delivered (waiting for each chunk); "
        "frames/s = chunks pushed back to back, then flush()",
        "",
        "| frame | chunks | latency p50 (ms) | p99 (ms) | max (ms) | frames/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {r['chunks']} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['fps']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        with out.open("a") as f:
            f.write(("\n" if out.exists() and out.stat().st_size else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
