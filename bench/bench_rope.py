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

import sys
from pathlib import Path

import torch

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:  # bench/_common.py, also when device_check.py loads this file by path
    sys.path.insert(0, _BENCH)
import _common as common  # noqa: E402
from _common import DEVICE  # noqa: E402

TOKENS = (4096, 16384, 65536)
HEADS, HEAD_DIM = 16, 72
MODES = ("encoder", "decoder")
DTYPE = torch.bfloat16


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
    if common.no_cuda("rope"):
        return []
    meta = common.metadata()
    rows = common.JsonRows(json_path, "rope", meta)  # on disk as they come
    for mode in MODES:
        for n in TOKENS:
            fns = setup(mode, n)
            want = fns["torch"]()
            errs = common.measure(fns, lambda _, got: common.max_rel_err(got, want))
            for provider, err, ms, ms20, ms80, t_torch in errs:
                rows.append(common.bandwidth_row(
                    f"rope_qk {mode}", f"{n}x{HEADS}x{HEAD_DIM}", provider, _bytes(n), ms, ms20,
                    ms80, t_torch, ("rel_err_vs_torch", err), meta))
            del fns, want
    _print(rows, meta)
    return list(rows)


def _print(rows, meta):
    common.print_header("rope", meta,
                        "GB/s = (4*N*H*D*2 + 16*N) B / t; target >= 75% of 4.3 TB/s")
    print(f"{'op':<18}{'shape':>14}{'provider':>10}{common.ms_header()}{'GB/s':>9}"
          f"{'% peak':>8}{'vs torch':>10}{'rel err':>10}")
    for r in rows:
        print(f"{r['op']:<18}{r['shape']:>14}{r['provider']:>10}{common.ms_columns(r)}"
              f"{r['GB/s']:>9.0f}{r['pct_of_4.3TB/s']:>7.0f}%{r['speedup_vs_torch']:>9.2f}x"
              f"{r['rel_err_vs_torch']:>10.1e}")


def main(argv=None) -> int:
    return common.main(run, __doc__, argv)


if __name__ == "__main__":
    common.script(main)
