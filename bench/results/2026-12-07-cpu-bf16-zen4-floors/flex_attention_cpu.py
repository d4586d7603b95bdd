"""torch.compile(flex_attention) on CPU (inductor C++ template) vs the CPU flash SDPA, bf16, 16 heads x 72,
one sequence, one torch thread, process CPU ms (median of 5), with each one's relative error against fp64."""
import torch, time, warnings, math
warnings.simplefilter("ignore")
torch.set_num_threads(1)
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
import torch._inductor.config as ic
def t(fn, n=5):
    fn()
    ts=[]
    for _ in range(n):
        a=time.process_time(); fn(); ts.append(time.process_time()-a)
    ts.sort(); return ts[len(ts)//2]*1e3
H,D=16,72
t0=time.perf_counter()
with ic.patch(compile_threads=1):
    fa=torch.compile(flex_attention, dynamic=False)
    for N in (256,1024,4096):
        g=torch.Generator().manual_seed(0)
        q,k,v=(torch.randn(1,H,N,D,generator=g).bfloat16() for _ in range(3))
        ex=F.scaled_dot_product_attention(q.double(),k.double(),v.double())
        try:
            o=fa(q,k,v)
            print('compiled in', round(time.perf_counter()-t0,1),'s')
            tf=t(lambda: fa(q,k,v))
            err=((o.double()-ex).norm()/ex.norm()).item()
        except Exception as e:
            print('flex failed', type(e).__name__, str(e)[:300]); tf=float('nan'); err=float('nan')
        ts=t(lambda: F.scaled_dot_product_attention(q,k,v))
        es=((F.scaled_dot_product_attention(q,k,v).double()-ex).norm()/ex.norm()).item()
        print(N, f'flex {tf:.2f} ms err {err:.2e} | sdpa flash {ts:.2f} ms err {es:.2e}', flush=True)
