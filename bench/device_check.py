"""One script for a GPU machine: GPU tests, kernel microbenchmarks and session latency, in one go.

    python bench/device_check.py [--out bench/results/DATE-GPU] [--quick] [--skip-tests]

Runs, in order (each step time-boxed, failures reported, never fatal for the later steps):

1. the test suite on the GPU (`pytest -q -x`: CUDA-only tests run, kernels run on CUDA tensors);
2. every kernel benchmark in bench/ that exposes ``run(json_path)`` (attention, rope, fsq, norms,
   epilogue), each writing its JSON;
3. end-to-end session latency with random full-size ``atoken-sod`` weights, bf16: batch-1 encode and
   encode+decode of a 256x256 image, p50/p99, torch and triton backends;
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

ROOT = Path(__file__).resolve().parent.parent
KERNEL_BENCHES = ["bench_attention", "bench_rope", "bench_fsq", "bench_norms", "bench_epilogue"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


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


def session_latency(repeats: int) -> list[dict]:
    import numpy as np
    import torch

    import atoken_rt
    rows = []
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for backend in ("torch", "triton"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sess = atoken_rt.Session("atoken-sod", device="cuda", dtype=torch.bfloat16,
                                         backend=backend)
            for what in ("encode", "encode+decode"):
                def step():
                    enc = sess.encode([img])
                    if what != "encode":
                        sess.decode(enc)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
                rows.append({"backend": backend, "what": f"{what} 256x256 b1",
                             "p50_ms": float(np.percentile(times, 50)),
                             "p99_ms": float(np.percentile(times, 99))})
            del sess
            torch.cuda.empty_cache()
        except Exception as exc:  # report, keep going
            rows.append({"backend": backend, "what": "session", "error": repr(exc)[:300]})
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
    summary = {"date": date, "gpu": gpu, "commit": _commit(), "torch": torch.__version__,
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

    summary["steps"]["session"] = session_latency(10 if a.quick else 30)
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
        if "error" in r:
            lines.append(f"| session {r['backend']} | error | {r['error'][:80]} |")
        else:
            lines.append(f"| session {r['backend']} | {r['what']} | p50 {r['p50_ms']:.2f} ms, "
                         f"p99 {r['p99_ms']:.2f} ms |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    raise SystemExit(main())
