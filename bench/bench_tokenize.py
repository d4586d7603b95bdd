"""Dataset tokenization throughput (issue 9): reader alone, local engine, Ray engine, and the
cost of deterministic mode.

Generates a folder of JPEG images (smooth gradients plus noise, so they compress like photos),
then measures:

1. reader: decode + preprocess alone (``atoken_rt.data.readers.read_chunk``), on one thread
   (images/s per core) and on ``--readers`` threads;
2. local engine: ``atoken_rt.data.tokenize`` end to end, deterministic and not, alternated
   (``--repeats`` each, medians; the ratio comes from one run on one machine);
3. Ray engine: the same through Ray Data (a local Ray; ``--workers`` actors).

Each tokenize row gives samples/s and tokens/s over the wall time of the call (Session build and,
on CUDA, graph capture included) and over the encode time alone (``encode_*``).

CPU (default when there is no GPU): config tiny-sod, fp32, torch backend.
CUDA: full-size atoken-sod, bf16, Triton backend, CUDA graphs, 256x256 images (random weights
unless ``--checkpoint``); the issue's target is >= 2,500 images/s per H200.

Usage::

    python bench/bench_tokenize.py --json out.json [--quick]
    python bench/bench_tokenize.py --config tiny-sod --images 384 --size 128 --repeats 3

Rows are written to --json as they are measured; a part that cannot run gives a row saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit, cpu_model  # noqa: E402

from atoken_rt.data import Preprocess, enumerate_items, tokenize  # noqa: E402
from atoken_rt.data.readers import Sample, chunk_items, read_chunk  # noqa: E402




class Rows:
    """Rows printed and written to the JSON file as they come."""

    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta, self.rows = path, meta, []
        self._dump()

    def add(self, **row) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self._dump()

    def _dump(self) -> None:
        if self.path:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({**self.meta, "rows": self.rows}, f, indent=1)
            os.replace(tmp, self.path)


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """n JPEG images of size x size (quality 90)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx, b * yy, c * (1 - xx) * yy], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def bench_reader(folder: Path, threads: int, prep: Preprocess) -> tuple[float, int]:
    """(seconds, samples) to decode and preprocess every image on ``threads`` threads."""
    items = enumerate_items([str(folder)])
    chunks = chunk_items(items, 0, len(items), 32)

    def run(chunk) -> int:
        return sum(isinstance(r, Sample) for r in read_chunk(chunk, prep))

    t0 = time.perf_counter()
    if threads == 1:
        n = sum(run(c) for c in chunks)
    else:
        with ThreadPoolExecutor(threads) as ex:
            n = sum(ex.map(run, chunks))
    return time.perf_counter() - t0, n


def run_tokenize(folder: Path, work: Path, name: str, **kw) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    s = tokenize([str(folder)], out, **kw)
    shutil.rmtree(out, ignore_errors=True)
    enc = max(s.encode_seconds, 1e-9)
    return {"samples": s.samples, "tokens": s.tokens, "failures": s.failures,
            "seconds": round(s.seconds, 4), "samples_per_s": round(s.samples_per_s, 2),
            "tokens_per_s": round(s.tokens_per_s, 1),
            "encode_seconds": round(s.encode_seconds, 4),
            "encode_samples_per_s": round(s.samples / enc, 2) if s.encode_seconds else None,
            "encode_tokens_per_s": round(s.tokens / enc, 1) if s.encode_seconds else None}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the rows here as they come")
    p.add_argument("--quick", action="store_true", help="fewer images and repeats")
    p.add_argument("--config", default="atoken-sod" if cuda else "tiny-sod")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bf16" if cuda else "fp32")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--size", type=int, default=256 if cuda else 128)
    p.add_argument("--repeats", type=int, default=None, help="runs per mode (alternated)")
    p.add_argument("--readers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--workers", type=int, default=1, help="Ray actors")
    p.add_argument("--max-tokens", type=int, default=65536 if cuda else 16384)
    p.add_argument("--no-ray", action="store_true")
    a = p.parse_args(argv)
    on_cuda = a.device.startswith("cuda")
    if a.images is None:
        a.images = (1024 if a.quick else 8192) if on_cuda else (48 if a.quick else 256)
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    backend = "triton" if on_cuda else "torch"
    meta = {"bench": "tokenize", "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if on_cuda else None, "config": a.config,
            "checkpoint": a.checkpoint, "device": a.device, "dtype": a.dtype, "backend": backend,
            "images": a.images, "size": a.size, "repeats": a.repeats, "readers": a.readers,
            "max_tokens": a.max_tokens, "quick": a.quick}
    rows = Rows(a.json, meta)
    work = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    try:
        folder = work / "images"
        t0 = time.perf_counter()
        make_images(folder, a.images, a.size)
        print(f"generated {a.images} {a.size}x{a.size} JPEGs in {time.perf_counter() - t0:.1f} s",
              flush=True)
        prep = Preprocess()
        for threads in sorted({1, a.readers}):
            try:
                sec, n = bench_reader(folder, threads, prep)
                rows.add(part="reader", threads=threads, samples=n, seconds=round(sec, 4),
                         samples_per_s=round(n / sec, 1),
                         samples_per_s_per_thread=round(n / sec / threads, 1))
            except Exception as exc:
                rows.add(part="reader", threads=threads, error=f"{type(exc).__name__}: {exc}")

        kw = dict(config=a.config, checkpoint=a.checkpoint, device=a.device, dtype=a.dtype,
                  backend=backend, max_tokens=a.max_tokens, readers=a.readers,
                  shard_size=max(1, a.images // 4))
        warm = dict(kw)
        try:  # warm-up: imports, allocator, first-call costs (not recorded)
            run_tokenize(folder, work, "warm", deterministic=True, **warm)
        except Exception as exc:
            rows.add(part="local", error=f"warm-up failed: {type(exc).__name__}: {exc}",
                     trace=traceback.format_exc(limit=3)[-1500:])
        per_mode: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(a.repeats):
            for det in (True, False):  # alternated A/B
                try:
                    r = run_tokenize(folder, work, f"local-{det}-{rep}", deterministic=det, **kw)
                    per_mode[det].append(r)
                    rows.add(part="local", deterministic=det, repeat=rep, **r)
                except Exception as exc:
                    rows.add(part="local", deterministic=det, repeat=rep,
                             error=f"{type(exc).__name__}: {exc}",
                             trace=traceback.format_exc(limit=3)[-1500:])
        if per_mode[True] and per_mode[False]:
            def med(mode, key):
                vals = [r[key] for r in per_mode[mode] if r.get(key)]
                return statistics.median(vals) if vals else None
            ratio = {}
            for key in ("samples_per_s", "encode_samples_per_s"):
                d, n = med(True, key), med(False, key)
                ratio[key] = round(n / d, 3) if d and n else None
            rows.add(part="deterministic_cost", slowdown_wall=ratio["samples_per_s"],
                     slowdown_encode=ratio["encode_samples_per_s"],
                     det_samples_per_s=med(True, "samples_per_s"),
                     nondet_samples_per_s=med(False, "samples_per_s"),
                     det_encode_samples_per_s=med(True, "encode_samples_per_s"),
                     nondet_encode_samples_per_s=med(False, "encode_samples_per_s"),
                     note="non-deterministic / deterministic throughput, medians, one run")

        if a.no_ray:
            rows.add(part="ray", skipped="--no-ray")
        else:
            try:
                import ray
            except ImportError:
                ray = None
                rows.add(part="ray", skipped="ray is not installed (pip install 'ray[data]')")
            if ray is not None:
                try:
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                             log_to_driver=False, ignore_reinit_error=True)
                    gpus = 1.0 if on_cuda else 0.0
                    cpus = max(1, (os.cpu_count() or 2) // a.workers) if not on_cuda else None
                    run_tokenize(folder, work, "ray-warm", deterministic=True, engine="ray",
                                 workers=a.workers, gpus_per_worker=gpus,
                                 cpus_per_worker=cpus, **kw)
                    for rep in range(a.repeats):
                        r = run_tokenize(folder, work, f"ray-{rep}", deterministic=True,
                                         engine="ray", workers=a.workers, gpus_per_worker=gpus,
                                         cpus_per_worker=cpus, **kw)
                        rows.add(part="ray", deterministic=True, repeat=rep, workers=a.workers,
                                 **r)
                except Exception as exc:
                    rows.add(part="ray", error=f"{type(exc).__name__}: {exc}",
                             trace=traceback.format_exc(limit=3)[-1500:])
                finally:
                    ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
