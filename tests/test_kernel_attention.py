"""kernels/attention.py: varlen attention against atoken_rt.reference.attention_per_sequence.

Tolerance (FlashAttention's rule): the kernel's error against the fp32 oracle is at most twice the
error of the same torch math run in the low-precision dtype (scores, scale and cap in the dtype,
softmax in fp32, probabilities rounded to the dtype before P @ V: FA's ``upcast=False``
reference), plus a small floor; checked on the max abs error and on the relative Frobenius error.
Under the CPU interpreter tl.dot on bf16 is wrong (ENGINEERING.md), so bf16 runs only on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import DEVICE, rel_err, requires_cuda

pytest.importorskip("triton")

from atoken_rt import reference as ref  # noqa: E402
from atoken_rt.kernels import attention as attn_mod  # noqa: E402
from atoken_rt.kernels.attention import varlen_attention  # noqa: E402

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]
# Floors of the max-error check, in units of the output's largest magnitude, and of the Frobenius
# check. In fp32 the "low-precision" math is the oracle itself (zero error), so the floor alone
# bounds the kernel: scores of magnitude ~30 (softcap tests) carry ~1e-5 rounding noise in any
# fp32 order of operations, and on a GPU fp32 products run as 3xTF32 (~2^-21 relative).
FLOOR_ABS = {torch.float32: 3e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
FLOOR_REL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}

on_cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="interpreter block sizes (CPU only)")


def _dtype_id(d):
    return str(d).removeprefix("torch.")


def _cu(lengths, capacity=None, start=0):
    """Host list [start, start + cumsum(lengths)], padded to capacity + 1 entries by repeats."""
    cu = [start]
    for n in lengths:
        cu.append(cu[-1] + n)
    if capacity is not None:
        cu += [cu[-1]] * (capacity + 1 - len(cu))
    return cu


def _dev(cu):
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _qkv(n, h, d, dtype, scale=1.0):
    """q, k, v as strided views of one [n, 3, h, d] tensor (a QKV projection's layout)."""
    qkv = (scale * torch.randn(n, 3, h, d, device=DEVICE)).to(dtype)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _lowp_attention(q, k, v, cu_q, cu_k=None, scale=None, softcap=0.0):
    """attention_per_sequence with FA's ``upcast=False`` rounding points, in q.dtype."""
    cu_k = cu_q if cu_k is None else cu_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        a, b, c, e = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        if b == a or e == c:
            continue
        sc = torch.einsum("qhd,khd->hqk", q[a:b], k[c:e]) * scale
        if softcap > 0:
            sc = softcap * torch.tanh(sc / softcap)
        p = sc.float().softmax(-1).to(q.dtype)
        out[a:b] = torch.einsum("hqk,khd->qhd", p, v[c:e])
    return out


def _check(out, q, k, v, cu_q, cu_k=None, scale=None, softcap=0.0):
    """FA's rule against the fp32 oracle; returns the oracle (in fp32)."""
    want = ref.attention_per_sequence(q.float(), k.float(), v.float(), cu_q, cu_k, scale=scale,
                                      softcap=softcap)
    lowp = _lowp_attention(q, k, v, cu_q, cu_k, scale=scale, softcap=softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err = (out.float() - want).abs().max().item()
    err_lowp = (lowp.float() - want).abs().max().item()
    floor = FLOOR_ABS[q.dtype] * max(1.0, want.abs().max().item())
    assert err <= 2 * err_lowp + floor, (err, err_lowp, floor)
    if want.norm() > 0:
        rel, rel_lowp = rel_err(out, want), rel_err(lowp, want)
        assert rel <= 2 * rel_lowp + FLOOR_REL[q.dtype], (rel, rel_lowp)
    return want


# ---------------------------------------------------------------------------------------------
# Numerics against the oracle
# ---------------------------------------------------------------------------------------------

# (name, sequence lengths, heads): single sequences of 1, 17 and 423 tokens (the long one with one
# head to keep the interpreter fast), and a packed batch of mixed lengths with an empty sequence.
CASES = [
    ("L1", [1], 2),
    ("L17", [17], 2),
    ("L423", [423], 1),
    ("mixed", [5, 1, 100, 0, 17, 64], 2),
]


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("head_dim", [72, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name,lengths,heads", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, lengths, heads, dtype, head_dim, softcap):
    cu = _cu(lengths)
    n = cu[-1]
    # Wider scores under the cap so that tanh is far from linear.
    q, k, v = _qkv(n, heads, head_dim, dtype, scale=3.0 if softcap else 1.0)
    out = varlen_attention(q, k, v, _dev(cu), max(lengths), softcap=softcap)
    _check(out, q, k, v, cu, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_each_sequence_equals_itself_alone(dtype):
    """No leakage across sequences: each slice of a packed run is bit-identical to a run of that
    sequence alone (tiles start at each sequence's first row, so the arithmetic is the same; the
    same max_seqlen bound keeps the GPU autotuner on the same tile config)."""
    lengths = [17, 1, 70, 33]
    cu = _cu(lengths)
    q, k, v = _qkv(cu[-1], 2, 72, dtype)
    out = varlen_attention(q, k, v, _dev(cu), max(lengths))
    for s, n in enumerate(lengths):
        a, b = cu[s], cu[s + 1]
        alone = varlen_attention(q[a:b], k[a:b], v[a:b], _dev([0, n]), max(lengths))
        assert torch.equal(out[a:b], alone), s
        _check(alone, q[a:b], k[a:b], v[a:b], [0, n])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_separate_key_lengths(dtype):
    """Lq != Lk per sequence (queries are the current tokens, keys include cached ones): a
    query-only sequence (no keys: zero rows), a key-only one, single-query cross attention."""
    lq = [3, 17, 0, 1, 20, 4]
    lk = [50, 10, 15, 40, 0, 4]
    cu_q, cu_k = _cu(lq), _cu(lk)
    h, d = 2, 72
    q = torch.randn(cu_q[-1], h, d, device=DEVICE).to(dtype)
    kv = torch.randn(cu_k[-1], 2, h, d, device=DEVICE).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    out = varlen_attention(q, k, v, _dev(cu_q), max(lq), cu_seqlens_k=_dev(cu_k),
                           max_seqlen_k=max(lk))
    _check(out, q, k, v, cu_q, cu_k)
    assert not out[cu_q[4]:cu_q[5]].any()  # 20 queries, no keys


@pytest.mark.parametrize("head_dim", [72, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_every_row_written(dtype, head_dim):
    """Fixed-capacity cu_seqlens (trailing repeats), rows before cu[0] and after the last live
    sequence: `out` starts as NaN and every row not covered by a sequence comes out 0."""
    lengths = [9, 40, 3]
    lead, tail, cap = 5, 70, 6
    cu = _cu(lengths, capacity=cap, start=lead)
    n = cu[-1] + tail
    q, k, v = _qkv(n, 2, head_dim, dtype)
    out = torch.full_like(q, float("nan")).contiguous()
    got = varlen_attention(q, k, v, _dev(cu), 64, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = _check(out, q, k, v, cu)
    assert not out[:lead].any() and not out[cu[-1]:].any()
    assert out[lead:cu[-1]].abs().sum() > 0 and want[:lead].abs().sum() == 0


def test_num_seqs_below_capacity():
    """Only the first num_seqs sequences run; rows past cu[num_seqs] are zero even where later
    cu entries describe live sequences."""
    cu = [2, 10, 30, 40, 47]
    n = 50
    q, k, v = _qkv(n, 2, 72, torch.float32)
    out = torch.full_like(q, float("nan")).contiguous()
    varlen_attention(q, k, v, _dev(cu), 20, num_seqs=2, out=out)
    _check(out, q, k, v, cu[:3])
    assert not out[30:].any() and not out[:2].any()
    varlen_attention(q, k, v, _dev(cu), 20, num_seqs=0, out=out)
    assert not out.any()


def test_softcap_saturates():
    """A small cap (2) with large scores: tanh saturates to +-1 without overflow or NaN."""
    cu = _cu([30, 7])
    q, k, v = _qkv(cu[-1], 2, 72, torch.float32, scale=10.0)
    out = varlen_attention(q, k, v, _dev(cu), 30, softcap=2.0)
    _check(out, q, k, v, cu, softcap=2.0)


def test_custom_scale():
    cu = _cu([20, 45])
    q, k, v = _qkv(cu[-1], 2, 64, torch.float32)
    out = varlen_attention(q, k, v, _dev(cu), 45, scale=0.3)
    _check(out, q, k, v, cu, scale=0.3)


@pytest.mark.parametrize("head_dim", [8, 40, 96, 128])
def test_other_head_dims(head_dim):
    """Generic dims (multiples of 8 up to 128): one padded piece or a 2-piece split."""
    cu = _cu([30, 1, 70])
    q, k, v = _qkv(cu[-1], 2, head_dim, torch.float32)
    out = varlen_attention(q, k, v, _dev(cu), 70)
    _check(out, q, k, v, cu)


def test_split_head_dim():
    split = attn_mod._split_head_dim
    assert split(72) == (64, 16)  # 80 columns of work, not 128
    assert split(64) == (64, 0) and split(128) == (128, 0)
    assert split(96) == (64, 32) and split(40) == (32, 16)
    assert split(8) == (16, 0) and split(24) == (32, 0) and split(112) == (128, 0)


@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_head_dim_split_on_and_off(dtype, split):
    """Head dim 72 as one padded 128-wide piece (what fp16/bf16 use on a GPU) and as 64 + 16,
    over the cases that broke the split on an H200 under Triton 3.6 (a masked key tail after full
    tiles, sequences shorter than a tile, empty capacity slots). The split in 16-bit on a GPU is
    the known miscompile: skipped there, not asserted."""
    if split and dtype != torch.float32 and DEVICE == "cuda":
        pytest.skip("Triton 3.6 miscompiles the split head dim in 16-bit on sm_90")
    for lengths in ([64, 64, 17], [300, 5, 1], [129, 1, 200]):
        cu = _cu(lengths, capacity=len(lengths) + 3)
        q, k, v = _qkv(cu[-1], 2, 72, dtype)
        for grid in ("per_sequence", "packed"):
            out = varlen_attention(q, k, v, _dev(cu), max(lengths) + 100, grid=grid,
                                   split_head_dim=split)
            _check(out, q, k, v, cu)


@on_cpu_only
@pytest.mark.parametrize("blocks", [(16, 16), (32, 64), (128, 64)], ids=str)
def test_block_sizes(monkeypatch, blocks):
    """Other tile shapes (the GPU's 128 x 64 among them) through the interpreter."""
    monkeypatch.setattr(attn_mod, "_interpreter_blocks", lambda: blocks)
    cu = _cu([1, 17, 130, 64], capacity=6, start=3)
    q, k, v = _qkv(cu[-1] + 9, 1, 72, torch.float16)
    out = torch.full_like(q, float("nan")).contiguous()
    varlen_attention(q, k, v, _dev(cu), 130, out=out, softcap=30.0)
    _check(out, q, k, v, cu, softcap=30.0)


def test_inputs_untouched():
    cu = _cu([17, 40])
    q, k, v = _qkv(cu[-1], 2, 72, torch.float16)
    cu_t = _dev(cu)
    before = [t.clone() for t in (q, k, v, cu_t)]
    varlen_attention(q, k, v, cu_t, 40, softcap=30.0)
    for t, b in zip((q, k, v, cu_t), before):
        assert torch.equal(t, b)


def test_no_keys_at_all():
    """Nk = 0: every query row has an empty key set and comes out 0 (the reference's rule)."""
    q = torch.randn(9, 2, 72, device=DEVICE)
    k = torch.empty(0, 2, 72, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, k, _dev([0, 4, 9]), 5, cu_seqlens_k=_dev([0, 0, 0]), out=out)
    assert not out.any()


def test_empty_query_tensor():
    q = torch.randn(0, 2, 72, device=DEVICE)
    k = torch.randn(5, 2, 72, device=DEVICE)
    out = varlen_attention(q, k, k, _dev([0, 0]), 1, cu_seqlens_k=_dev([0, 5]))
    assert out.shape == (0, 2, 72)


# ---------------------------------------------------------------------------------------------
# Packed grid (static buckets: max_seqlen_q is a capacity, programs find their sequence)
# ---------------------------------------------------------------------------------------------

# (lengths, capacity, leading rows, trailing rows): empty sequences between and after live ones,
# a sequence of one row, lengths that straddle tile edges, rows before cu[0] and after the end.
PACKED_CASES = [
    ([17], 1, 0, 0),
    ([5, 1, 100, 0, 17, 64], 8, 0, 0),
    ([0, 0, 63, 65, 1], 8, 3, 40),
    ([130, 2, 2, 2], 4, 70, 5),
]


@pytest.mark.parametrize("blocks", [(64, 64), (16, 16), (128, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("lengths,cap,lead,tail", PACKED_CASES, ids=[str(c[0]) for c in PACKED_CASES])
def test_packed_grid_equals_per_sequence(monkeypatch, lengths, cap, lead, tail, dtype, blocks):
    """Same tiles, same arithmetic: the packed grid's output equals the per-sequence grid's bit
    for bit, matches the oracle, and zeroes every padding row (out starts as NaN)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(attn_mod, "_interpreter_blocks", lambda: blocks)
    elif blocks != (64, 64):
        pytest.skip("tile sizes are the autotuner's on a GPU")
    else:  # one config for both grids (each grid is tuned on its own key otherwise)
        monkeypatch.setattr(attn_mod, "_GPU_CONFIGS", [(64, 64, 4, 2)])
        monkeypatch.setattr(attn_mod, "_tuned_kernel", None)
    cu = _cu(lengths, capacity=cap, start=lead)
    n = cu[-1] + tail
    q, k, v = _qkv(n, 2, 72, dtype)
    bucket = 512  # a capacity, far above the longest sequence
    outs = {}
    for grid in ("per_sequence", "packed"):
        outs[grid] = torch.full_like(q, float("nan")).contiguous()
        varlen_attention(q, k, v, _dev(cu), bucket, out=outs[grid], grid=grid)
    assert torch.equal(outs["packed"], outs["per_sequence"])
    _check(outs["packed"], q, k, v, cu)
    assert not outs["packed"][:lead].any() and not outs["packed"][cu[-1]:].any()


def test_packed_grid_separate_keys_and_num_seqs():
    """Packed grid with Lq != Lk and num_seqs below the capacity."""
    lq, lk = [3, 17, 0, 1, 20], [50, 10, 15, 40, 0]
    cu_q, cu_k = _cu(lq, capacity=7), _cu(lk, capacity=7)
    q = torch.randn(cu_q[-1] + 4, 2, 72, device=DEVICE)
    kv = torch.randn(cu_k[-1], 2, 2, 72, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, kv[:, 0], kv[:, 1], _dev(cu_q), 256, cu_seqlens_k=_dev(cu_k),
                     num_seqs=4, out=out, grid="packed")
    _check(out[:cu_q[4]], q[:cu_q[4]], kv[:, 0], kv[:, 1], cu_q[:5], cu_k[:5])
    assert not out[cu_q[4]:].any()


def test_grid_auto_choice():
    """"auto" takes the packed grid when max_seqlen_q is a loose capacity over many sequences,
    and the per-sequence grid when it is the real longest length."""
    small = attn_mod._packed_is_smaller
    assert small(16384, 16384, 64)  # 64 images of 256 tokens in a 16384-token bucket
    assert not small(256, 16384, 64)  # the same batch planned dynamically
    assert not small(256, 256, 1)  # one image in its own bucket
    assert not small(16384, 16384, 5000)  # too many sequences for one vector load
    with pytest.raises(ValueError, match="^grid"):
        varlen_attention(*_qkv(4, 1, 72, torch.float32), _dev([0, 4]), 4, grid="tiles")


# ---------------------------------------------------------------------------------------------
# Launcher validation
# ---------------------------------------------------------------------------------------------


def _args():
    q, k, v = _qkv(10, 2, 72, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=_dev([0, 4, 10]), max_seqlen_q=6)


def _bad(**changes):
    def make():
        a = _args()
        for key, fn in changes.items():
            a[key] = fn(a)
        return a
    return make


BAD = [
    ("q", _bad(q=lambda a: a["q"][:, 0])),  # 2 dims
    ("q", _bad(q=lambda a: a["q"].to(torch.int32))),
    ("q", _bad(q=lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2))),  # last stride
    ("q", _bad(q=lambda a: a["q"][..., :70], k=lambda a: a["k"][..., :70],
               v=lambda a: a["v"][..., :70])),  # D not a multiple of 8
    ("q", _bad(q=lambda a: a["q"].to("meta"))),  # device Triton cannot run on
    ("k", _bad(k=lambda a: a["k"][:, :1])),  # mismatched H
    ("k", _bad(k=lambda a: a["k"].to(torch.float16))),
    ("v", _bad(v=lambda a: a["v"][..., :64])),  # mismatched D
    ("v", _bad(v=lambda a: a["v"][:9])),  # k and v rows differ
    ("v", _bad(v=lambda a: a["v"].to(torch.float16))),
    ("cu_seqlens_q", _bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long())),
    ("cu_seqlens_q", _bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"][None])),
    ("cu_seqlens_q", _bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"][:1])),
    ("cu_seqlens_q", _bad(cu_seqlens_q=lambda a: a["cu_seqlens_q"].to("meta"))),
    ("cu_seqlens_q", _bad(cu_seqlens_q=lambda a: [0, 4, 10])),  # host list
    ("cu_seqlens_k", _bad(cu_seqlens_k=lambda a: a["cu_seqlens_q"][:2])),  # wrong capacity
    ("cu_seqlens_k", _bad(cu_seqlens_k=lambda a: a["cu_seqlens_q"].long())),
    ("max_seqlen_q", _bad(max_seqlen_q=lambda a: 0)),
    ("max_seqlen_q", _bad(max_seqlen_q=lambda a: torch.tensor(6))),  # never a device value
    ("max_seqlen_q", _bad(max_seqlen_q=lambda a: 6.0)),
    ("max_seqlen_k", _bad(max_seqlen_k=lambda a: 0)),
    ("num_seqs", _bad(num_seqs=lambda a: 3)),  # capacity is 2
    ("num_seqs", _bad(num_seqs=lambda a: -1)),
    ("scale", _bad(scale=lambda a: float("nan"))),
    ("softcap", _bad(softcap=lambda a: -1.0)),
    ("out", _bad(out=lambda a: torch.empty(10, 2, 64, device=DEVICE))),
    ("out", _bad(out=lambda a: torch.empty(10, 2, 72, device=DEVICE, dtype=torch.float16))),
    ("out", _bad(out=lambda a: torch.empty(10, 2, 72, device="meta"))),
]


@pytest.mark.parametrize("name,make", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_launcher_errors(name, make):
    with pytest.raises(ValueError, match=f"^{name}"):
        varlen_attention(**make())


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("grid", ["per_sequence", "packed"])
def test_cuda_graph_replay_with_new_lengths(grid):
    """Captured once (after the autotuning warm-up), replayed with other lengths written into the
    same fixed-capacity cu_seqlens buffer: the launcher never reads device values."""
    h, d, n, cap, bucket = 4, 72, 600, 8, 256
    q, k, v = _qkv(n, h, d, torch.bfloat16)
    cu_buf = _dev(_cu([200, 100], capacity=cap))
    out = torch.empty(n, h, d, device=DEVICE, dtype=torch.bfloat16)
    varlen_attention(q, k, v, cu_buf, bucket, out=out, grid=grid)  # compile and autotune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        varlen_attention(q, k, v, cu_buf, bucket, out=out, grid=grid)
    for lengths in ([256, 1, 30], [17] * cap, [0, 250, 250]):
        cu = _cu(lengths, capacity=cap)
        cu_buf.copy_(_dev(cu))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, q, k, v, cu)
        assert not out[cu[-1]:].any()
