"""Inductor's CPU GEMM template (max-autotune, CPP backend, frozen weights) vs prepacked oneDNN
for the model's bf16 Linear shapes, one thread, process CPU ms."""
import time, sys, warnings, torch, torch.nn.functional as F
warnings.simplefilter("ignore")
torch.set_num_threads(1)
import torch._inductor.config as ic
def t(fn, n=20):
    for _ in range(3): fn()
    a=time.process_time()
    for _ in range(n): fn()
    return (time.process_time()-a)/n*1e3
shapes=[(1152,4304),(4304,1152),(1152,3456),(1152,1152)]
rows=[int(r) for r in sys.argv[1:]] or [256,1024]
for n in rows:
  for k,m in shapes:
    lin=torch.nn.Linear(k,m).bfloat16().eval()
    x=torch.randn(n,k).bfloat16()
    with torch.no_grad():
        packed=torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)
        ref=torch.ops.mkldnn._linear_pointwise(x, packed, lin.bias, "none", [], "")
        torch._dynamo.reset()
        t0=time.perf_counter()
        with ic.patch(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", freezing=True, compile_threads=1):
            c=torch.compile(lin, dynamic=False)
            got=c(x)
        ct=time.perf_counter()-t0
        fl=2*n*k*m/1e9
        a=t(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, lin.bias, "none", [], ""))
        b=t(lambda: c(x))
        pl=t(lambda: F.linear(x, lin.weight, lin.bias))
    print(f"rows {n} [{k}->{m}] oneDNN prepacked {a:.2f} ms ({fl/a*1e3:.0f} GFLOP/s) | inductor max-autotune {b:.2f} ms ({fl/b*1e3:.0f}) | F.linear {pl:.2f} ms | compile {ct:.0f} s | equal {torch.equal(got,ref)} frac-diff {(got!=ref).float().mean().item():.4f}", flush=True)
