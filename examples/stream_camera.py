"""A camera-style loop: frames arrive at the video's frame rate, tokens come out per chunk.

    python examples/stream_camera.py clip.mp4 [--config tiny-sod] [--device cpu] [--size 128]
    python examples/stream_camera.py --synthetic [--fps 30]      # no file: random frames

Frames are read one by one from the file (PyAV: ``pip install -e ".[cli]"``), resized (centre
square crop + nearest-neighbour, to keep the example dependency-free) to ``--size``, and pushed
into an ``atoken_rt.VideoStream`` at the file's fps, as a camera driver would deliver them.
Every chunk's tokens arrive through the callback, which prints the chunk's latency (last frame
pushed -> tokens ready) and how far behind real time the loop is. ``flush()`` at the end encodes
the tail under the 4-frame rule and says what it padded or dropped.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's atoken_rt, even if another one is installed
    sys.path.insert(0, str(ROOT))

import atoken_rt  # noqa: E402


def square(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then nearest-neighbour resize to size x size (uint8 [H, W, 3])."""
    h, w, _ = frame.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    idx = (np.arange(size) * s) // size
    return np.ascontiguousarray(frame[top + idx][:, left + idx])


def file_frames(path: str) -> tuple[Iterator[np.ndarray], float]:
    import av
    container = av.open(path)
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.base_rate
    fps = float(rate) if rate else 30.0

    def gen():
        with container:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
    return gen(), fps


def synthetic_frames(n: int, size: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        yield np.roll(base, i, axis=1)  # a slow pan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("video", nargs="?", help="a video file (or --synthetic)")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--frames", type=int, default=100, help="synthetic frames")
    p.add_argument("--fps", type=float, default=30.0, help="synthetic frame rate")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--config", default="tiny-sod")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.video is None and not args.synthetic:
        p.error("give a video file or --synthetic")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atoken_rt.RandomWeightsWarning)
        sess = atoken_rt.Session(args.config, args.checkpoint, device=args.device, dtype=dtype)
    if args.synthetic:
        frames, fps = synthetic_frames(args.frames, args.size), args.fps
    else:
        frames, fps = file_frames(args.video)
    start = time.perf_counter()

    def on_tokens(chunk: atoken_rt.StreamChunk) -> None:
        # Real time of the chunk's last frame vs now: how far the loop lags the camera.
        due = start + (chunk.frame_start + chunk.frames) / fps
        last = chunk.frame_start + chunk.frames - 1
        print(f"chunk {chunk.index:3d}: frames {chunk.frame_start}..{last}"
              f"  t {int(chunk.coords[:, 0].min())}..{int(chunk.coords[:, 0].max())}"
              f"  {chunk.coords.shape[0]} tokens  latency {chunk.latency_s * 1e3:7.1f} ms"
              f"  behind real time {max(0.0, time.perf_counter() - due) * 1e3:7.1f} ms")

    stream = atoken_rt.VideoStream(sess, on_tokens=on_tokens)
    for i, frame in enumerate(frames):
        wait = start + i / fps - time.perf_counter()  # the camera delivers frame i at i / fps
        if wait > 0:
            time.sleep(wait)
        stream.push(square(frame, args.size))
    report = stream.flush()
    print(f"{report.frames_pushed} frames pushed, {report.frames_encoded} encoded in "
          f"{report.chunks} chunks, {report.frames_padded} padded, {report.frames_dropped} "
          "dropped (4-frame rule)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
