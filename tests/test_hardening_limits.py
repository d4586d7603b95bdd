"""Issue 10, resource exhaustion: per-sample limits, bounded caches, memory-proportional padding,
memory-efficient static attention on CPU, and inputs that are not silently misread."""

from __future__ import annotations

import json
import re
import time
import warnings

import numpy as np
import pytest
import torch

import atoken_rt
from atoken_rt import Limits
from atoken_rt import reference as ref

from .conftest import make_session, random_voxels


@pytest.fixture(scope="module")
def sod():
    return make_session("tiny-sod")


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# limits on encode
# ------------------------------------------------------------------------------------------------

def test_limits_validate_their_fields():
    with pytest.raises(ValueError, match="max_pixels"):
        Limits(max_pixels=0)
    with pytest.raises(TypeError, match="Limits"):
        make_session("tiny-sod", limits={"max_pixels": 5})


def test_huge_image_fails_fast_without_allocating(sod):
    # A 20000 x 20000 image as a zero-stride view (no memory here): the check reads the shape
    # only; preparing it would allocate ~10 GB.
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"sample 1: frames of 20000x20000 = 400000000 pixels "
                                         r"exceed the limit of 16777216"):
        sod.encode([_img(32, 32), huge])
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("kw, sample, msg", [
    (dict(max_pixels=64 * 64), _img(80, 64), r"sample 0: frames of 64x80 = 5120 pixels exceed "
                                             r"the limit of 4096"),
    (dict(max_frames=8), np.zeros((9, 16, 16, 3), np.uint8), r"sample 0: 9 frames exceed the "
                                                              r"limit of 8"),
    (dict(max_tokens_per_sample=15), _img(64, 64), r"sample 0: shape \(64, 64, 3\) makes 16 "
                                                   r"tokens, more than the limit of 15"),
    (dict(max_tokens_per_sample=31), np.zeros((8, 64, 64, 3), np.uint8), r"makes 32 tokens"),
    (dict(max_voxels=39), random_voxels(40, 0), r"sample 0 \(Voxels\): 40 voxels exceed the "
                                                r"limit of 39"),
])
def test_each_limit_names_sample_size_and_limit(kw, sample, msg):
    sess = make_session("tiny-sod", limits=Limits(**kw))
    with pytest.raises(ValueError, match=msg):
        sess.encode([sample])


def test_within_limits_encodes(quiet):
    sess = make_session("tiny-sod", limits=Limits(max_pixels=64 * 64, max_tokens_per_sample=16))
    enc = sess.encode([_img(64, 64)])
    assert enc.coords[0].shape == (16, 4)


# ------------------------------------------------------------------------------------------------
# limits on decode (coords from an untrusted token file)
# ------------------------------------------------------------------------------------------------

def test_decode_rejects_coords_beyond_any_encodable_grid(monkeypatch):
    sess = make_session("tiny-sod", limits=Limits(max_pixels=64 * 64 * 256))
    called = []
    monkeypatch.setattr(ref, "interpolate_pos_table",
                        lambda *a, **k: called.append(a) or pytest.fail("table built"))
    lat = torch.zeros(2, 48)
    # One stray token far out: the table would be 65 x 65 (4225 > 4096 positions).
    coords = np.array([[0, 0, 0, 0], [0, 64, 64, 0]], np.int32)
    with pytest.raises(ValueError, match=r"sample 0: coords span a 65x65 token grid \(4225 "
                                         r"positions\), more than the 4096"):
        sess.decode(coords=[coords], latents=[lat])
    with pytest.raises(ValueError, match=r"sample 0: 3D coords"):
        sess.decode(coords=[np.array([[1, 70, 0, 1]], np.int32)], latents=[lat[:1]])
    with pytest.raises(ValueError, match=r"span 2001 temporal tokens"):
        sess.decode(coords=[np.array([[0, 0, 0, 0], [2000, 0, 0, 0]], np.int32)], latents=[lat])
    assert not called


def test_decode_bounds_the_temporal_span_not_the_stream_time():
    """A streamed chunk carries its stream time (t = 2000 after 8000 frames): nothing is sized
    by t (the splitter re-bases each 16-frame chunk), so only the span is limited."""
    sess = make_session("tiny-sod")
    lat = torch.randn(4, 48)
    far = np.array([[2000, 0, 0, 0], [2000, 0, 1, 0], [2001, 0, 0, 0], [2001, 0, 1, 0]], np.int32)
    near = far - np.array([2000, 0, 0, 0], np.int32)
    a = sess.decode(coords=[far], latents=[lat]).samples[0]
    b = sess.decode(coords=[near], latents=[lat]).samples[0]
    assert torch.equal(a, b)


def test_decode_default_limits_reject_the_4095_token(sod, monkeypatch):
    monkeypatch.setattr(ref, "interpolate_pos_table", lambda *a, **k: pytest.fail("table built"))
    with pytest.raises(ValueError, match=r"4096x4096 token grid"):
        sod.decode(coords=[np.array([[0, 4095, 4095, 0]], np.int32)],
                   indices=[np.zeros((1, 8), np.int32)])


# ------------------------------------------------------------------------------------------------
# bounded caches
# ------------------------------------------------------------------------------------------------

def test_position_table_cache_is_a_bounded_lru():
    from atoken_rt import model as M
    pe = M.PositionTable(8)
    for r in range(1, 101):  # 100 grid shapes: a service fed arbitrary image sizes
        pe.table(r, 3)
    assert len(pe._cache) == M.PE_CACHE_ENTRIES
    assert (100, 3, torch.float32, pe.position_embedding.weight.device,
            pe.position_embedding.weight.data_ptr()) in pe._cache  # the most recent is kept
    t = pe.table(5, 7)
    assert torch.equal(t, ref.interpolate_pos_table(pe.position_embedding.weight, 16, 5, 7))


def test_lru_cache_bounds_bytes_and_skips_oversized_values():
    from atoken_rt.caches import LRUCache
    evicted = []
    c = LRUCache(10, 1000, on_evict=lambda k, v: evicted.append(k))
    for i in range(5):
        c.put(i, torch.zeros(50))  # 200 bytes each
    assert len(c) == 5 and c.nbytes == 1000
    c.get(0)  # 0 becomes the most recent: 1 is evicted next
    c.put(5, torch.zeros(50))
    assert evicted == [1] and c.nbytes == 1000
    c.put("big", torch.zeros(251))  # 1004 bytes: larger than the budget, never kept
    assert "big" not in c and c.nbytes <= 1000


def test_cpu_workspace_does_not_keep_huge_buffers():
    from atoken_rt import model as M
    ops = M.TorchOps()
    rows = M.WORKSPACE_MAX_BYTES // (4 * 1024) + 1
    ops._scratch("fc1", (rows, 1024), torch.float32)
    assert "fc1" not in ops._workspace
    ops._scratch("fc1", (4, 1024), torch.float32)
    assert "fc1" in ops._workspace


def test_cpu_static_buffers_are_a_bounded_lru(monkeypatch, quiet):
    import atoken_rt.session as S
    from atoken_rt.static import BucketSet
    from atoken_rt.caches import tensor_bytes
    from atoken_rt.static import Bucket
    sess = make_session("tiny-sod", graphs=True, buckets=BucketSet((256,), (1, 2)))
    one = tensor_bytes(sess._static_buffers(Bucket(256, 1)).t)
    monkeypatch.setattr(S, "STATIC_BUFFER_BYTES", one * 3 // 2)  # room for one bucket's buffers
    sess = make_session("tiny-sod", graphs=True, buckets=BucketSet((256,), (1, 2)))
    dyn = make_session("tiny-sod", graphs=False)
    a, b = _img(64, 64, 1), _img(32, 32, 2)
    for batch in ([a], [a, b], [b]):  # buckets (256, 1), (256, 2), (256, 1)
        enc = sess.encode(batch)
        ref_enc = dyn.encode(batch)
        torch.testing.assert_close(enc.features.packed, ref_enc.features.packed)
        assert len(sess._buffers) == 1


# ------------------------------------------------------------------------------------------------
# graphs=True on CPU: memory-bounded attention
# ------------------------------------------------------------------------------------------------

class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (elements) with last dim ``last`` that ops create while active
    (attention scores and masks over all keys of a bucket end in the bucket size)."""

    def __init__(self, last):
        super().__init__()
        self.last, self.largest = last, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.last:
                self.largest = max(self.largest, t.numel())
        return out


def test_cpu_static_attention_is_memory_bounded(monkeypatch, quiet):
    from atoken_rt import model as M
    from atoken_rt.static import BucketSet
    monkeypatch.setattr(M, "STATIC_ATTENTION_SCORE_ELEMS", 1 << 14)
    sess = make_session("tiny-sod", graphs=True, buckets=BucketSet((256,), (4,)))
    dyn = make_session("tiny-sod", graphs=False)
    batch = [_img(64, 64, s) for s in range(3)]  # 3 sequences of 16 tokens in a 256 bucket
    heads = sess.config.encoder.num_heads
    enc = sess.encode(batch)  # warm-up (one-time tables)
    with _Largest(256) as mode:
        enc = sess.encode(batch)
        dec = sess.decode(enc)
    # Dense: [heads, 256, 256] scores and a [256, 256] mask; blocked: <= 2^14 at a time.
    assert mode.largest <= 1 << 14 < heads * 256 * 256
    torch.testing.assert_close(enc.features.packed, dyn.encode(batch).features.packed)
    torch.testing.assert_close(dec.tokens.packed, dyn.decode(enc).tokens.packed)


def test_blocked_masked_attention_equals_per_sequence():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 8, generator=g) for _ in range(3))
    q[37:] = float("nan")  # padding rows may hold anything
    cu = torch.tensor([0, 5, 17, 30, 37, 37], dtype=torch.int32)
    want = ref.attention_per_sequence(q[:37], k[:37], v[:37], [0, 5, 17, 30, 37])
    for elems in (None, 1, 2 * 40 * 7):
        got = ref.varlen_attention_masked(q, k, v, cu, max_score_elems=elems)
        torch.testing.assert_close(got[:37], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[37:], torch.zeros(3, 2, 8))


# ------------------------------------------------------------------------------------------------
# the 4-frame rule without a 4x padded copy
# ------------------------------------------------------------------------------------------------

class _Big(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the distinct storages of at least ``numel`` elements that ops create while active
    (in-place ops and views return storages already seen)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, set()

    @property
    def count(self) -> int:
        return len(self.seen)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves(
            (args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs:  # new memory, not a view or in-place result
                    self.seen.add(ptr)
        return out


def _plain_tokens(frames: np.ndarray) -> np.ndarray:
    """Spec §1.2 written out: zero-pad to 4 frames, centre crop, f[((pt*16+ph)*16+pw)*3+c]."""
    t, h, w, _ = frames.shape
    v = np.zeros((max(t, 4), h, w, 3), np.float32)
    v[:t] = frames
    h2, w2 = h // 16 * 16, w // 16 * 16
    top, left = (h - h2) // 2, (w - w2) // 2
    out = []
    for i in range(h2 // 16):
        for j in range(w2 // 16):
            tok = np.zeros(3072, np.float32)
            for pt in range(4):
                for ph in range(16):
                    for pw in range(16):
                        k = ((pt * 16 + ph) * 16 + pw) * 3
                        tok[k:k + 3] = v[pt, top + 16 * i + ph, left + 16 * j + pw]
            out.append(tok)
    return np.stack(out)


@pytest.mark.parametrize("shape", [(40, 56, 3), (2, 33, 32, 3)])
def test_padding_allocates_only_the_tokens(shape):
    from atoken_rt.inputs import prepare_pixels
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
    frames = x.numpy()[None] if len(shape) == 3 else x.numpy()
    h2, w2 = shape[-3] // 16 * 16, shape[-2] // 16 * 16
    with _Big(4 * h2 * w2 * 3) as mode:  # tensors at least 4x one cropped frame
        p = prepare_pixels(x, 0)
    assert mode.count == 1  # the tokens; no zero-padded copy of the frames
    np.testing.assert_array_equal(p.feats.numpy(), _plain_tokens(frames))


def test_single_image_encode_makes_one_token_sized_tensor(quiet):
    sess = make_session("tiny-sod")
    img = _img(64, 96)
    with _Big(64 * 96 * 3 * 4) as mode:
        sess.encode([img])
    assert mode.count == 1  # before: the pad, the tokens and the batch's concatenated copy


# ------------------------------------------------------------------------------------------------
# inputs not silently misread
# ------------------------------------------------------------------------------------------------

def test_float_in_unit_range_warns_with_the_fix(sod):
    x = torch.rand(32, 32, 3)  # what torchvision's ToTensor (permuted) gives
    with pytest.warns(atoken_rt.InputWarning, match=r"samples \[1\]: float pixels all lie in "
                                                    r"\[0, 1\].*x \* 2 - 1"):
        sod.encode([_img(32, 32), x])
    with warnings.catch_warnings():
        warnings.simplefilter("error", atoken_rt.InputWarning)
        sod.encode([x * 2 - 1])  # proper [-1, 1]: no warning
        sod.encode([torch.zeros(32, 32, 3)])  # all mid-grey is a valid [-1, 1] image


class _DLPackOnly:
    """A foreign array (CuPy/JAX-like): only the DLPack protocol, over a numpy buffer."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


@pytest.mark.parametrize("kind", ["numpy", "torch", "dlpack", "voxels"])
def test_encode_async_snapshots_the_callers_buffers(sod, kind):
    import threading
    rng = np.random.default_rng(5)
    if kind == "voxels":
        v = random_voxels(20, 3)
        buf, first = v, atoken_rt.Voxels(v.coords.copy(), v.feats.copy())
    else:
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        buf = {"numpy": arr, "torch": torch.from_numpy(arr), "dlpack": _DLPackOnly(arr)}[kind]
        first = arr.copy()
    want = sod.encode([first])
    gate = threading.Event()
    blocker = sod._submit(gate.wait, None)  # the worker is busy: the request waits in the queue
    handle = sod.encode_async([buf])
    if kind == "voxels":  # the capture loop reuses its buffers for the next frame
        buf.feats[:] = 0.5
    else:
        arr[:] = 7
    gate.set()
    blocker.wait()
    got = handle.wait()
    assert torch.equal(got.latents.packed, want.latents.packed)


def test_encode_async_over_limit_fails_at_wait_without_copying():
    sess = make_session("tiny-sod", limits=Limits(max_pixels=32 * 32))
    h = sess.encode_async([_img(64, 64)])
    with pytest.raises(ValueError, match="sample 0: frames of 64x64"):
        h.wait()


# ------------------------------------------------------------------------------------------------
# model size sanity bound (before any module is built)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, msg", [
    (dict(num_blocks=200000), r"config tiny-sod: encoder has 200000 blocks, more than the sanity "
                              r"bound of 1024"),
    (dict(width=65536, num_heads=512, mlp_width=65536), r"parameters, more than the sanity bound"),
])
def test_config_of_absurd_size_fails_before_building(change, msg):
    import dataclasses
    cfg = atoken_rt.load_config("tiny-sod")
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **change))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=msg):
        atoken_rt.Session(cfg)
    assert time.perf_counter() - t0 < 2.0


def test_decode_checks_row_counts_before_converting(sod, monkeypatch):
    called = []
    monkeypatch.setattr(sod, "indices_to_codes", lambda v: called.append(v) or pytest.fail("ran"))
    with pytest.raises(ValueError, match=r"sample 0: 1 coords but 5000 latent rows"):
        sod.decode(coords=[np.zeros((1, 4), np.int32)], indices=[np.zeros((5000, 8), np.int32)])
    assert not called


def test_dataset_reader_turns_a_decompression_bomb_into_a_failure(tmp_path):
    from atoken_rt import media
    from atoken_rt.data import readers
    from .test_media import _png
    from atoken_rt.data.sources import Item
    path = _png(tmp_path / "bomb.png", None, depth=1, size=(20000, 20000))
    recs = list(readers.read_chunk([(0, Item(key=str(path), source=str(path), kind="file"))],
                                   readers.Preprocess()))
    failures = [r for r in recs if isinstance(r, readers.Failure)]
    assert len(failures) == 1 and re.search(r"bomb.png: refused as a decompression bomb",
                                            failures[0].error)
    # Over our own max_pixels but under Pillow's guard: refused from the header, as media.load
    # words it.
    small = readers.Preprocess(limits=Limits(max_pixels=64 * 64))
    path = _png(tmp_path / "big.png", None, depth=1, size=(80, 64))
    recs = list(readers.read_chunk([(0, Item(key=str(path), source=str(path), kind="file"))],
                                   small))
    assert [r.error for r in recs if isinstance(r, readers.Failure)] == [
        f"{path}: 80x64 = 5120 pixels exceed the limit of 4096 per frame (Limits.max_pixels)"]


def test_models_with_bounded_caches_still_deepcopy():
    import copy

    from atoken_rt import model as M
    pe = M.PositionTable(8)
    pe.table(3, 3)
    twin = copy.deepcopy(pe)
    assert len(twin._cache) == 0 and torch.equal(twin.table(3, 3), pe.table(3, 3))


def test_full_voxel_grid_fails_fast_by_default(sod):
    m = 64 ** 3  # every voxel: minutes of attention; the default max_voxels is 65536
    coords = np.stack(np.unravel_index(np.arange(m), (64, 64, 64)), 1).astype(np.int32)
    feats = np.broadcast_to(np.zeros((1, 768), np.float32), (m, 768))  # no memory
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"sample 0 \(Voxels\): 262144 voxels exceed the limit "
                                         r"of 65536"):
        sod.encode([atoken_rt.Voxels(coords, feats)])
    assert time.perf_counter() - t0 < 1.0


def test_cli_decode_of_a_crafted_token_file_fails_cleanly(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from safetensors import safe_open

    from atoken_rt import cli, media

    from .conftest import WEIGHTS
    model = ["--config", "tiny-sod", "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet"]
    Image.fromarray(_img(32, 32)).save(tmp_path / "a.png")
    good = tmp_path / "good.safetensors"
    assert cli.main(["encode", str(tmp_path / "a.png"), "--out", str(good), *model]) == 0
    with safe_open(str(good), framework="pt") as f:  # the same file, one token moved far out
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["atoken_rt"])
    tensors["sample.0.coords"][-1] = torch.tensor([0, 4095, 4095, 0], dtype=torch.int32)
    evil = media.write_token_file(tmp_path / "evil.safetensors", tensors, meta)
    monkeypatch.setattr(ref, "interpolate_pos_table", lambda *a, **k: pytest.fail("table built"))
    assert cli.main(["decode", str(evil), "--out", str(tmp_path / "o"), *model]) != 0
    # Refused before any work, in one line naming the file and the sample: by the token-file
    # validation (kind vs coords) or, past it, by the decode limits.
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(r"evil.safetensors: (samples 0..0: )?sample 0: (coords span a 4096x4096 "
                     r"token grid|field 'kind' is 'image' but the coords are not a full)", err)
