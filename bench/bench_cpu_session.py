"""CPU end-to-end timing, before/after the bf16 fast path (issue 11), in one invocation.

Random full-size weights (``Session("atoken-sod")``: nothing to download). For each input (a 256^2
image, a 512^2 image, a 16-frame 256^2 video) it times, alternating within every repeat so that a
noisy machine slows all of them alike (medians of ``--repeats``):

- bf16 ``encode`` / ``decode`` with the torch reference ops ("before": ``backend="reference"``) and
  with the CPU fast ops ("after": the default ``backend="torch"`` on a CPU, :mod:`atoken_rt.cpu_ops`),
  both on the same session and weights;
- the bf16 GEMM floor of each tower: the same Linear layers alone (input layer, the 4 per block,
  the output projection / ``proj`` + the head's ``to_kv``), same weights, same row counts, once as
  the fast path runs them (prepacked oneDNN) and once as plain ``F.linear``;
- the attention floor of each tower: its blocks' attention alone (flash SDPA on random bf16
  tensors of the same shape), so that "after / (GEMM + attention floor)" says how far the fast path
  is from the work no exact implementation can skip on this CPU;
- fp32 ``encode`` / ``decode`` (the reference path, unchanged) and the fp32 GEMM floor (F.linear);
- accuracy of each bf16 path against the fp32 session on the 256^2 image (relative Frobenius error
  of the encoder features and the decoded tokens).

Then attention alone at 256 / 1024 / 4096 tokens (16 heads, head dim 72): SDPA on fp32 copies (the
reference: exact), SDPA on the bf16 tensors (flash semantics: the fast path's default),
matmul + softmax + matmul in fp32, and blocked GEMMs (fp32 scores, bf16 probabilities: the
fastest exact composition of torch's GEMMs on a CPU without AMX), with each one's error against an
fp64 computation.

Usage::

    python3 bench/bench_cpu_session.py --json bench/results/cpu-DATE-bf16.json   # ~5 min
    python3 bench/bench_cpu_session.py --quick                                   # ~1.5 min
    python3 bench/bench_cpu_session.py --quick --threads 1 --clock cpu           # loaded machine

``--quick``: 3 repeats, fp32 on the 256^2 image only, attention to 1024 tokens, no long video.
The JSON file is rewritten after every row (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The checkout this script lives in, ahead of any installed atoken_rt (an editable install of
# another clone would otherwise be measured).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atoken_rt  # noqa: E402
from atoken_rt.cpu_features import cpu_features  # noqa: E402
from atoken_rt.model import TorchOps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit, write_atomic  # noqa: E402  (bench/ helpers)


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def tower_linears(model, tower: str):
    """(Linear, rows factor) of every GEMM one tower runs per token (rows = tokens): input layer,
    4 per block, then proj + the head's to_kv (encoder) or the output layer (decoder)."""
    t = getattr(model, tower)
    lins = [t.input_layer]
    for b in t.blocks:
        lins += [b.attn.to_qkv, b.attn.to_out, b.mlp.mlp[0], b.mlp.mlp[2]]
    lins += [model.proj, t.head.attention.to_kv] if tower == "encoder" else [t.out_layer]
    return lins


def attention_floor_fn(num_blocks: int, n: int, heads: int, head_dim: int, dtype):
    """A call running the attention of ``num_blocks`` blocks alone: SDPA on random [1, heads, n,
    head_dim] tensors in ``dtype`` (the fast path's kernel: PyTorch's CPU flash SDPA), once per
    block. With the GEMM floor it is the work no exact implementation can skip."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen).to(dtype) for _ in range(3))

    def run():
        for _ in range(num_blocks):
            F.scaled_dot_product_attention(q, k, v)
    return run


def floor_fn(lins, n: int, dtype, packed_ops=None):
    """A call running every Linear in ``lins`` on n random rows (packed oneDNN via the fast ops'
    own prepacked weights when ``packed_ops`` is given, else F.linear)."""
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(n, k, generator=gen).to(dtype) for k in {m.in_features for m in lins}}
    if packed_ops is not None:
        pw = [packed_ops.packed_weight(m) for m in lins]

        def run():
            for m, w in zip(lins, pw):
                torch.ops.mkldnn._linear_pointwise(xs[m.in_features], w, m.bias, "none", [], "")
    else:
        def run():
            for m in lins:
                F.linear(xs[m.in_features], m.weight, m.bias)
    return run


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def timed(fn) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


class Report:
    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, **row) -> None:
        self.rows.append(row)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({**self.meta, "rows": self.rows}, indent=1))


def make_inputs(quick: bool):
    rng = np.random.default_rng(0)
    return [("image 256x256", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
            ("image 512x512", rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
            ("video 16x256x256", rng.integers(0, 256, (16, 256, 256, 3), dtype=np.uint8))]


def bench_bf16(rep: Report, sess, fast, refops, name, x, repeats, fp32_out=None):
    """Alternating before/after/floors for one input; returns the medians."""
    enc = sess.encode([x])
    n = enc.coords[0].shape[0]
    floors = {}
    for tower in ("encoder", "decoder"):
        lins = tower_linears(sess.model, tower)
        blocks = getattr(sess.model, tower).blocks
        attn = blocks[0].attn
        floors[tower] = {"packed": floor_fn(lins, n, sess.dtype, fast),
                         "plain": floor_fn(lins, n, sess.dtype),
                         "attention": attention_floor_fn(len(blocks), n, attn.heads,
                                                         attn.head_dim, sess.dtype)}
    calls = {}
    for label, ops in (("before", refops), ("after", fast)):
        def e(ops=ops):
            sess.ops = ops
            return sess.encode([x])

        def d(ops=ops):
            sess.ops = ops
            return sess.decode(enc)
        calls[f"encode {label}"], calls[f"decode {label}"] = e, d
    for tower, key in (("encoder", "encode"), ("decoder", "decode")):
        calls[f"{key} GEMM floor (prepacked oneDNN)"] = floors[tower]["packed"]
        calls[f"{key} GEMM floor (F.linear)"] = floors[tower]["plain"]
        calls[f"{key} attention floor (flash SDPA)"] = floors[tower]["attention"]
    for fn in calls.values():  # warm-up: weights packed, buffers touched, kernels compiled
        fn()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            times[k].append(timed(fn))
    sess.ops = fast
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        rep.add(section="bf16", input=name, tokens=n, measurement=k, seconds=med[k],
                all_s=v, load=load())
    out = {"tokens": n, **med}
    if fp32_out is not None:  # accuracy against the fp32 session, per bf16 path
        for label, ops in (("before", refops), ("after", fast)):
            sess.ops = ops
            e = sess.encode([x])
            dec = sess.decode(e)
            out[f"err {label}"] = (rel(e.features[0], fp32_out[0]),
                                   rel(dec.tokens[0], fp32_out[1]))
            rep.add(section="accuracy", input=name, measurement=f"bf16 {label} vs fp32",
                    features_rel_err=out[f"err {label}"][0],
                    decoded_rel_err=out[f"err {label}"][1])
        sess.ops = fast
    return out


def bench_fp32(rep: Report, sess, name, x, repeats):
    enc = sess.encode([x])
    n = enc.coords[0].shape[0]
    calls = {"encode": lambda: sess.encode([x]), "decode": lambda: sess.decode(enc),
             "encode GEMM floor (F.linear)": floor_fn(tower_linears(sess.model, "encoder"), n,
                                                      sess.dtype),
             "decode GEMM floor (F.linear)": floor_fn(tower_linears(sess.model, "decoder"), n,
                                                      sess.dtype)}
    for fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            times[k].append(timed(fn))
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        rep.add(section="fp32", input=name, tokens=n, measurement=k, seconds=med[k], all_s=v,
                load=load())
    return {"tokens": n, **med}, (enc.features[0], sess.decode(enc).tokens[0])


def bench_attention(rep: Report, lengths, repeats):
    """SDPA fp32 (exact) vs SDPA bf16 (flash) vs fp32 matmuls, one sequence, 16 heads x 72."""
    h, d = 16, 72
    out = {}
    for L in lengths:
        gen = torch.Generator().manual_seed(L)
        qt, kt, vt = (torch.randn(1, h, L, d, generator=gen).to(torch.bfloat16) for _ in range(3))
        exact64 = F.scaled_dot_product_attention(qt.double(), kt.double(), vt.double())

        def sdpa32():
            return F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).bfloat16()

        def sdpa16():
            return F.scaled_dot_product_attention(qt, kt, vt)

        def matmul32():
            s = torch.matmul(qt.float(), kt.float().transpose(-1, -2)).mul_(1 / math.sqrt(d))
            return torch.matmul(s.softmax(-1), vt.float()).bfloat16()

        def blocked_gemms():
            # The fastest exact composition of torch's own GEMMs found on a Zen 4 core (no AMX):
            # per head and 256-row query block, fp32 scores (bf16 inputs are exact in fp32),
            # fp32 softmax, bf16 probabilities, bf16 x bf16 GEMM (fp32 accumulate) for P V. Its
            # time is the attention floor of torch's kernels; the flash SDPA is measured at it.
            q32 = qt[0].float().mul_(1 / math.sqrt(d))
            k32 = kt[0].float()
            o = torch.empty(L, h, d, dtype=torch.bfloat16).transpose(0, 1)
            for j in range(h):
                kj = k32[j].t()
                for i in range(0, L, 256):
                    p = torch.softmax(torch.mm(q32[j, i:i + 256], kj), -1).to(torch.bfloat16)
                    torch.mm(p, vt[0, j], out=o[j, i:i + 256])
            return o.unsqueeze(0)

        fns = {"SDPA fp32 (exact, reference)": sdpa32, "SDPA bf16 (flash, fast path)": sdpa16,
               "matmul+softmax fp32": matmul32,
               "blocked GEMMs (fp32 scores, bf16 P)": blocked_gemms}
        want = sdpa32()
        for fn in fns.values():
            fn()
        reps = repeats if L < 4096 else max(3, repeats // 2)
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                times[k].append(timed(fn))
        for k, fn in fns.items():
            o = fn()
            med = float(np.median(times[k]))
            out[(L, k)] = med
            rep.add(section="attention", tokens=L, measurement=k, seconds=med, all_s=times[k],
                    rel_err_vs_fp64=float((o.double() - exact64).norm() / exact64.norm()),
                    frac_differing_from_reference=float((o != want).float().mean()),
                    load=load())
    return out


def bench_long_video(rep: Report, sess, repeats):
    """A 32-frame 64x64 video: one varlen pass vs one pass per 16-frame chunk (the official
    way), on the fast bf16 path."""
    vid = np.random.default_rng(1).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    chunks = [vid[i:i + 16] for i in range(0, 32, 16)]
    fns = {"video 32x64x64: one varlen pass": lambda: sess.encode([vid]),
           "video 32x64x64: one pass per chunk (official)":
               lambda: [sess.encode([c]) for c in chunks]}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    for k, v in times.items():
        rep.add(section="video", measurement=k, seconds=float(np.median(v)), all_s=v)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="atoken-sod")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU seconds instead of wall time; for a shared, loaded "
                        "machine, with --threads 1 (waiting for a core is not counted; with more "
                        "threads, OpenMP's spin-waits would be)")
    a = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 5)
    feats = cpu_features()
    meta = {"bench": "cpu_session", "config": a.config, "torch": torch.__version__,
            "commit": commit(), "threads": torch.get_num_threads(), "cpu": feats.model,
            "cpu_features": feats.lines(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": a.quick, "repeats": repeats,
            "clock": a.clock,
            "load_at_start": load()}
    rep = Report(a.json, meta)
    print(f"atoken_rt CPU bench: {a.config}, torch {torch.__version__}, {meta['threads']} threads, "
          f"{feats.model}, commit {meta['commit']}, load {meta['load_at_start']}, "
          f"{'process CPU' if a.clock == 'cpu' else 'wall'} seconds")
    for line in feats.lines():
        print("  " + line)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        s16 = atoken_rt.Session(a.config, dtype=torch.bfloat16)
        build16 = time.perf_counter() - t0
        s32 = atoken_rt.Session(a.config, dtype=torch.float32)
    fast, refops = s16.ops, TorchOps()
    rep.add(section="build", measurement="build bf16 session (random weights)", seconds=build16)
    print(f"  bf16 session: {fast.describe() if hasattr(fast, 'describe') else type(fast)}")

    inputs = make_inputs(a.quick)
    table = []
    for i, (name, x) in enumerate(inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f32, f32_out = (bench_fp32(rep, s32, name, x, repeats)
                            if (i == 0 or not a.quick) else (None, None))
            b16 = bench_bf16(rep, s16, fast, refops, name, x, repeats,
                             fp32_out=f32_out if i == 0 else None)
        table.append((name, b16, f32))
        print(f"  done: {name} ({b16['tokens']} tokens), load {load()}")
    att = bench_attention(rep, (256, 1024) if a.quick else (256, 1024, 4096), repeats)
    vid = None if a.quick else bench_long_video(rep, s16, max(2, repeats // 2))
    rep.meta["load_at_end"] = load()
    rep.add(section="done", measurement="load at end", value=load())

    print(f"\n| input (tokens) | stage | bf16 before | bf16 after | speed-up | GEMM floor "
          f"(prepacked) | after / floor | + attention floor | after / (GEMM + attention) "
          f"| floor F.linear | fp32 | fp32 floor | fp32 / floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, b, f in table:
        for st in ("encode", "decode"):
            fl = b[f"{st} GEMM floor (prepacked oneDNN)"]
            at = b[f"{st} attention floor (flash SDPA)"]
            fp = (f"{f[st]:.3f} | {f[f'{st} GEMM floor (F.linear)']:.3f} | "
                  f"{f[st] / f[f'{st} GEMM floor (F.linear)']:.2f}x" if f else "- | - | -")
            print(f"| {name} ({b['tokens']}) | {st} | {b[f'{st} before']:.3f} | "
                  f"{b[f'{st} after']:.3f} | {b[f'{st} before'] / b[f'{st} after']:.2f}x | "
                  f"{fl:.3f} | {b[f'{st} after'] / fl:.2f}x | {fl + at:.3f} | "
                  f"{b[f'{st} after'] / (fl + at):.2f}x | "
                  f"{b[f'{st} GEMM floor (F.linear)']:.3f} | {fp} |")
    b0 = table[0][1]
    if "err before" in b0:
        print(f"\nbf16 error vs fp32 ({table[0][0]}; features, decoded): reference ops "
              f"{b0['err before'][0]:.4f}, {b0['err before'][1]:.4f}; fast ops "
              f"{b0['err after'][0]:.4f}, {b0['err after'][1]:.4f}")
    print("\n| attention, 16 heads x 72 | " + " | ".join(str(L) for L in sorted({k[0] for k in att}))
          + " tokens |")
    print("|---|" + "---:|" * len({k[0] for k in att}))
    for m in dict.fromkeys(k[1] for k in att):
        print(f"| {m} | " + " | ".join(f"{att[(L, m)] * 1e3:.2f} ms"
                                       for L in sorted({k[0] for k in att})) + " |")
    if vid:
        for k, v in vid.items():
            print(f"{k}: {v:.3f} s")
    print(f"\nload average: start {meta['load_at_start']}, end {rep.meta['load_at_end']}")


if __name__ == "__main__":
    main()
