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

import sys
from pathlib import Path

import torch

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # bench/_common.py, also when device_check.py loads this file by path
    sys.path.insert(0, _BENCH)
import _common as common  # noqa: E402
from _common import DEVICE  # noqa: E402

TOKENS = (256 * 64, 4096)
CASES = (("layer", 1152), ("rms", 1152), ("layer", 768))  # (norm, width)
DTYPE = torch.bfloat16


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
    if common.no_cuda("norms"):
        return []
    meta = common.metadata()
    rows = common.JsonRows(json_path, "norms", meta)  # on disk as they come
    for kind, c in CASES:
        for n in TOKENS:
            fns = setup(kind, n, c)
            want = fns["torch"]()
            # same rounding points as the reference: agreement at the bf16-ulp level
            errs = common.measure(fns, lambda _, got: common.max_rel_err(got, want))
            for provider, err, ms, ms20, ms80, t_torch in errs:
                rows.append(common.bandwidth_row(
                    f"add_{kind}_norm", f"{n}x{c}", provider, _bytes(n, c, kind), ms, ms20, ms80,
                    t_torch, ("rel_err_vs_torch", err), meta))
            del fns, want
    _print(rows, meta)
    return list(rows)


def _print(rows, meta):
    common.print_header("norms", meta, "GB/s = (4*N*C + P*C) * 2 B / t")
    print(f"{'op':<16}{'shape':>12}{'provider':>10}{common.ms_header()}{'GB/s':>9}"
          f"{'vs torch':>10}{'rel err':>10}")
    for r in rows:
        print(f"{r['op']:<16}{r['shape']:>12}{r['provider']:>10}{common.ms_columns(r)}"
              f"{r['GB/s']:>9.0f}{r['speedup_vs_torch']:>9.2f}x{r['rel_err_vs_torch']:>10.1e}")


def main(argv=None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    common.script(main)
