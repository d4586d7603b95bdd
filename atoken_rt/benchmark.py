"""``atoken-rt bench``: end-to-end latency, throughput and effective TFLOP/s of a Session.

For every (backend, graphs mode, shape, batch) combination it times ``encode`` and
``encode + decode`` of a batch of random inputs (CUDA events after a synchronize on a GPU,
``time.perf_counter`` on the CPU) and reports:

* latency p50 / p90 / p99 over ``repeats`` timed calls, after ``warmup`` untimed ones;
* throughput: samples/s and tokens/s at the p50 latency;
* effective TFLOP/s from the model's FLOP formula (ENGINEERING.md): per tower and token the dense
  work of :func:`atoken_rt.config.atoken_flops_per_token`, plus ``4 * blocks * width * L`` for
  attention, with L the length of the token's sequence (one sequence per sample and 16-frame chunk,
  as planned); encode counts the encoder, encode + decode both towers. The patch embedding, the
  output projection and the MAP head (< 1% at full size) are not counted;
* percent of the measured peak: 790 TFLOP/s for a large bf16 matmul on an H200 (ENGINEERING.md),
  reported for bf16 on CUDA; elsewhere only TFLOP/s;
* peak memory: ``torch.cuda.max_memory_allocated`` on a GPU (reset per combination), the process's
  maximum resident set size on the CPU (``resource.getrusage``; it never goes down).

A timed call is the whole public call: host-side checks, patchify, planning and (on a GPU) the
copy of the uint8 inputs to the device included.
:func:`run_bench` returns the report as a dict; :func:`write_report` writes ``bench.json``,
``bench.md`` and ``bench.png`` (matplotlib, Agg canvas, no global backend change).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import ATokenConfig, atoken_flops_per_token
from .inputs import VOXEL_CHANNELS, VOXEL_GRID, Voxels, prepare_sample
from .media import estimate_tokens
from .packing import build_plan

# Measured ceilings of the H200 (ENGINEERING.md): a large bf16 matmul through PyTorch, and a
# device-to-device copy.
PEAK_TFLOPS = {("cuda", "bf16"): 790.0}
PEAK_BANDWIDTH_TBS = 4.3
DEFAULT_SHAPES = "image:256,image:512,video:16x256,3d:20000"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRAPHS_MODES = {"off": False, "on": True}


# ------------------------------------------------------------------------------------------------
# shapes and inputs
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchShape:
    """One input shape: ``image:256`` / ``image:HxW``, ``video:TxS`` / ``video:TxHxW``,
    ``3d:M`` (M voxels)."""

    kind: str
    dims: tuple[int, ...]
    label: str

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.kind, self.dims)


def parse_shape(text: str) -> BenchShape:
    """Parse one shape spec (ValueError with the accepted forms otherwise)."""
    forms = "image:S, image:HxW, video:TxS, video:TxHxW or 3d:M (e.g. image:256, video:16x256)"
    kind, sep, size = text.strip().partition(":")
    kind = kind.lower()
    try:
        nums = [int(v) for v in size.lower().split("x")] if sep else []
    except ValueError:
        nums = []
    if kind == "image" and len(nums) in (1, 2):
        h, w = nums if len(nums) == 2 else nums * 2
        dims: tuple[int, ...] = (h, w, 3)
    elif kind == "video" and len(nums) in (2, 3):
        t, h, w = nums if len(nums) == 3 else (nums[0], nums[1], nums[1])
        dims = (t, h, w, 3)
    elif kind == "3d" and len(nums) == 1:
        if not 0 < nums[0] <= VOXEL_GRID ** 3:
            raise ValueError(f"shape {text!r}: 3D takes 1..{VOXEL_GRID ** 3} voxels")
        dims = (nums[0], VOXEL_CHANNELS)
    else:
        raise ValueError(f"bad shape {text!r}; use {forms}")
    if kind != "3d" and (dims[-3] < 16 or dims[-2] < 16 or min(dims) < 1):
        raise ValueError(f"shape {text!r}: frames must be at least 16x16 pixels")
    return BenchShape(kind=kind, dims=dims, label=text.strip())


def make_input(shape: BenchShape, rng: np.random.Generator) -> Any:
    """A random sample of that shape: uint8 noise pixels, or unique random voxels."""
    if shape.kind == "3d":
        m = shape.dims[0]
        flat = rng.choice(VOXEL_GRID ** 3, size=m, replace=False)
        coords = np.stack(np.unravel_index(flat, (VOXEL_GRID,) * 3), axis=1).astype(np.int32)
        return Voxels(coords=coords, feats=rng.random((m, VOXEL_CHANNELS), dtype=np.float32))
    return rng.integers(0, 256, size=shape.dims, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def tower_flops(cfg: ATokenConfig, tower: str, seqlens: Sequence[int]) -> float:
    """FLOPs of one tower over sequences of the given lengths: dense per token, plus attention
    ``4 * blocks * width * L`` per token of a sequence of length L (ENGINEERING.md)."""
    dense = atoken_flops_per_token(cfg)[tower]
    t = getattr(cfg, tower)
    L = np.asarray(seqlens, dtype=np.float64)
    return float((L * dense).sum() + (4.0 * t.num_blocks * t.width * L * L).sum())


def batch_seqlens(cfg: ATokenConfig, batch: Sequence[Any]) -> list[int]:
    """Sequence lengths of the packed pass for ``batch`` (one per sample and temporal chunk)."""
    coords = [prepare_sample(x, i).coords.numpy() for i, x in enumerate(batch)]
    plan = build_plan(coords, cfg.chunk_frames)
    return np.diff(plan.cu_seqlens).astype(int).tolist()


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device
               ) -> list[float]:
    """Seconds per call of ``fn``: CUDA events around each call (after a synchronize) on a GPU,
    ``perf_counter`` on the CPU."""
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # events are recorded on the current device's stream
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    a = np.asarray(seconds, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min()),
            "n": int(a.size)}


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(rss * scale), "process max RSS (getrusage)"


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" for an empty one, e.g. a bare assert)."""
    return (str(exc).splitlines() or [""])[0]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _flash_attn_varlen():
    """``flash_attn.flash_attn_varlen_func`` when importable, else None."""
    if not _installed("flash_attn"):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def official_baseline(batch, config, checkpoint, device, dtype):
    """BASELINE HOOK (not implemented): time the official ``atoken_inference`` package on the same
    batch. Its wrapper's constructor and ``inference`` signatures are not pinned down in the spec
    we build from, and no machine we measure on has it (it needs CUDA and flash-attn), so a
    guessed call would report numbers nobody checked. Detection only."""
    raise NotImplementedError("official atoken_inference baseline: timing hook not implemented")


def attention_baseline(cfg: ATokenConfig, seqlens: Sequence[int], device: torch.device,
                       dtype: torch.dtype, repeats: int, warmup: int,
                       flash_fn: Callable | None = None) -> list[dict]:
    """The attention of one tower layer on this batch's packed sequences, per provider.

    Providers: flash-attn's ``flash_attn_varlen_func`` (``flash_fn``, when installed), our Triton
    kernel (on CUDA with Triton), and the torch reference. Same random q, k, v ([N, H, D] strided
    views of one [N, 3, H, D] tensor, the model's layout), same ``cu_seqlens``. Each row: p50
    seconds per call, TFLOP/s by ``4 * sum(L^2) * H * D``, the time of all attention layers of
    encode + decode at that rate, and the relative error against the torch reference (fp32).
    """
    from . import reference as ref
    heads = cfg.encoder.num_heads
    d = cfg.encoder.width // heads
    lens = [int(v) for v in seqlens]
    n, max_len = sum(lens), max(lens)
    cu_host = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, 3, heads, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = torch.from_numpy(cu_host).to(device=device, dtype=torch.int32)
    fns: dict[str, Callable] = {}
    if flash_fn is not None:
        fns["flash-attn varlen"] = lambda: flash_fn(q, k, v, cu, cu, max_len, max_len)
    if device.type == "cuda" and backend_skip_reason("triton", device) is None:
        from .kernels.attention import varlen_attention
        fns["atoken_rt triton"] = lambda: varlen_attention(q, k, v, cu, max_len)
    fns["torch reference"] = lambda: ref.varlen_attention(q, k, v, cu_host)
    want = ref.varlen_attention(q.float(), k.float(), v.float(), cu_host)
    flops = 4.0 * sum(L * L for L in lens) * heads * d
    layers = cfg.encoder.num_blocks + cfg.decoder.num_blocks
    rows = []
    for name, fn in fns.items():
        row = {"provider": name, "tokens": n, "sequences": len(lens), "max_seqlen": max_len,
               "heads": heads, "head_dim": d}
        try:
            got = fn()
            err = float((got.float() - want).norm() / want.norm().clamp_min(1e-30))
            t = percentiles(time_calls(fn, repeats, warmup, device))
        except Exception as exc:  # a provider that rejects this shape, dtype or device
            rows.append({**row, "error": f"{type(exc).__name__}: {_first_line(exc)}"})
            continue
        rows.append({**row, "s": t, "tflops": flops / t["p50"] / 1e12,
                     "encode_decode_attention_s": t["p50"] * layers, "rel_err_vs_fp32": err})
    return rows


BASELINES = {
    "official (atoken_inference)": lambda: _installed("atoken_inference"),
    "flash-attn varlen (flash_attn.flash_attn_varlen_func)": lambda: _flash_attn_varlen() is not None,
}


def detect_baselines() -> dict[str, str]:
    """{baseline: "not installed" | status}: flash-attn varlen is timed (attention of one layer
    on each benchmarked batch) when installed; the official package is detected only."""
    status = {"official (atoken_inference)": "installed (timing hook not implemented)",
              "flash-attn varlen (flash_attn.flash_attn_varlen_func)":
                  "installed: timed on each batch's packed sequences (attention table)"}
    return {name: (status[name] if detect() else "not installed")
            for name, detect in BASELINES.items()}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def backend_skip_reason(backend: str, device: torch.device) -> str | None:
    """Why a backend cannot be timed here, or None."""
    if backend == "torch":
        return None
    if backend == "triton":
        from . import backends
        ok, why = backends.triton_ready()
        if not ok:
            return why
        if device.type != "cuda":
            return ("the Triton kernels run on CUDA devices; on the CPU only under the "
                    "interpreter (TRITON_INTERPRET=1), which is for testing, not timing")
        return None
    return f"unknown backend {backend!r}"


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=5, cwd=Path(__file__).resolve().parent)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    from . import __version__
    env = {"atoken_rt": __version__, "torch": torch.__version__,
           "python": platform.python_version(),
           "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads(), "commit": _git_commit(),
           "date": _dt.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = f"CPU ({env['processor']}, {env['cpu_threads']} threads)"
    return env


def run_bench(config: str = "atoken-sod", shapes: Sequence[str] = DEFAULT_SHAPES.split(","),
              batches: Sequence[int] = (1, 8), backends: Sequence[str] = ("torch", "triton"),
              graphs: Sequence[str] | None = None, dtype: str | None = None,
              device: str | None = None,
              repeats: int = 10, warmup: int = 2, checkpoint: str | None = None, seed: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Time every (backend, shape, batch) combination; return the report (see module docstring).

    ``dtype`` defaults to bf16 on CUDA and fp32 on the CPU; ``device`` to CUDA when available;
    ``graphs`` (``"off"`` and/or ``"on"``: ``Session(graphs=False/True)``) to both on CUDA and
    ``["off"]`` on the CPU, where ``"on"`` runs the static bucketed path eagerly (no CUDA graphs).
    A backend that cannot run here is skipped with the reason (in the report and through ``log``).
    """
    from .session import Session
    from .config import load_config

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    graphs = list(graphs or (["off", "on"] if dev.type == "cuda" else ["off"]))
    if not graphs or any(g not in GRAPHS_MODES for g in graphs):
        raise ValueError(f"graphs must be 'off' and/or 'on', got {graphs!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    parsed = [parse_shape(s) for s in shapes]
    batches = [int(b) for b in batches]
    if any(b < 1 for b in batches):
        raise ValueError("batch sizes must be >= 1")
    cfg = load_config(config)
    peak = PEAK_TFLOPS.get((dev.type, dtype))
    report: dict = {
        "environment": environment(dev),
        "settings": {"config": str(config), "checkpoint": checkpoint or "random weights",
                     "device": str(dev), "dtype": dtype, "graphs": graphs,
                     "graphs_note": (None if dev.type == "cuda" or "on" not in graphs else
                                     "no CUDA graphs on the CPU: 'on' runs the static bucketed "
                                     "path eagerly"),
                     "repeats": repeats, "warmup": warmup,
                     "shapes": [s.label for s in parsed], "batches": batches,
                     "backends": list(backends), "peak_tflops": peak,
                     "peak_reference": ("H200, large bf16 matmul through PyTorch (ENGINEERING.md)"
                                        if peak else None)},
        "baselines": detect_baselines(),
        "results": [], "skipped": [],
    }
    if report["settings"]["graphs_note"]:
        log(f"graphs on: {report['settings']['graphs_note']}")
    # Progress and an estimate: on a CPU the defaults (full-size model, 4 shapes x 2 batch sizes,
    # 12 calls each) run for many minutes, which looked like a hang when nothing was printed.
    runs = [(b, g) for b in backends for g in graphs]
    progress = _Progress(len(runs) * len(parsed) * len(batches), log)
    if dev.type == "cpu" and cfg.encoder.width >= 512:  # a full-size model, not a tiny one
        log(f"note: benchmarking the full-size '{cfg.name}' on the CPU takes minutes per case; "
            "for a quick run use e.g. --config tiny-sod --shapes image:256 --batch 1 --repeats 3")
    for backend, mode in runs:
        why = backend_skip_reason(backend, dev)
        sess = None
        if why is None:
            log(f"building a session: {cfg.name}, backend {backend}, graphs {mode}, {dtype} on "
                f"{dev} ...")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sess = Session(cfg, checkpoint, device=dev, dtype=DTYPES[dtype],
                                   backend=backend, seed=seed, graphs=GRAPHS_MODES[mode])
            except (ValueError, RuntimeError, ImportError) as exc:
                why = _first_line(exc)
        if sess is None:
            if not any(s["backend"] == backend and "shape" not in s for s in report["skipped"]):
                log(f"skipping backend {backend}: {why}")
                report["skipped"].append({"backend": backend, "reason": why})
            progress.skip(len(parsed) * len(batches))
            continue
        for k, s in enumerate(parsed):
            for b in batches:
                progress.start(f"{s.label} x{b} backend {backend} graphs {mode}")
                # The same inputs for every backend, made when needed (a batch can be large).
                rng = np.random.default_rng([seed, k, b])
                xs = [make_input(s, rng) for _ in range(b)]
                try:
                    row = _bench_one(sess, cfg, s, b, xs, repeats, warmup, peak, log)
                except torch.cuda.OutOfMemoryError:
                    why = "out of GPU memory"
                    log(f"skipping {s.label} x{b} on backend {backend}, graphs {mode}: {why}")
                    report["skipped"].append({"backend": backend, "graphs": mode,
                                              "shape": s.label, "batch": b, "reason": why})
                    torch.cuda.empty_cache()
                    continue
                finally:
                    del xs
                    progress.done()
                row.update(backend=backend, graphs=mode, dtype=dtype, device=str(dev))
                report["results"].append(row)
        del sess
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    flash_fn = _flash_attn_varlen()
    if flash_fn is not None:
        report["attention"] = []
        for k, s in enumerate(parsed):
            for b in batches:
                rng = np.random.default_rng([seed, k, b])
                seqlens = batch_seqlens(cfg, [make_input(s, rng) for _ in range(b)])
                for row in attention_baseline(cfg, seqlens, dev, DTYPES[dtype], repeats, warmup,
                                              flash_fn):
                    report["attention"].append({"shape": s.label, "batch": b, **row})
                    log(f"attention {s.label:>14} x{b:<3} {row['provider']:>18}: " + (
                        row["error"] if "error" in row else
                        f"{row['s']['p50'] * 1e3:.3f} ms/layer, {row['tflops']:.3g} TFLOP/s"))
    return report


class _Progress:
    """``[k/N] case ...`` before each case; after it, the elapsed time and an estimate of the
    rest (the mean time per finished case times the cases left)."""

    def __init__(self, total: int, log):
        self.total, self.log = total, log
        self.k = 0
        self.elapsed = 0.0
        self.finished = 0
        self.t0 = None

    def start(self, what: str) -> None:
        self.k += 1
        self.t0 = time.perf_counter()
        self.log(f"[{self.k}/{self.total}] {what} ...")

    def skip(self, n: int) -> None:
        self.total -= n

    def done(self) -> None:
        if self.t0 is None:
            return
        dt = time.perf_counter() - self.t0
        self.t0 = None
        self.elapsed += dt
        self.finished += 1
        left = self.total - self.k
        if left > 0:
            self.log(f"[{self.k}/{self.total}] took {dt:.1f} s; about "
                     f"{self.elapsed / self.finished * left:.0f} s left for {left} case(s) "
                     "(estimate: larger shapes take longer)")


# A timing is called noisy when the slower calls are this much slower than the median: the
# machine is shared or throttling, and the figures should not be compared or published.
NOISE_RATIO = 0.10


def noise(seconds: Sequence[float]) -> float:
    """(p90 - p50) / p50 of the timed calls (0 for fewer than 3 calls)."""
    if len(seconds) < 3:
        return 0.0
    p = percentiles(seconds)
    return (p["p90"] - p["p50"]) / p["p50"] if p["p50"] > 0 else 0.0


def _bench_one(sess, cfg, shape: BenchShape, batch: int, xs: list, repeats: int, warmup: int,
               peak: float | None, log) -> dict:
    dev = sess.device
    seqlens = batch_seqlens(cfg, xs)
    tokens = int(sum(seqlens))
    flops_enc = tower_flops(cfg, "encoder", seqlens)
    flops_dec = tower_flops(cfg, "decoder", seqlens)
    _reset_peak_memory(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # crop / frame-drop notes of odd shapes
        t_enc = time_calls(lambda: sess.encode(xs), repeats, warmup, dev)
        t_all = time_calls(lambda: sess.decode(sess.encode(xs)), repeats, warmup, dev)
    mem, mem_kind = peak_memory(dev)
    enc, both = percentiles(t_enc), percentiles(t_all)
    row = {
        "shape": shape.label, "kind": shape.kind, "batch": batch, "tokens": tokens,
        "sequences": len(seqlens), "max_seqlen": int(max(seqlens)),
        "flops_encode": flops_enc, "flops_encode_decode": flops_enc + flops_dec,
        "encode_s": enc, "encode_decode_s": both,
        "encode_samples_per_s": batch / enc["p50"], "encode_tokens_per_s": tokens / enc["p50"],
        "encode_decode_samples_per_s": batch / both["p50"],
        "encode_decode_tokens_per_s": tokens / both["p50"],
        "encode_tflops": flops_enc / enc["p50"] / 1e12,
        "encode_decode_tflops": (flops_enc + flops_dec) / both["p50"] / 1e12,
        "peak_memory_bytes": mem, "peak_memory_kind": mem_kind,
    }
    row["encode_pct_peak"] = 100 * row["encode_tflops"] / peak if peak else None
    row["encode_decode_pct_peak"] = 100 * row["encode_decode_tflops"] / peak if peak else None
    worst = max(noise(t_enc), noise(t_all))
    row["noise"] = worst
    row["noisy"] = worst > NOISE_RATIO
    if row["noisy"]:
        log(f"warning: noisy timings for {shape.label} x{batch}: p90 is {100 * worst:.0f}% above "
            f"p50 (a loaded or throttling machine?); rerun on a quiet machine or with more "
            "--repeats before comparing")
    graphs = "on " if sess.static else "off"
    log(f"{shape.label:>14} x{batch:<3} {sess.backend:>6} graphs {graphs}: "
        f"encode p50 {enc['p50'] * 1e3:9.2f} ms, "
        f"encode+decode p50 {both['p50'] * 1e3:9.2f} ms, {row['encode_decode_tflops']:.3g} TFLOP/s")
    return row


# ------------------------------------------------------------------------------------------------
# report files
# ------------------------------------------------------------------------------------------------

def _ms(s: float) -> str:
    v = s * 1e3
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _num(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.0f} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.2f} GiB"


def markdown(report: dict) -> str:
    """The report as markdown: a settings line, the table, skips and baselines."""
    st, env = report["settings"], report["environment"]
    lines = [f"# atoken-rt bench: {st['config']}, {st['dtype']}, {env['device_name']}", "",
             f"{st['checkpoint']}; torch {env['torch']}; atoken_rt {env['atoken_rt']}"
             f"{'; commit ' + env['commit'] if env.get('commit') else ''}; {env['date']}; "
             f"{st['repeats']} timed calls after {st['warmup']} warm-up"
             f"{'; ' + st['graphs_note'] if st.get('graphs_note') else ''}.", ""]
    peak = st["peak_tflops"]
    head = ["shape", "batch", "backend", "graphs", "tokens", "encode p50 / p90 / p99 ms",
            "enc+dec p50 / p90 / p99 ms", "encode tok/s", "enc+dec samples/s", "enc+dec tok/s",
            "encode TFLOP/s", "enc+dec TFLOP/s"]
    if peak:
        head.append(f"enc+dec % of {peak:.0f}")
    head.append("peak memory")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in report["results"]:
        e, b = r["encode_s"], r["encode_decode_s"]
        cells = [r["shape"], str(r["batch"]), r["backend"], r["graphs"], str(r["tokens"]),
                 " / ".join(_ms(e[k]) for k in ("p50", "p90", "p99")),
                 " / ".join(_ms(b[k]) for k in ("p50", "p90", "p99")),
                 _num(r["encode_tokens_per_s"]), _num(r["encode_decode_samples_per_s"]),
                 _num(r["encode_decode_tokens_per_s"]), f"{r['encode_tflops']:.3g}",
                 f"{r['encode_decode_tflops']:.3g}"]
        if peak:
            cells.append(f"{r['encode_decode_pct_peak']:.1f}%")
        cells.append(_mib(r["peak_memory_bytes"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report["results"]:
        lines.append(f"Peak memory: {report['results'][0]['peak_memory_kind']}. TFLOP/s from the "
                     "FLOP formula (dense + attention per sequence; bench/README.md).")
    for s in report["skipped"]:
        what = f" {s['shape']} x{s['batch']} graphs {s['graphs']}" if "shape" in s else ""
        lines.append(f"- skipped backend `{s['backend']}`{what}: {s['reason']}")
    for name, status in report["baselines"].items():
        lines.append(f"- baseline {name}: {status}")
    if report.get("attention"):
        lines += ["", "Attention of one layer on each batch's packed sequences (same q, k, v; "
                  "TFLOP/s = 4 * sum(L^2) * H * D / t):", "",
                  "| shape | batch | provider | ms per layer p50 | TFLOP/s | all layers of "
                  "enc+dec ms | rel. error vs fp32 |", "|---|---|---|---:|---:|---:|---:|"]
        for r in report["attention"]:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['batch']} | {r['provider']} | "
                             f"{r['error'][:60]} | | | |")
                continue
            lines.append(f"| {r['shape']} | {r['batch']} | {r['provider']} | "
                         f"{r['s']['p50'] * 1e3:.3f} | {r['tflops']:.3g} | "
                         f"{r['encode_decode_attention_s'] * 1e3:.2f} | "
                         f"{r['rel_err_vs_fp32']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Bar charts: p50 latency (encode, encode + decode) and effective TFLOP/s per combination."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["results"]
    labels = [f"{r['shape']}\nx{r['batch']} {r['backend']}\ngraphs {r['graphs']}" for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1)
    w = 0.4
    ax1.bar(x - w / 2, [r["encode_s"]["p50"] * 1e3 for r in rows], w, label="encode")
    ax1.bar(x + w / 2, [r["encode_decode_s"]["p50"] * 1e3 for r in rows], w,
            label="encode + decode")
    ax1.set_ylabel("p50 latency (ms)")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.bar(x - w / 2, [r["encode_tflops"] for r in rows], w, label="encode")
    ax2.bar(x + w / 2, [r["encode_decode_tflops"] for r in rows], w, label="encode + decode")
    ax2.set_ylabel("effective TFLOP/s")
    peak = report["settings"]["peak_tflops"]
    if peak:
        ax2.axhline(peak, color="grey", linestyle="--", linewidth=1)
        ax2.text(0, peak, f" measured peak {peak:.0f}", va="bottom", fontsize=8)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, fontsize=8)
    st, env = report["settings"], report["environment"]
    fig.suptitle(f"atoken-rt bench: {st['config']}, {st['dtype']}, {env['device_name']}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and (with results) ``bench.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    if report["results"]:
        paths["plot"] = plot(report, out / "bench.png")
    return paths


__all__ = ["run_bench", "write_report", "markdown", "plot", "parse_shape", "make_input",
           "tower_flops", "batch_seqlens", "time_calls", "percentiles", "detect_baselines",
           "attention_baseline",
           "BASELINES", "PEAK_TFLOPS", "DEFAULT_SHAPES"]
