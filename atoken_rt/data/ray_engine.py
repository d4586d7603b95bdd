"""The Ray engine: shards as a Ray Dataset, tokenised by a pool of actors, one Session each.

    shards (one row each: number, item range, its items)      ray.data.from_items
      -> map_batches(ShardWorker, batch_size=1,                one Session per actor, built once
                     compute=ActorPoolStrategy(min_size=1, max_size=workers),
                     num_gpus=gpus_per_worker, num_cpus=cpus_per_worker)
      -> each call runs the shard pipeline (reader threads, token-budget batches, the Session)
         and commits the shard file into the output folder itself (temporary name + rename),
         returning its manifest entry
      -> the driver streams the entries and rewrites manifest.json as shards land.

A shard is the unit of work, so the commit protocol of :mod:`atoken_rt.data.shards` holds
across machines: a shard is written whole by one actor or not at all; a crashed actor's shard is
retried by Ray (or redone by the next run), never half-kept. The output folder must be on a
filesystem every node sees (NFS, Lustre, a FUSE mount of object storage with atomic rename).

Ray is an optional extra (``pip install "atoken_rt[ray]"``); ``tokenize(engine="ray")``
connects to ``ray_address`` (``"auto"``: the running cluster) or starts a local Ray.
"""

from __future__ import annotations

import json
import pickle
from typing import Callable, Sequence

from .pipeline import ShardSpec


class _Offset:
    """items[lo:hi] addressed by global position (what the pipeline indexes by)."""

    def __init__(self, lo: int, items):
        self.lo, self.items = lo, items

    def __getitem__(self, pos: int):
        return self.items[pos - self.lo]

    def __len__(self) -> int:
        return self.lo + len(self.items)


class ShardWorker:
    """Ray Data callable class: builds one Session per actor, tokenises one shard per row."""

    def __init__(self, job):
        self.job = job
        self.sess = job.session()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        entries, stats = [], []
        for k, lo, hi, blob in zip(batch["k"], batch["lo"], batch["hi"], batch["items"]):
            k, lo, hi = int(k), int(lo), int(hi)
            done: list = []
            pipe = self.job.pipeline(self.sess, _Offset(lo, pickle.loads(blob)),
                                     on_shard=done.append)
            st = pipe.run([ShardSpec(k, lo, hi)])
            entries.append(json.dumps(done[0]))
            stats.append(json.dumps({"items": st.items, "samples": st.samples,
                                     "tokens": st.tokens, "failures": st.failures,
                                     "encode_seconds": st.encode_seconds}))
        return {"entry": np.array(entries, dtype=object), "stats": np.array(stats, dtype=object)}


def run_ray(items: Sequence, pending: Sequence[ShardSpec], job, workers: int,
            gpus_per_worker: float | None, cpus_per_worker: float | None,
            ray_address: str | None, on_shard: Callable[[dict], None], bar) -> dict:
    """Tokenise ``pending`` shards on Ray; returns this run's totals."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("engine 'ray' needs Ray Data: pip install 'atoken_rt[ray]' "
                         "(ray[data])") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
        started = True
    totals = {"items": 0, "samples": 0, "tokens": 0, "failures": 0, "encode_seconds": 0.0}
    try:
        gpus = float(gpus_per_worker or 0)
        cpus = float(cpus_per_worker or (job.readers if gpus else 1))
        rows = [{"k": s.k, "lo": s.lo, "hi": s.hi,
                 "items": pickle.dumps(list(items[s.lo:s.hi]))} for s in pending]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        kw = {"num_gpus": gpus} if gpus else {}
        ds = ds.map_batches(ShardWorker, fn_constructor_kwargs={"job": job}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                            num_cpus=cpus, **kw)
        for row in ds.iter_rows():
            entry = json.loads(row["entry"])
            on_shard(entry)
            st = json.loads(row["stats"])
            for key in totals:
                totals[key] += st[key]
            bar.update(entry["items"][1] - entry["items"][0])
    finally:
        if started:
            ray.shutdown()
    return totals


__all__ = ["run_ray", "ShardWorker"]
