"""Caller-owned encode outputs: ``Session.encode(batch, out=EncodeBuffers(...))``.

A real-time loop that encodes the same geometry again and again (a camera's chunks) can own its
output tensors: allocated once, written by every call, never reallocated.

    buf = atoken_rt.EncodeBuffers.for_shapes(sess, [(16, 256, 256, 3)])
    while True:
        enc = sess.encode([next_chunk()], out=buf)   # enc.latents[0] is a view of buf.latents
        consume(enc)                                 # before the next encode(out=buf)

Aliasing, precisely:

* ``encode(..., out=buf)``: every per-token result (``coords``, ``latents``, ``indices``,
  ``moments``, ``features``, and their ``.packed``) and ``embedding`` are views of ``buf``'s
  tensors (their first N rows / B samples). They stay valid until the next encode that writes
  ``buf``; on CUDA the writes are ordered on the stream of the call, so a consumer on that
  stream needs no sync, and one on another stream or the host must wait for the call (e.g.
  ``Handle.wait()`` of ``encode_async``) and finish reading before the next call is enqueued.
* Without ``out=``: no result aliases a session buffer. The static path's bucket outputs (which
  the next replay overwrites) are copied out into tensors the result owns; ``enc.plan`` and
  ``enc.coords_host`` are the session's cached plan and per-call host arrays, shared read-only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .inputs import _pixel_info

__all__ = ["EncodeBuffers"]

# The per-token outputs in the order the static encode stage returns them.
TOKEN_OUTPUTS = ("features", "moments", "latents", "indices")


class EncodeBuffers:
    """Preallocated outputs for batches of up to ``tokens`` tokens and ``samples`` samples.

    coords:    [tokens, 4] int32 (t, x, y, z)
    latents:   [tokens, L] model dtype (posterior mean / sample / FSQ codes)
    indices:   [tokens, num_codebooks] int32 (discrete configs), else None
    moments:   [tokens, 2L] model dtype
    features:  [tokens, width] model dtype
    embedding: [samples, width] model dtype
    All on the session's device. Use with the session (config, device, dtype) they were made for.
    """

    def __init__(self, session, tokens: int, samples: int = 1):
        if not isinstance(tokens, int) or tokens < 1 or not isinstance(samples, int) \
                or samples < 1:
            raise ValueError(f"EncodeBuffers: tokens and samples must be positive ints, got "
                             f"{tokens!r}, {samples!r}")
        c, dev, dt = session.config, session.device, session.dtype
        lat, width = c.latent_channels, c.encoder.width
        self.tokens, self.samples = tokens, samples
        self._owner = (c.name, str(dev), dt)
        with torch.inference_mode(False):  # ordinary tensors even under the caller's inference
            self.coords = torch.empty((tokens, 4), dtype=torch.int32, device=dev)
            self.latents = torch.empty((tokens, lat), dtype=dt, device=dev)
            q = c.quantizer
            self.indices = None if q is None else \
                torch.empty((tokens, q.num_codebooks), dtype=torch.int32, device=dev)
            self.moments = torch.empty((tokens, 2 * lat), dtype=dt, device=dev)
            self.features = torch.empty((tokens, width), dtype=dt, device=dev)
            self.embedding = torch.empty((samples, width), dtype=dt, device=dev)

    @classmethod
    def for_shapes(cls, session, shapes: Sequence[tuple]) -> "EncodeBuffers":
        """Buffers sized for a batch of images ``(H, W, 3)`` / videos ``(T, H, W, 3)`` of these
        shapes (after the 4-frame rule and the centre crop: the encode's own patch rules)."""
        n = sum(math.prod(_pixel_info(tuple(s), f"EncodeBuffers.for_shapes: shape {i}").grid)
                for i, s in enumerate(shapes))
        return cls(session, max(1, n), max(1, len(shapes)))

    def __repr__(self) -> str:
        return f"EncodeBuffers(tokens={self.tokens}, samples={self.samples})"

    def check(self, session, tokens: int, samples: int) -> None:
        """ValueError unless a batch of ``tokens`` tokens and ``samples`` samples of ``session``
        fits (checked before any work is queued)."""
        if self._owner != (session.config.name, str(session.device), session.dtype):
            raise ValueError(f"out: EncodeBuffers made for {self._owner}, not for this session "
                             f"({session.config.name}, {session.device}, {session.dtype})")
        if tokens > self.tokens or samples > self.samples:
            raise ValueError(f"out: the batch has {tokens} tokens in {samples} samples; the "
                             f"buffers hold {self.tokens} tokens and {self.samples} samples")

    def views(self, tokens: int) -> tuple:
        """The first ``tokens`` rows of features, moments, latents, indices (static-stage order)."""
        return tuple(None if getattr(self, k) is None else getattr(self, k)[:tokens]
                     for k in TOKEN_OUTPUTS)

    def write(self, out: dict, samples: int) -> dict:
        """Copy encode outputs (``features``, ``moments``, ``latents``, ``indices`` [N, ...],
        ``embedding`` [B, width]) into the buffers, skipping tensors already written in place;
        returns the same dict of buffer views."""
        n = out["features"].shape[0]
        res = {}
        for k, dst in zip(TOKEN_OUTPUTS, self.views(n)):
            src = out[k]
            if dst is None or src is None:
                res[k] = None
                continue
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
            res[k] = dst
        emb = self.embedding[:samples]
        if out["embedding"].data_ptr() != emb.data_ptr():
            emb.copy_(out["embedding"])
        res["embedding"] = emb
        return res
