"""kernels/fsq.py against the torch reference: FSQ codes + indices in one kernel, and the inverse.

The codes are exact (q / (L//2)) and the indices integers, so the comparison is exact. The
contract (ATOKEN_SPEC §8 and the kernel brief) only requires it away from rounding boundaries:
scalars whose bounded value lies within 1e-4 of a half-integer may round either way. The kernel
reproduces the reference's own steps (see kernels/fsq.py), so the tests also check exactness on
and next to every step. On a CPU the kernels run through the Triton interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch

from atoken_rt import reference as ref

from .conftest import requires_cuda

pytest.importorskip("triton")

from atoken_rt.kernels import fsq as Q  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=requires_cuda)]
ATOKEN = ((4, 4, 4, 4, 4, 4), 8)
CONFIGS = [pytest.param(*ATOKEN, id="atoken"), pytest.param((8, 5, 5, 5), 2, id="8555x2"),
           pytest.param((3, 2, 7), 3, id="327x3")]
NEAR = 1e-4


def _bounded(z, levels, c):
    """The reference's fp32 bounded values [N, C, d] (to locate rounding boundaries)."""
    _, half_l, offset, shift = ref._fsq_constants(levels, z.device)
    return (z.float().reshape(z.shape[0], c, len(levels)) + shift).tanh() * half_l - offset


def _inputs(n, levels, c, dtype, strided):
    """Random z plus scalars placed on and next to every rounding boundary."""
    d = len(levels)
    z = 1.5 * torch.randn(n, c * d, device=DEVICE)
    lv, half_l, offset, shift = ref._fsq_constants(levels, DEVICE)
    # u with bounded = k + 0.5 (+ a small nudge): u = atanh((k + 0.5 + offset) / half_l) - shift.
    flat = z.view(n, c, d)
    for j in range(d):
        ks = torch.arange(-(levels[j] // 2), (levels[j] - 1) // 2, device=DEVICE).float()
        b = ks + 0.5 + offset[j]
        u = torch.atanh(b / half_l[j]) - shift[j]
        nudges = torch.tensor([0.0, 1e-6, -1e-6, 1e-3, -1e-3], device=DEVICE)
        cand = (u[:, None] + nudges[None, :]).flatten()
        m = min(n, cand.numel())
        flat[:m, 0, j] = cand[:m]
    if strided:  # the view moments[:, :C*d] of a [N, 2*C*d] tensor
        big = torch.randn(n, 2 * c * d, device=DEVICE).to(dtype)
        big[:, : c * d] = z.to(dtype)
        return big[:, : c * d]
    return z.to(dtype)


def _assert_matches(z, levels, c, codes, idx):
    rc, ri = ref.fsq_quantize(z, levels, c)
    n, d = z.shape[0], len(levels)
    assert codes.dtype == z.dtype and codes.shape == rc.shape
    assert idx.dtype == torch.int32 and idx.shape == ri.shape
    b = _bounded(z, levels, c)
    near = (b - b.floor() - 0.5).abs() < NEAR  # [N, C, d]
    far = ~near.reshape(n, c * d)
    # Exact away from boundaries; bitwise (the sign of a zero code too) where |bounded| is not
    # tiny either (bounded's sign is a step too: a CPU reference evaluates the tanh of a
    # tensor's last few elements with scalar code, which may move a step by an ulp).
    assert torch.equal(codes[far], rc[far])
    signed = far & (b.abs() >= NEAR).reshape(n, c * d)
    assert torch.equal(torch.signbit(codes[signed]), torch.signbit(rc[signed]))
    ok_rows = ~near.any(-1)
    assert torch.equal(idx[ok_rows], ri[ok_rows])
    # Next to a boundary: one of the two neighbouring levels.
    half_w = torch.tensor([lv // 2 for lv in levels], device=z.device).repeat(c)
    step = (codes.float() - rc.float()).abs() * half_w
    assert (step[~far] <= 1).all()
    assert torch.equal(Q.fsq_indices_to_codes(idx, levels, z.dtype), codes)  # self-consistent
    return near


@pytest.mark.parametrize("n", [1, 17, 423])
@pytest.mark.parametrize("levels,c", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "view"])
def test_fsq_quantize_matches_reference(n, levels, c, dtype, strided):
    z = _inputs(n, levels, c, dtype, strided)
    z0 = z.clone()
    codes, idx = Q.fsq_quantize(z, levels, c)
    near = _assert_matches(z, levels, c, codes, idx)
    assert near.float().mean() <= 0.5  # most scalars are compared exactly
    assert torch.equal(z, z0)
    assert codes.is_contiguous() and idx.is_contiguous()


@pytest.mark.parametrize("levels,c", CONFIGS)
def test_fsq_exact_ties_round_half_even(levels, c):
    """bounded exactly -0.5 (even L: u = -shift, so u + shift = 0) and exactly 0 / -0 (odd L:
    u = +-0): round half to even gives -0.0, not -1, and the sign of zero matches torch.round."""
    d = len(levels)
    _, _, _, shift = ref._fsq_constants(levels, DEVICE)
    z = torch.stack([-shift, torch.where(shift == 0, -0.0, -shift), torch.zeros_like(shift)])
    z = z.repeat(1, c).float()
    codes, idx = Q.fsq_quantize(z, levels, c)
    rc, ri = ref.fsq_quantize(z, levels, c)
    b = _bounded(z, levels, c)
    even = torch.tensor([lv % 2 == 0 for lv in levels], device=DEVICE).repeat(c)
    assert (b.reshape(3, -1)[:2][:, even] == -0.5).all()  # genuine ties
    assert torch.equal(codes, rc) and torch.equal(idx, ri)
    # Rows 0-1 (u + shift == 0) bit for bit. Row 2 (u = 0) has bounded ~ +-1e-8 for even L:
    # its sign is a step, which a CPU reference may move by an ulp in its scalar tail.
    assert torch.equal(torch.signbit(codes[:2]), torch.signbit(rc[:2]))
    assert (codes[:2] == 0).all()  # -0.5 -> -0.0 (even), never -1
    assert torch.signbit(codes[:2][:, even]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fsq_extreme_inputs(dtype):
    levels, c = ATOKEN
    big = torch.finfo(dtype).max
    vals = torch.tensor([float("inf"), -float("inf"), big, -big, 30.0, -30.0, 1e-30, -1e-30],
                        device=DEVICE)
    z = vals[torch.randint(0, len(vals), (17, 48), device=DEVICE)].to(dtype)
    codes, idx = Q.fsq_quantize(z, levels, c)
    rc, ri = ref.fsq_quantize(z, levels, c)
    assert torch.equal(codes, rc) and torch.equal(idx, ri)


@pytest.mark.parametrize("levels,c", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_fsq_indices_to_codes_every_index(levels, c, dtype, idx_dtype):
    """Every index of the codebook decodes exactly like the reference, and re-quantising the
    codes (fp32 atanh of the bounded targets) gives the indices back."""
    total = math.prod(levels)
    idx = torch.arange(total, device=DEVICE)
    idx = torch.cat([idx, idx.flip(0)] + [idx[torch.randperm(total, device=DEVICE)]
                                          for _ in range(max(0, c - 2))])
    idx = idx[: (idx.numel() // c) * c].view(-1, c).to(idx_dtype)
    codes = Q.fsq_indices_to_codes(idx, levels, dtype)
    assert torch.equal(codes, ref.fsq_indices_to_codes(idx, levels, dtype))
    # Strided indices (a column slice) and a caller-owned output.
    wide = torch.cat([idx, idx], dim=1)[:, :c]
    out = torch.empty(codes.shape, dtype=dtype, device=DEVICE)
    assert Q.fsq_indices_to_codes(wide, levels, dtype, out=out) is out
    assert torch.equal(out, codes)
    # Round trip: codes -> z whose bounded value is the level itself -> the same indices.
    _, half_l, offset, shift = ref._fsq_constants(levels, DEVICE)
    half_w = torch.tensor([lv // 2 for lv in levels], device=DEVICE).float()
    q = codes.float().view(-1, c, len(levels)) * half_w
    z = (torch.atanh((q + offset) / half_l) - shift).reshape(codes.shape)
    _, back = Q.fsq_quantize(z, levels, c)
    assert torch.equal(back, idx.to(torch.int32))


def test_fsq_round_trip_random():
    levels, c = ATOKEN
    z = 2 * torch.randn(423, 48, device=DEVICE)
    codes, idx = Q.fsq_quantize(z, levels, c)
    assert torch.equal(Q.fsq_indices_to_codes(idx, levels, torch.float32), codes)
    assert int(idx.min()) >= 0 and int(idx.max()) < 4 ** 6


def test_fsq_out_arguments():
    levels, c = ATOKEN
    z = torch.randn(17, 48, device=DEVICE)
    rc, ri = ref.fsq_quantize(z, levels, c)
    codes_out = torch.empty(17, 48, device=DEVICE)
    idx_buf = torch.zeros(17, 16, dtype=torch.int32, device=DEVICE)
    codes, idx = Q.fsq_quantize(z, levels, c, codes_out=codes_out, indices_out=idx_buf[:, :8])
    assert codes is codes_out and torch.equal(codes, rc) and torch.equal(idx, ri)
    assert (idx_buf[:, 8:] == 0).all()  # nothing written past the view
    # In place: codes written over z itself (each program reads its rows before writing).
    zz = z.clone()
    codes, _ = Q.fsq_quantize(zz, levels, c, codes_out=zz)
    assert codes is zz and torch.equal(zz, rc)
    empty_codes, empty_idx = Q.fsq_quantize(z[:0], levels, c)
    assert empty_codes.shape == (0, 48) and empty_idx.shape == (0, 8)


def _neighbours(t: torch.Tensor) -> torch.Tensor:
    """t, and the fp32 numbers one ulp below and above it."""
    inf = torch.full_like(t, float("inf"))
    return torch.cat([t, torch.nextafter(t, -inf), torch.nextafter(t, inf)])


@pytest.mark.parametrize("levels,c", CONFIGS + [pytest.param((26, 3), 2, id="26x3-lossy-digit")])
def test_fsq_exact_at_every_step(levels, c):
    """At every step of q(u) (and of the sign of a zero code) and one ulp either side of it,
    codes (bit for bit) and indices equal the reference's: the kernel's thresholds are the
    reference's own. (26 levels: the reference's digit expression is lossy; reproduced too.)"""
    d = len(levels)
    thr = Q._tables(tuple(levels), torch.device(DEVICE))[0]  # [max(levels), d]
    finite = torch.isfinite(thr)
    assert finite[-1].all()  # the zero-sign step
    assert torch.equal(finite[:-1].sum(0).cpu(), torch.tensor(levels) - 1)  # L - 1 steps per dim
    steps = thr[:-1]
    assert (steps[1:] >= steps[:-1]).all()  # non-decreasing in the level
    probes = [_neighbours(thr[:, j][finite[:, j]]) for j in range(d)]
    # Rows: a whole number of 64-element vectors per column, so that a CPU reference computes
    # every tanh with its vectorised code (its scalar tail may differ by an ulp).
    n = -(-max(p.numel() for p in probes) // 64) * 64
    cols = [p.repeat(-(-n // p.numel()))[:n] for p in probes]
    z = torch.stack(cols, dim=1).repeat(1, c)  # [n, c * d], every probe in every codebook
    codes, idx = Q.fsq_quantize(z, levels, c)
    rc, ri = ref.fsq_quantize(z, levels, c)
    assert torch.equal(codes, rc) and torch.equal(idx, ri)
    assert torch.equal(torch.signbit(codes), torch.signbit(rc))


def test_fsq_launcher_errors():
    levels, c = ATOKEN
    z = torch.randn(4, 48, device=DEVICE)

    def raises(name, fn):
        with pytest.raises(ValueError, match=name):
            fn()

    raises("levels", lambda: Q.fsq_quantize(z, (), c))
    raises("levels", lambda: Q.fsq_quantize(z, (4, 4, 4, 4, 4, 1), c))
    raises("levels", lambda: Q.fsq_quantize(z, (4.0,) * 6, c))
    raises("levels", lambda: Q.fsq_quantize(z, 4, c))
    raises("levels", lambda: Q.fsq_quantize(z[:, :6], (1 << 16, 1 << 16), 3))  # > int32
    raises("num_codebooks", lambda: Q.fsq_quantize(z, levels, 0))
    raises("num_codebooks", lambda: Q.fsq_quantize(z, levels, True))
    raises("z", lambda: Q.fsq_quantize(z[:, :42], levels, c))  # channels
    raises("z", lambda: Q.fsq_quantize(z.view(4, 8, 6), levels, c))  # dims
    raises("z", lambda: Q.fsq_quantize(z.int(), levels, c))  # dtype
    raises("z", lambda: Q.fsq_quantize(torch.randn(4, 96, device=DEVICE)[:, ::2], levels, c))
    raises("codes_out", lambda: Q.fsq_quantize(z, levels, c, codes_out=z.half().clone()))
    raises("codes_out", lambda: Q.fsq_quantize(z, levels, c, codes_out=torch.empty(4, 47)))
    raises("codes_out", lambda: Q.fsq_quantize(z, levels, c, codes_out=z[:, 1:].clone()))
    raises("codes_out", lambda: Q.fsq_quantize(
        z, levels, c, codes_out=torch.empty(4, 48, device="meta")))  # device
    raises("codes_out", lambda: _partial_overlap_call(levels, c))
    raises("indices_out", lambda: Q.fsq_quantize(
        z, levels, c, indices_out=torch.empty(4, 8, dtype=torch.int64, device=DEVICE)))
    raises("indices_out", lambda: Q.fsq_quantize(
        z, levels, c, indices_out=torch.empty(4, 16, dtype=torch.int32, device=DEVICE)[:, ::2]))
    raises("z", lambda: Q.fsq_quantize(z.to("meta"), levels, c))  # no device can run it

    idx = torch.zeros(4, 8, dtype=torch.int32, device=DEVICE)
    raises("indices", lambda: Q.fsq_indices_to_codes(idx.float(), levels))
    raises("indices", lambda: Q.fsq_indices_to_codes(idx[0], levels))
    raises("dtype", lambda: Q.fsq_indices_to_codes(idx, levels, torch.int32))
    raises("levels", lambda: Q.fsq_indices_to_codes(idx, (4, 0)))
    raises("out", lambda: Q.fsq_indices_to_codes(idx, levels, out=torch.empty(4, 47)))
    raises("out", lambda: Q.fsq_indices_to_codes(idx, levels, torch.float16,
                                                 out=torch.empty(4, 48)))


def _partial_overlap_call(levels, c):
    """codes_out overlapping z with a different layout (shifted by one row): rejected."""
    buf = torch.randn(5 * 48, device=DEVICE)
    return Q.fsq_quantize(buf[:192].view(4, 48), levels, c, codes_out=buf[48:].view(4, 48))
