"""4D RoPE (+ the decoder's QK-norm) of q and k (kernels/rope.py) against the torch reference.

    python bench/bench_rope.py [--json PATH]

Workloads (bf16, AToken heads H = 16, head dim D = 72): N = 4096, 16384 and 65536 tokens of a
[N, 3, H, D] QKV projection output, in two modes:

- ``encoder``: RoPE only;
- ``decoder``: QK-norm (``u / ||u|| * gamma * sqrt(D)``, rounded) then RoPE.

Providers, same inputs, same outputs (q and k rotated):

- ``torch``: what the torch backend runs per layer: ``reference.apply_rope`` (and
  ``reference.qk_l2_norm`` for the decoder) with cos/sin tables computed once outside the timing
  (they are shared by the 27 layers of a forward);
- ``triton``: ``rope_qk(qkv, positions, freqs[, q_gamma, k_gamma])``, one pass, cos/sin computed in
  the kernel.

Bandwidth formula (the bytes the op must move, the same for both providers so the numbers compare
time): ``GB/s = (2*N*H*D*s + N*4*4 + 2*N*H*D*s) / t``, s = 2 bytes (bf16): read q and k, read the
int32 positions, write q and k (the gammas, 2*H*D*s bytes, are left out). Ceiling on an H200: about
4.3 TB/s (ENGINEERING.md); target 75% of it. Timing: ``triton.testing.do_bench``, quantiles
[0.5, 0.2, 0.8].

Without CUDA this prints one line and exits 0. ``run(json_path)`` is what
bench/device_check.py calls.
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
TOKENS = (4096, 16384, 65536)
HEADS, HEAD_DIM = 16, 72
MODES = ("encoder", "decoder")
DTYPE = torch.bfloat16
DEVICE = "cuda"
QUANTILES = [0.5, 0.2, 0.8]
PEAK_GBS = 4300.0  # measured device-to-device copy on the H200 (ENGINEERING.md)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _bytes(n: int, h: int = HEADS, d: int = HEAD_DIM) -> int:
    s = torch.finfo(DTYPE).bits // 8
    return 2 * n * h * d * s + n * 4 * 4 + 2 * n * h * d * s


def setup(mode: str, n: int):
    """Inputs and one callable per provider, each returning (q, k) [N, H, D]."""
    from atoken_rt import reference as ref
    from atoken_rt.kernels import rope

    g = torch.Generator(device=DEVICE).manual_seed(0)
    h, d = HEADS, HEAD_DIM
    qkv = torch.randn(n, 3 * h * d, device=DEVICE, generator=g).to(DTYPE).view(n, 3, h, d)
    # Image-like positions: t in 0..3, x and y on a grid, z = 0.
    side = 64
    tok = torch.arange(n, device=DEVICE)
    pos = torch.stack([(tok // (side * side)) % 4, (tok // side) % side, tok % side,
                       torch.zeros_like(tok)], dim=1).to(torch.int32)
    freqs = ref.rope_frequencies(d).to(DEVICE)
    cos, sin = ref.rope_cos_sin(pos, d)
    gq = gk = None
    if mode == "decoder":
        gq = (1 + 0.1 * torch.randn(h, d, device=DEVICE, generator=g)).to(DTYPE)
        gk = (1 + 0.1 * torch.randn(h, d, device=DEVICE, generator=g)).to(DTYPE)

        def torch_fn():
            q = ref.apply_rope(ref.qk_l2_norm(qkv[:, 0], gq), cos, sin)
            k = ref.apply_rope(ref.qk_l2_norm(qkv[:, 1], gk), cos, sin)
            return q, k
    else:
        def torch_fn():
            qk = ref.apply_rope(qkv[:, :2], cos, sin)
            return qk[:, 0], qk[:, 1]

    def triton_fn():
        qk = rope.rope_qk(qkv, pos, freqs, q_gamma=gq, k_gamma=gk)
        return qk[:, 0], qk[:, 1]

    return {"torch": torch_fn, "triton": triton_fn}


def run(json_path: str | None = None) -> list[dict]:
    """Time every workload and provider; print a table; write JSON if asked. [] without CUDA."""
    if not torch.cuda.is_available():
        print("bench_rope: no CUDA GPU here; nothing measured (run it on the GPU machine).")
        return []
    import triton
    from triton.testing import do_bench

    meta = {"gpu": torch.cuda.get_device_name(), "commit": _commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    for mode in MODES:
        for n in TOKENS:
            fns = setup(mode, n)
            want = fns["torch"]()
            t_torch = None
            for provider, fn in fns.items():
                got = fn()
                err = max(float((a.float() - b.float()).norm() / b.float().norm())
                          for a, b in zip(got, want))
                ms, ms20, ms80 = do_bench(fn, quantiles=QUANTILES)
                t_torch = ms if provider == "torch" else t_torch
                gbs = _bytes(n) / ms * 1e-6
                rows.append({"op": f"rope_qk {mode}", "shape": f"{n}x{HEADS}x{HEAD_DIM}",
                             "provider": provider, "ms": ms, "GB/s": gbs,
                             "speedup_vs_torch": t_torch / ms,
                             "pct_of_4.3TB/s": 100 * gbs / PEAK_GBS, "ms_p20": ms20,
                             "ms_p80": ms80, "rel_err_vs_torch": err,
                             "dtype": "bf16", **meta})
            del fns, want
    _print(rows, meta, triton.__version__)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"bench": "rope", **meta, "torch": torch.__version__,
                                               "triton": triton.__version__, "rows": rows},
                                              indent=1))
    return rows


def _print(rows, meta, triton_version):
    print(f"bench_rope: {meta['gpu']}, commit {meta['commit']}, triton {triton_version}; "
          "GB/s = (4*N*H*D*2 + 16*N) B / t; target >= 75% of 4.3 TB/s")
    print(f"{'op':<18}{'shape':>14}{'provider':>10}{'ms p50':>10}{'p20-p80':>18}{'GB/s':>9}"
          f"{'% peak':>8}{'vs torch':>10}{'rel err':>10}")
    for r in rows:
        print(f"{r['op']:<18}{r['shape']:>14}{r['provider']:>10}{r['ms']:>10.4f}"
              f"{r['ms_p20']:>9.4f}-{r['ms_p80']:<8.4f}{r['GB/s']:>9.0f}"
              f"{r['pct_of_4.3TB/s']:>7.0f}%{r['speedup_vs_torch']:>9.2f}x"
              f"{r['rel_err_vs_torch']:>10.1e}")


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
