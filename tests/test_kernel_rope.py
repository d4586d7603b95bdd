"""kernels/rope.py against the torch reference: 4D RoPE, with and without the decoder's QK-norm.

Tolerances follow FlashAttention's rule: the kernel's error against the fp32 reference is at most
twice the error of the same torch math run in the low-precision dtype, plus a small floor (for
fp32 the floor alone: rel err < 1e-5). On a CPU the kernels run through the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

from atoken_rt import reference as ref

from .conftest import rel_err, requires_cuda

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from atoken_rt.kernels import rope as R  # noqa: E402  (needs triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=requires_cuda)]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-4}
MAX_POS = 4095


def _positions(n: int, device=DEVICE) -> torch.Tensor:
    pos = torch.randint(0, MAX_POS + 1, (n, 4), dtype=torch.int32)
    pos[0] = MAX_POS  # the largest angle on every axis
    if n > 1:
        pos[1] = 0
    return pos.to(device)


def _reference(qkv, pos, q_gamma=None, k_gamma=None):
    """The reference composition: optional qk_l2_norm, then apply_rope, on q and k."""
    d = qkv.shape[-1]
    cos, sin = ref.rope_cos_sin(pos, d)
    q, k = qkv[:, 0], qkv[:, 1]
    if q_gamma is not None:
        q, k = ref.qk_l2_norm(q, q_gamma), ref.qk_l2_norm(k, k_gamma)
    return torch.stack([ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)], dim=1)


def _assert_fa_close(ours, lowp, ref32, dtype, what=""):
    """FA rule on the relative and the max-abs error, both against the fp32 reference."""
    floor = FLOOR[dtype]
    e_ours, e_lowp = rel_err(ours, ref32), rel_err(lowp, ref32)
    assert e_ours <= 2 * e_lowp + floor, f"{what} rel err {e_ours:.3g} vs torch {e_lowp:.3g}"
    m_ours = (ours.double() - ref32.double()).abs().max().item()
    m_lowp = (lowp.double() - ref32.double()).abs().max().item()
    scale = ref32.abs().max().item()
    assert m_ours <= 2 * m_lowp + floor * scale, \
        f"{what} max err {m_ours:.3g} vs torch {m_lowp:.3g}"
    assert torch.isfinite(ours).all()


def _check_qk(qkv, pos, q_gamma, k_gamma, dtype, **kw):
    freqs = ref.rope_frequencies(qkv.shape[-1]).to(qkv.device)
    before = [t.clone() for t in (qkv, pos, freqs)]
    gammas_before = [g.clone() for g in (q_gamma, k_gamma) if g is not None]
    out = R.rope_qk(qkv, pos, freqs, q_gamma=q_gamma, k_gamma=k_gamma, **kw)
    n, _, h, d = qkv.shape
    assert out.shape == (n, 2, h, d) and out.dtype == dtype and out.is_contiguous()
    lowp = _reference(qkv, pos, q_gamma, k_gamma)
    g32 = [None if g is None else g.float() for g in (q_gamma, k_gamma)]
    ref32 = _reference(qkv.float(), pos, *g32)
    _assert_fa_close(out, lowp, ref32, dtype, "rope_qk")
    # Inputs untouched.
    for a, b in zip((qkv, pos, freqs), before):
        assert torch.equal(a, b)
    for a, b in zip([g for g in (q_gamma, k_gamma) if g is not None], gammas_before):
        assert torch.equal(a, b)
    return out


CASES = [(n, h) for n in (1, 17, 423) for h in (1, 2, 16) if not (n == 423 and h == 16)]


@pytest.mark.parametrize("n,h", CASES)
@pytest.mark.parametrize("d", [72, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [False, True], ids=["encoder", "qknorm"])
def test_rope_qk_matches_reference(n, h, d, dtype, gamma):
    qkv = torch.randn(n, 3, h, d, device=DEVICE).to(dtype)
    pos = _positions(n)
    q_gamma = k_gamma = None
    if gamma:
        # bf16 gammas as stored in the model (any float dtype is accepted).
        q_gamma = (1 + 0.5 * torch.randn(h, d, device=DEVICE)).to(torch.bfloat16)
        k_gamma = (1 + 0.5 * torch.randn(h, d, device=DEVICE)).to(torch.float32)
    _check_qk(qkv, pos, q_gamma, k_gamma, dtype)


@pytest.mark.parametrize("n", [1, 17, 423])
@pytest.mark.parametrize("d", [72, 68])  # 68: pairs 32, 33 are left unrotated (D % 8 != 0)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_single_tensor(n, d, dtype):
    h = 2
    x = torch.randn(n, h, d, device=DEVICE).to(dtype)
    pos = _positions(n)
    freqs = ref.rope_frequencies(d).to(DEVICE)
    x0 = x.clone()
    out = R.rope(x, pos, freqs)
    cos, sin = ref.rope_cos_sin(pos, d)
    _assert_fa_close(out, ref.apply_rope(x, cos, sin), ref.apply_rope(x.float(), cos, sin),
                     dtype, "rope")
    assert torch.equal(x, x0)
    if dtype == torch.float32:  # the real-arithmetic oracle agrees too
        assert rel_err(out, ref.apply_rope_real(x, cos, sin)) < 1e-5


@pytest.mark.parametrize("gamma", [False, True], ids=["encoder", "qknorm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_strided_views(gamma, dtype):
    n, h, d = 17, 2, 72
    # The QKV projection output with a padded row: [N, 3*H*D + 24] viewed as [N, 3, H, D].
    base = torch.randn(n, 3 * h * d + 24, device=DEVICE).to(dtype)
    qkv_rows = base[:, : 3 * h * d].view(n, 3, h, d)
    # Heads not packed either (head stride D + 8): the kernel's general-stride path.
    qkv_heads = torch.randn(n, 3, h, d + 8, device=DEVICE).to(dtype)[..., :d]
    assert qkv_heads.stride(2) == d + 8
    g = [(1 + torch.randn(h, d, device=DEVICE)) for _ in range(2)] if gamma else [None, None]
    for qkv in (qkv_rows, qkv_heads):
        _check_qk(qkv, _positions(n), *g, dtype)
    # Strided positions (a column slice of a wider int table) and int64 positions.
    pos_wide = torch.randint(0, MAX_POS + 1, (n, 6), dtype=torch.int32, device=DEVICE)
    _check_qk(qkv_rows, pos_wide[:, 1:5], *g, dtype)
    _check_qk(qkv_rows, pos_wide[:, :4].long(), *g, dtype)


def test_rope_extreme_positions():
    """Every axis at 4095, 0, -1 and -4095 (negative coords are legal), fp32."""
    n, h, d = 6, 2, 72
    pos = torch.tensor([[4095] * 4, [0] * 4, [-1] * 4, [-4095] * 4, [4095, 0, -4095, 1],
                        [1, 2, 3, 4]], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(n, 3, h, d, device=DEVICE)
    out = _check_qk(qkv, pos, None, None, torch.float32)
    assert rel_err(out, _reference(qkv, pos)) < 1e-6


@pytest.mark.parametrize("n,h,d", [(17, 16, 72), (5, 48, 128)])
def test_rope_gpu_tiling(monkeypatch, n, h, d):
    """The GPU block sizes (4 tokens x 16 heads for AToken; head blocks when H * D is large),
    run through the interpreter too: only the tiling differs from the default test path."""
    orig = R._config
    monkeypatch.setattr(R, "_config", lambda hh, dd, interpreter=None: orig(hh, dd, False))
    assert orig(16, 72, False) == (4, 16, 32, 4, 4)  # 64 + 8 channels per head, no padding
    assert orig(48, 128, False)[1] == 32  # two head blocks, the second half masked
    qkv = torch.randn(n, 3, h, d, device=DEVICE)
    g = [1 + torch.randn(h, d, device=DEVICE) for _ in range(2)]
    _check_qk(qkv, _positions(n), *g, torch.float32)
    _check_qk(qkv, _positions(n), None, None, torch.float32)


def test_rope_out_argument_and_empty():
    n, h, d = 17, 2, 72
    qkv = torch.randn(n, 3, h, d, device=DEVICE)
    pos, freqs = _positions(n), ref.rope_frequencies(d).to(DEVICE)
    out = torch.full((n, 2, h, d), float("nan"), device=DEVICE)
    res = R.rope_qk(qkv, pos, freqs, out=out)
    assert res is out and rel_err(out, _reference(qkv, pos)) < 1e-5
    x_out = torch.empty(n, h, d, device=DEVICE)
    assert R.rope(qkv[:, 0], pos, freqs, out=x_out) is x_out
    assert rel_err(x_out, out[:, 0]) == 0
    empty = R.rope_qk(qkv[:0], pos[:0], freqs)
    assert empty.shape == (0, 2, h, d)
    no_heads = R.rope_qk(qkv[:, :, :0], pos, freqs)
    assert no_heads.shape == (n, 2, 0, d)


@triton.jit
def _sincos_kernel(X, S, C, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    s, c = R._sincos(tl.load(X + offs, mask=mask, other=0.0))
    tl.store(S + offs, s, mask=mask)
    tl.store(C + offs, c, mask=mask)


def test_sincos_accuracy():
    """The in-kernel sin/cos of every angle pos * freq (|pos| <= 4095) is within ~2 ulp."""
    n = 4096
    pos = torch.randint(-MAX_POS, MAX_POS + 1, (n,)).float()
    freqs = ref.rope_frequencies(72)
    ang = (pos * freqs[torch.randint(0, len(freqs), (n,))]).to(DEVICE)
    s, c = torch.empty_like(ang), torch.empty_like(ang)
    _sincos_kernel[(1,)](ang, s, c, n, BLOCK=n, enable_fp_fusion=False)
    a64 = ang.double()
    assert (s.double() - a64.sin()).abs().max().item() < 1.5e-7
    assert (c.double() - a64.cos()).abs().max().item() < 1.5e-7


def test_rope_launcher_errors():
    n, h, d = 4, 2, 72
    qkv = torch.randn(n, 3, h, d, device=DEVICE)
    pos, freqs = _positions(n), ref.rope_frequencies(d).to(DEVICE)
    g = torch.ones(h, d, device=DEVICE)

    def raises(name, fn):
        with pytest.raises(ValueError, match=name):
            fn()

    raises("qkv", lambda: R.rope_qk(qkv[:, 0], pos, freqs))  # 3 dims
    raises("qkv", lambda: R.rope_qk(qkv[:, :2], pos, freqs))  # not 3 slices
    raises("qkv", lambda: R.rope_qk(qkv.double(), pos, freqs))  # dtype
    raises("qkv", lambda: R.rope_qk(torch.randn(n, 3, h, 2 * d, device=DEVICE)[..., ::2], pos,
                                    freqs))  # channel stride 2
    raises("qkv", lambda: R.rope_qk(torch.randn(n, 3, h, 6, device=DEVICE), pos,
                                    freqs[:0]))  # head dim < 8
    raises("positions", lambda: R.rope_qk(qkv, pos[:, :3], freqs))
    raises("positions", lambda: R.rope_qk(qkv, pos[:-1], freqs))
    raises("positions", lambda: R.rope_qk(qkv, pos.float(), freqs))
    raises("positions", lambda: R.rope_qk(qkv, pos.to("meta"), freqs))  # device
    raises("freqs", lambda: R.rope_qk(qkv, pos, freqs[:-1]))
    raises("freqs", lambda: R.rope_qk(qkv, pos, freqs.double()))
    raises("q_gamma", lambda: R.rope_qk(qkv, pos, freqs, q_gamma=g))  # k_gamma missing
    raises("k_gamma", lambda: R.rope_qk(qkv, pos, freqs, q_gamma=g, k_gamma=g[:, :8]))
    raises("q_gamma", lambda: R.rope_qk(qkv, pos, freqs, q_gamma=g.long(), k_gamma=g))
    raises("out", lambda: R.rope_qk(qkv, pos, freqs, out=torch.empty(n, 2, h, d,
                                                                      device=DEVICE).half()))
    raises("out", lambda: R.rope_qk(qkv, pos, freqs, out=torch.empty(n, 3, h, d,
                                                                      device=DEVICE)))
    raises("out", lambda: R.rope_qk(qkv, pos, freqs, out=torch.empty(
        2, n, h, d, device=DEVICE).transpose(0, 1)))  # not contiguous
    buf = torch.randn(n * 3 * h * d, device=DEVICE)
    raises("out", lambda: R.rope_qk(buf.view(n, 3, h, d), pos, freqs,
                                    out=buf[: n * 2 * h * d].view(n, 2, h, d)))  # overlap
    raises("x", lambda: R.rope(qkv, pos, freqs))  # 4 dims
    raises("x", lambda: R.rope(qkv[:, 0].to(torch.int32), pos, freqs))
    raises("out", lambda: R.rope(qkv[:, 0], pos, freqs, out=torch.empty(n, h, d + 1,
                                                                          device=DEVICE)))
    meta = [t.to("meta") for t in (qkv, pos, freqs)]
    raises("qkv", lambda: R.rope_qk(*meta))  # no device can run it
