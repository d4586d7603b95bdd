"""Live video in, tokens out (and back): :class:`VideoStream` and :class:`VideoDecodeStream`.

    stream = atoken_rt.VideoStream(sess)              # or on_tokens=callback
    for frame in camera:                               # [H, W, 3] uint8 (or [n, H, W, 3])
        stream.push(frame)
        for chunk in stream.poll():                    # StreamChunk: coords in stream time
            send(chunk.indices, chunk.coords)
    report = stream.flush()                            # the ragged tail, under the 4-frame rule

The model encodes a video in independent 16-frame chunks (spec §2: no information crosses
chunks), so encoding each chunk as soon as its 16th frame arrives and adding ``4k`` to ``t`` of
chunk k gives exactly the tokens of one whole-video encode:

* equal, row for row: ``coords`` (t offset applied), ``latents``, ``indices``, ``moments`` and
  ``features``. Bit for bit with ``Session(deterministic=True)`` (batch-invariant numerics: a
  chunk gets the same bits alone as inside the whole video's packed pass; tested for every
  length 1..50). A default session's GEMMs round differently with the number of rows (a chunk
  alone vs the whole video), so there the floats agree to ~1e-6 relative and an FSQ index can
  flip where a value sits on a rounding boundary (as between two batchings of the official code);
* not equal: the MAP-head ``embedding``. It pools over every token of a sample (spec §3.5), so
  the whole-video embedding needs the whole video. A stream gives one embedding **per chunk**
  (the MAP head over that chunk alone = the embedding of a whole-video encode of the chunk's
  frames on their own).

The ragged tail follows the whole video's 4-frame rule (spec §1.2): a stream of fewer than 4
frames is padded with zero (mid-grey) frames to 4; otherwise the tail is cut to a multiple of 4
frames and the rest dropped. :meth:`VideoStream.flush` says which.

On a CUDA session every chunk is encoded asynchronously (one worker thread, on the stream that was
current in the caller's thread at the ``push`` that completed the chunk, after waiting on the
device for the copies of every push that filled it), and a chunk comes out of :meth:`poll`, the
iterator or the callback once its CUDA event has completed: its tensors can then be read from any
stream or the host. On the CPU the chunk is encoded inside the ``push`` that completes it (its
error, if any, still comes out at delivery, at the end of that push).

``sample=True``: one generator per stream, drawn in chunk order; the sampled latents equal the
whole video's draw when ``latent_channels`` is a multiple of 16 (see :class:`VideoStream`).
Stream time ``t`` may pass 4096: ``Session.decode`` re-bases it by whole chunks.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .inputs import PATCH_T, as_frames_tensor

__all__ = ["VideoStream", "VideoDecodeStream", "StreamChunk", "DecodedFrames", "FlushReport"]


@dataclass
class StreamChunk:
    """The tokens of one chunk of a :class:`VideoStream`.

    index: chunk number k; frame_start: the stream frame of its first frame (``chunk_frames * k``).
    frames: stream frames it encodes; frames_padded: zero frames added (only for a whole stream of
    fewer than 4 frames); t_offset: added to ``t`` (``frame_start // 4``).
    result: the :class:`~atoken_rt.session.EncodeResult` of the chunk (one sample), coords
    already offset; ``session.decode(chunk.result)`` decodes it.
    pushed_at / ready_at: ``time.perf_counter()`` at the push of its last frame and when it was
    delivered (``latency_s`` is the difference).
    """

    index: int
    frame_start: int
    frames: int
    frames_padded: int
    t_offset: int
    result: Any
    pushed_at: float
    ready_at: float = 0.0

    # Per-token outputs, [n, ...], rows in the whole video's raster order (see EncodeResult).
    @property
    def coords(self) -> torch.Tensor:
        """[n, 4] int32 (t, x, y, z), t in the whole stream's frame of reference."""
        return self.result.coords[0]

    @property
    def latents(self) -> torch.Tensor:
        return self.result.latents[0]

    @property
    def indices(self) -> torch.Tensor | None:
        return self.result.indices[0]

    @property
    def moments(self) -> torch.Tensor:
        return self.result.moments[0]

    @property
    def features(self) -> torch.Tensor:
        return self.result.features[0]

    @property
    def embedding(self) -> torch.Tensor:
        """[width] MAP-head embedding of this chunk alone (not of the whole stream)."""
        return self.result.embedding[0]

    @property
    def latency_s(self) -> float:
        return self.ready_at - self.pushed_at


@dataclass
class FlushReport:
    """What :meth:`VideoStream.flush` did with the stream's frames (spec §1.2 4-frame rule).

    frames_pushed: every frame pushed; frames_encoded: frames that went into tokens;
    frames_padded: zero frames added (stream shorter than 4 frames); frames_dropped: trailing
    frames not encoded (the tail beyond a multiple of 4); chunks: chunks encoded in all.
    """

    frames_pushed: int
    frames_encoded: int
    frames_padded: int
    frames_dropped: int
    chunks: int


@dataclass
class DecodedFrames:
    """Frames decoded by a :class:`VideoDecodeStream`: ``frames`` [n, H, W, 3] in [-1, 1] (model
    dtype, not clamped) for stream frames ``frame_start .. frame_start + n - 1``."""

    frame_start: int
    frames: torch.Tensor
    result: Any = field(repr=False, default=None)


class _Pipeline:
    """In-flight requests delivered in submission order (poll / iterator / callback)."""

    def __init__(self, session, callback: Callable | None, max_ready: int = 64):
        if not isinstance(max_ready, int) or max_ready < 1:
            raise ValueError(f"max_ready must be a positive int, got {max_ready!r}")
        self.session = session
        self._callback = callback
        self.max_ready = max_ready
        # (Handle, finish(value) -> item, release() or None); release runs when the caller has
        # taken the item (the callback returned, or poll()/the iterator handed it out) or when
        # its error was raised.
        self._inflight: deque = deque()
        self._ready: deque = deque()  # (item, release or None)
        self._deferred: deque = deque()  # errors met while delivering inside a push, raised later

    def _check_room(self, who: str) -> None:
        """Refuse new input while ``max_ready`` items wait to be polled: a caller that never
        polls (and gave no callback) must get an error, not a process that grows until it dies.
        Raised before the input is taken, so nothing is lost."""
        self._collect(block=False)
        waiting = len(self._ready) + len(self._inflight)
        if waiting >= self.max_ready:
            raise RuntimeError(f"{who}: {waiting} results are waiting to be taken "
                               f"(max_ready={self.max_ready}); call poll() or iterate, or pass "
                               "a callback")

    @property
    def _async(self) -> bool:
        return self.session.device.type == "cuda"

    def _run(self, fn: Callable, finish: Callable, release: Callable | None = None):
        """Run ``fn`` (on the session's worker thread and the caller's CUDA stream when the
        session is on CUDA, else here), queue ``finish(result)`` for delivery; returns the
        request's handle. Never raises the request's error (nor an earlier one's): errors come
        out where the request is delivered (``_collect``), so a caller can finish its
        bookkeeping (buffer ownership, frames taken) first."""
        if self._async:
            handle = self.session._submit(fn, None)
        else:
            try:
                handle = _Done(fn())
            except Exception as exc:  # noqa: BLE001 - delivered in order, like the worker's
                handle = _Done(None, exc)
        self._inflight.append((handle, finish, release))
        return handle

    def _raise_deferred(self) -> None:
        if self._deferred:
            raise self._deferred.popleft()

    def _collect(self, block: bool) -> None:
        self._raise_deferred()
        while self._inflight and (block or self._inflight[0][0].done()):
            self._deliver_next()

    def _deliver_next(self, defer: bool = False) -> None:
        """Wait for the oldest request and hand its item to the callback or the ready queue.
        ``defer``: keep an error (the request's or the callback's) for the next ``_collect``
        instead of raising it here (used inside a push, which must finish taking its frames)."""
        handle, finish, release = self._inflight.popleft()
        try:
            try:
                item = finish(handle.wait())
            except Exception:
                if release is not None:
                    release()  # an error is taken by whoever it is raised to
                raise
            if self._callback is None:
                self._ready.append((item, release))
                return
            try:
                self._callback(item)
            finally:
                if release is not None:
                    release()
        except Exception as exc:  # noqa: BLE001 - raised now, or at the next delivery
            if not defer:
                raise
            self._deferred.append(exc)

    @staticmethod
    def _take(entry):
        item, release = entry
        if release is not None:
            release()
        return item

    def poll(self, wait: bool = False) -> list:
        """The items finished so far, in order (``wait=True``: everything in flight). Empty
        when a callback takes them."""
        self._collect(block=wait)
        out = [self._take(e) for e in self._ready]
        self._ready.clear()
        return out

    def __iter__(self) -> Iterator:
        """Yield items in order, waiting for those in flight; stops when none is left."""
        while True:
            if not self._ready:
                self._raise_deferred()
                if not self._inflight:
                    return
                self._deliver_next()
                continue
            yield self._take(self._ready.popleft())

    @property
    def pending(self) -> int:
        """Requests submitted and not yet delivered."""
        return len(self._inflight)


class _Done:
    """A finished request with the :class:`~atoken_rt.session.Handle` interface."""

    def __init__(self, value, error: BaseException | None = None):
        self._value, self._error = value, error

    def done(self) -> bool:
        return True

    def wait(self):
        if self._error is not None:
            raise self._error
        return self._value


class VideoStream(_Pipeline):
    """Push frames, get the tokens of each complete chunk (see the module docstring).

    Parameters
    ----------
    session: a :class:`~atoken_rt.Session`.
    chunk_frames: frames per encode call; a positive multiple of the model's chunk (16 frames),
        so that chunks are exactly the whole-video encode's (the default 16 gives the lowest
        latency).
    on_tokens: called with each :class:`StreamChunk`, in order, from the caller's thread (inside
        ``push``/``poll``/``flush``); without it chunks wait in :meth:`poll` / the iterator.
    depth: chunk buffers (and so chunks in flight on CUDA); ``push`` waits for the oldest chunk
        when all are busy (backpressure instead of unbounded memory).
    preallocate: encode into ``depth`` caller-owned :class:`~atoken_rt.EncodeBuffers` used in
        turn (no output allocation per chunk); chunk k's tensors are then views valid until
        chunk ``k + depth`` is encoded: consume (or copy) them before. Chunk ``k + depth`` is
        never encoded before chunk k was handed to the caller: with ``on_tokens``, a push waits
        for chunk k and calls the callback first (read chunk k inside the callback; on CUDA
        reads queued on the pushing stream are ordered before the next encode on that
        stream); with :meth:`poll` / the iterator, a ``push`` (or ``flush``) that would need
        the buffers of a chunk not yet taken raises ``RuntimeError`` before taking any frame
        (so one push may complete at most ``depth`` chunks).
    max_ready: chunks that may wait in :meth:`poll` (without ``on_tokens``); ``push`` raises a
        ``RuntimeError`` past it, before taking the frames, instead of growing without bound.
    encode_kw: passed to :meth:`Session.encode` (e.g. ``sample=True, seed=...``). With
        ``sample=True`` the stream draws its noise from one generator (``generator=``, or one
        seeded once with ``seed``, default 0, again at each ``reset()``), chunk after chunk
        in order: chunks get different noise, the same seed gives the same stream, and the
        sampled latents equal those of a whole-video ``encode(sample=True, seed=seed)`` when
        each chunk's ``tokens * latent_channels`` is a multiple of 16 (true whenever
        ``latent_channels`` is, as in every shipped config: torch's CPU ``randn`` then consumes
        the generator the same way for one draw as for consecutive per-chunk draws).

    Frames: ``[H, W, 3]`` or ``[n, H, W, 3]``, uint8 or float in [-1, 1], torch, numpy or any
    ``__dlpack__`` / ``__cuda_array_interface__`` object; every frame must have the first frame's
    size and dtype. Frames are copied once, into the chunk buffer (pinned host memory when host
    frames go to a CUDA session, so the upload is asynchronous; device memory for device frames).
    On the CPU, a whole chunk pushed at a chunk boundary as one tensor is encoded in place
    (no copy); on CUDA frames are always copied (the encode reads its input later, on the
    worker thread). What the caller may do with its frame memory once ``push`` returns:

    * host frames: anything (they were copied into the pinned chunk buffer synchronously);
    * device frames: the device-to-device copy is queued on the stream current at ``push``
      (after the producer's writes: DLPack handshake / stream order), followed by an event.
      The stream keeps a reference to the source tensor until the copy is done (the chunk is
      delivered, or the copy waited for), so dropping it (a torch tensor, or a DLPack
      producer's buffer whose deleter runs when torch lets go) is safe at once. Overwriting
      it is safe from work queued later on the same stream; a writer on another stream, or the
      host, must wait for that stream first (e.g. ``other.wait_stream(push_stream)``).
    * The chunk's encode runs on the stream current at the push that completes it, and first
      waits (on the device) for the copy events of every push that filled its buffer, so
      pushes may use different streams.

    One producer: ``push``/``poll``/``flush`` are not thread-safe (one stream per camera
    thread; streams of one session may live in different threads).
    """

    def __init__(self, session, *, chunk_frames: int = 16, on_tokens: Callable | None = None,
                 depth: int = 2, preallocate: bool = False, max_ready: int = 64, **encode_kw):
        super().__init__(session, on_tokens, max_ready)
        model_chunk = session.config.chunk_frames * PATCH_T  # 16 frames (spec §2)
        if not isinstance(chunk_frames, int) or chunk_frames <= 0 or chunk_frames % model_chunk:
            raise ValueError(f"chunk_frames must be a positive multiple of the model's "
                             f"{model_chunk}-frame chunk, got {chunk_frames!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.chunk_frames = chunk_frames
        self.depth = depth
        self.preallocate = bool(preallocate)
        # sample=True: one generator for the whole stream, drawn in chunk order (a fresh one
        # per chunk would give every chunk the same noise). Made again by reset().
        self._seed = None
        if encode_kw.get("sample") and encode_kw.get("generator") is None:
            from .session import _check_seed
            seed = encode_kw.pop("seed", None)
            if seed is not None:
                _check_seed(seed, "VideoStream: seed")
            self._seed = 0 if seed is None else int(seed)
        self._encode_kw = encode_kw
        self._reset_state()

    def reset(self) -> None:
        """Start a new stream (t from 0 again; any frame size). Chunks not yet delivered are
        delivered first."""
        _finish_copies(self._copies)  # frames copied but never encoded
        self._copies = []
        try:
            self._collect(block=True)  # may raise a chunk's error: the reset happens anyway
        finally:
            self._reset_state()

    def _reset_state(self) -> None:
        self.frames_pushed = 0
        self.chunks = 0
        if self._seed is not None:
            self._encode_kw["generator"] = torch.Generator().manual_seed(self._seed)
        self._frame_shape: tuple | None = None
        self._dtype: torch.dtype | None = None
        self._buffers: list[torch.Tensor] = []
        self._outs: list = []  # EncodeBuffers per chunk slot (preallocate=True)
        # Per output set: True while the chunk last encoded into it has not been taken by the
        # caller (a new list per stream: a chunk of the old stream releases the old list).
        self._held: list = [False] * self.depth
        self._busy: list = []  # per buffer: the handle of the chunk reading it, or None
        # Device copies into the buffer being filled: (event recorded after the copy on the
        # pushing stream, source tensor). Handed to the chunk's encode, which waits for them.
        self._copies: list = []
        self._slot = 0
        self._fill = 0
        self._closed = False

    # -- input ---------------------------------------------------------------------------------

    def push(self, frames: Any) -> None:
        """Append one frame ``[H, W, 3]`` or several ``[n, H, W, 3]`` (n may be 0).

        Errors, and which frames a push that raises has taken (``frames_pushed`` always counts
        the frames taken):

        * raised before any frame is taken: a closed stream, ``max_ready`` reached, a frame of
          another size/dtype or shape, and an earlier chunk's error already found at the start
          of the push;
        * raised after every frame of the push is taken: a chunk's own error (e.g. float pixels
          outside [-1, 1], named by its stream frames), or that of an earlier chunk, found when
          finished chunks are delivered at the end of the push.

        A chunk's error is raised once, by whichever of ``push``/``poll``/``flush``/the iterator
        delivers it, in chunk order; that chunk's frames are lost, the stream goes on (the next
        chunk keeps its stream time).
        """
        t0 = time.perf_counter()
        if self._closed:
            raise ValueError("VideoStream: push after flush(); call reset() to start a new stream")
        self._check_room("VideoStream.push")
        first = self.frames_pushed
        t = as_frames_tensor(frames, f"stream frame {first}")
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[-1] != 3:
            raise ValueError(f"stream frame {first}: expected a frame (H, W, 3) or frames "
                             f"(n, H, W, 3), got shape {tuple(t.shape)}")
        if self._frame_shape is None and t.shape[0]:
            self._start(t)
        elif t.shape[0]:
            if tuple(t.shape[1:]) != self._frame_shape:
                raise ValueError(f"stream frame {first}: size {tuple(t.shape[1:])} differs from "
                                 f"the stream's first frame {self._frame_shape}; start a new "
                                 "stream (reset()) for another size")
            if t.dtype != self._dtype:
                raise TypeError(f"stream frame {first}: dtype {t.dtype} differs from the "
                                f"stream's first frame ({self._dtype})")
        self._check_outputs_free((self._fill + t.shape[0]) // self.chunk_frames,
                                 "VideoStream.push")
        i = 0
        while i < t.shape[0]:
            if self._fill == 0 and not self._async and t.shape[0] - i >= self.chunk_frames:
                # A whole chunk at a boundary, encoded synchronously: read in place, no copy.
                self.frames_pushed += self.chunk_frames
                self._encode(t[i:i + self.chunk_frames], self.chunk_frames, t0)
                i += self.chunk_frames
                continue
            buf = self._buffer(t.device)
            n = min(self.chunk_frames - self._fill, t.shape[0] - i)
            buf[self._fill:self._fill + n].copy_(t[i:i + n], non_blocking=True)
            ev = _record_copy(buf)
            if ev is not None:  # a device copy, queued on the caller's current stream
                self._copies.append((ev, t))  # t: keeps the source alive until it is done
            self._fill += n
            self.frames_pushed += n
            i += n
            if self._fill == self.chunk_frames:
                self._encode(buf, self.chunk_frames, t0, slot=self._slot)
        self._collect(block=False)

    def _start(self, t: torch.Tensor) -> None:
        h, w = t.shape[1:3]
        if h < 16 or w < 16:
            raise ValueError(f"stream frame 0: frames of {h}x{w} pixels are smaller than one "
                             "16x16 patch")
        if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
            raise TypeError(f"stream frame 0: unsupported dtype {t.dtype}; use uint8 in "
                            "[0, 255] or a float dtype in [-1, 1]")
        self._frame_shape = tuple(t.shape[1:])
        self._dtype = t.dtype
        if self.preallocate:
            from .buffers import EncodeBuffers
            self._outs = [EncodeBuffers.for_shapes(self.session, [(self.chunk_frames, h, w, 3)])
                          for _ in range(self.depth)]

    def _buffer(self, src: torch.device) -> torch.Tensor:
        """The chunk buffer being filled (allocated on first use; waits if its last chunk is
        still being encoded). ``src``: the device of the frames being pushed."""
        if len(self._buffers) <= self._slot:
            dev = self.session.device
            shape = (self.chunk_frames, *self._frame_shape)
            # Device frames for a GPU session stay on the GPU; host frames for a GPU go through
            # pinned memory (the encode's upload is then asynchronous); a CPU session reads host
            # memory.
            try:
                if dev.type == "cuda" and src.type != "cuda":
                    buf = torch.empty(shape, dtype=self._dtype, pin_memory=True)
                else:
                    buf = torch.empty(shape, dtype=self._dtype, device=dev)
            except RuntimeError:  # no pinnable memory here
                buf = torch.empty(shape, dtype=self._dtype)
            self._buffers.append(buf)
            self._busy.append(None)
        busy = self._busy[self._slot]
        if busy is not None and self._fill == 0:
            try:
                busy.wait()  # the chunk that last read this buffer must be done with it
            except Exception:  # noqa: BLE001 - its error is raised where it is delivered (poll)
                pass
            self._busy[self._slot] = None
        return self._buffers[self._slot]

    def _encode(self, frames: torch.Tensor, n: int, pushed_at: float, slot: int | None = None,
                padded: int = 0) -> None:
        """Submit the first ``n`` frames of ``frames`` as chunk ``self.chunks`` (every earlier
        chunk is a full one, so it starts at stream frame ``chunks * chunk_frames``)."""
        k = self.chunks
        start = k * self.chunk_frames
        t_off = start // PATCH_T
        kw, sess, part = self._encode_kw, self.session, frames[:n]
        release = None
        copies, self._copies = (self._copies, []) if slot is not None else ([], self._copies)
        if self._outs:
            kw = {**kw, "out": self._outs[k % self.depth]}
            release = self._claim_outputs(k % self.depth)

        def job():
            # On the encode's stream (the worker's current one): wait for the copies of this
            # chunk's frames, whatever stream each push queued them on (device-side waits).
            _wait_copies(copies)
            try:
                enc = sess.encode([part], **kw)
            except (ValueError, TypeError) as exc:  # name the stream frames, not "sample 0"
                _after_failed_encode(copies, sess)
                raise type(exc)(f"stream frames {start}..{start + n - 1}: {exc}") from None
            except BaseException:
                _after_failed_encode(copies, sess)
                raise
            return _offset_t(enc, t_off)

        def finish(enc):
            # Delivered once the chunk's event completed (after its copies): the sources may go.
            copies.clear()
            return StreamChunk(index=k, frame_start=start, frames=n, frames_padded=padded,
                               t_offset=t_off, result=enc, pushed_at=pushed_at,
                               ready_at=time.perf_counter())

        self.chunks += 1
        handle = self._run(job, finish, release)  # raises nothing (errors at delivery)
        if slot is not None:
            # The buffer is owned by this chunk until its request is done: the next fill of
            # this slot waits for it (_buffer).
            self._busy[slot] = handle
            self._fill = 0
            self._slot = (self._slot + 1) % self.depth

    def _check_outputs_free(self, chunks: int, who: str) -> None:
        """preallocate=True without a callback: refuse (before any frame is taken) a call that
        would encode ``chunks`` chunks into output sets still holding chunks not yet polled."""
        if not self._outs or self._callback is not None or chunks == 0:
            return
        for j in range(chunks):
            k = self.chunks + j
            if j >= self.depth or self._held[k % self.depth]:
                raise RuntimeError(
                    f"{who}: preallocate=True with depth={self.depth}: this would encode chunk "
                    f"{k} into the output buffers of chunk {k - self.depth}, which has not been "
                    "taken yet (poll(wait=True) or iterate first, push fewer frames at a time, "
                    "or raise depth); no frame was taken")

    def _claim_outputs(self, s: int) -> Callable:
        """Make output set ``s`` free (with a callback: deliver the chunk holding it, waiting for
        it; its error, if any, is raised at the end of the push) and mark it held by the chunk
        about to be encoded. Returns the function that frees it again."""
        held = self._held
        while held[s] and self._inflight:
            self._deliver_next(defer=True)
        if held[s]:  # poll() consumption was checked before the push took frames
            raise RuntimeError("VideoStream: output buffers still held by an undelivered chunk")
        held[s] = True

        def release():
            held[s] = False
        return release

    # -- end -----------------------------------------------------------------------------------

    def flush(self) -> FlushReport:
        """Encode the buffered tail as a whole-video encode would (4-frame rule), wait for every
        chunk in flight and deliver it, and end the stream (``reset()`` starts a new one)."""
        t0 = time.perf_counter()
        tail, total = self._fill, self.frames_pushed
        padded = dropped = 0
        if not self._closed:
            self._check_outputs_free(int(total < PATCH_T or tail >= PATCH_T) if tail else 0,
                                     "VideoStream.flush")
        if tail:
            slot = self._slot
            if total < PATCH_T:  # the whole stream is shorter than 4 frames: zero-padded to 4
                padded = PATCH_T - tail
                self._encode(self._buffers[slot], tail, t0, slot=slot, padded=padded)
            else:  # cut to a multiple of 4 frames, the rest dropped (as the whole video's)
                keep = tail // PATCH_T * PATCH_T
                dropped = tail - keep
                if keep:
                    self._encode(self._buffers[slot], keep, t0, slot=slot)
            self._fill = 0
        _finish_copies(self._copies)  # a dropped tail's copies: wait, then drop the sources
        self._copies = []
        self._closed = True
        self._collect(block=True)
        return FlushReport(frames_pushed=total, frames_encoded=total - dropped,
                           frames_padded=padded, frames_dropped=dropped, chunks=self.chunks)


def _record_copy(buf: torch.Tensor):
    """An event recorded on the current stream right after a copy into ``buf`` (None for a
    host buffer: that copy was synchronous)."""
    if not buf.is_cuda:
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(buf.device))
    return ev


def _wait_copies(copies) -> None:
    """Make the current CUDA stream wait (on the device, no host sync) for each copy's event."""
    if copies:
        stream = torch.cuda.current_stream()
        for ev, _ in copies:
            stream.wait_event(ev)


def _finish_copies(copies) -> None:
    """Wait on the host for copies whose sources are about to be dropped unread by an encode
    (an error, a dropped tail, reset): the source memory must outlive its copy."""
    for ev, _ in copies:
        ev.synchronize()


def _after_failed_encode(copies, sess) -> None:
    """A failed encode has no completion event: the chunk buffer is freed for the next fill as
    soon as the error is known, and the sources are dropped with the error. So wait here (the
    worker thread, error path only) for the copies and for whatever the encode had queued."""
    _finish_copies(copies)
    if sess.device.type == "cuda":
        torch.cuda.current_stream(sess.device).synchronize()


def _snapshot(x):
    """A copy of a caller's array (torch: cloned where it lives, ordered on the current stream
    like the decode that reads it; anything else: a numpy copy)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    return np.array(x)


def _clone_per_sample(per_sample, offsets):
    from .session import _PerSample
    return _PerSample(None if per_sample.packed is None else per_sample.packed.clone(), offsets)


def _offset_t(enc, t_off: int):
    """``enc`` with ``t_off`` added to t of its coords (device and host), in place: the result
    owns its coords (Session.encode returns a copy)."""
    if t_off:
        enc.coords.packed[:, 0] += t_off
        enc.coords_host = [_shift_host(c, t_off) for c in enc.coords_host]
    return enc


def _shift_host(c: np.ndarray, t_off: int) -> np.ndarray:
    c = c.copy()
    c[:, 0] += t_off
    c.flags.writeable = False
    return c


class VideoDecodeStream(_Pipeline):
    """Turn the chunks of a :class:`VideoStream` (or any t-contiguous token chunks) back into
    frames, in order.

    ``push(chunk)`` takes a :class:`StreamChunk`, an ``EncodeResult`` of one video, or
    ``coords=`` with ``latents=`` / ``indices=`` of one chunk (coords with t in stream time). Each
    chunk is decoded on its own (asynchronously on CUDA, like :class:`VideoStream`); its frames
    come out as :class:`DecodedFrames` through :meth:`poll`, the iterator or ``on_frames``.
    ``push`` copies what the decode reads later (coords, latents/indices, a chunk's latents,
    which may live in a :class:`VideoStream`'s preallocated buffers), so the caller may reuse
    them as soon as it returns.
    Chunks must arrive in order: each chunk's first t must follow the previous chunk's last;
    after a gap (a lost or failed chunk) every later chunk is refused until :meth:`reset`.
    Stream time may pass the coordinate limit (t >= 4096 after 16384 frames): ``Session.decode``
    re-bases t by whole 16-frame chunks, and ``frame_start`` stays in stream time.
    """

    def __init__(self, session, *, on_frames: Callable | None = None, max_ready: int = 64):
        super().__init__(session, on_frames, max_ready)
        self._next_t: int | None = None

    def reset(self) -> None:
        """Resynchronise: deliver the chunks in flight, then accept a next chunk at any t (also
        when that delivery raises a chunk's error)."""
        try:
            self._collect(block=True)
        finally:
            self._next_t = None

    def push(self, chunk: Any = None, *, coords=None, latents=None, indices=None) -> None:
        sess = self.session
        self._check_room("VideoDecodeStream.push")
        if chunk is not None:
            if coords is not None or latents is not None or indices is not None:
                raise ValueError("VideoDecodeStream.push: give a chunk or coords with "
                                 "latents/indices, not both")
            enc = chunk.result if isinstance(chunk, StreamChunk) else chunk
            if not hasattr(enc, "coords_host") or len(enc) != 1:
                raise TypeError("VideoDecodeStream.push: expected a StreamChunk or a one-sample "
                                f"EncodeResult, got {type(chunk).__name__}")
            host = enc.coords_host[0] if enc.coords_host is not None else \
                enc.coords[0].cpu().numpy()
            t_lo, t_hi = int(host[:, 0].min()), int(host[:, 0].max())
            # Snapshot: the decode runs later and reads only the latents (the plan and host
            # coords are read-only); a preallocated chunk's latents are overwritten later.
            enc = dataclasses.replace(enc, latents=_clone_per_sample(enc.latents, enc.offsets),
                                      coords_host=[np.array(host)])

            def job():
                return sess.decode(enc)
        else:
            if coords is None:
                raise ValueError("VideoDecodeStream.push: give a chunk, or coords with "
                                 "latents/indices")
            host = np.array(coords.detach().cpu().numpy() if isinstance(coords, torch.Tensor)
                            else coords)  # a copy
            if host.ndim != 2 or host.shape[1] != 4 or len(host) == 0:
                raise ValueError(f"VideoDecodeStream.push: coords must be [n, 4], got shape "
                                 f"{tuple(host.shape)}")
            t_lo, t_hi = int(host[:, 0].min()), int(host[:, 0].max())
            lat = None if latents is None else [_snapshot(latents)]
            idx = None if indices is None else [_snapshot(indices)]

            def job():
                return sess.decode(coords=[host], latents=lat, indices=idx, kinds=["video"])
        if self._next_t is not None and t_lo != self._next_t:
            raise ValueError(f"VideoDecodeStream.push: chunk starts at t={t_lo}, expected "
                             f"t={self._next_t} (chunks must come in order, without gaps; "
                             "call reset() to resynchronise after a lost chunk)")
        self._next_t = t_hi + 1

        def finish(dec):
            frames = dec.samples[0]
            if frames.dim() == 3:  # a one-token-deep chunk decoded as an image
                frames = frames[None]
            return DecodedFrames(frame_start=t_lo * PATCH_T, frames=frames, result=dec)

        self._run(job, finish)
        self._collect(block=False)

    def flush(self) -> None:
        """Wait for every chunk in flight and deliver its frames."""
        self._collect(block=True)
