"""Host-side planning of a packed batch: tokens -> (sample, temporal chunk) sequences.

The official model splits the batch into 4-latent-frame windows and runs each window through the
encoder/decoder separately (spec §2). Chunks never exchange information, so we run **every chunk of
every sample as one sequence of a single variable-length pass**. The plan holds, all computed with
vectorised numpy on the host (no per-token Python work):

* the permutation from packed (input) row order to sequence order, or None when it is the
  identity (always the case for images and videos, whose raster order has t slowest);
* ``cu_seqlens`` of the sequences, one per (sample, chunk), in sample-then-chunk order;
* per-token positions (t re-based inside its chunk, x, y, z) for the 4D RoPE;
* per-sequence grid sizes (max x + 1, max y + 1) for the learned 2D position table, and the row
  of that table each token reads.

Chunking follows the reference: chunk k of a sample holds its tokens with
``m + 4k <= t < m + 4k + 4``, where m is the sample's smallest t, and t is re-based to ``t - m - 4k``.
The reference takes m over the whole batch; we take it per sample, which is identical for images and
videos (their m is 0) and makes a 3D asset's tokens independent of what it is batched with (equal
to the official ``inference_3d``, which encodes 3D alone). See README "Numerics".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

MAX_COORD = 4096  # the reference hashes 12 bits per coordinate (spec §2.4)


@dataclass
class SequencePlan:
    """The sequence layout of one packed batch (host arrays; device copies cached by device).

    num_tokens: N. sample_offsets: [B+1] packed row offsets of each sample.
    order: [N] packed row of each sequence-order row, or None for the identity.
    inverse: [N] sequence-order row of each packed row, or None.
    cu_seqlens: [S+1] int64. seq_sample: [S] sample of each sequence.
    seq_grid: [S, 2] (rows, cols) extent used for the position table.
    positions: [N, 4] int32 (t re-based, x, y, z), sequence order.
    pe_shapes: distinct (rows, cols) grids; pe_rows: [N] row into the concatenation of the tables
    interpolated to pe_shapes (in that order), sequence order.
    """

    num_tokens: int
    sample_offsets: np.ndarray
    order: np.ndarray | None
    inverse: np.ndarray | None
    cu_seqlens: np.ndarray
    seq_sample: np.ndarray
    seq_grid: np.ndarray
    positions: np.ndarray
    pe_shapes: list[tuple[int, int]]
    pe_rows: np.ndarray
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def max_seqlen(self) -> int:
        return int(np.diff(self.cu_seqlens).max()) if self.num_sequences else 0

    @property
    def num_samples(self) -> int:
        return len(self.sample_offsets) - 1

    def tensor(self, name: str, device: torch.device) -> torch.Tensor:
        """A device copy of a host array (``order``, ``inverse``, ``positions``, ``pe_rows``,
        ``cu_seqlens``), cached per device."""
        key = (name, str(device))
        if key not in self._device_cache:
            arr = getattr(self, name)
            dtype = torch.int32 if name in ("positions", "cu_seqlens") else torch.int64
            self._device_cache[key] = torch.from_numpy(np.array(arr)).to(  # (a writable copy)
                device=device, dtype=dtype)
        return self._device_cache[key]

    def position_embeddings(self, table) -> torch.Tensor:
        """Per-token learned 2D position embeddings [N, C] from a PositionTable (sequence order)."""
        return table(self)

    def cached(self, key, build):
        """Memoise a derived device tensor (e.g. RoPE cos/sin for one head dim) on the plan."""
        if key not in self._device_cache:
            self._device_cache[key] = build()
        return self._device_cache[key]


def build_plan(coords: Sequence[np.ndarray], chunk: int = 4) -> SequencePlan:
    """Plan a batch from per-sample coords ``[n_i, 4]`` int (t, x, y, z) in packed row order."""
    counts = np.array([len(c) for c in coords], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    if n == 0:
        raise ValueError("the batch has no tokens")
    allc = np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1, 4) for c in coords])
    sample = np.repeat(np.arange(len(coords), dtype=np.int64), counts)
    t = allc[:, 0]
    nonempty = counts > 0
    tmin = np.zeros(len(coords), dtype=np.int64)
    tmin[nonempty] = np.minimum.reduceat(t, offsets[:-1][nonempty])
    rel = t - tmin[sample]
    chunk_id = rel // chunk
    key = sample * (int(chunk_id.max()) + 1) + chunk_id
    if np.all(key[1:] >= key[:-1]):
        order = None
        skey = key
    else:
        order = np.argsort(key, kind="stable")
        skey = key[order]
    starts = np.concatenate([[0], np.nonzero(skey[1:] != skey[:-1])[0] + 1])
    cu = np.concatenate([starts, [n]]).astype(np.int64)

    def seq(a):
        return a if order is None else a[order]

    pos = np.stack([seq(rel % chunk), seq(allc[:, 1]), seq(allc[:, 2]), seq(allc[:, 3])], axis=1)
    rows = np.maximum.reduceat(pos[:, 1], starts) + 1
    cols = np.maximum.reduceat(pos[:, 2], starts) + 1
    grid = np.stack([rows, cols], axis=1)
    shapes, shape_id = np.unique(grid, axis=0, return_inverse=True)
    shape_id = shape_id.reshape(-1)
    sizes = shapes[:, 0] * shapes[:, 1]
    table_off = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    seq_of_token = np.repeat(np.arange(len(starts)), np.diff(cu))
    tok_shape = shape_id[seq_of_token]
    pe_rows = table_off[tok_shape] + pos[:, 1] * shapes[tok_shape, 1] + pos[:, 2]
    inverse = None
    if order is not None:
        inverse = np.empty_like(order)
        inverse[order] = np.arange(n)
    arrays = dict(sample_offsets=offsets, order=order, inverse=inverse, cu_seqlens=cu,
                  seq_sample=seq(sample)[starts], seq_grid=grid, positions=pos.astype(np.int32),
                  pe_rows=pe_rows.astype(np.int64))
    for a in arrays.values():  # plans are cached and shared by results: nobody may edit them
        if a is not None:
            a.flags.writeable = False
    return SequencePlan(num_tokens=n, pe_shapes=[(int(a), int(b)) for a, b in shapes],
                        **arrays)


def check_token_coords(coords: np.ndarray, index: int) -> None:
    """Validate user-given token coords [n, 4] (t, x, y, z) for decoding."""
    where = f"sample {index}"
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"{where}: coords must have shape [n, 4] (t, x, y, z), "
                         f"got {tuple(coords.shape)}")
    if len(coords) == 0:
        raise ValueError(f"{where}: no tokens")
    if (coords < 0).any() or (coords >= MAX_COORD).any():
        raise ValueError(f"{where}: coords must lie in [0, {MAX_COORD})")
    key = ((coords[:, 0] * MAX_COORD + coords[:, 1]) * MAX_COORD + coords[:, 2]) * MAX_COORD \
        + coords[:, 3]
    if len(np.unique(key)) != len(key):
        raise ValueError(f"{where}: duplicated token coordinates")


__all__ = ["SequencePlan", "build_plan", "check_token_coords", "MAX_COORD"]
