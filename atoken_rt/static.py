"""Static, bucketed execution: fixed-shape plans that a CUDA graph can capture and replay.

A batch's :class:`~atoken_rt.packing.SequencePlan` is cut into groups of whole sequences, each
padded to a :class:`Bucket` (a token capacity and a sequence capacity). Every tensor the towers read
lives in a fixed-address :class:`StaticBuffers` of that bucket and is filled on the host side of
the boundary (``copy_``), outside any captured region:

* the input rows (sequence order) and zeros (or anything: padding never reaches a real row);
* ``cu_seqlens`` [S+1] int32 — sequences past the group's end have length 0;
* 4D RoPE positions [T, 4] int32;
* the learned 2D position embeddings per token [T, C] for each tower: tables are interpolated
  outside the graph and cached by grid shape (:class:`~atoken_rt.model.PositionTable`).

Nothing inside the forward reads a device value on the host: sizes come from the bucket.
On CPU the same static path runs eagerly (that is how the tests check it); on CUDA the session
captures it per bucket (:mod:`atoken_rt.graphs`).

Padding rows belong to no sequence: attention leaves them out of every softmax and writes them as
zeros, and all other ops are row-wise, so the values in padding rows (even NaN) change no output.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .packing import SequencePlan

_LOAD_IDS = itertools.count(1)  # StaticPlan.load_id: unique per StaticPlan for the process
DEFAULT_TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, order=True)
class Bucket:
    """Capacity of one static plan: ``tokens`` rows and ``seqs`` attention sequences."""

    tokens: int
    seqs: int


class BucketSet:
    """The token and sequence capacities a session plans (and captures) for."""

    def __init__(self, tokens=DEFAULT_TOKEN_BUCKETS, seqs=DEFAULT_SEQ_BUCKETS):
        self.tokens = tuple(sorted(int(t) for t in tokens))
        self.seqs = tuple(sorted(int(s) for s in seqs))
        if not self.tokens or not self.seqs or self.tokens[0] < 1 or self.seqs[0] < 1:
            raise ValueError("bucket sizes must be positive and non-empty")

    @property
    def largest(self) -> Bucket:
        return Bucket(self.tokens[-1], self.seqs[-1])

    def all(self) -> list[Bucket]:
        return [Bucket(t, s) for t in self.tokens for s in self.seqs]

    def choose(self, n_tokens: int, n_seqs: int) -> Bucket:
        """The smallest bucket holding ``n_tokens`` rows and ``n_seqs`` sequences."""
        t = next((t for t in self.tokens if t >= n_tokens), None)
        s = next((s for s in self.seqs if s >= n_seqs), None)
        if t is None or s is None:
            raise ValueError(f"{n_tokens} tokens / {n_seqs} sequences exceed the largest bucket "
                             f"({self.largest.tokens} tokens / {self.largest.seqs} sequences): "
                             "split the plan first")
        return Bucket(t, s)

    def split(self, seq_lens: np.ndarray) -> list[tuple[int, int]]:
        """Cut sequences into contiguous groups ``[lo, hi)`` that fit the largest bucket.

        Greedy in order (a long video streams through chunk by chunk). A single sequence longer
        than the largest token bucket is a ValueError naming both sizes.
        """
        big = self.largest
        groups, lo, tok = [], 0, 0
        for i, n in enumerate(np.asarray(seq_lens, dtype=np.int64).tolist()):
            if n > big.tokens:
                raise ValueError(f"a sequence of {n} tokens exceeds the largest token bucket "
                                 f"({big.tokens}); add a larger bucket")
            if tok + n > big.tokens or i - lo >= big.seqs:
                groups.append((lo, i))
                lo, tok = i, 0
            tok += n
        groups.append((lo, len(seq_lens)))
        return [g for g in groups if g[1] > g[0]]


class StaticBuffers:
    """Fixed-address device tensors of one bucket (allocated once, reused by every batch)."""

    def __init__(self, bucket: Bucket, device, dtype, widths: dict[str, int]):
        t, s = bucket.tokens, bucket.seqs
        self.bucket = bucket
        self.t = {
            "cu_seqlens": torch.zeros(s + 1, dtype=torch.int32, device=device),
            "positions": torch.zeros(t, 4, dtype=torch.int32, device=device),
            "sample_cu": torch.zeros(s + 1, dtype=torch.int32, device=device),
        }
        for name, width in widths.items():  # inputs and per-tower position embeddings
            self.t[name] = torch.zeros(t, width, dtype=dtype, device=device)
        # Which StaticPlan's layout each plan-derived buffer holds, by the plan's load_id (an
        # int, so the buffers keep no plan alive): a plan loaded again (the same geometry as the
        # last call, the common case in a stream) skips those copies.
        self.loaded: dict[str, int] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]


class StaticPlan:
    """Sequences ``[seq_lo, seq_hi)`` of a :class:`SequencePlan`, padded to ``bucket``.

    Offers the same interface the towers use on a SequencePlan (``tensor``, ``cached``,
    ``cu_seqlens``, ``max_seqlen``, ``position_embeddings``), over fixed shapes.
    """

    device_only = True  # ops must not read the host arrays inside a captured region

    def __init__(self, plan: SequencePlan, seq_lo: int, seq_hi: int, bucket: Bucket,
                 buffers: StaticBuffers | None = None):
        cu = plan.cu_seqlens
        self.parent, self.bucket, self.buffers = plan, bucket, buffers
        self.row_lo, self.row_hi = int(cu[seq_lo]), int(cu[seq_hi])
        self.num_tokens = self.row_hi - self.row_lo
        nseq = seq_hi - seq_lo
        if self.num_tokens > bucket.tokens or nseq > bucket.seqs:
            raise ValueError(f"{self.num_tokens} tokens / {nseq} sequences do not fit bucket "
                             f"{bucket}")
        local = cu[seq_lo:seq_hi + 1] - cu[seq_lo]
        self.cu_seqlens = np.concatenate(
            [local, np.full(bucket.seqs - nseq, local[-1], dtype=np.int64)])
        self.positions = np.zeros((bucket.tokens, 4), dtype=np.int32)
        self.positions[:self.num_tokens] = plan.positions[self.row_lo:self.row_hi]
        self.pe_rows = np.zeros(bucket.tokens, dtype=np.int64)
        self.pe_rows[:self.num_tokens] = plan.pe_rows[self.row_lo:self.row_hi]
        self.pe_shapes = plan.pe_shapes
        # When the group holds whole samples (the batch fits one bucket), the MAP head can run
        # inside the captured region too: sample row offsets, padded like cu_seqlens.
        self.whole_samples = seq_lo == 0 and seq_hi == plan.num_sequences
        offs = plan.sample_offsets
        self.sample_cu = np.concatenate([offs, np.full(bucket.seqs + 1 - len(offs), offs[-1])]) \
            if self.whole_samples and len(offs) <= bucket.seqs + 1 else None
        self._cache: dict = {}
        self._pe: dict = {}
        self.load_id = next(_LOAD_IDS)

    @property
    def max_seqlen(self) -> int:
        """The grid bound: the bucket's capacity (a host int that never depends on the data)."""
        return self.bucket.tokens

    @property
    def num_sequences(self) -> int:
        return self.bucket.seqs

    def tensor(self, name: str, device) -> torch.Tensor:
        if self.buffers is not None and name in self.buffers.t:
            return self.buffers[name]
        key = ("host", name, str(device))
        if key not in self._cache:
            dtype = torch.int32 if name in ("positions", "cu_seqlens") else torch.int64
            self._cache[key] = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(
                device=device, dtype=dtype)
        return self._cache[key]

    def reset_derived(self) -> None:
        """Forget derived device tensors (e.g. RoPE cos/sin): they must be recomputed from the
        buffers inside each run, so that a captured graph recomputes them on every replay."""
        self._cache = {k: v for k, v in self._cache.items() if k[0] == "host"}

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def position_embeddings(self, table) -> torch.Tensor:
        """The [T, C] buffer :meth:`load` filled for this PositionTable (fixed address)."""
        return self._pe[id(table)]

    def load(self, rows: torch.Tensor, input_name: str, tables: dict,
             full_pe: dict | None = None) -> None:
        """Copy this group's inputs into the bucket's buffers (outside any captured region).

        rows: [n, width] input rows in sequence order; tables: tower name -> PositionTable.
        full_pe: a dict shared by the groups of one run, holding each tower's whole-batch
        position embeddings once computed (so they are built at most once per run, and never
        when the buffers already hold this plan's rows).
        """
        b = self.buffers
        n = self.num_tokens
        full_pe = {} if full_pe is None else full_pe
        if b.loaded.get("layout") != self.load_id:
            b.loaded.pop("layout", None)  # a copy that fails half-way leaves nothing marked
            b["cu_seqlens"].copy_(torch.from_numpy(self.cu_seqlens.astype(np.int32)))
            if self.sample_cu is not None:
                b["sample_cu"].copy_(torch.from_numpy(self.sample_cu.astype(np.int32)))
            b["positions"].copy_(torch.from_numpy(self.positions))
            b.loaded["layout"] = self.load_id
        b[input_name][:n].copy_(rows)
        if b.loaded.get(input_name) != self.load_id:
            b[input_name][n:].zero_()  # padding rows: any value is harmless, zeros are tidy
            b.loaded[input_name] = self.load_id
        for name, table in tables.items():
            buf, key = b[f"pe_{name}"], f"pe_{name}"
            if b.loaded.get(key) != self.load_id:
                b.loaded.pop(key, None)
                if name not in full_pe:
                    full_pe[name] = table(self.parent)
                buf[:n].copy_(full_pe[name][self.row_lo:self.row_hi])
                buf[n:].zero_()
                b.loaded[key] = self.load_id
            self._pe[id(table)] = buf


__all__ = ["Bucket", "BucketSet", "StaticBuffers", "StaticPlan", "DEFAULT_TOKEN_BUCKETS",
           "DEFAULT_SEQ_BUCKETS"]
