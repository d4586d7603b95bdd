"""Gaussian rendering time (atoken_rt.threed.render), every available backend, CPU and GPU.

    python bench/bench_render.py [--sizes 100000,640000] [--resolution 512] [--repeats 3]
                                 [--device cpu|cuda] [--backends torch,triton,...] [--md PATH]
                                 [--threads N] [--quick]

``--quick``: 20k Gaussians, 128^2, one timed render per backend (a smoke run: well under a
minute on a CPU; on CUDA it still covers every available backend: dgr, gsplat, triton, torch).
A backend that fails is reported in its row and the others still run.

Scenes: Gaussians as the official decoder lays them out (spec §9.5), 32 per voxel, on a
spherical shell of occupied voxels of the 64^3 grid (20k voxels x 32 = 640k Gaussians; 100k =
3125 voxels), from random raw decoder outputs ~ N(0, 0.5^2) through ``gs.to_gaussians`` (so
scales, opacities and offsets have the decoder's activations: scales around 0.004, opacity
around 0.1). One 512^2 view from the TRELLIS orbit (yaw 0.5, pitch 0.3 rad, r 2, fov 40), the
official settings otherwise. Time per view: one warm-up render, then the median of
``--repeats`` renders (``torch.cuda.synchronize`` around each on the GPU).

Writes a Markdown table to ``--md`` (with the CPU model, torch thread count and the machine
load) when given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))
from _common import cpu_model  # noqa: E402


def shell_voxels(m: int, seed: int = 0) -> np.ndarray:
    """m distinct voxels of the 64^3 grid nearest to a sphere of radius ~25 voxels (a closed
    surface, like a decoded object), as (x, y, z) int32 [m, 3]."""
    g = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = np.linalg.norm(g + 0.5 - 32, axis=1)
    rng = np.random.default_rng(seed)
    # Rank by the distance to the best shell radius (jittered to break ties), keep m.
    radius = {100_000 // 32: 10.0, 20_000: 25.0}.get(m, 25.0)
    key = np.abs(r - radius) + rng.random(len(g)) * 1e-3
    return g[np.argsort(key)[:m]].astype(np.int32)


def scene(n_gaussians: int, device: str, seed: int = 0):
    from atoken_rt.config import load_gs_config
    from atoken_rt.gs import hammersley_perturbation, to_gaussians

    cfg = load_gs_config("3d-decode-gs")
    m = n_gaussians // cfg.num_gaussians
    xyz = torch.from_numpy(shell_voxels(m, seed))
    coords = torch.cat([torch.zeros(m, 1, dtype=torch.int32), xyz], 1)
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(m, cfg.out_channels, generator=gen) * 0.5
    (g,) = to_gaussians(raw, coords, cfg, hammersley_perturbation(cfg.num_gaussians,
                                                                   cfg.voxel_size))
    return g.to(device)


def time_render(g, backend: str, resolution: int, repeats: int) -> list[float]:
    from atoken_rt.threed.render import render, yaw_pitch_cameras

    w2c, k = yaw_pitch_cameras([0.5], [0.3])
    sync = torch.cuda.synchronize if g.xyz.is_cuda else (lambda: None)
    render(g, w2c, k, resolution=resolution, backend=backend)  # warm-up (JIT, allocator)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        render(g, w2c, k, resolution=resolution, backend=backend)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,640000")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="default: every available one")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; on a shared, loaded machine 1 "
                        "thread can be much faster than 2)")
    p.add_argument("--md", default=None)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --sizes 20000 --resolution 128 --repeats 1 unless given")
    a = p.parse_args(argv)
    if a.quick:
        given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:])}
        if "--sizes" not in given:
            a.sizes = "20000"
        if "--resolution" not in given:
            a.resolution = 128
        if "--repeats" not in given:
            a.repeats = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    from atoken_rt.threed.render import available_backends

    backends = (a.backends.split(",") if a.backends else available_backends(a.device))
    if a.device == "cpu":  # the interpreter is not a benchmark; the CUDA libraries need CUDA
        backends = [b for b in backends
                    if b not in ("triton", "diff_gaussian_rasterization", "gsplat")]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = "unknown"
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else cpu_model()
    head = (f"device: {dev_name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"commit {commit}; {time.strftime('%Y-%m-%d %H:%M')}; load average before "
            f"{os.getloadavg()[0]:.1f}")
    print(head)
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        g = scene(n, a.device)
        for b in backends:
            try:
                ts = time_render(g, b, a.resolution, a.repeats)
            except Exception as exc:  # noqa: BLE001 (a missing or broken library: say so)
                msg = " ".join(str(exc).split())[:120]
                row = (f"| {n:,} | {a.resolution}² | {b} | failed: {type(exc).__name__}: "
                       f"{msg} | | |")
                print(row, flush=True)
                rows.append(row)
                continue
            med = statistics.median(ts)
            row = (f"| {n:,} | {a.resolution}² | {b} | {med:.3f} | {min(ts):.3f} | "
                   f"{max(ts):.3f} |")
            print(row, flush=True)
            rows.append(row)
    if a.md:
        table = ["| Gaussians | view | backend | median s | min s | max s |",
                 "|---:|---:|---|---:|---:|---:|", *rows]
        Path(a.md).write_text("\n".join([f"# Gaussian render time, {a.device}", "", head, "",
                                         *table, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
