"""The shard pipeline: readers -> bounded queue -> token-budget batches -> Session -> writer.

One process, four kinds of work (the local engine runs it over every pending shard; each Ray
actor runs it over the shards it is given):

* reader threads take chunks of consecutive items in order and push records
  (:mod:`atoken_rt.data.readers`) into one bounded queue (``prefetch`` records: decoding never
  runs more than that ahead of the device, and memory stays bounded). Pillow and PyAV release the
  GIL while decoding and resizing, so threads scale over cores;
* the calling thread keeps a window of decoded samples, sorts it by size and cuts it into
  batches of at most ``max_tokens`` tokens and ``max_seqs`` attention sequences (so that a
  static session's buckets fill up), and encodes them; when the queue runs dry it encodes what
  it has rather than wait (the device never waits for a full window);
* a writer thread turns each finished shard (every item read, every sample encoded) into a
  Parquet file, committed by rename (:mod:`atoken_rt.data.shards`).

Rows in a shard are sorted by (item, clip), so a shard's content does not depend on how its
samples were batched, and with ``Session(deterministic=True)`` neither do its tokens.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..session import InputWarning
from .readers import Failure, ItemDone, Preprocess, Sample, chunk_items, read_chunk
from .shards import SHARD_FORMAT, rows_to_table, write_shard

_END = object()


@dataclass
class ShardSpec:
    """Shard k holds items [lo, hi)."""

    k: int
    lo: int
    hi: int


@dataclass
class _ShardState:
    items_left: int
    outstanding: int = 0
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)


@dataclass
class Stats:
    samples: int = 0
    tokens: int = 0
    failures: int = 0
    items: int = 0
    batches: int = 0
    encode_seconds: float = 0.0
    shards: int = 0


class ShardPipeline:
    """Tokenise shards of ``items`` with ``session`` into ``out`` (see the module docstring).

    schema: the Arrow row schema; fingerprint: the run's fingerprint hash (stored in each shard);
    on_shard(entry): called from the writer thread after each shard is committed, with its
    manifest entry (shard, items, rows, tokens, failures, file, sha256, bytes).
    """

    def __init__(self, session, items: Sequence, prep: Preprocess, out: Path, schema,
                 fingerprint: str, *, shard_size: int, max_tokens: int = 16384,
                 max_seqs: int | None = None, readers: int = 4, prefetch: int = 256,
                 window_tokens: int | None = None, latent_dtype: str = "fp32",
                 on_shard: Callable[[dict], None] | None = None,
                 progress: Callable[[int, int, int], None] | None = None):
        self.sess, self.items, self.prep, self.out = session, items, prep, Path(out)
        self.schema, self.fingerprint = schema, fingerprint
        self.shard_size = shard_size
        self.max_tokens = int(max_tokens)
        self.max_seqs = int(max_seqs or session.buckets.largest.seqs)
        self.readers = max(1, int(readers))
        self.prefetch = max(1, int(prefetch))
        self.window_tokens = int(window_tokens or 4 * self.max_tokens)
        self.latent_dtype = latent_dtype
        self.on_shard = on_shard
        self.progress = progress
        self.stats = Stats()
        self._states: dict[int, _ShardState] = {}
        self._specs: dict[int, ShardSpec] = {}

    # -- readers ---------------------------------------------------------------------------------

    def _reader(self, chunks, next_chunk, lock, q, stop):
        try:
            while not stop.is_set():
                with lock:
                    i = next_chunk[0]
                    next_chunk[0] += 1
                if i >= len(chunks):
                    break
                for rec in read_chunk(chunks[i], self.prep):
                    self._put(q, rec, stop)
                    if stop.is_set():
                        return
        except BaseException as exc:  # a bug in a reader: stop the run, report it
            self._put(q, ("error", exc), stop)
        finally:
            self._put(q, _END, stop)

    @staticmethod
    def _put(q, rec, stop) -> None:
        while not stop.is_set():
            try:
                q.put(rec, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- writer ----------------------------------------------------------------------------------

    def _writer(self, wq, errors):
        while True:
            job = wq.get()
            if job is None:
                return
            if errors:
                continue  # drain after a failure
            try:
                self._write(*job)
            except BaseException as exc:
                errors.append(exc)

    def _write(self, spec: ShardSpec, st: _ShardState):
        rows = sorted(st.rows, key=lambda r: (r["_pos"], r["clip"]))
        failures = sorted(st.failures, key=lambda f: (f["_pos"], f["clip"]))
        fails = [{k: v for k, v in f.items() if k != "_pos"} for f in failures]
        meta = {"format": SHARD_FORMAT, "shard": spec.k, "items": [spec.lo, spec.hi],
                "fingerprint": self.fingerprint, "rows": len(rows),
                "tokens": int(sum(r["num_tokens"] for r in rows)), "failures": fails}
        entry = write_shard(self.out, spec.k, rows_to_table(rows, self.schema, meta))
        entry.update({"shard": spec.k, "items": [spec.lo, spec.hi], "rows": len(rows),
                      "tokens": meta["tokens"], "failures": len(fails)})
        if self.on_shard is not None:
            self.on_shard(entry)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _state(self, pos: int) -> tuple[ShardSpec, _ShardState]:
        k = pos // self.shard_size
        return self._specs[k], self._states[k]

    def _maybe_finish(self, pos: int, wq) -> None:
        spec, st = self._state(pos)
        if st.items_left == 0 and st.outstanding == 0:
            del self._states[spec.k]
            wq.put((spec, st))
            self.stats.shards += 1

    def _fail(self, pos: int, clip: int, key: str, source: str, error: str, wq=None) -> None:
        spec, st = self._state(pos)
        st.failures.append({"_pos": pos, "key": key, "source": source, "clip": int(clip),
                            "error": error})
        self.stats.failures += 1

    # -- encoding --------------------------------------------------------------------------------

    def _batches(self, window: list[Sample], flush: bool):
        """Cut a window into batches (largest samples first); returns (batches, leftover)."""
        window = sorted(window, key=lambda s: (-s.tokens, s.pos, s.clip))
        batches, cur, tok, seqs = [], [], 0, 0
        for s in window:
            if cur and (tok + s.tokens > self.max_tokens or seqs + s.seqs > self.max_seqs):
                batches.append(cur)
                cur, tok, seqs = [], 0, 0
            cur.append(s)
            tok += s.tokens
            seqs += s.seqs
        if cur:
            if flush:
                batches.append(cur)
                cur = []
        return batches, cur

    def _encode(self, batch: list[Sample], wq) -> None:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # crops and dropped frames are in every row
                warnings.simplefilter("ignore", InputWarning)
                enc = self.sess.encode([s.data for s in batch])
        except (ValueError, TypeError) as exc:
            if len(batch) == 1:
                s = batch[0]
                name = f"{s.item.source}:{s.item.key}" if s.item.kind != "file" else s.item.source
                clip = f" clip {s.clip}" if s.kind == "video" else ""
                self._fail(s.pos, s.clip if s.kind == "video" else -1, s.item.key,
                           s.item.source, f"{name}{clip}: {exc}")
                self._done_sample(s, wq)
                return
            for s in batch:  # find the sample(s) the checks reject; the others still go
                self._encode([s], wq)
            return
        self.stats.encode_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        enc = enc.cpu()
        for j, s in enumerate(batch):
            row = self._row(s, enc, j)
            self._state(s.pos)[1].rows.append(row)
            self.stats.samples += 1
            self.stats.tokens += row["num_tokens"]
            self._done_sample(s, wq)

    def _done_sample(self, s: Sample, wq) -> None:
        self._state(s.pos)[1].outstanding -= 1
        self._maybe_finish(s.pos, wq)

    def _row(self, s: Sample, enc, j: int) -> dict:
        info = enc.info[j]
        coords = np.ascontiguousarray(enc.coords_host[j], dtype=np.int32)
        row = {"_pos": s.pos, "key": s.item.key, "source": s.item.source,
               "source_index": int(s.item.index), "kind": s.kind, "clip": int(s.clip),
               "frame_start": int(s.meta["frame_start"]), "fps": s.meta["fps"],
               "original_shape": [int(v) for v in s.meta["original_shape"]],
               "resized_shape": s.meta["resized_shape"],
               "used_shape": [int(v) for v in info.used_shape],
               "frames_used": int(info.frames_used), "frames_dropped": int(info.frames_dropped),
               "frames_padded": int(info.frames_padded), "num_tokens": int(len(coords)),
               "coords": coords,
               "embedding": enc.embedding[j].float().numpy()}
        if s.meta["crop"] is not None:
            top, left, _, _ = s.meta["crop"]
            mt, ml = info.crop_offset
            row["crop"] = [int(top + mt), int(left + ml), int(info.used_shape[-3]),
                           int(info.used_shape[-2])]
        else:
            row["crop"] = None
        if enc.indices[j] is not None:
            row["indices"] = enc.indices[j].to(torch.int32).numpy()
        else:
            lat = enc.latents[j]
            if self.latent_dtype == "bf16":
                row["latents"] = lat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            elif self.latent_dtype == "fp16":
                row["latents"] = lat.to(torch.float16).numpy()
            else:
                row["latents"] = lat.float().numpy()
        return row

    # -- the run ---------------------------------------------------------------------------------

    def run(self, shards: Sequence[ShardSpec]) -> Stats:
        """Tokenise ``shards`` (each written and committed as soon as it is complete)."""
        if not shards:
            return self.stats
        for spec in shards:
            self._specs[spec.k] = spec
            self._states[spec.k] = _ShardState(items_left=spec.hi - spec.lo)
        chunks = [c for spec in shards for c in chunk_items(self.items, spec.lo, spec.hi)]
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        wq: queue.Queue = queue.Queue()
        stop = threading.Event()
        next_chunk, lock = [0], threading.Lock()
        n_readers = min(self.readers, len(chunks))
        readers = [threading.Thread(target=self._reader, args=(chunks, next_chunk, lock, q, stop),
                                    name=f"atoken_rt-reader-{i}", daemon=True)
                   for i in range(n_readers)]
        errors: list = []
        writer = threading.Thread(target=self._writer, args=(wq, errors), name="atoken_rt-writer",
                                  daemon=True)
        writer.start()
        for t in readers:
            t.start()
        ended = 0
        window: list[Sample] = []
        wtokens = 0
        try:
            while ended < n_readers:
                if errors:
                    raise errors[0]
                try:
                    rec = q.get(timeout=0.02)
                except queue.Empty:
                    rec = None
                if rec is _END:
                    ended += 1
                    continue
                if rec is None:  # nothing ready: encode what there is rather than wait
                    if window:
                        for b in self._batches(window, flush=True)[0]:
                            self._encode(b, wq)
                        window, wtokens = [], 0
                    continue
                if isinstance(rec, tuple) and rec and rec[0] == "error":
                    raise rec[1]
                if isinstance(rec, Sample):
                    self._state(rec.pos)[1].outstanding += 1
                    window.append(rec)
                    wtokens += rec.tokens
                    if wtokens >= self.window_tokens:
                        batches, window = self._batches(window, flush=False)
                        wtokens = sum(s.tokens for s in window)
                        for b in batches:
                            self._encode(b, wq)
                elif isinstance(rec, Failure):
                    self._fail(rec.pos, rec.clip, rec.key, rec.source, rec.error)
                elif isinstance(rec, ItemDone):
                    self._state(rec.pos)[1].items_left -= 1
                    self.stats.items += 1
                    if self.progress is not None:
                        self.progress(1, self.stats.samples, self.stats.tokens)
                    self._maybe_finish(rec.pos, wq)
            for b in self._batches(window, flush=True)[0]:
                self._encode(b, wq)
            if self._states:  # every item ended, so every shard must have been handed over
                raise RuntimeError(f"internal error: shards {sorted(self._states)} never "
                                   "completed")
        finally:
            stop.set()
            for t in readers:
                t.join(timeout=5)
            wq.put(None)
            writer.join()  # finished shards are complete: let them commit, even on Ctrl-C
        if errors:
            raise errors[0]
        return self.stats


__all__ = ["ShardPipeline", "ShardSpec", "Stats"]
