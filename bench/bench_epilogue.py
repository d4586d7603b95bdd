"""Linear + fused epilogue (kernels/epilogue.py): torch vs cuBLAS + one fused kernel vs a Triton
GEMM with the epilogue fused, on a CUDA GPU. Picks the faster impl per shape.

    python bench/bench_epilogue.py [--json PATH]

Workloads (bf16, one AToken-So block, M tokens = 256*64 = 16384 (64 images of 256x256) or 4096):

| layer  | K    | N    | epilogue          |
|--------|------|------|-------------------|
| fc1    | 1152 | 4304 | bias + GELU-tanh  |
| fc2    | 4304 | 1152 | bias + residual   |
| to_out | 1152 | 1152 | bias + residual   |

Providers (same inputs; each output checked against ``torch``'s):

- ``torch``: ``F.linear`` then ``reference.gelu_tanh`` (upcast, GELU, round) or ``residual + y``:
  what the torch backend runs;
- ``cublas``: ``impl="cublas"``: ``torch.addmm`` (bias in cuBLAS's epilogue) + one fused Triton
  element-wise kernel;
- ``mm_fp32out``: ``torch.mm(..., out_dtype=torch.float32)`` + the same element-wise kernel adding
  the bias to the fp32 product (skipped where this torch has no ``out_dtype``): the alternative
  exact-bias design, 2x the intermediate bytes;
- ``triton``: ``impl="triton"``: one Triton GEMM with bias + GELU / residual in its epilogue;
- ``linear_only``: ``F.linear`` alone, no epilogue: the GEMM floor the fused versions approach.

Throughput formula: ``TFLOP/s = 2 * M * N * K / t`` (the GEMM's multiply-adds; the epilogue's
element-wise work is not counted). Ceiling on an H200: about 790 TFLOP/s bf16 (ENGINEERING.md).
Timing: ``triton.testing.do_bench``, quantiles [0.5, 0.2, 0.8]. The table ends with the winner of
``cublas`` vs ``triton`` per shape (``Session(..., epilogue=...)`` selects either).

Without CUDA this prints one line and exits 0. bench/device_check.py calls ``run(json_path)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # bench/_common.py, also when device_check.py loads this file by path
    sys.path.insert(0, _BENCH)
import _common as common  # noqa: E402
from _common import DEVICE  # noqa: E402

TOKENS = (256 * 64, 4096)
LAYERS = (("fc1", 1152, 4304, "gelu"), ("fc2", 4304, 1152, "residual"),
          ("to_out", 1152, 1152, "residual"))
DTYPE = torch.bfloat16


def _has_mm_out_dtype() -> bool:
    try:
        a = torch.ones(16, 16, device=DEVICE, dtype=DTYPE)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:
        return False


def setup(m: int, k: int, n: int, op: str):
    """Inputs and one callable per provider (each returns the [M, N] output)."""
    from atoken_rt import reference as ref
    from atoken_rt.kernels import epilogue as epi

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, generator=g).to(DTYPE)
    w = (torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5).to(DTYPE)
    b = (0.1 * torch.randn(n, device=DEVICE, generator=g)).to(DTYPE)
    r = torch.randn(m, n, device=DEVICE, generator=g).to(DTYPE)
    gelu = op == "gelu"
    code = epi._GELU if gelu else epi._RESIDUAL
    out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)

    def torch_fn():
        y = F.linear(x, w, b)
        return ref.gelu_tanh(y) if gelu else r + y

    def fused(impl):
        if gelu:
            return lambda: epi.linear_bias_gelu(x, w, b, impl=impl)
        return lambda: epi.linear_bias_residual(x, w, b, r, impl=impl)

    def mm_fp32out():
        y32 = torch.mm(x, w.t(), out_dtype=torch.float32)
        return epi._launch_bias_epilogue(y32, b, None if gelu else r, out, code)

    fns = {"torch": torch_fn, "cublas": fused("cublas")}
    if _has_mm_out_dtype():
        fns["mm_fp32out"] = mm_fp32out
    fns["triton"] = fused("triton")
    fns["linear_only"] = lambda: F.linear(x, w, b)
    return fns


def run(json_path: str | None = None) -> list[dict]:
    """Time every workload and provider; print a table; write JSON if asked. [] without CUDA."""
    if common.no_cuda("epilogue"):
        return []
    meta = common.metadata()
    rows, winners = common.JsonRows(json_path, "epilogue", meta), []  # on disk as they come
    for layer, k, n, op in LAYERS:
        for m in TOKENS:
            fns = setup(m, k, n, op)
            want = fns["torch"]().float()
            times = {}
            errs = common.measure(fns, lambda provider, got: (
                None if provider == "linear_only"  # a different op: no epilogue
                else common.rel_err(got, want)))
            for provider, err, ms, ms20, ms80, t_torch in errs:
                times[provider] = ms
                rows.append({"layer": layer, "shape": f"M{m} K{k} N{n}", "provider": provider,
                             "ms": ms, "TFLOP/s": 2 * m * n * k / ms * 1e-9,
                             "speedup_vs_torch": t_torch / ms, "ms_p20": ms20,
                             "ms_p80": ms80, "rel_err_vs_torch": err, "epilogue": op,
                             "dtype": "bf16", **meta})
            best = min(("cublas", "triton"), key=times.__getitem__)
            other = "triton" if best == "cublas" else "cublas"
            winners.append(f"{layer:<7} M={m:<6} {best} wins: {times[other] / times[best]:.2f}x "
                           f"faster than {other}")
            rows.append({"layer": layer, "shape": f"M{m} K{k} N{n}", "provider": "winner",
                         "winner": best, "ratio": times[other] / times[best], **meta})
            del fns, want
    _print(rows, meta, winners)
    return list(rows)


def _fmt_err(err) -> str:
    return "-" if err is None else f"{err:.1e}"


def _print(rows, meta, winners):
    common.print_header("epilogue", meta, "TFLOP/s = 2*M*N*K / t")
    print(f"{'layer':<8}{'shape':>20}{'provider':>13}{common.ms_header(9)}{'TFLOP/s':>9}"
          f"{'vs torch':>10}{'rel err':>10}")
    for r in rows:
        if r["provider"] == "winner":
            continue
        print(f"{r['layer']:<8}{r['shape']:>20}{r['provider']:>13}{common.ms_columns(r, 9)}"
              f"{r['TFLOP/s']:>9.1f}{r['speedup_vs_torch']:>9.2f}x"
              f"{_fmt_err(r['rel_err_vs_torch']):>10}")
    print("cublas vs triton (keep the other selectable with Session(..., epilogue=...)):")
    for line in winners:
        print("  " + line)


def main(argv=None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    common.script(main)
