"""kernels/norms.py: residual add + LayerNorm32 / RMSNorm32 against atoken_rt.reference.

Tolerance (FlashAttention's rule): the kernel's error against the fp32 math is at most twice the
error of the same torch math run in the low-precision dtype (the reference with its rounding
points), plus a small floor. On top of that the kernel must agree with that low-precision
reference to one ulp (it has the same rounding points) and reproduce the residual add bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import DEVICE, rel_err, requires_cuda

pytest.importorskip("triton")

from atoken_rt import reference as ref  # noqa: E402
from atoken_rt.kernels.norms import MAX_C, add_layer_norm, add_rms_norm  # noqa: E402

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def _dtype_id(d):
    return str(d).removeprefix("torch.")


def _ref_add(x, delta):
    """The residual add of the model dtype: fp32 add, one rounding (what torch's x + delta does)."""
    return x if delta is None else (x.float() + delta.float()).to(x.dtype)


def _inputs(n, c, dtype, with_delta=True, device=DEVICE):
    x = torch.randn(n, c, device=device).to(dtype)
    delta = (0.5 * torch.randn(n, c, device=device)).to(dtype) if with_delta else None
    w = (1 + 0.2 * torch.randn(c, device=device)).to(dtype)
    b = (0.1 * torch.randn(c, device=device)).to(dtype)
    return x, delta, w, b


def _run(kind, x, delta, w, b, **kw):
    if kind == "layer":
        return add_layer_norm(x, delta, w, b, 1e-6, **kw)
    return add_rms_norm(x, delta, w, 1e-6, **kw)


def _reference(kind, x, delta, w, b):
    """(low-precision reference with the model's rounding points, fp32 math without rounding)."""
    x_new = _ref_add(x, delta)
    x32 = x.float() if delta is None else x.float() + delta.float()
    if kind == "layer":
        return ref.layer_norm32(x_new, w, b), ref.layer_norm32(x32, w.float(), b.float())
    return ref.rms_norm32(x_new, w), ref.rms_norm32(x32, w.float())


def _assert_ulp_close(ours, want, ulps=1, max_frac=0.01):
    """Same rounding points: every element within ``ulps`` ulps, and few elements off at all.

    RMSNorm32 rounds twice, so a 1-ulp difference in the first rounding can become 2 ulps.
    """
    eps = torch.finfo(want.dtype).eps
    a, r = ours.float(), want.float()
    bound = ulps * eps * torch.maximum(a.abs(), r.abs()) + torch.finfo(want.dtype).tiny
    bad = (a - r).abs() > bound
    assert not bad.any(), (f"{int(bad.sum())} elements off by more than {ulps} ulp, first at "
                           f"{bad.nonzero()[0].tolist()}: {a[bad][:4].tolist()} vs "
                           f"{r[bad][:4].tolist()}")
    frac = float((a != r).float().mean()) if a.numel() else 0.0
    assert frac <= max_frac, f"{frac:.2%} of elements differ by an ulp"


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("c", [144, 1152, 768])
@pytest.mark.parametrize("n", [1, 17, 423])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_norm_matches_reference(kind, dtype, c, n, with_delta):
    x, delta, w, b = _inputs(n, c, dtype, with_delta)
    before = [t.clone() for t in (x, delta, w, b) if t is not None]

    x_new, y = _run(kind, x, delta, w, b)

    assert y.dtype == dtype and y.shape == (n, c)
    if with_delta:
        assert torch.equal(x_new, _ref_add(x, delta))
    else:
        assert x_new is x  # nothing added, nothing written
    lowp, full = _reference(kind, x, delta, w, b)
    err, base = rel_err(y, full), rel_err(lowp, full)
    assert err <= 2 * base + FLOOR[dtype], (err, base)
    if dtype != torch.float32:
        _assert_ulp_close(y, lowp, ulps=2 if kind == "rms" else 1)
    after = [t for t in (x, delta, w, b) if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after)), "inputs were modified"


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_in_place_residual_stream(kind, dtype):
    x, delta, w, b = _inputs(17, 144, dtype)
    x0, d0 = x.clone(), delta.clone()
    x_new, y = _run(kind, x, delta, w, b, x_out=x)
    assert x_new is x and torch.equal(x, _ref_add(x0, delta))
    assert torch.equal(delta, d0)
    lowp, _ = _reference(kind, x0, delta, w, b)
    if dtype != torch.float32:
        _assert_ulp_close(y, lowp, ulps=2 if kind == "rms" else 1)
    else:
        assert rel_err(y, lowp) < 1e-6


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_strided_rows_and_preallocated_outputs(kind):
    """Row-strided views in and out (e.g. slices of a wider buffer); outputs written in place."""
    n, c, dtype = 17, 144, torch.float16
    big_x = torch.randn(n, c + 40, device=DEVICE).to(dtype)
    big_d = torch.randn(n, 2 * c, device=DEVICE).to(dtype)
    x, delta = big_x[:, 8:8 + c], big_d[:, c:]
    _, _, w, b = _inputs(n, c, dtype)
    x_buf = torch.full((n, c + 16), 7.0, device=DEVICE, dtype=dtype)
    y_buf = torch.full((n, c + 16), 7.0, device=DEVICE, dtype=dtype)
    x_out, y_out = x_buf[:, :c], y_buf[:, 16:]
    bx, bd = big_x.clone(), big_d.clone()

    x_new, y = _run(kind, x, delta, w, b, x_out=x_out, y_out=y_out)

    assert x_new.data_ptr() == x_out.data_ptr() and y.data_ptr() == y_out.data_ptr()
    assert torch.equal(x_out, _ref_add(x, delta))
    lowp, _ = _reference(kind, x, delta, w, b)
    _assert_ulp_close(y_out, lowp, ulps=2 if kind == "rms" else 1)
    assert bool((x_buf[:, c:] == 7).all()) and bool((y_buf[:, :16] == 7).all()), "wrote outside"
    assert torch.equal(big_x, bx) and torch.equal(big_d, bd)


def test_no_delta_with_x_out_copies():
    x, _, w, b = _inputs(5, 144, torch.float32)
    x_out = torch.zeros_like(x)
    x_new, y = add_layer_norm(x, None, w, b, x_out=x_out)
    assert x_new is x_out and torch.equal(x_out, x)
    assert rel_err(y, ref.layer_norm32(x, w, b)) < 1e-6


def test_layer_norm_without_bias_and_mixed_weight_dtype():
    """bias=None, and fp16 affine parameters on an fp32 stream (upcast exactly)."""
    x, delta, w, _ = _inputs(17, 768, torch.float32)
    w16 = w.half()
    _, y = add_layer_norm(x, delta, w16, None)
    assert rel_err(y, ref.layer_norm32(_ref_add(x, delta), w16, None)) < 1e-6
    _, y = add_rms_norm(x, delta, w16)
    assert rel_err(y, ref.rms_norm32(_ref_add(x, delta), w16)) < 1e-6


def test_large_offset_rows_use_centred_variance():
    """A large common offset: E[x^2] - E[x]^2 would lose most digits in fp32; two passes do not."""
    x, delta, w, b = _inputs(17, 1152, torch.float32)
    x = x + 1000.0
    _, y = add_layer_norm(x, delta, w, b)
    assert rel_err(y, ref.layer_norm32(_ref_add(x, delta), w, b)) < 1e-4


def test_empty_batch():
    x, delta, w, b = _inputs(0, 144, torch.float32)
    x_new, y = add_layer_norm(x, delta, w, b)
    assert x_new.shape == y.shape == (0, 144)


def _strided(t):
    """Same values, innermost stride != 1."""
    return t.t().contiguous().t()


def _shifted_pair(a, first, second):
    """``first`` and ``second`` as views of one buffer, one row apart (a partial overlap)."""
    buf = torch.randn(5, 144, device=DEVICE)
    return {**a, first: buf[:4], second: buf[1:]}


# (argument named in the error, how to break the valid call, case id). Each edit gets the valid
# arguments a = dict(x, delta, w, b, eps, x_out, y_out) and returns them changed.
ERROR_CASES = [
    ("x", lambda a: {**a, "x": a["x"][0]}, "x-1d"),
    ("x", lambda a: {**a, "x": a["x"].to(torch.int32)}, "x-int"),
    ("x", lambda a: {**a, "x": _strided(a["x"]), "delta": None}, "x-stride"),
    ("x", lambda a: {**a, "x": torch.randn(4, MAX_C + 1, device=DEVICE), "delta": None,
                     "w": torch.ones(MAX_C + 1, device=DEVICE), "b": None}, "x-too-wide"),
    ("delta", lambda a: {**a, "delta": a["delta"][:, :100]}, "delta-shape"),
    ("delta", lambda a: {**a, "delta": a["delta"].half()}, "delta-dtype"),
    ("delta", lambda a: {**a, "delta": _strided(a["delta"])}, "delta-stride"),
    ("weight", lambda a: {**a, "w": a["w"][:100]}, "weight-shape"),
    ("weight", lambda a: {**a, "w": a["w"].to("meta")}, "weight-device"),
    ("bias", lambda a: {**a, "b": a["b"][:100]}, "bias-shape"),
    ("eps", lambda a: {**a, "eps": -1.0}, "eps-negative"),
    ("eps", lambda a: {**a, "eps": float("nan")}, "eps-nan"),
    ("x_out", lambda a: {**a, "x_out": torch.empty(4, 145, device=DEVICE)}, "x_out-shape"),
    ("x_out", lambda a: _shifted_pair(a, "delta", "x_out"), "x_out-partial-overlap"),
    ("y_out", lambda a: {**a, "y_out": torch.empty(4, 144, device=DEVICE, dtype=torch.float16)},
     "y_out-dtype"),
    ("y_out", lambda a: {**a, "x_out": a["x"], "y_out": a["x"]}, "y_out-aliases-x_out"),
    ("y_out", lambda a: {**a, "y_out": torch.empty(1, 144, device=DEVICE).expand(4, 144)},
     "y_out-rows-overlap"),
    ("y_out", lambda a: {**a, "delta": None, "y_out": a["x"]}, "y_out-is-x_new"),
]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("name,edit", [pytest.param(n, e, id=i) for n, e, i in ERROR_CASES])
def test_launcher_errors(kind, name, edit):
    if kind == "rms" and name == "bias":
        pytest.skip("RMSNorm has no bias")
    x = torch.randn(4, 144, device=DEVICE)
    a = edit(dict(x=x, delta=torch.randn_like(x), w=torch.ones(144, device=DEVICE),
                  b=torch.zeros(144, device=DEVICE), eps=1e-6, x_out=None, y_out=None))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        if kind == "layer":
            add_layer_norm(a["x"], a["delta"], a["w"], a["b"], a["eps"], x_out=a["x_out"],
                           y_out=a["y_out"])
        else:
            add_rms_norm(a["x"], a["delta"], a["w"], a["eps"], x_out=a["x_out"], y_out=a["y_out"])


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 144)
    with pytest.raises(ValueError, match=r"^x\b.*TRITON_INTERPRET"):
        add_rms_norm(x, None, torch.ones(144))
