# attention variants: correctness (mode=check, launch-blocking) or timing (mode=time)
import os, sys, math, json, torch
sys.path.insert(0, os.getcwd())
from atoken_rt.kernels import attention as A
mode = sys.argv[1]
variants = [tuple(v.split(",")) for v in sys.argv[2:]]  # bm,bn,w,s,tail,split
dev = os.environ.get("DIAG_DEV", "cuda")
cuda = dev == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
def launch(q, k, v, out, cu, maxl, bm, bn, w, s, tail, split, packed):
    n, H, D = q.shape
    bd0, bd1 = A._split_head_dim(D) if split else (A.next_pow2(D), 0)
    ns = len(cu) - 1
    meta = dict(HEAD_DIM=D, BLOCK_D0=bd0, BLOCK_D1=max(bd1, 16), SPLIT_D=bd1 > 0, SOFTCAP=False,
                ALIGN=A._stride_align((q, k, v, out), q.element_size()),
                INPUT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
                PACKED_GRID=packed, SEQ_BLOCK=A.next_pow2(max(ns, 1)) if packed else 1, TAIL_MODE=tail)
    cd = lambda a, b: -(-a // b)
    grid = (cd(n, bm) + ns, 2, H) if packed else (cd(maxl, bm), ns + 1, H)
    args = (q, k, v, out, cu, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), n, n, ns, 1 / math.sqrt(D) * A._LOG2E, 1.0, A._bucket(maxl), A._bucket(maxl))
    kw = dict(BLOCK_M=bm, BLOCK_N=bn) if not cuda else dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    A._varlen_attention_kernel[grid](*args, **meta, **kw)
def make(lens, H, extra_cap=0):
    n = sum(lens); D = 72
    qkv = torch.randn(n + 7, 3, H, D, device=dev, dtype=dtype)
    cs = [0]
    for l in lens: cs.append(cs[-1] + l)
    cu = torch.tensor(cs + [n] * extra_cap, dtype=torch.int32, device=dev)
    return qkv[:n, 0], qkv[:n, 1], qkv[:n, 2], torch.empty(n, H, D, device=dev, dtype=dtype), cu, cs
def ref_err(q, k, v, out, cs):
    err = 0.0
    for i in range(len(cs) - 1):
        a, b = cs[i], cs[i + 1]
        qq, kk, vv = (t[a:b].float().transpose(0, 1) for t in (q, k, v))
        o = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ vv
        err = max(err, float((o.transpose(0, 1) - out[a:b].float()).abs().max()))
    return err
torch.manual_seed(0)
if mode == "check":
    shapes = [[256], [64, 64, 17], [1024], [300, 5, 1], [256] * 8, [4096], [129, 1, 200]] if cuda else [[64, 17], [5, 70]]
    for vv in variants:
        bm, bn, w, s, tail, split = (int(x) for x in vv)
        bad = 0
        for lens in shapes:
            for packed in (False, True):
                for extra in (0, 3):
                    q, k, v, out, cu, cs = make(lens, 2, extra)
                    maxl = max(lens) + (100 if extra else 0)
                    tag = f"{','.join(vv)} lens={lens[:3]} packed={packed} cap+{extra}"
                    try:
                        launch(q, k, v, out, cu, maxl, bm, bn, w, s, tail, split, packed)
                        if cuda: torch.cuda.synchronize()
                    except Exception as e:
                        print("FAULT", tag, str(e).splitlines()[0], flush=True); sys.exit(3)
                    e = ref_err(q, k, v, out, cs)
                    if not e < (3e-2 if cuda else 1e-4):
                        print("WRONG", tag, f"{e:.2e}", flush=True); bad += 1
        print("PASS" if not bad else "FAILED", ",".join(vv), flush=True)
else:
    import triton.testing as tt
    import torch.nn.functional as F
    H = 16
    cases = {"L256x64": [256] * 64, "L4096x4": [4096] * 4}
    res = {}
    for name, lens in cases.items():
        q, k, v, out, cu, cs = make(lens, H)
        flops = sum(4 * l * l * 72 * H for l in lens)
        # SDPA baseline on the padded-free equal-length batch [B, H, L, D]
        B, L = len(lens), lens[0]
        qb, kb, vb = (t.reshape(B, L, H, 72).transpose(1, 2) for t in (q, k, v))
        from torch.nn.attention import sdpa_kernel, SDPBackend
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    ms = tt.do_bench(lambda: F.scaled_dot_product_attention(qb, kb, vb), warmup=10, rep=40)
                res[f"{name} sdpa_{be.name}"] = (ms, flops / ms / 1e9)
            except Exception as e:
                res[f"{name} sdpa_{be.name}"] = (float("nan"), str(e)[:40])
        for vv in variants:
            bm, bn, w, s, tail, split = (int(x) for x in vv)
            for packed in (False, True):
                try:
                    f = lambda: launch(q, k, v, out, cu, L, bm, bn, w, s, tail, split, packed)
                    ms = tt.do_bench(f, warmup=10, rep=40)
                    res[f"{name} {','.join(vv)} {'packed' if packed else 'perseq'}"] = (ms, flops / ms / 1e9)
                except Exception as e:
                    res[f"{name} {','.join(vv)}"] = (float('nan'), str(e)[:60]); break
    for k_, (ms, tf) in res.items():
        print(f"{k_:50s} {ms:8.4f} ms  {tf if isinstance(tf, str) else f'{tf:7.1f} TFLOP/s'}", flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "attn_time.json"), "w"))
