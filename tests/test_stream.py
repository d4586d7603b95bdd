"""VideoStream / VideoDecodeStream against the whole-video encode and decode (the reference),
DLPack inputs against torch tensors, caller-owned outputs against the normal path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import atoken_rt

from .conftest import make_session, rel_err

CUDA = torch.cuda.is_available()
TOKEN_FIELDS = ("coords", "latents", "indices", "moments", "features")


# Bit-for-bit equality with the whole video needs batch-invariant numerics (a chunk alone vs in
# the whole video's packed pass): deterministic sessions. The default session is checked to
# float rounding in test_default_session_within_rounding. GEMM tiles of 32 rows instead of 256:
# the same invariance at a fraction of the cost for these few-token chunks.
def _deterministic(cfg):
    from atoken_rt.deterministic import DeterministicTorchOps
    sess = make_session(cfg, deterministic=True)
    sess.ops = DeterministicTorchOps(row_tile=32)
    return sess


@pytest.fixture(scope="module")
def sod():
    return _deterministic("tiny-sod")


@pytest.fixture(scope="module")
def soc():
    return _deterministic("tiny-soc")


def _video(t, h=40, w=50, seed=0):
    # 40x50 is centre-cropped to 32x48 (3 x 2x3 tokens per 4 frames): crops take the same path.
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _whole(sess, vid):
    """The whole-video encode of ``vid`` (or of each video of a list, in one batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atoken_rt.InputWarning)
        return sess.encode(vid if isinstance(vid, list) else [vid])


class _Sample:
    """Sample j of an EncodeResult, seen as a one-sample result (fields indexed [0])."""

    def __init__(self, enc, j):
        self._enc, self._j = enc, j

    def __getattr__(self, name):
        return [getattr(self._enc, name)[self._j]]


def _push_randomly(stream, vid, rng):
    i = 0
    while i < len(vid):
        n = int(rng.integers(1, 20))
        part = vid[i:i + n]
        stream.push(part[0] if n == 1 and rng.random() < 0.5 else part)  # a frame or frames
        i += n


def _check_equal_to_whole(sess, chunks, whole, vid, embeddings=True):
    """Stream chunks, concatenated, equal the whole-video encode's tokens bit for bit; each
    chunk's embedding is the whole-video embedding of its own frames."""
    for name in TOKEN_FIELDS:
        want = getattr(whole, name)[0]
        if want is None:
            assert all(getattr(c, name) is None for c in chunks)
            continue
        got = torch.cat([getattr(c, name) for c in chunks])
        assert got.dtype == want.dtype and torch.equal(got, want), name
    host = np.concatenate([c.result.coords_host[0] for c in chunks])
    assert np.array_equal(host, whole.coords[0].numpy())
    for c in chunks if embeddings else ():
        alone = _whole(sess, vid[c.frame_start:c.frame_start + c.frames])
        assert torch.equal(c.embedding, alone.embedding[0])


@pytest.mark.parametrize("cfg", ["sod", "soc"])
def test_stream_equals_whole_video_for_every_length(cfg, request):
    sess = request.getfixturevalue(cfg)
    rng = np.random.default_rng(1)
    vid = _video(50)
    lengths = range(1, 51) if cfg == "sod" else (3, 16, 33, 47)  # soc: a sample of lengths
    # The reference: whole-video encodes of every length, in one batch (a deterministic session
    # gives each sample the bits of its own encode; it saves 50 calls).
    wholes = _whole(sess, [vid[:n] for n in lengths])
    for j, n in enumerate(lengths):
        got = []
        stream = atoken_rt.VideoStream(sess, on_tokens=got.append)
        _push_randomly(stream, vid[:n], rng)
        assert len(got) == n // 16  # every full chunk came out as soon as it was complete
        report = stream.flush()
        whole = _Sample(wholes, j)
        info = whole.info[0]
        assert (report.frames_pushed, report.frames_dropped, report.frames_padded) == \
            (n, info.frames_dropped, info.frames_padded), n
        assert report.frames_encoded == n - info.frames_dropped
        assert report.chunks == len(got) and [c.index for c in got] == list(range(len(got)))
        _check_equal_to_whole(sess, got, whole, vid, embeddings=n in (2, 17, 47, 50))
        assert all(c.latency_s >= 0 for c in got)


def test_default_session_within_rounding():
    sess = make_session("tiny-soc")
    vid = _video(37)
    stream = atoken_rt.VideoStream(sess)
    stream.push(vid)
    stream.flush()
    chunks = stream.poll()
    whole = _whole(sess, vid)
    assert torch.equal(torch.cat([c.coords for c in chunks]), whole.coords[0])
    for name in ("latents", "moments", "features"):
        assert rel_err(torch.cat([getattr(c, name) for c in chunks]),
                       getattr(whole, name)[0]) < 1e-5, name


def test_poll_iterator_and_bigger_chunks(sod):
    vid = _video(40, 32, 32)
    whole = _whole(sod, vid)
    stream = atoken_rt.VideoStream(sod)
    stream.push(vid[:20])
    first = stream.poll()
    assert [c.frame_start for c in first] == [0] and stream.poll() == []
    stream.push(torch.from_numpy(vid[20:]))
    report = stream.flush()
    rest = list(stream)
    assert [c.frame_start for c in rest] == [16, 32] and report.frames_dropped == 0
    _check_equal_to_whole(sod, first + rest, whole, vid)
    # 32-frame calls (two model chunks per encode): same tokens.
    big = atoken_rt.VideoStream(sod, chunk_frames=32)
    big.push(vid)
    big.flush()
    chunks = big.poll()
    assert [c.frames for c in chunks] == [32, 8]
    got = torch.cat([c.latents for c in chunks])
    assert torch.equal(got, whole.latents[0])
    assert torch.equal(torch.cat([c.coords for c in chunks]), whole.coords[0])


def test_stream_errors(sod):
    stream = atoken_rt.VideoStream(sod)
    stream.push(_video(3, 32, 32))
    with pytest.raises(ValueError, match=r"stream frame 3: size \(48, 32, 3\) differs"):
        stream.push(_video(1, 48, 32)[0])
    with pytest.raises(TypeError, match="stream frame 3: dtype torch.float32 differs"):
        stream.push(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="stream frame 3: expected a frame"):
        stream.push(np.zeros((32, 3), np.uint8))
    with pytest.raises(TypeError, match="stream frame 3: expected a torch.Tensor"):
        stream.push([1, 2, 3])
    assert stream.flush().frames_padded == 1
    with pytest.raises(ValueError, match="push after flush"):
        stream.push(_video(1, 32, 32))
    stream.reset()
    stream.push(_video(4, 48, 32))  # a new stream may have another size
    assert stream.flush().frames_encoded == 4
    with pytest.raises(ValueError, match="multiple of the model's 16-frame chunk"):
        atoken_rt.VideoStream(sod, chunk_frames=8)
    bad = atoken_rt.VideoStream(sod)
    with pytest.raises(ValueError, match=r"stream frames 0\.\.15: sample 0: float pixels"):
        bad.push(np.full((16, 32, 32, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="smaller than one"):
        atoken_rt.VideoStream(sod).push(np.zeros((8, 32, 3), np.uint8))


def test_decode_offset_chunks_equals_whole_decode(sod):
    vid = _video(44)
    whole = _whole(sod, vid)
    want = sod.decode(whole)
    stream = atoken_rt.VideoStream(sod)
    stream.push(vid)
    stream.flush()
    chunks = stream.poll()
    assert [c.t_offset for c in chunks] == [0, 4, 8]
    # Session.decode of chunks whose t starts at 4k: tokens and frames of the whole decode.
    for c in chunks:
        for dec in (sod.decode(c.result),
                    sod.decode(coords=[c.coords], indices=[c.indices], kinds=["video"]),
                    sod.decode(coords=[c.coords.numpy()], latents=[c.latents])):
            rows = slice(c.t_offset * 6, c.t_offset * 6 + len(c.coords))
            assert torch.equal(dec.tokens[0], want.tokens[0][rows])
            fs = slice(c.frame_start, c.frame_start + c.frames)
            assert torch.equal(dec.samples[0], want.samples[0][fs])
    # The decode stream gives the whole video's frames in order.
    dstream = atoken_rt.VideoDecodeStream(sod)
    for c in chunks:
        dstream.push(c)
    dstream.flush()
    out = list(dstream)
    assert [d.frame_start for d in out] == [0, 16, 32]
    assert torch.equal(torch.cat([d.frames for d in out]), want.samples[0])
    # Coords/indices form, and chunks out of order are refused.
    d2 = atoken_rt.VideoDecodeStream(sod)
    d2.push(coords=chunks[0].coords, indices=chunks[0].indices)
    with pytest.raises(ValueError, match="starts at t=8, expected t=4"):
        d2.push(chunks[2])
    assert torch.equal(d2.poll(wait=True)[0].frames, want.samples[0][:16])


def test_decode_spatial_crop_with_offset(sod):
    # A crop of the token grid (x, y not from 0) decodes to pixels of the crop's size; the model
    # runs on the given coords (as the reference would), the offset only matters for assembly.
    vid = _video(4, 64, 64)
    enc = _whole(sod, vid)
    c = enc.coords[0].numpy()
    keep = (c[:, 1] >= 1) & (c[:, 1] < 3) & (c[:, 2] >= 2)
    dec = sod.decode(coords=[c[keep]], indices=[enc.indices[0][torch.from_numpy(keep)]],
                     kinds=["video"])
    assert dec.samples[0].shape == (4, 32, 32, 3)
    want = sod.decode(coords=[c[keep]], indices=[enc.indices[0][torch.from_numpy(keep)]],
                      kinds=["3d"])  # the raw tokens, no pixel assembly
    assert torch.equal(dec.tokens[0], want.tokens[0])
    with pytest.raises(ValueError, match="not a full"):
        sod.decode(coords=[c[keep][1:]], indices=[enc.indices[0][torch.from_numpy(keep)][1:]],
                   kinds=["video"])


class _DLPackOnly:
    """An array that speaks only DLPack (as CuPy/JAX/Holoscan tensors do), over numpy."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def _foreign_arrays(a: np.ndarray):
    out = [("dlpack-wrapper", _DLPackOnly(a))]
    try:
        import jax.numpy as jnp
        out.append(("jax", jnp.asarray(a)))
    except ImportError:
        pass
    if CUDA:
        try:
            import cupy
            out.append(("cupy", cupy.asarray(a)))
        except ImportError:
            pass
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_dlpack_inputs_equal_torch(sod, dtype):
    vid = _video(8, 32, 32)
    if dtype == np.float32:
        vid = (vid / 127.5 - 1).astype(np.float32)
    want = sod.encode([torch.from_numpy(vid.copy())])
    for name, arr in _foreign_arrays(vid):
        got = sod.encode([arr])
        assert torch.equal(got.indices[0], want.indices[0]), name
        assert torch.equal(got.features[0], want.features[0]), name
        stream = atoken_rt.VideoStream(sod)
        stream.push(arr)
        stream.flush()
        assert torch.equal(torch.cat([c.features for c in stream.poll()]), want.features[0])
    # Zero copy: the torch view shares the numpy memory.
    from atoken_rt.inputs import as_frames_tensor
    assert as_frames_tensor(_DLPackOnly(vid), "x").data_ptr() == vid.__array_interface__["data"][0]
    with pytest.raises(TypeError, match="sample 0: cannot read a _Broken"):
        sod.encode([_Broken()])


class _Broken:
    def __dlpack__(self, **kw):
        raise BufferError("no export")

    def __dlpack_device__(self):
        return (1, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stream_on_cuda_equals_whole_video():
    sess = make_session("tiny-sod", device="cuda", deterministic=True)
    rng = np.random.default_rng(2)
    vid = _video(37)
    for src in ("host", "device"):
        frames = vid if src == "host" else torch.from_numpy(vid).cuda()
        stream = atoken_rt.VideoStream(sess)
        i = 0
        while i < len(vid):
            n = int(rng.integers(1, 20))
            stream.push(frames[i:i + n])
            i += n
        stream.flush()
        chunks = stream.poll()
        whole = _whole(sess, vid)
        for name in ("coords", "latents", "indices", "features"):
            assert torch.equal(torch.cat([getattr(c, name) for c in chunks]),
                               getattr(whole, name)[0]), (src, name)


@pytest.mark.parametrize("cfg,graphs", [("tiny-sod", False), ("tiny-soc", False),
                                        ("tiny-sod", True)])
def test_encode_into_caller_buffers_equals_normal_path(cfg, graphs):
    sess = make_session(cfg, graphs=graphs)
    batch = [_video(16, 32, 32, seed=3), _video(1, 32, 48, seed=4)[0]]
    want = sess.encode(batch)
    buf = atoken_rt.EncodeBuffers.for_shapes(sess, [(16, 32, 32, 3), (32, 48, 3)])
    assert buf.tokens == 4 * 4 + 6 and buf.samples == 2
    got = sess.encode(batch, out=buf)
    for name in TOKEN_FIELDS + ("embedding",):
        w, g = getattr(want, name), getattr(got, name)
        if name != "embedding":
            if w[0] is None:
                assert g[0] is None and g[1] is None
                continue
            w, g = w.packed, g.packed
            assert g.data_ptr() == getattr(buf, name).data_ptr()  # a view of the caller's buffer
        assert torch.equal(g, w), name
    # A second call writes the same buffers (the first result's tensors now show the new data).
    again = sess.encode(batch[:1], out=buf)
    assert again.latents.packed.data_ptr() == buf.latents.data_ptr()
    assert torch.equal(again.latents[0], want.latents[0])
    dec = sess.decode(got)
    assert torch.equal(dec.tokens[1], sess.decode(want).tokens[1])
    # Sampling (continuous) into buffers: the same draw as without them.
    if cfg == "tiny-soc":
        a = sess.encode(batch, sample=True, seed=5)
        b = sess.encode(batch, sample=True, seed=5, out=buf)
        assert torch.equal(a.latents.packed, b.latents.packed)


def test_encode_buffers_errors(sod):
    small = atoken_rt.EncodeBuffers(sod, tokens=4)
    with pytest.raises(ValueError, match="the batch has 24 tokens in 1 samples; the buffers "
                                         "hold 4 tokens and 1 samples"):
        sod.encode([_video(16, 32, 48)], out=small)
    other = make_session("tiny-soc")
    with pytest.raises(ValueError, match="not for this session"):
        other.encode([_video(4, 32, 32)], out=small)
    with pytest.raises(TypeError, match="out must be an EncodeBuffers"):
        sod.encode([_video(4, 32, 32)], out={})
    with pytest.raises(ValueError, match="positive ints"):
        atoken_rt.EncodeBuffers(sod, tokens=0)


def test_stream_with_preallocated_outputs(sod):
    vid = _video(40, 32, 32)
    whole = _whole(sod, vid)
    got = []
    stream = atoken_rt.VideoStream(sod, preallocate=True, depth=2,
                                   on_tokens=lambda c: got.append({k: getattr(c, k).clone()
                                                                   for k in TOKEN_FIELDS}))
    stream.push(vid)
    stream.flush()
    for name in TOKEN_FIELDS:
        assert torch.equal(torch.cat([g[name] for g in got]), getattr(whole, name)[0]), name
    assert stream._outs[0].latents.data_ptr() != stream._outs[1].latents.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graphs_buffers_dlpack_and_decode_stream():
    sess = make_session("tiny-sod", device="cuda", backend="triton", graphs=True,
                        deterministic=True)  # chunk-wise == whole, bit for bit
    vid = _video(36, 32, 32)
    dev = torch.from_numpy(vid).cuda()
    want = _whole(sess, vid)
    # Device frames through DLPack and in place: the same tokens as host frames.
    got = sess.encode([_DLPackOnly(dev)])
    assert torch.equal(got.indices[0], want.indices[0])
    # Caller-owned outputs on the graph path.
    buf = atoken_rt.EncodeBuffers.for_shapes(sess, [vid.shape])
    out = sess.encode([dev], out=buf)
    assert out.latents.packed.data_ptr() == buf.latents.data_ptr()
    assert torch.equal(out.indices[0], want.indices[0])
    assert torch.equal(out.embedding, want.embedding)
    # Stream of device frames with preallocated outputs, decoded back by a decode stream.
    # (poll() before flush: the tail chunk reuses chunk 0's output buffers, so chunk 0 must have
    # been taken; the decode stream copies what it decodes.)
    stream = atoken_rt.VideoStream(sess, preallocate=True)
    dstream = atoken_rt.VideoDecodeStream(sess)
    stream.push(dev)
    for c in stream.poll(wait=True):
        dstream.push(c)
    stream.flush()
    for c in stream.poll():
        dstream.push(c)
    dstream.flush()
    frames = torch.cat([d.frames for d in dstream.poll()])
    assert torch.equal(frames, sess.decode(want).samples[0])


def test_worker_thread_path_on_cpu(sod, monkeypatch):
    # The CUDA code path (encode on the session's worker thread, chunk buffers reused after their
    # chunk is done, delivery when the request completes), run on the CPU.
    from atoken_rt import stream as stream_mod
    monkeypatch.setattr(stream_mod._Pipeline, "_async", property(lambda self: True))
    vid = _video(45, 32, 32)
    whole = _whole(sod, vid)
    rng = np.random.default_rng(5)
    s = atoken_rt.VideoStream(sod, depth=2)
    _push_randomly(s, vid, rng)
    report = s.flush()
    chunks = s.poll()
    assert report.frames_dropped == 1 and [c.index for c in chunks] == [0, 1, 2]
    _check_equal_to_whole(sod, chunks, whole, vid, embeddings=False)
    d = atoken_rt.VideoDecodeStream(sod)
    for c in chunks:
        d.push(c)
    frames = torch.cat([x.frames for x in d])
    assert torch.equal(frames, sod.decode(whole).samples[0])
    # A bad chunk's error comes out where the chunk is delivered, once; the stream goes on.
    bad = atoken_rt.VideoStream(sod, depth=1)
    f = np.zeros((32, 32, 3), np.float32)
    bad.push(np.stack([f] * 15 + [f + 2]))
    with pytest.raises(ValueError, match=r"stream frames 0\.\.15: sample 0: float pixels"):
        bad.poll(wait=True)
    bad.push(np.stack([f] * 16))
    assert [c.index for c in bad.poll(wait=True)] == [1]


def test_unpolled_results_are_bounded(sod):
    """A caller that never polls (and gave no callback) gets a clear error before the stream
    takes more frames, not unbounded growth; after polling it goes on, and nothing was lost."""
    stream = atoken_rt.VideoStream(sod, max_ready=2)
    vid = _video(48)
    stream.push(vid[:32])                       # two chunks waiting
    with pytest.raises(RuntimeError, match="max_ready=2"):
        stream.push(vid[32:])
    assert stream.frames_pushed == 32           # the refused frames were not taken
    assert len(stream.poll()) == 2
    stream.push(vid[32:])
    assert [c.frame_start for c in stream.poll()] == [32]
    dec = atoken_rt.VideoDecodeStream(sod, max_ready=1)
    enc = sod.encode([vid[:16]])
    dec.push(enc)
    with pytest.raises(RuntimeError, match="max_ready=1"):
        dec.push(enc)
    with pytest.raises(ValueError, match="max_ready"):
        atoken_rt.VideoStream(sod, max_ready=0)


_NEGATIVE_STRIDES = r'''
import numpy as np, torch, atoken_rt, warnings
from atoken_rt.inputs import as_frames_tensor
from tests.test_stream import _DLPackOnly, _video
from tests.conftest import make_session

a = np.arange(4)[::-1]
t = as_frames_tensor(_DLPackOnly(a), "x")
assert t.tolist() == [3, 2, 1, 0], t
vid = _video(16, 32, 32)
flipped = vid[..., ::-1]                      # BGR -> RGB as a view: a negative stride
sess = make_session("tiny-sod")
want = sess.encode([np.ascontiguousarray(flipped)])
got = sess.encode([_DLPackOnly(flipped)])
assert torch.equal(got.indices[0], want.indices[0])
s = atoken_rt.VideoStream(sess)
s.push(_DLPackOnly(flipped))
s.flush()
assert torch.equal(s.poll()[0].indices, want.indices[0])
print("OK")
'''


def test_negative_strides_do_not_abort():
    """torch.from_dlpack of a negative-stride DLPack tensor aborts the process (c10::Error ->
    std::terminate): run in a subprocess, so an abort fails this test instead of killing pytest.
    Host producers are read through numpy and copied; the values must be the flipped ones."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", _NEGATIVE_STRIDES], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_cuda_array_interface_negative_strides_refused():
    """A __cuda_array_interface__ with a negative stride is refused with a ValueError before
    torch sees it (checked on the interface dict: no CUDA needed)."""
    from atoken_rt.interop import from_foreign

    class _CAI:
        __cuda_array_interface__ = {"shape": (4, 4, 3), "typestr": "|u1", "version": 3,
                                    "data": (1 << 20, False), "strides": (12, 3, -1)}
    with pytest.raises(ValueError, match="negative stride"):
        from_foreign(_CAI(), "stream frame 0")


def test_chunk_error_does_not_free_a_busy_buffer_or_lose_frames(sod, monkeypatch):
    """An earlier chunk's error raised by a push must not (a) let a chunk buffer still being read
    be refilled, nor (b) drop the rest of that push's frames."""
    import threading
    import time as _time
    from atoken_rt import stream as stream_mod
    monkeypatch.setattr(stream_mod._Pipeline, "_async", property(lambda self: True))
    vid = (_video(64, 32, 32).astype(np.float32) / 127.5 - 1).astype(np.float32)
    bad = vid.copy()
    bad[15] = 2.0  # chunk 0 fails validation (on the worker)
    # A worker whose timing is scripted: chunk 0 (and its error) finishes exactly when chunk 1
    # is submitted, and chunk 1 then waits on the worker until `slow` is set.
    go0, slow, handles = threading.Event(), threading.Event(), []
    orig = sod._submit

    def submit(fn, stream):
        if len(handles) == 1:
            go0.set()
            while not handles[0].done():
                _time.sleep(0.01)
        gate = (go0, slow)[len(handles)] if len(handles) < 2 else None
        job = fn if gate is None else (lambda: (gate.wait(30), fn())[1])
        handles.append(orig(job, stream))
        return handles[-1]
    monkeypatch.setattr(sod, "_submit", submit)
    s = atoken_rt.VideoStream(sod, depth=2)
    s.push(bad[:16])                     # chunk 0 (slot 0), not finished yet
    with pytest.raises(ValueError, match=r"stream frames 0\.\.15"):
        s.push(bad[16:40])               # chunk 1 submitted (slot 1), then chunk 0's error
    assert s.frames_pushed == 40         # every frame of the push was taken
    timer = threading.Timer(0.5, slow.set)
    timer.start()
    s.push(bad[40:64])                   # chunk 2 (slot 0), chunk 3 (slot 1: waits for chunk 1)
    s.flush()
    timer.join()
    chunks = s.poll()
    assert [c.index for c in chunks] == [1, 2, 3]
    for c in chunks:
        want = sod.encode([vid[c.frame_start:c.frame_start + 16]])
        assert torch.equal(c.latents, want.latents[0]), c.index


@pytest.mark.parametrize("worker", [False, True])
def test_preallocate_never_overwrites_an_undelivered_chunk(sod, monkeypatch, worker):
    """preallocate=True: chunk k's buffers are not written again (by chunk k + depth) before
    chunk k was handed to the caller; poll()-style consumption gets a RuntimeError, before any
    frame is taken, where a push would need buffers of chunks not yet polled."""
    if worker:
        from atoken_rt import stream as stream_mod
        monkeypatch.setattr(stream_mod._Pipeline, "_async", property(lambda self: True))
    vid = _video(64, 32, 32)
    whole = _whole(sod, vid)

    def snap(c):
        return {k: getattr(c, k).clone() for k in TOKEN_FIELDS}

    def check(got):
        for name in TOKEN_FIELDS:
            assert torch.equal(torch.cat([g[name] for g in got]), getattr(whole, name)[0]), name

    got = []  # callback: one 64-frame push, depth 2 (the callback takes each chunk in turn)
    s = atoken_rt.VideoStream(sod, preallocate=True, depth=2,
                              on_tokens=lambda c: got.append(snap(c)))
    s.push(vid)
    s.flush()
    check(got)
    p = atoken_rt.VideoStream(sod, preallocate=True, depth=2)  # poll()
    with pytest.raises(RuntimeError, match="preallocate"):
        p.push(vid)                      # 4 chunks, 2 buffer sets: refused, nothing taken
    assert p.frames_pushed == 0
    p.push(vid[:24])
    with pytest.raises(RuntimeError, match="preallocate"):
        p.push(vid[24:48])               # chunks 1, 2: chunk 2 over chunk 0, not yet polled
    assert p.frames_pushed == 24
    first = [snap(c) for c in p.poll(wait=True)]
    p.push(vid[24:56])
    second = [snap(c) for c in p.poll(wait=True)]
    p.push(vid[56:])
    p.flush()
    check(first + second + [snap(c) for c in p.poll()])


def test_sampled_stream_draws_like_the_whole_video(soc):
    """sample=True, seed=s: one generator per stream, drawn in chunk order. The noise of chunk k
    is then the rows of a whole-video draw (torch's CPU randn consumes the generator the same
    way for one [N, L] draw as for consecutive [n_k, L] draws when each n_k * L is a multiple
    of 16: L = 48 here and in every shipped config), so sampled latents equal the whole
    video's; chunks get different noise, and the same seed gives the same stream."""
    vid = _video(37)
    want = soc.encode([vid], sample=True, seed=3)
    mean = _whole(soc, vid)

    def run():
        s = atoken_rt.VideoStream(soc, sample=True, seed=3)
        for i in range(0, len(vid), 7):
            s.push(vid[i:i + 7])
        s.flush()
        return s.poll()
    chunks = run()
    got = torch.cat([c.latents for c in chunks])
    assert torch.equal(got, want.latents[0])
    assert not torch.equal(got, mean.latents[0])  # sampled, not the mean
    noise = [c.latents - c.moments[:, :48] for c in chunks]
    assert not torch.equal(noise[0], noise[1])    # each chunk its own noise
    assert torch.equal(torch.cat([c.latents for c in run()]), got)


def test_stream_time_past_4096_temporal_tokens(sod):
    """A live stream passes t = 4096 (16384 frames, ~9 minutes at 30 fps): its chunks still
    decode, through Session.decode (result or coords form) and VideoDecodeStream, to the frames
    of the same chunk at t = 0; a decode stream can be resynchronised after a gap."""
    vid = _video(32, 32, 32)
    ref = [sod.decode(_whole(sod, vid[i:i + 16])).samples[0] for i in (0, 16)]
    s = atoken_rt.VideoStream(sod)
    s.chunks = s.frames_pushed = 1023  # as if 1023 chunks had gone by: chunk k starts at 4k
    s.frames_pushed *= 16
    s.push(vid)
    chunks = s.poll()
    assert [int(c.coords[:, 0].min()) for c in chunks] == [4092, 4096]
    assert int(chunks[1].coords[:, 0].max()) == 4099
    for c, want in zip(chunks, ref):
        assert torch.equal(sod.decode(c.result).samples[0], want)
        got = sod.decode(coords=[c.coords], indices=[c.indices], kinds=["video"])
        assert torch.equal(got.samples[0], want)
        assert torch.equal(sod.decode(coords=[c.coords.numpy()], latents=[c.latents]).samples[0],
                           want)
    d = atoken_rt.VideoDecodeStream(sod)
    d.push(coords=chunks[0].coords, indices=chunks[0].indices)
    d.push(chunks[1])
    out = d.poll(wait=True)
    assert [x.frame_start for x in out] == [16368, 16384]
    assert torch.equal(out[0].frames, ref[0]) and torch.equal(out[1].frames, ref[1])
    # A lost chunk: the next one is refused until reset() (then any start is accepted).
    with pytest.raises(ValueError, match=r"expected t=4100.*reset\(\)"):
        d.push(coords=chunks[1].coords.numpy() + [8, 0, 0, 0], indices=chunks[1].indices)
    d.reset()
    d.push(coords=chunks[1].coords.numpy() + [8, 0, 0, 0], indices=chunks[1].indices)
    assert [x.frame_start for x in d.poll(wait=True)] == [16416]


def test_decode_stream_snapshots_its_inputs(sod, monkeypatch):
    """VideoDecodeStream.push copies what it decodes later (on the worker thread): a caller
    that reuses its coords/indices arrays, or a chunk's preallocated buffers, right after push
    does not change the frames."""
    import threading
    from atoken_rt import stream as stream_mod
    monkeypatch.setattr(stream_mod._Pipeline, "_async", property(lambda self: True))
    vid = _video(16, 32, 32)
    enc = _whole(sod, vid)
    want = sod.decode(enc).samples[0]
    d = atoken_rt.VideoDecodeStream(sod)
    ev = threading.Event()
    sod._submit(lambda: ev.wait(30), None)  # the worker is busy: the pushes below wait
    coords, idx = enc.coords[0].numpy().copy(), enc.indices[0].clone()
    d.push(coords=coords, indices=idx)
    lat = enc.latents[0].clone()
    d.push(coords=coords + [4, 0, 0, 0], latents=lat)
    chunk = sod.encode([vid])
    d2 = atoken_rt.VideoDecodeStream(sod)
    d2.push(chunk)
    coords[:] = coords[::-1]                # the caller reuses its arrays at once
    idx.zero_()
    lat.zero_()
    chunk.latents.packed.zero_()
    ev.set()
    out = d.poll(wait=True) + d2.poll(wait=True)
    assert len(out) == 3 and all(torch.equal(x.frames, want) for x in out)


def test_device_copies_are_waited_for_and_their_sources_kept(sod, monkeypatch):
    """The CUDA copy bookkeeping, run on the CPU with stand-in events: each push's copy gets an
    event; the chunk's encode (on the worker) first waits for the events of every push that
    filled its buffer, whatever stream each was on; the pushed arrays stay referenced until
    the chunk is delivered (a DLPack producer's deleter must not run while its copy is queued),
    and copies of frames never encoded (a dropped tail) are waited for on the host."""
    import gc
    import threading
    import weakref
    from atoken_rt import stream as stream_mod
    monkeypatch.setattr(stream_mod._Pipeline, "_async", property(lambda self: True))
    log = []

    class _Event:
        def __init__(self):
            self.id = len(log)
            log.append(("record", self.id))

        def synchronize(self):
            log.append(("synchronize", self.id))

    monkeypatch.setattr(stream_mod, "_record_copy", lambda buf: _Event())
    monkeypatch.setattr(stream_mod, "_wait_copies",
                        lambda copies: log.append(("wait", [e.id for e, _ in copies])))
    encode = sod.encode
    monkeypatch.setattr(sod, "encode",
                        lambda *a, **k: (log.append(("encode",)), encode(*a, **k))[1])
    vid = _video(18, 32, 32)
    s = atoken_rt.VideoStream(sod)
    ev = threading.Event()
    sod._submit(lambda: ev.wait(30), None)  # the worker is busy until ev is set
    parts = [np.ascontiguousarray(vid[a:b]) for a, b in ((0, 5), (5, 16), (16, 18))]
    refs = [weakref.ref(p) for p in parts]
    for p in parts:
        s.push(p)
    del parts, p
    gc.collect()
    assert all(r() is not None for r in refs)   # queued copies: sources alive
    ev.set()
    chunk = s.poll(wait=True)[0]
    assert log[:3] == [("record", 0), ("record", 1), ("record", 2)]
    assert log[3:5] == [("wait", [0, 1]), ("encode",)]  # waits for both pushes, then encodes
    gc.collect()
    assert refs[0]() is None and refs[1]() is None      # delivered: released
    assert refs[2]() is not None                        # frames 16, 17: still buffered
    s.flush()                                           # 2 frames: dropped (4-frame rule)
    assert log[-1] == ("synchronize", 2)
    gc.collect()
    assert refs[2]() is None
    assert torch.equal(chunk.indices, _whole(sod, vid[:16]).indices[0])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_device_frames_pushed_on_different_streams():
    """Frames of one chunk pushed on two CUDA streams, the first copy queued behind a long
    kernel: the encode (on the second stream) waits for both copies; the first source, dropped
    by the caller at once, is kept until its copy is done."""
    sess = make_session("tiny-sod", device="cuda", deterministic=True)
    vid = _video(16, 32, 32)
    want = _whole(sess, vid)
    dev = torch.from_numpy(vid).cuda()
    torch.cuda.synchronize()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    stream = atoken_rt.VideoStream(sess)
    with torch.cuda.stream(s1):
        src = dev[:8].clone()
        torch.cuda._sleep(500_000_000)  # the copy below waits behind ~0.3 s of GPU time
        stream.push(src)
        del src
        junk = torch.empty_like(dev[:8]).fill_(7)  # may reuse src's memory: after the copy
    with torch.cuda.stream(s2):
        stream.push(dev[8:])
    stream.flush()
    chunk = stream.poll()[0]
    torch.cuda.synchronize()
    assert torch.equal(chunk.indices, want.indices[0]) and junk.sum() > 0


def test_concurrent_first_submits_make_one_worker(monkeypatch):
    """Two threads submitting first at once must share one executor (two would break the
    submission order that streams rely on): Session._submit creates it under a lock."""
    import threading
    import time as _time
    from atoken_rt import session as session_mod
    made = []

    class _Slow(session_mod.ThreadPoolExecutor):
        def __init__(self, *a, **k):
            made.append(self)
            _time.sleep(0.05)  # widen the window between the check and the assignment
            super().__init__(*a, **k)
    monkeypatch.setattr(session_mod, "ThreadPoolExecutor", _Slow)
    sess = make_session("tiny-sod")
    barrier = threading.Barrier(6)
    handles = []

    def go(i):
        barrier.wait()
        handles.append(sess._submit(lambda: i, None))
    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and sorted(h.wait() for h in handles) == list(range(6))
    sess.close()
