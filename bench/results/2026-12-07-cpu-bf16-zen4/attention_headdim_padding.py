"""CPU flash SDPA on bf16, 16 heads, head dim 72 vs zero-padded to 80/96/128 (scale kept at
1/sqrt(72), output sliced back) and head dim 64 (speed reference only); process CPU ms per call.
Usage: python3 attention_headdim_padding.py THREADS 256,1024,4096"""
import sys, time, math, torch, numpy as np
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
Ls = [int(v) for v in sys.argv[2].split(",")]
for L in Ls:
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(1, 16, L, 72, generator=g).to(torch.bfloat16) for _ in range(3))
    def pad(t, d): return F.pad(t, (0, d - 72))
    fns = {"d72": lambda: F.scaled_dot_product_attention(q, k, v)}
    for d in (64, 80, 96, 128):
        if d == 64:
            q64, k64, v64 = q[..., :64].contiguous(), k[..., :64].contiguous(), v[..., :64].contiguous()
            fns["d64 (speed ref only)"] = lambda: F.scaled_dot_product_attention(q64, k64, v64)
        else:
            fns[f"pad {d} (incl. pad)"] = (lambda d=d: F.scaled_dot_product_attention(pad(q, d), pad(k, d), pad(v, d), scale=1 / math.sqrt(72))[..., :72])
    want = fns["d72"]()
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for f in fns.values(): f()
    R = max(1, 2000 // L)
    t = {kk: [] for kk in fns}
    for _ in range(5):
        for kk, f in fns.items():
            c = time.process_time()
            for _ in range(R): f()
            t[kk].append((time.process_time() - c) / R)
    for kk, f in fns.items():
        o = f()
        extra = "" if "d64" in kk else f" differs from d72: {(o != want).float().mean().item():.4f}, err vs fp64 {((o.double()-ref64).norm()/ref64.norm()).item():.2e}"
        print(f"L={L:5d} {kk:22s} {np.median(t[kk])*1e3:8.2f} ms cpu{extra}")
