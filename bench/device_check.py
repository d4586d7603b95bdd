"""One script for a GPU machine: kernel microbenchmarks, session latency and the GPU tests, in one go.

    python bench/device_check.py [--out DIR] [--budget SECONDS] [--quick] [--skip-tests]
    # on the project's device tool:  python3 bench/device_check.py --out $OUT/dc

Steps, in this order (the numbers first: device time is scarce, and the tests' verdict on a broken
kernel is also visible as an error row or a large rel_err in the benchmarks):

1. ``bench_attention``: the varlen attention kernel against torch and the SDPA backends;
2. ``session``: the host-side cost of ``encode`` alone (bench_host_overhead.py, towers stubbed),
   then end-to-end latency with random full-size ``atoken-sod`` weights, bf16: batch-1
   encode and encode+decode (p50/p99) of 256x256 and 512x512 images and a 16-frame 256x256 video,
   and batch-64 256x256 throughput (effective TFLOP/s, ENGINEERING.md formula); graphs on/off,
   triton/torch (most important combination first);
3. ``bench_rope``, ``bench_norms``, ``bench_fsq``, ``bench_epilogue``;
4. ``bench_render`` (3D Gaussian rendering, every backend), ``bench_stream`` (VideoStream chunk
   latency p50/p99, frames/s), ``bench_tokenize`` (dataset tokenization, local engine, reader
   alone): their printed tables are kept in the summaries;
5. ``tests``: the GPU-relevant test files on the GPU, CUDA-only ones first (graph capture, bf16
   fixtures, kernels on CUDA tensors); the rest of the suite is machine-independent (CI runs it).

Each step runs in its own process (a kernel fault cannot poison the later steps; Triton's disk
cache carries compiled kernels across them) with a time box cut from ``--budget``; a step that
overruns is killed and reported, and the next one starts. Every step writes its JSON as it goes,
and ``summary.json`` / ``summary.md`` are rewritten after each step, so whatever ran is kept even
if the whole call is cut short. At most 8 files land in --out (the device tool's limit): five
benchmark JSONs, ``session.json``, ``summary.json``, ``summary.md``; the compact table prints last.

Without CUDA it exits at once with a clear message (exit code 0, nothing measured).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # bench/_common.py, also when this file is loaded by path
    sys.path.insert(0, _BENCH)
from _common import ROOT, commit, write_atomic  # noqa: E402

# (step, share of the budget): the time box of a step is its share of the whole budget, and at
# most what is left. Shares sum to 1.
STEPS = [("bench_attention", 0.17), ("session", 0.24), ("bench_rope", 0.04),
         ("bench_norms", 0.04), ("bench_fsq", 0.03), ("bench_epilogue", 0.05),
         ("bench_render", 0.07), ("bench_stream", 0.07), ("bench_tokenize", 0.06), ("tests", 0.23)]
# Steps whose result is the table they print (the device tool brings back at most 8 files: the
# kernel JSONs, session.json and the two summaries fill them): summary.json/md keep their last
# TEXT_TAIL lines. Their defaults on CUDA are the issues' GPU cases (3D rendering of 100k and
# 640k Gaussians at 512²; streaming 256² and 512² chunks; tokenizing 256² JPEGs).
TEXT_STEPS = ("bench_render", "bench_stream", "bench_tokenize")
TEXT_TAIL = 40
# The GPU-relevant test files, the CUDA-only ones first (a time box may cut the tail); the
# rest of the suite (command line, configs, parsing) is the same on any machine and runs in CI.
GPU_TEST_FILES = ["tests/test_gpu_graphs.py", "tests/test_triton_backend.py",
                  "tests/test_kernel_attention.py", "tests/test_kernel_rope.py",
                  "tests/test_kernel_fsq.py", "tests/test_kernel_norms.py",
                  "tests/test_kernel_epilogue.py", "tests/test_parity.py", "tests/test_static.py",
                  "tests/test_session.py", "tests/test_gs.py", "tests/test_inputs.py",
                  "tests/test_threed_render.py", "tests/test_stream.py",
                  "tests/test_determinism.py"]
SESSION_CASES = ["image 256x256 b1", "image 512x512 b1", "video 16x256x256 b1",
                 "image 256x256 b64"]
# Most informative first: the captured Triton path is what the targets are about.
SESSION_COMBOS = [("triton", True), ("torch", False), ("triton", False), ("torch", True)]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    env["PYTHONUNBUFFERED"] = "1"
    # The bench scripts run as ``python bench/x.py`` from a checkout that may not be installed
    # (the GPU machine runs the copied tree as is): sys.path[0] is bench/, so the checkout itself
    # must be on the path for ``import atoken_rt`` (the first GPU run failed every bench on it).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("ATOKEN_RT_COMMIT", commit())
    return env


def run_boxed(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd`` in ROOT, streaming its output through to ours; kill it after ``timeout`` s.

    The step runs in its own process group, killed whole when the box runs out and when the step
    exits (leftover children would hold the GPU). Returns {"code", "timed_out", "lines",
    "seconds"} (code None when killed by the box)."""
    t0 = time.time()
    deadline = t0 + timeout
    chunks: list[str] = []
    timed_out = False
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    fd = p.stdout.fileno()
    os.set_blocking(fd, False)
    while True:
        if time.time() > deadline:  # checked every round, even while output keeps coming
            timed_out = p.poll() is None
            break
        try:
            data = os.read(fd, 1 << 16)  # raw reads: pytest's dots come without newlines
        except BlockingIOError:
            data = None
        if data:
            text = data.decode(errors="replace")
            print(text, end="", flush=True)
            chunks.append(text)
        elif data == b"" or p.poll() is not None:
            # Output closed, or the step exited (a child of it may still hold the pipe).
            break
        else:
            time.sleep(0.05)
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the box ran out, or leftovers of a finished step
    except (ProcessLookupError, PermissionError):
        pass
    code = p.wait()
    try:  # whatever was written before the end
        rest = os.read(fd, 1 << 20)
        if rest:
            chunks.append(rest.decode(errors="replace"))
            print(chunks[-1], end="", flush=True)
    except (BlockingIOError, OSError):
        pass
    p.stdout.close()
    return {"code": None if timed_out else code, "timed_out": timed_out,
            "lines": "".join(chunks).splitlines(), "seconds": round(time.time() - t0, 1)}


def step_command(name: str, out: Path, a) -> list[str]:
    if name == "tests":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=30",
                "-W", "ignore::UserWarning", *GPU_TEST_FILES]
    if name == "session":
        return [sys.executable, __file__, "--session-only", "--out", str(out),
                "--repeats", str(10 if a.quick else 30)]
    if name == "bench_render":
        return [sys.executable, str(ROOT / "bench" / "bench_render.py"), "--repeats", "3"]
    if name == "bench_stream":
        return [sys.executable, str(ROOT / "bench" / "bench_stream.py")]
    if name == "bench_tokenize":
        return [sys.executable, str(ROOT / "bench" / "bench_tokenize.py"), "--no-ray"]
    return [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--json",
            str(out / f"{name}.json")]


def run_step(name: str, cmd: list[str], timeout: float) -> dict:
    """One step in its own process, time-boxed; a short report for the summary."""
    try:
        r = run_boxed(cmd, timeout)
    except Exception as exc:  # could not even start it
        return {"ok": False, "summary": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
    tail = [ln for ln in r["lines"] if ln.strip()][-3:]
    status = (f"killed after {timeout:.0f}s (time box)" if r["timed_out"]
              else f"exit {r['code']}" if r["code"] else "ok")
    summary = f"{status}: {tail[-1]}" if name == "tests" and tail else status
    if name in TEXT_STEPS:  # the printed table is the result
        tail = [ln for ln in r["lines"] if ln.strip()][-TEXT_TAIL:]
    return {"ok": r["code"] == 0, "status": status, "summary": summary, "tail": tail,
            "seconds": r["seconds"]}


def session_latency(repeats: int, json_path: Path, config: str = "atoken-sod",
                    device: str = "cuda", dtype=None, cases=SESSION_CASES,
                    combos=SESSION_COMBOS) -> list[dict]:
    """Batch-1 latency (p50, p99) and batch-64 throughput, graphs on/off, triton/torch, bf16
    (random full-size weights by default; a small config on the CPU for the tests).

    Rows are appended to ``json_path`` as they are measured (a time box keeps what finished)."""
    import numpy as np
    import torch

    import atoken_rt
    from atoken_rt.benchmark import batch_seqlens, time_calls, tower_flops
    from atoken_rt.static import BucketSet
    cuda = device.startswith("cuda")
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    rng = np.random.default_rng(0)
    img256 = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    img512 = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    vid16 = rng.integers(0, 256, (16, 256, 256, 3), dtype=np.uint8)
    batches = {"image 256x256 b1": [img256], "image 512x512 b1": [img512],
               "video 16x256x256 b1": [vid16], "image 256x256 b64": [img256] * 64}
    buckets = BucketSet(tokens=(256, 1024, 16384), seqs=(1, 4, 64))
    meta = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "config": config, "dtype": str(dtype).removeprefix("torch.")}
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        write_atomic(json_path, json.dumps({"bench": "session", **meta, "rows": rows}, indent=1))
        print(_session_line(row), flush=True)

    try:  # the host side of encode alone (towers stubbed): the floor under batch-1 latency
        import bench_host_overhead
        for r in bench_host_overhead.measure(config, device, 200 if repeats >= 30 else 50,
                                             dtype):
            emit({"backend": "host", "graphs": True, "what": f"host overhead {r['case']}",
                  "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "tflops": None})
        if cuda:
            torch.cuda.empty_cache()
    except Exception as exc:
        emit({"backend": "host", "graphs": True, "what": "host overhead", "error": repr(exc)[:300]})

    for backend, graphs in combos:
        sess = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sess = atoken_rt.Session(config, device=device, dtype=dtype, backend=backend,
                                         graphs=graphs, buckets=buckets)
            cfg = sess.config
            if graphs:
                # The torch backend's capturable attention is dense over the bucket (O(T^2)
                # memory), so its batch-64 bucket is left out of the capture.
                chosen = [(1024, 4), (1024, 1), (256, 1)]
                if backend == "triton":
                    chosen.insert(0, (16384, 64))
                rep = sess.warmup(chosen)
                emit({"backend": backend, "graphs": graphs, "what": "warmup",
                      "seconds": rep["seconds"], "memory_gb": rep["memory_bytes"] / 1e9})
            for name in cases:
                batch = batches[name]
                if backend == "torch" and graphs and "b64" in name:
                    continue  # see above
                # One attention sequence per sample and 16-frame chunk, as planned (the 16-frame
                # video is one sequence of 1024 tokens).
                seqs = batch_seqlens(cfg, batch)
                for what in ("encode", "encode+decode"):
                    def step():
                        enc = sess.encode(batch)
                        if what != "encode":
                            sess.decode(enc)
                    n = repeats if "b1" in name else max(3, repeats // 5)
                    # CUDA events on a GPU, perf_counter elsewhere; 3 untimed calls first.
                    times = [s * 1e3 for s in time_calls(step, n, 3, torch.device(device))]
                    stages = ["encoder"] if what == "encode" else ["encoder", "decoder"]
                    flops = sum(tower_flops(cfg, st, seqs) for st in stages)
                    p50 = float(np.percentile(times, 50))
                    emit({"backend": backend, "graphs": graphs, "what": f"{what} {name}",
                          "p50_ms": p50, "p99_ms": float(np.percentile(times, 99)),
                          "min_ms": float(min(times)), "repeats": n, "tokens": int(sum(seqs)),
                          "tflops": flops / (p50 * 1e-3) / 1e12})
        except Exception as exc:  # report, keep going
            emit({"backend": backend, "graphs": graphs, "what": "session",
                  "error": repr(exc)[:300]})
        finally:  # free this combination's weights, buffers and graphs before the next one
            sess = None
            if cuda:
                torch.cuda.empty_cache()
    return rows


def _session_line(r: dict) -> str:
    """One markdown row of a session result (any row shape: a summary must never crash)."""
    tag = f"session {r.get('backend', '?')} graphs={'on' if r.get('graphs') else 'off'}"
    try:
        if "error" in r:
            return f"| {tag} | error | {r['error'][:80]} |"
        if r["what"] == "warmup":
            return f"| {tag} | warmup | {r['seconds']:.1f} s, {r['memory_gb']:.2f} GB |"
        flops = f", {r['tflops']:.0f} TFLOP/s" if r.get("tflops") is not None else ""
        return (f"| {tag} | {r['what']} | p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms"
                f"{flops} |")
    except (KeyError, TypeError, ValueError):
        return f"| {tag} | {r.get('what', '?')} | {json.dumps(r, default=str)[:120]} |"


def _read_rows(path: Path) -> list[dict] | None:
    try:
        return json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError):
        return None


def write_summary(out: Path, summary: dict) -> str:
    """summary.json and summary.md from the step reports and the JSON files so far."""
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    lines = [f"# device_check {summary['date']} — {summary['gpu']} — commit {summary['commit']}",
             "", f"torch {summary['torch']}, triton {summary['triton']}, budget "
             f"{summary['budget_s']:.0f} s", "", "| step | status | seconds |", "|---|---|---|"]
    for name, rep in summary["steps"].items():
        lines.append(f"| {name} | {rep.get('summary', '')[:100]} | {rep.get('seconds', 0)} |")
    lines += ["", "| benchmark | case | result |", "|---|---|---|"]
    for name, _ in STEPS:
        if name in ("tests", "session") or name in TEXT_STEPS:
            continue
        for r in _read_rows(out / f"{name}.json") or []:
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {name} | {r.get('workload', r.get('case', ''))} "
                             f"{r.get('provider', '')} | error: {str(r['error'])[:80]} |")
                continue
            keys = [k for k in r if k not in ("gpu", "commit", "date")]
            case = ", ".join(f"{k}={r[k]}" for k in keys[:3])
            res = ", ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                            for k in keys[3:8])
            lines.append(f"| {name} | {case} | {res} |")
    lines += [_session_line(r) for r in _read_rows(out / "session.json") or []]
    for name in TEXT_STEPS:
        rep = summary["steps"].get(name)
        if rep and rep.get("tail"):
            lines += ["", f"## {name} (last {TEXT_TAIL} lines)", "", "```",
                      *[str(ln)[:200] for ln in rep["tail"]], "```"]
    text = "\n".join(lines) + "\n"
    write_atomic(out / "summary.md", text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the JSON and markdown files "
                    "(default bench/results/<date>-<gpu>)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for all steps together (default 420: the issue's 8 minutes, "
                         "less start-up)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeats", type=int, default=30, help=argparse.SUPPRESS)
    ap.add_argument("--session-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("device_check: no CUDA GPU on this machine; nothing to measure (run it on the GPU "
              "machine).")
        return 0
    gpu = torch.cuda.get_device_name()
    date = time.strftime("%Y-%m-%d")
    # Absolute: the steps run with the checkout as their working directory.
    out = Path(a.out or ROOT / "bench" / "results" / f"{date}-{gpu.replace(' ', '_')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.session_only:  # the session step's own process
        session_latency(a.repeats, out / "session.json")
        return 0

    import triton
    t_start = time.time()
    summary = {"date": date, "gpu": gpu, "commit": commit(), "torch": torch.__version__,
               "triton": triton.__version__, "budget_s": a.budget, "steps": {}}
    print(f"device_check: {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"commit {summary['commit']}, budget {a.budget:.0f}s", flush=True)
    for name, share in STEPS:
        if name == "tests" and a.skip_tests:
            continue
        left = a.budget - (time.time() - t_start)
        if left < 10:
            summary["steps"][name] = {"ok": False, "summary": "skipped: budget spent",
                                      "seconds": 0}
            continue
        # A step may use its share, or more when earlier steps finished early.
        remaining_shares = sum(s for n, s in STEPS[[n for n, _ in STEPS].index(name):]
                               if not (n == "tests" and a.skip_tests))
        box = max(share * a.budget, left * share / remaining_shares)
        box = min(box, left)
        print(f"\n== {name} (time box {box:.0f}s)", flush=True)
        summary["steps"][name] = run_step(name, step_command(name, out, a), box)
        print(f"== {name}: {summary['steps'][name]['summary']} "
              f"({summary['steps'][name]['seconds']}s)", flush=True)
        write_summary(out, summary)
    summary["seconds"] = round(time.time() - t_start, 1)
    print("\n" + write_summary(out, summary))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    raise SystemExit(main())
