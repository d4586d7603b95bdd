"""CUDA-graph capture and replay of the static (bucketed) towers.

One graph per (stage, bucket), all in ONE shared memory pool, captured largest bucket first so the
pool is sized once. A captured function reads only fixed-address buffers
(:class:`~atoken_rt.static.StaticBuffers`) and returns tensors in the pool; the caller copies the
real rows out before the next replay of any graph overwrites them.

Capture rules this code relies on (ENGINEERING.md, "CUDA-graph pitfalls"):
* kernels are compiled and autotuned in the eager warm-up runs, before capture;
* nothing inside reads a device value on the host (grids come from the bucket);
* every output row is written (padding rows zeroed by the kernels), so replays never expose
  stale memory.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class GraphCache:
    """Captured graphs keyed by (stage, bucket), sharing one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = None
        self.graphs: dict = {}
        self.capture_seconds = 0.0

    def __contains__(self, key) -> bool:
        return key in self.graphs

    def capture(self, key, fn: Callable[[], tuple], warmup_runs: int = 2):
        """Warm ``fn`` up on a side stream (JIT, autotune, allocator), then capture it."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": a capture (first call of a bucket, maybe on the async worker thread)
        # must not fail because another thread of the host application allocates or syncs on
        # its own streams meanwhile, which the default "global" mode turns into a capture error.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, out)
        self.capture_seconds += time.perf_counter() - t0
        return out

    def replay(self, key):
        graph, out = self.graphs[key]
        graph.replay()
        return out


__all__ = ["GraphCache"]
