"""What exact attention costs on this CPU, piece by piece: one head (head dim 72), one query block
against all keys, one torch thread, process CPU ms (means of 50 calls after 3 warm-up).

- scores in fp32 (bf16 q, k are exact in fp32): MKL ``torch.mm`` and oneDNN ``_linear_pointwise``;
- scores from bf16 x bf16 with a bf16 output (``torch.mm`` on bf16): fast, but it rounds every
  score to 8 bits, a rounding point the official code (flash-attn: fp32 scores) does not have;
- fp32 softmax of the block, its cast to bf16, and P V as a bf16 GEMM (fp32 accumulate).

Sum of the exact pieces x blocks x 16 heads = the attention floor of torch's kernels here.
"""
import time

import torch

torch.set_num_threads(1)
lp = torch.ops.mkldnn._linear_pointwise


def t(fn, n=50):
    for _ in range(3):
        fn()
    a = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - a) / n * 1e3


D, H = 72, 16
print("| query block x keys | scores fp32 MKL | scores fp32 oneDNN | scores bf16-out (not exact) "
      "| softmax fp32 | cast P | P V bf16 | exact per head-block | x blocks x 16 heads |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for B, N in ((256, 256), (256, 1024), (512, 4096)):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(r, D, generator=g).bfloat16() for r in (B, N, N))
    qf, kf = q.float(), k.float()
    f = 2 * B * N * D / 1e9
    s = torch.mm(qf, kf.t())
    p = torch.softmax(s, -1).bfloat16()
    r = {"mkl": t(lambda: torch.mm(qf, kf.t())),
         "onednn": t(lambda: lp(qf, kf, None, "none", [], "")),
         "bf16out": t(lambda: torch.mm(q, k.t())),
         "softmax": t(lambda: torch.softmax(s, -1)),
         "cast": t(lambda: s.to(torch.bfloat16)),
         "pv": t(lambda: torch.mm(p, v))}
    exact = min(r["mkl"], r["onednn"]) + r["softmax"] + r["cast"] + r["pv"]

    def g_(key):
        return f"{r[key]:.3f} ({f / r[key] * 1e3:.0f} GFLOP/s)"
    print(f"| {B} x {N} | {g_('mkl')} | {g_('onednn')} | {g_('bf16out')} | {r['softmax']:.3f} | "
          f"{r['cast']:.3f} | {g_('pv')} | {exact:.3f} | {exact * (N // B) * H:.1f} ms |")
