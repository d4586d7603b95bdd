"""Varlen attention forward (kernels/attention.py) against torch and SDPA backends, on a CUDA GPU.

    python bench/bench_attention.py [--json PATH]

Workloads, bf16, packed [N, 3, H, D] QKV with q/k/v read as strided views (what the model passes):

- ``L256`` / ``L1024`` / ``L4096``: the AToken encoder/decoder shape (16 heads, D = 72, no softcap),
  32768 tokens as 128 x 256, 32 x 1024 or 8 x 4096 equal-length sequences (images; a long video
  chunk);
- ``gs``: the GS decoder's Swin windows (12 heads, D = 64, softcap 30), 32768 tokens in windows of
  1..512 tokens (random, fixed seed).

Providers (same inputs; every output is compared with ``torch``'s):

- ``torch``: ``atoken_rt.reference.varlen_attention`` with host cu_seqlens (equal lengths take its
  batched-SDPA fast path; the gs workload its padded matmul + softmax path, which honours softcap);
- ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention`` under
  ``torch.nn.attention.sdpa_kernel(<backend>)`` on the batched equivalent [B, H, L, D] (a
  zero-copy view of the packed tensor; equal-length workloads only, SDPA has no softcap). D = 72
  is not a native size for them: FlashAttention-2 rounds it up to its 96 kernel, the others pad or
  mask internally; their TFLOP/s still counts only the useful D = 72 work;
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when importable (not installed on the
  project's GPU machine);
- ``triton``: ``atoken_rt.kernels.attention.varlen_attention`` (D = 72 as 64 + 8, autotuned; the
  chosen config is reported);
- ``triton_bucket_per_sequence`` / ``triton_bucket_packed`` (L256 and gs only): the same kernel
  called as a static bucket calls it, with max_seqlen_q = all 32768 tokens (a capacity), under
  each grid mode. Prediction for L256: the per-sequence grid launches 128 x 512 x 16 = 1M
  programs (per BLOCK_M 64), all but 8192 exiting at once; packed launches (512 + 128) x 2 x 16
  = 20k. At a few hundred ns per exiting program per SM slot that is ~0.1-1 ms saved per call.

Throughput formula (useful work, same for every provider): ``TFLOP/s = 4 * sum_s(Lq_s * Lk_s) * H
* D / t`` (two matmuls of 2 FLOP per multiply-add; softmax not counted). Ceiling on an H200: about
790 TFLOP/s for a large bf16 matmul (ENGINEERING.md). Target: ``triton`` >= 1.25x the best SDPA
backend and >= 450 TFLOP/s at L4096. Timing: ``triton.testing.do_bench``, quantiles [0.5, 0.2,
0.8], after one untimed call (compile + autotune).

Without CUDA this prints one line and exits 0. bench/device_check.py calls ``run(json_path)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # bench/_common.py, also when device_check.py loads this file by path
    sys.path.insert(0, _BENCH)
import _common as common  # noqa: E402
from _common import DEVICE  # noqa: E402

DTYPE = torch.bfloat16
TOTAL_TOKENS = 32768
# (name, heads, head dim, softcap, sequence lengths or None for random GS windows)
# L4096 first: it decides the speed target, and a time box (device_check) may cut the tail.
WORKLOADS = (
    ("L4096", 16, 72, 0.0, [4096] * (TOTAL_TOKENS // 4096)),
    ("L256", 16, 72, 0.0, [256] * (TOTAL_TOKENS // 256)),
    ("L1024", 16, 72, 0.0, [1024] * (TOTAL_TOKENS // 1024)),
    ("gs", 12, 64, 30.0, None),
)
SDPA_BACKENDS = ("flash", "efficient", "cudnn")
TARGET_SPEEDUP, TARGET_TFLOPS, TARGET_WORKLOAD = 1.25, 450.0, "L4096"


def _gs_windows(total: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, n = [], 0
    while n < total:
        m = min(int(torch.randint(1, 513, (1,), generator=g)), total - n)
        lengths.append(m)
        n += m
    return lengths


def _flops(lengths: list[int], heads: int, head_dim: int) -> float:
    """4 * sum(Lq * Lk) * H * D: QK^T and PV, 2 FLOP per multiply-add (self-attention: Lq = Lk)."""
    return 4.0 * sum(n * n for n in lengths) * heads * head_dim


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def setup(heads: int, head_dim: int, softcap: float, lengths: list[int]):
    """Inputs and one zero-argument callable per provider, each returning [N, H, D]."""
    import torch.nn.functional as F

    from atoken_rt import reference as ref
    from atoken_rt.kernels import attention

    n = sum(lengths)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(n, 3, heads, head_dim, device=DEVICE, generator=g).to(DTYPE)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu_host = [0]
    for m in lengths:
        cu_host.append(cu_host[-1] + m)
    cu = torch.tensor(cu_host, dtype=torch.int32, device=DEVICE)
    max_len = max(lengths)
    out = torch.empty(n, heads, head_dim, device=DEVICE, dtype=DTYPE)

    fns = {
        "torch": lambda: ref.varlen_attention(q, k, v, cu_host, softcap=softcap),
        "triton": lambda: attention.varlen_attention(q, k, v, cu, max_len, softcap=softcap,
                                                     out=out),
    }
    if len(lengths) > 1 and max_len <= 512:
        # A static bucket: max_seqlen_q is the capacity (all tokens), not the longest sequence.
        # The two grids of the launcher: per-sequence (cdiv(capacity, BLOCK_M) programs per
        # sequence, nearly all exiting at once) and packed (each program finds its sequence).
        for grid in ("per_sequence", "packed"):
            fns[f"triton_bucket_{grid}"] = (
                lambda grid=grid: attention.varlen_attention(q, k, v, cu, n, softcap=softcap,
                                                             out=out, grid=grid))
    if softcap == 0 and len(set(lengths)) == 1:
        b, L = len(lengths), lengths[0]

        def batched(t):  # [N, H, D] view -> [B, H, L, D] view, no copy
            return t.view(b, L, heads, head_dim).transpose(1, 2)

        qb, kb, vb = batched(q), batched(k), batched(v)
        for name in SDPA_BACKENDS:
            def sdpa(backend=_sdpa_backend(name)):
                from torch.nn.attention import sdpa_kernel
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(qb, kb, vb)
                return o.transpose(1, 2).reshape(n, heads, head_dim)
            fns[f"sdpa_{name}"] = sdpa
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        fns["flash_attn"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len,
                                                           softcap=softcap)
    return fns


def run(json_path: str | None = None) -> list[dict]:
    """Time every workload and provider; print a table; write JSON if asked. [] without CUDA."""
    if common.no_cuda("attention"):
        return []
    from atoken_rt.kernels import attention

    meta = common.metadata()
    rows = common.JsonRows(json_path, "attention", meta)  # on disk as they come
    for name, heads, head_dim, softcap, lengths in WORKLOADS:
        lengths = lengths or _gs_windows(TOTAL_TOKENS)
        fns = setup(heads, head_dim, softcap, lengths)
        want = fns["torch"]().float()
        flops = _flops(lengths, heads, head_dim)
        for provider, fn in fns.items():
            row = {"workload": name, "provider": provider, "tokens": sum(lengths),
                   "seqs": len(lengths), "max_len": max(lengths), "heads": heads,
                   "head_dim": head_dim, "softcap": softcap,
                   "dtype": str(DTYPE).removeprefix("torch."), **meta}
            try:
                got = fn().float()  # untimed: compile, autotune, backend availability
                torch.cuda.synchronize()
            except Exception as exc:  # an SDPA backend that rejects this shape or GPU
                rows.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            ms, ms20, ms80 = common.bench(fn)
            row.update(ms=ms, ms_p20=ms20, ms_p80=ms80, tflops=flops / ms * 1e-9,
                       rel_err_vs_torch=common.rel_err(got, want))
            if provider == "triton":
                best = getattr(attention._tuned_kernel, "best_config", None)
                row["config"] = str(best) if best is not None else None
            rows.append(row)
            del got
        _add_speedups(rows, name)
        rows.flush()  # the speedups were added to rows already on disk
        del fns, want
        torch.cuda.empty_cache()
    _print(rows, meta)
    return list(rows)


def _add_speedups(rows: list[dict], workload: str) -> None:
    """triton's speedup over torch and over the best SDPA backend, and the target verdict."""
    mine = [r for r in rows if r["workload"] == workload and "ms" in r]
    by = {r["provider"]: r for r in mine}
    sdpa = [r["ms"] for r in mine if r["provider"].startswith("sdpa_")]
    for r in mine:
        r["speedup_vs_torch"] = by["torch"]["ms"] / r["ms"] if "torch" in by else None
    t = by.get("triton")
    if t is None:
        return
    t["speedup_vs_best_sdpa"] = min(sdpa) / t["ms"] if sdpa else None
    if workload == TARGET_WORKLOAD:
        t["meets_target"] = bool(sdpa) and t["speedup_vs_best_sdpa"] >= TARGET_SPEEDUP \
            and t["tflops"] >= TARGET_TFLOPS


def _print(rows, meta):
    common.print_header("attention", meta, "TFLOP/s = 4 * sum(Lq*Lk) * H * D / t (bf16)")
    print(f"{'workload':<9}{'provider':>16}{common.ms_header()}{'TFLOP/s':>9}"
          f"{'vs torch':>10}{'rel err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<9}{r['provider']:>16}  unavailable: {r['error'][:70]}")
            continue
        sp = r.get("speedup_vs_torch")
        print(f"{r['workload']:<9}{r['provider']:>16}{common.ms_columns(r)}{r['tflops']:>9.1f}"
              f"{(f'{sp:.2f}x' if sp else '-'):>10}{r['rel_err_vs_torch']:>10.1e}")
    for r in rows:
        if r["provider"] == "triton" and "ms" in r:
            vs = r.get("speedup_vs_best_sdpa")
            print(f"  {r['workload']}: triton config {r.get('config')}"
                  + (f", {vs:.2f}x the best SDPA backend" if vs else ""))
    print("  note: D = 72 is not native to the SDPA backends (FlashAttention-2 runs its 96 kernel);"
          " TFLOP/s counts the useful D = 72 work for every provider")
    verdict = [r for r in rows if "meets_target" in r]
    want = (f"target at {TARGET_WORKLOAD}: >= {TARGET_SPEEDUP}x the best SDPA backend and "
            f">= {TARGET_TFLOPS:.0f} TFLOP/s on an H200")
    print(f"{want}: " + ("met" if verdict and verdict[0]["meets_target"] else "NOT met"))


def main(argv=None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    common.script(main)
