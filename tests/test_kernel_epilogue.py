"""kernels/epilogue.py: Linear + bias + GELU-tanh / + residual, both impls, against the reference.

Oracles: ``reference.gelu_tanh(F.linear(x, W, b))`` and ``residual + F.linear(x, W, b)``, computed
in fp32 (from the same low-precision inputs) and in the test dtype. Tolerance (FlashAttention's
rule): our error against the fp32 result is at most twice the error of the same torch math run in
the test dtype, plus a small floor. Shapes have edges that are no multiple of any tile.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from .conftest import DEVICE, rel_err, requires_cuda

pytest.importorskip("triton")

from atoken_rt import reference as ref  # noqa: E402
from atoken_rt.kernels.epilogue import (IMPLS, bias_gelu_, bias_residual_,  # noqa: E402
                                        linear_bias_gelu, linear_bias_residual)

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def _dtype_id(d):
    return str(d).removeprefix("torch.")


# M x N edges crossed, K alternating between 144 (a multiple of 16) and 100 (not)
SHAPES = [(m, (144, 100)[i % 2], n)
          for i, (m, n) in enumerate(itertools.product([1, 17, 200], [304, 144, 50]))]


def _inputs(m, k, n, dtype, with_bias=True):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    r = torch.randn(m, n, device=DEVICE).to(dtype)
    return x, w, b, r


def _f32(t):
    return None if t is None else t.float()


def _reference(op, x, w, b, r):
    """(the torch math in x.dtype, the same math in fp32 from the same inputs)."""
    if op == "gelu":
        return (ref.gelu_tanh(F.linear(x, w, b)),
                ref.gelu_tanh(F.linear(_f32(x), _f32(w), _f32(b))))
    return r + F.linear(x, w, b), _f32(r) + F.linear(_f32(x), _f32(w), _f32(b))


def _call(op, impl, x, w, b, r):
    if op == "gelu":
        return linear_bias_gelu(x, w, b, impl=impl)
    return linear_bias_residual(x, w, b, r, impl=impl)


def _assert_fa_close(ours, lowp, full, dtype):
    err, base = rel_err(ours, full), rel_err(lowp, full)
    assert err <= 2 * base + FLOOR[dtype], (err, base)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["gelu", "residual"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_epilogue_matches_reference(impl, op, m, k, n, dtype, with_bias):
    x, w, b, r = _inputs(m, k, n, dtype, with_bias)
    before = [t.clone() for t in (x, w, b, r) if t is not None]

    out = _call(op, impl, x, w, b, r)

    assert out.shape == (m, n) and out.dtype == dtype
    lowp, full = _reference(op, x, w, b, r)
    _assert_fa_close(out, lowp, full, dtype)
    after = [t for t in (x, w, b, r) if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after)), "inputs were modified"


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_operands(impl):
    """Row strides other than the width (slices of wider buffers) for x, weight and residual."""
    m, k, n, dtype = 33, 100, 50, torch.float16
    x = torch.randn(m, k + 12, device=DEVICE).to(dtype)[:, 12:]
    w = (torch.randn(n, 2 * k, device=DEVICE) / k ** 0.5).to(dtype)[:, :k]
    b = torch.randn(n, device=DEVICE).to(dtype)
    r = torch.randn(m, n + 3, device=DEVICE).to(dtype)[:, 3:]
    for op in ("gelu", "residual"):
        lowp, full = _reference(op, x, w, b, r)
        _assert_fa_close(_call(op, impl, x, w, b, r), lowp, full, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_gelu_in_place(dtype, with_bias):
    """The element-wise tail alone: y = round(gelu(round(y + b))) written into y."""
    m, n = 37, 304
    y = (2 * torch.randn(m, n, device=DEVICE)).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    b0 = None if b is None else b.clone()
    h = y if b is None else (y.float() + b.float()).to(dtype)
    want = ref.gelu_tanh(h)
    full = F.gelu(y.float() + (0 if b is None else b.float()), approximate="tanh")

    out = bias_gelu_(y, b)

    assert out is y
    _assert_fa_close(y, want, full, dtype)
    if dtype != torch.float32:
        # Same rounding points as the reference: at most an ulp apart wherever GELU is well
        # conditioned (in the negative tail torch's 1 + tanh cancels; the FA bound covers it).
        big = want.float().abs() > 0.05
        diff = (y.float() - want.float()).abs()[big]
        assert bool((diff <= torch.finfo(dtype).eps * want.float().abs()[big]).all())
    if b is not None:
        assert torch.equal(b, b0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_residual_in_place(dtype, with_bias):
    m, n = 37, 144
    y = torch.randn(m, n, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    r = torch.randn(m, n, device=DEVICE).to(dtype)
    r0 = r.clone()
    h = y if b is None else (y.float() + b.float()).to(dtype)
    want = (r.float() + h.float()).to(dtype)  # exact: two roundings, as the reference does

    out = bias_residual_(y, b, r)

    assert out is y and torch.equal(y, want) and torch.equal(r, r0)


@pytest.mark.parametrize("op", ["gelu", "residual"])
def test_fp32_product_into_low_precision_output(op):
    """The element-wise kernel also takes an fp32 GEMM product (``torch.mm(..., out_dtype=
    torch.float32)``) and writes the model dtype: the bias add is then exact, as in F.linear."""
    from atoken_rt.kernels.epilogue import _GELU, _RESIDUAL, _launch_bias_epilogue
    x, w, b, r = _inputs(37, 144, 304, torch.float16)
    y32 = x.float() @ w.float().t()
    out = torch.empty(37, 304, device=DEVICE, dtype=torch.float16)
    _launch_bias_epilogue(y32, b, r if op == "residual" else None, out,
                          _GELU if op == "gelu" else _RESIDUAL)
    h = (y32 + b.float()).half()
    want = ref.gelu_tanh(h) if op == "gelu" else r + h
    full = _reference(op, x, w, b, r)[1]
    _assert_fa_close(out, want, full, torch.float16)
    if op == "residual":
        assert torch.equal(out, want)


def test_bias_residual_residual_may_be_y():
    y = torch.randn(5, 144, device=DEVICE)
    want = y + y
    bias_residual_(y, None, y)
    assert torch.equal(y, want)


def _gelu_tanh_f64(u):
    """The GELU-tanh formula in float64, with 0.5 (1 + tanh z) written as a sigmoid (exact tail)."""
    u = u.double()
    z = (2 / torch.pi) ** 0.5 * (u + 0.044715 * u ** 3)
    return u * torch.sigmoid(2 * z)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # u^3, interpreter
def test_gelu_tanh_extremes():
    """Stable over the whole fp32 range: no NaN or overflow, exact tails, accurate everywhere
    (also where torch's 1 + tanh(z) cancels: there we agree to ~1e-7 |u| in absolute terms)."""
    u = torch.cat([torch.linspace(-60, 60, 2401),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 1e20, -1e20, 3e38])])
    y = u.to(DEVICE).reshape(1, -1).clone()
    bias_gelu_(y)
    got = y.cpu()[0].double()
    assert not torch.isnan(got).any()
    truth = _gelu_tanh_f64(u).float().double()  # the truth as fp32 can hold it
    # rtol 1e-5 leaves room for the GPU's approximate exp (relative error ~ |2z| * 2^-24)
    bad = (got - truth).abs() > 1e-5 * truth.abs() + 1e-30  # atol: subnormals may flush to 0
    assert not bad.any(), (u[bad][:5], got[bad][:5], truth[bad][:5])
    torch_gelu = F.gelu(u, approximate="tanh").double()
    bad = (got - torch_gelu).abs() > 2.5e-7 * u.double().abs() + 1e-30
    assert not bad.any(), (u[bad][:5], got[bad][:5], torch_gelu[bad][:5])
    assert bool((got[u >= 10] == u[u >= 10]).all())  # the identity tail is exact


def test_empty_inputs():
    for impl in IMPLS:
        x, w, b, r = _inputs(0, 144, 50, torch.float32)
        assert linear_bias_gelu(x, w, b, impl=impl).shape == (0, 50)
        assert linear_bias_residual(x, w, b, r, impl=impl).shape == (0, 50)
    assert bias_gelu_(torch.empty(0, 8, device=DEVICE)).shape == (0, 8)


def _strided(t):
    """Same values, innermost stride != 1."""
    return t.t().contiguous().t()


# (argument named in the error, how to break a valid call of linear_bias_residual, case id)
LINEAR_ERRORS = [
    ("impl", lambda a: {**a, "impl": "cutlass"}, "impl"),
    ("x", lambda a: {**a, "x": a["x"][None]}, "x-3d"),
    ("x", lambda a: {**a, "x": a["x"].to(torch.int32)}, "x-int"),
    ("x", lambda a: {**a, "x": _strided(a["x"])}, "x-stride"),
    ("weight", lambda a: {**a, "w": a["w"][:, :100]}, "weight-k"),
    ("weight", lambda a: {**a, "w": a["w"].half()}, "weight-dtype"),
    ("weight", lambda a: {**a, "w": _strided(a["w"])}, "weight-stride"),
    ("weight", lambda a: {**a, "w": a["w"].to("meta")}, "weight-device"),
    ("bias", lambda a: {**a, "b": a["b"][:10]}, "bias-shape"),
    ("bias", lambda a: {**a, "b": a["b"].half()}, "bias-dtype"),
    ("residual", lambda a: {**a, "r": a["r"][:, :10]}, "residual-shape"),
    ("residual", lambda a: {**a, "r": a["r"].half()}, "residual-dtype"),
    ("residual", lambda a: {**a, "r": _strided(a["r"])}, "residual-stride"),
]


@pytest.mark.parametrize("name,edit", [pytest.param(n, e, id=i) for n, e, i in LINEAR_ERRORS])
@pytest.mark.parametrize("op", ["gelu", "residual"])
def test_linear_launcher_errors(name, edit, op):
    if op == "gelu" and name == "residual":
        pytest.skip("no residual in linear_bias_gelu")
    x, w, b, r = _inputs(8, 144, 50, torch.float32)
    a = edit(dict(x=x, w=w, b=b, r=r, impl="triton"))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _call(op, a["impl"], a["x"], a["w"], a["b"], a["r"])


ELEMENTWISE_ERRORS = [
    ("y", lambda a: {**a, "y": a["y"][0]}, "y-1d"),
    ("y", lambda a: {**a, "y": a["y"].to(torch.int32)}, "y-int"),
    ("y", lambda a: {**a, "y": _strided(a["y"])}, "y-stride"),
    ("y", lambda a: {**a, "y": a["y"][:1].expand(8, 50)}, "y-rows-overlap"),
    ("bias", lambda a: {**a, "b": a["b"][:10]}, "bias-shape"),
    ("bias", lambda a: {**a, "b": a["b"].to("meta")}, "bias-device"),
    ("residual", lambda a: {**a, "r": a["r"].half()}, "residual-dtype"),
    ("residual", lambda a: {**a, "r": a["r"][:, :10]}, "residual-shape"),
    ("residual", lambda a: _shifted_pair(a), "residual-partial-overlap"),
]


def _shifted_pair(a):
    buf = torch.randn(9, 50, device=DEVICE)
    return {**a, "y": buf[:8], "r": buf[1:]}


@pytest.mark.parametrize("name,edit", [pytest.param(n, e, id=i) for n, e, i in ELEMENTWISE_ERRORS])
def test_elementwise_launcher_errors(name, edit):
    _, _, b, r = _inputs(8, 144, 50, torch.float32)
    a = edit(dict(y=torch.randn(8, 50, device=DEVICE), b=b, r=r))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        if name == "residual":
            bias_residual_(a["y"], a["b"], a["r"])
        else:
            bias_gelu_(a["y"], a["b"])


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"^x\b.*TRITON_INTERPRET"):
        linear_bias_gelu(x, w)
    with pytest.raises(ValueError, match=r"^y\b.*TRITON_INTERPRET"):
        bias_gelu_(torch.randn(2, 8))
