"""One script for a GPU machine: GPU tests, kernel microbenchmarks and session latency, in one go.

    python bench/device_check.py [--out bench/results/DATE-GPU] [--quick] [--skip-tests]

Runs, in order (each step time-boxed, failures reported, never fatal for the later steps):

1. the test suite on the GPU (`pytest -q -x`: CUDA-only tests run, kernels run on CUDA tensors);
2. every kernel benchmark in bench/ that exposes ``run(json_path)`` (attention, rope, fsq, norms,
   epilogue), each writing its JSON;
3. end-to-end session latency with random full-size ``atoken-sod`` weights, bf16: batch-1 encode and
   encode+decode (p50/p99) of 256x256 and 512x512 images and a 16-frame 256x256 video, and batch-64
   256x256 throughput (effective TFLOP/s, ENGINEERING.md formula); graphs on/off, torch/triton;
4. a compact table last, also written as ``summary.json`` and ``summary.md`` under --out.

Without CUDA it exits at once with a clear message (exit code 0, nothing measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # bench/_common.py, also when this file is loaded by path
    sys.path.insert(0, _BENCH)
from _common import ROOT, commit  # noqa: E402

KERNEL_BENCHES = ["bench_attention", "bench_rope", "bench_fsq", "bench_norms", "bench_epilogue"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_tests(timeout: int) -> dict:
    t = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"],
                           cwd=ROOT, text=True, capture_output=True, timeout=timeout)
        tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
        return {"ok": p.returncode == 0, "summary": tail[-1] if tail else "", "tail": tail,
                "seconds": round(time.time() - t, 1)}
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout}s", "seconds": timeout}


def _flops(cfg, seq_lens, stages):
    """Effective FLOPs (ENGINEERING.md): dense per-token work + attention 4*L*width per layer."""
    from atoken_rt.config import atoken_flops_per_token
    dense = atoken_flops_per_token(cfg)
    total = 0.0
    for st in stages:
        tower = cfg.encoder if st == "encoder" else cfg.decoder
        for L in seq_lens:
            total += L * (dense[st] + tower.num_blocks * 4 * L * tower.width)
    return total


def session_latency(repeats: int, quick: bool) -> list[dict]:
    """Batch-1 latency (p50, p99) and batch-64 throughput, graphs on/off, torch/triton, bf16."""
    import numpy as np
    import torch

    import atoken_rt
    from atoken_rt.static import BucketSet
    rng = np.random.default_rng(0)
    img256 = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    img512 = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    vid16 = rng.integers(0, 256, (16, 256, 256, 3), dtype=np.uint8)
    cases = [("image 256x256 b1", [img256], [256]), ("image 512x512 b1", [img512], [1024]),
             ("video 16x256x256 b1", [vid16], [256] * 4),
             ("image 256x256 b64", [img256] * 64, [256] * 64)]
    buckets = BucketSet(tokens=(256, 1024, 16384), seqs=(1, 4, 64))
    rows = []
    combos = [("triton", True), ("triton", False), ("torch", False), ("torch", True)]
    for backend, graphs in combos:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sess = atoken_rt.Session("atoken-sod", device="cuda", dtype=torch.bfloat16,
                                         backend=backend, graphs=graphs, buckets=buckets)
            cfg = sess.config
            if graphs:
                rep = sess.warmup([(16384, 64), (1024, 4), (1024, 1), (256, 1)])
                rows.append({"backend": backend, "graphs": graphs, "what": "warmup",
                             "seconds": rep["seconds"], "memory_gb": rep["memory_bytes"] / 1e9})
            for name, batch, seqs in cases:
                if quick and "b64" in name and backend == "torch" and graphs:
                    continue
                for what in ("encode", "encode+decode"):
                    def step():
                        enc = sess.encode(batch)
                        if what != "encode":
                            sess.decode(enc)
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    times = []
                    n = repeats if "b1" in name else max(3, repeats // 5)
                    for _ in range(n):
                        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                        start.record()
                        step()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                    stages = ["encoder"] if what == "encode" else ["encoder", "decoder"]
                    p50 = float(np.percentile(times, 50))
                    rows.append({"backend": backend, "graphs": graphs, "what": f"{what} {name}",
                                 "p50_ms": p50, "p99_ms": float(np.percentile(times, 99)),
                                 "tflops": _flops(cfg, seqs, stages) / (p50 * 1e-3) / 1e12})
            del sess
            torch.cuda.empty_cache()
        except Exception as exc:  # report, keep going
            rows.append({"backend": backend, "graphs": graphs, "what": "session",
                         "error": repr(exc)[:300]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--test-timeout", type=int, default=180)
    a = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("device_check: no CUDA GPU on this machine; nothing to measure (run it on the GPU "
              "machine).")
        return 0
    gpu = torch.cuda.get_device_name()
    date = time.strftime("%Y-%m-%d")
    out = Path(a.out or ROOT / "bench" / "results" / f"{date}-{gpu.replace(' ', '_')}")
    out.mkdir(parents=True, exist_ok=True)
    import triton
    summary = {"date": date, "gpu": gpu, "commit": commit(), "torch": torch.__version__,
               "triton": triton.__version__, "steps": {}}
    print(f"device_check: {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"commit {summary['commit']}", flush=True)

    if not a.skip_tests:
        summary["steps"]["tests"] = run_tests(a.test_timeout)
        print("tests:", summary["steps"]["tests"]["summary"], flush=True)

    kernel_rows = {}
    for name in KERNEL_BENCHES:
        t = time.time()
        try:
            mod = _load(name)
            kernel_rows[name] = mod.run(json_path=str(out / f"{name}.json"))
        except Exception:
            kernel_rows[name] = [{"error": traceback.format_exc(limit=3)[-400:]}]
        print(f"{name}: {time.time() - t:.1f}s", flush=True)
    summary["steps"]["kernels"] = kernel_rows

    summary["steps"]["session"] = session_latency(10 if a.quick else 30, a.quick)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    lines = [f"# device_check {date} — {gpu} — commit {summary['commit']}", ""]
    if "tests" in summary["steps"]:
        lines.append(f"tests: {summary['steps']['tests']['summary']}")
    lines += ["", "| benchmark | case | result |", "|---|---|---|"]
    for name, rows in kernel_rows.items():
        for r in rows or []:
            if "error" in r:
                lines.append(f"| {name} | error | {r['error'].splitlines()[-1][:80]} |")
                continue
            keys = [k for k in r if k not in ("gpu", "commit", "date")]
            case = ", ".join(f"{k}={r[k]}" for k in keys[:3])
            res = ", ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                            for k in keys[3:8])
            lines.append(f"| {name} | {case} | {res} |")
    for r in summary["steps"]["session"]:
        tag = f"session {r['backend']} graphs={'on' if r['graphs'] else 'off'}"
        if "error" in r:
            lines.append(f"| {tag} | error | {r['error'][:80]} |")
        elif r["what"] == "warmup":
            lines.append(f"| {tag} | warmup | {r['seconds']:.1f} s, {r['memory_gb']:.2f} GB |")
        else:
            lines.append(f"| {tag} | {r['what']} | p50 {r['p50_ms']:.2f} ms, p99 "
                         f"{r['p99_ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    raise SystemExit(main())
