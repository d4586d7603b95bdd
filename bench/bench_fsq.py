"""FSQ quantisation and its inverse (kernels/fsq.py) against the torch reference, on a CUDA GPU.

    python bench/bench_fsq.py [--json PATH]

Workloads (AToken-sod: levels (4, 4, 4, 4, 4, 4), 8 codebooks): N = 65536 and 1M tokens, the input
the bf16 view ``moments[:, :48]`` of a [N, 96] tensor (the Gaussian mean, as the model passes it).
Providers, same inputs, same outputs:

- ``torch``: ``reference.fsq_quantize`` (fp32 math over several kernels) and
  ``reference.fsq_indices_to_codes``;
- ``triton``: ``fsq_quantize`` (codes + indices in one kernel) and ``fsq_indices_to_codes``.

Bandwidth formulas (the bytes each op must move, the same for both providers so the numbers compare
time), s = 2 bytes (bf16):

- quantize: ``GB/s = (N*48*s in + N*48*s codes + N*8*4 indices) / t``;
- indices_to_codes: ``GB/s = (N*8*4 in + N*48*s out) / t``.

Ceiling on an H200: about 4.3 TB/s (ENGINEERING.md); target 75% of it. Timing:
``triton.testing.do_bench``, quantiles [0.5, 0.2, 0.8].

Without CUDA this prints one line and exits 0. ``run(json_path)`` is what
bench/device_check.py calls.
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

TOKENS = (65536, 1 << 20)
LEVELS, CODEBOOKS = (4, 4, 4, 4, 4, 4), 8
DTYPE = torch.bfloat16


def _bytes(op: str, n: int) -> int:
    s = torch.finfo(DTYPE).bits // 8
    ch = CODEBOOKS * len(LEVELS)
    if op == "quantize":
        return n * ch * s + n * ch * s + n * CODEBOOKS * 4
    return n * CODEBOOKS * 4 + n * ch * s


def setup(op: str, n: int):
    """One callable per provider, each returning a tuple of output tensors."""
    from atoken_rt import reference as ref
    from atoken_rt.kernels import fsq

    g = torch.Generator(device=DEVICE).manual_seed(0)
    ch = CODEBOOKS * len(LEVELS)
    moments = torch.randn(n, 2 * ch, device=DEVICE, generator=g).to(DTYPE)
    z = moments[:, :ch]
    if op == "quantize":
        return {"torch": lambda: ref.fsq_quantize(z, LEVELS, CODEBOOKS),
                "triton": lambda: fsq.fsq_quantize(z, LEVELS, CODEBOOKS)}
    _, idx = ref.fsq_quantize(z, LEVELS, CODEBOOKS)
    return {"torch": lambda: (ref.fsq_indices_to_codes(idx, LEVELS, DTYPE),),
            "triton": lambda: (fsq.fsq_indices_to_codes(idx, LEVELS, DTYPE),)}


def run(json_path: str | None = None) -> list[dict]:
    """Time every workload and provider; print a table; write JSON if asked. [] without CUDA."""
    if common.no_cuda("fsq"):
        return []
    meta = common.metadata()
    rows = common.JsonRows(json_path, "fsq", meta)  # on disk as they come
    for op in ("quantize", "indices_to_codes"):
        for n in TOKENS:
            fns = setup(op, n)
            want = fns["torch"]()
            # Outputs are exact: count mismatching elements (0 expected, bar exact ties).
            counts = common.measure(fns, lambda _, got: sum(int((a != b).sum())
                                                            for a, b in zip(got, want)))
            for provider, mismatches, ms, ms20, ms80, t_torch in counts:
                rows.append(common.bandwidth_row(
                    f"fsq_{op}", f"{n}x{CODEBOOKS * len(LEVELS)}", provider, _bytes(op, n), ms,
                    ms20, ms80, t_torch, ("mismatches_vs_torch", mismatches), meta))
            del fns, want
    _print(rows, meta)
    return list(rows)


def _print(rows, meta):
    common.print_header("fsq", meta,
                        "GB/s: quantize (N*48*2*2 + N*8*4) B / t, inverse (N*8*4 + N*48*2) B / t; "
                        "target >= 75% of 4.3 TB/s")
    print(f"{'op':<22}{'shape':>12}{'provider':>10}{common.ms_header()}{'GB/s':>9}"
          f"{'% peak':>8}{'vs torch':>10}{'mismatch':>10}")
    for r in rows:
        print(f"{r['op']:<22}{r['shape']:>12}{r['provider']:>10}{common.ms_columns(r)}"
              f"{r['GB/s']:>9.0f}{r['pct_of_4.3TB/s']:>7.0f}%{r['speedup_vs_torch']:>9.2f}x"
              f"{r['mismatches_vs_torch']:>10d}")


def main(argv=None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    common.script(main)
