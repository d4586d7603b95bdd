"""Residual add + norm (kernels/norms.py) against the torch reference, on a CUDA GPU.

    python bench/bench_norms.py [--json PATH]

Workloads (bf16, AToken shapes): 256*64 = 16384 tokens (a batch of 64 images of 256x256) and 4096
tokens; width 1152 with LayerNorm32 (encoder) and RMSNorm32 (decoder), width 768 with LayerNorm32
(the GS decoder). Providers, same inputs, same outputs (x_new, y):

- ``torch``: ``x + delta`` then ``reference.layer_norm32`` / ``reference.rms_norm32`` (what the
  torch backend runs: several kernels and fp32 temporaries);
- ``triton``: ``add_layer_norm`` / ``add_rms_norm``, one pass.

Bandwidth formula (the bytes the fused op must move, used for both providers so the numbers compare
time): ``GB/s = (4 * N * C * s + P * C * s) / t`` with s = 2 bytes (bf16): read x and delta, write
x_new and y, plus P parameter vectors (2 for LayerNorm, 1 for RMSNorm). Ceiling on an H200: about
4.3 TB/s (ENGINEERING.md). Timing: ``triton.testing.do_bench``, quantiles [0.5, 0.2, 0.8].

Without CUDA this prints one line and exits 0. bench/device_check.py calls ``run(json_path)``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOKENS = (256 * 64, 4096)
CASES = (("layer", 1152), ("rms", 1152), ("layer", 768))  # (norm, width)
DTYPE = torch.bfloat16
DEVICE = "cuda"
QUANTILES = [0.5, 0.2, 0.8]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _bytes(n: int, c: int, kind: str) -> int:
    s = torch.finfo(DTYPE).bits // 8
    return 4 * n * c * s + (2 if kind == "layer" else 1) * c * s


def setup(kind: str, n: int, c: int):
    """Inputs and one callable per provider, each returning (x_new, y)."""
    from atoken_rt import reference as ref
    from atoken_rt.kernels import norms

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, c, device=DEVICE, generator=g).to(DTYPE)
    delta = torch.randn(n, c, device=DEVICE, generator=g).to(DTYPE)
    w = (1 + 0.1 * torch.randn(c, device=DEVICE, generator=g)).to(DTYPE)
    b = (0.1 * torch.randn(c, device=DEVICE, generator=g)).to(DTYPE)
    if kind == "layer":
        def torch_fn():
            xn = x + delta
            return xn, ref.layer_norm32(xn, w, b, 1e-6)

        def triton_fn():
            return norms.add_layer_norm(x, delta, w, b, 1e-6)
    else:
        def torch_fn():
            xn = x + delta
            return xn, ref.rms_norm32(xn, w, 1e-6)

        def triton_fn():
            return norms.add_rms_norm(x, delta, w, 1e-6)
    return {"torch": torch_fn, "triton": triton_fn}


def run(json_path: str | None = None) -> list[dict]:
    """Time every workload and provider; print a table; write JSON if asked. [] without CUDA."""
    if not torch.cuda.is_available():
        print("bench_norms: no CUDA GPU here; nothing measured (run it on the GPU machine).")
        return []
    import triton
    from triton.testing import do_bench

    meta = {"gpu": torch.cuda.get_device_name(), "commit": _commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    for kind, c in CASES:
        for n in TOKENS:
            fns = setup(kind, n, c)
            want = fns["torch"]()
            t_torch = None
            for provider, fn in fns.items():
                got = fn()
                # same rounding points as the reference: agreement at the bf16-ulp level
                err = max(float((g.float() - w_.float()).norm() / w_.float().norm())
                          for g, w_ in zip(got, want))
                ms, ms20, ms80 = do_bench(fn, quantiles=QUANTILES)
                t_torch = ms if provider == "torch" else t_torch
                rows.append({"op": f"add_{kind}_norm", "shape": f"{n}x{c}", "provider": provider,
                             "ms": ms, "GB/s": _bytes(n, c, kind) / ms * 1e-6,
                             "speedup_vs_torch": t_torch / ms, "ms_p20": ms20, "ms_p80": ms80,
                             "rel_err_vs_torch": err, "dtype": "bf16", **meta})
            del fns, want
    _print(rows, meta, triton.__version__)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"bench": "norms", **meta, "torch": torch.__version__,
                                               "triton": triton.__version__, "rows": rows},
                                              indent=1))
    return rows


def _print(rows, meta, triton_version):
    print(f"bench_norms: {meta['gpu']}, commit {meta['commit']}, triton {triton_version}; "
          "GB/s = (4*N*C + P*C) * 2 B / t")
    print(f"{'op':<16}{'shape':>12}{'provider':>10}{'ms p50':>10}{'p20-p80':>18}{'GB/s':>9}"
          f"{'vs torch':>10}{'rel err':>10}")
    for r in rows:
        print(f"{r['op']:<16}{r['shape']:>12}{r['provider']:>10}{r['ms']:>10.4f}"
              f"{r['ms_p20']:>9.4f}-{r['ms_p80']:<8.4f}{r['GB/s']:>9.0f}"
              f"{r['speedup_vs_torch']:>9.2f}x{r['rel_err_vs_torch']:>10.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows and metadata here")
    run(ap.parse_args(argv).json)
    return 0


if __name__ == "__main__":
    if torch.cuda.is_available():
        import os
        os.environ.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    sys.exit(main())
