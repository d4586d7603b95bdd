"""The bf16 CPU fast ops (atoken_rt.cpu_ops.CpuOps) against the torch reference (TorchOps).

fp32 through CpuOps is the reference itself (bit-equal). bf16: each op is held to its rounding-point
bound (spec §10.5): a result rounded once from fp32 math may differ from the reference's rounding
by one bf16 ulp (2^-8 relative, half-ulp each side) where the fp32 values differ in their last bits;
GELU by table lookup is bit-equal. Whole sessions are held to the fixture bounds of test_parity, with
the fast ops, with the GEMM fallback forced (a CPU without oneDNN bf16), and in a subprocess whose
oneDNN may not use AMX (ONEDNN_MAX_CPU_ISA).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atoken_rt import reference as ref
from atoken_rt.cpu_features import CpuFeatures, cpu_features
from atoken_rt.cpu_ops import CpuOps, add_rms_norm, gelu_lookup, gelu_table
from atoken_rt.model import Norm, TorchOps
from atoken_rt.packing import build_plan

from .conftest import fixture_outputs, make_session, rel_err

BF16 = torch.bfloat16
ULP = 2.0 ** -7  # bf16 spacing relative to the value (8 significand bits)
NO_ONEDNN = dict(onednn_bf16=False, amx_bf16=False, avx512_bf16=False)


def eager_ops(**kw) -> CpuOps:
    return CpuOps(compile=False, **kw)


def within_ulps(ours, want, ulps=1.0, floor=1e-6):
    """|ours - want| <= ulps bf16 ulps of want (elementwise), plus an absolute floor near zero."""
    ours, want = ours.double(), want.double()
    bound = ulps * ULP * want.abs() + floor
    bad = (ours - want).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off by more than {ulps} ulp"


def plan_for(lengths, seed=0):
    """A SequencePlan of one image-like sample per length (distinct positions, chunk 4)."""
    rng = np.random.default_rng(seed)
    coords = []
    for n in lengths:
        xy = rng.choice(64 * 64, size=n, replace=False)
        coords.append(np.stack([np.zeros(n), xy // 64, xy % 64, np.zeros(n)], 1).astype(np.int32))
    return build_plan(coords)


def linear(cin, cout, seed, bias=True, dtype=BF16):
    torch.manual_seed(seed)
    lin = nn.Linear(cin, cout, bias=bias)
    return lin.to(dtype).requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------


def test_gelu_table_equals_reference_on_every_bf16_value():
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(BF16)
    want = ref.gelu_tanh(every)
    torch.testing.assert_close(gelu_lookup(every, gelu_table()), want, rtol=0, atol=0,
                               equal_nan=True)
    # aten's bf16 GELU (the no-compiler fallback) computes in fp32 and rounds once: also equal.
    torch.testing.assert_close(torch.ops.aten.gelu_(every.clone(), approximate="tanh"), want,
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_gelu_is_gelu_of_the_rounded_gemm(compiled, recwarn):
    ops = CpuOps(compile=compiled)
    lin = linear(72, 200, 1)
    x = torch.randn(33, 72).to(BF16)
    got = ops.linear_gelu(x, lin)
    assert torch.equal(got, ref.gelu_tanh(ops.linear(x, lin)))
    if compiled and cpu_features().cxx:
        assert ops._gelu.state == "ready"  # the compiled kernel checked itself against eager


# ----------------------------------------------------------------------------------------------
# GEMMs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", ["this cpu", "no onednn"])
def test_linear_bf16_within_one_rounding(bias, features):
    feats = (cpu_features() if features == "this cpu"
             else dataclasses.replace(cpu_features(), **NO_ONEDNN))
    ops = eager_ops(features=feats)
    assert ops.gemm == ("onednn" if feats.onednn_bf16 else "torch")
    lin = linear(144, 432, 2, bias)
    x = torch.randn(257, 144).to(BF16)
    got = ops.linear(x, lin, scratch="qkv")
    w64, x64 = lin.weight.double(), x.double()
    exact = x64 @ w64.T + (lin.bias.double() if bias else 0)
    # one rounding (half an ulp) plus fp32 accumulation error (~ K eps32 sum |x||w|)
    acc = 144 * 2.0 ** -23 * (x64.abs() @ w64.abs().T)
    assert ((got.double() - exact).abs() <= 0.5 * ULP * exact.abs() + acc + 1e-30).all()
    if not feats.onednn_bf16:  # the fallback is the reference GEMM itself
        assert torch.equal(got, TorchOps().linear(x, lin, scratch="qkv"))


def test_packed_weight_follows_weight_updates():
    ops = eager_ops()
    lin = linear(64, 96, 3)
    x = torch.randn(16, 64).to(BF16)
    before = ops.linear(x, lin)
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: a new version, same storage
    after = ops.linear(x, lin)
    within_ulps(after, F.linear(x, lin.weight, lin.bias), ulps=1.0, floor=1e-2)
    assert not torch.equal(before, after)


def test_fp32_is_the_reference_exactly():
    ops, refops = eager_ops(), TorchOps()
    lin = linear(72, 144, 4, dtype=torch.float32)
    x = torch.randn(40, 72)
    assert torch.equal(ops.linear(x, lin, scratch="out"), refops.linear(x, lin, scratch="out"))
    assert torch.equal(ops.linear_gelu(x, lin), refops.linear_gelu(x, lin))
    norm = Norm(72, rms=False)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    d = torch.randn(40, 72)
    for a, b in zip(ops.add_norm(x, d, norm), refops.add_norm(x, d, norm)):
        assert torch.equal(a, b)
    plan = plan_for([24, 16])
    qkv = torch.randn(40, 3, 2, 72)
    g = torch.randn(2, 72)
    for a, b in zip(ops.qkv_rope(qkv, plan, g, -g), refops.qkv_rope(qkv, plan, g, -g)):
        assert torch.equal(a, b)
    q, k, v = qkv.unbind(1)
    assert torch.equal(ops.attention(q, k, v, plan), refops.attention(q, k, v, plan))


# ----------------------------------------------------------------------------------------------
# Residual add + norm, QK-norm + RoPE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("delta", [True, False])
def test_add_norm_bf16(rms, delta):
    torch.manual_seed(5)
    norm = Norm(200, rms=rms)
    with torch.no_grad():
        norm.weight.normal_()
        if not rms:
            norm.bias.normal_()
    norm = norm.to(BF16)
    x = (torch.randn(97, 200) * 3 + 1).to(BF16)
    dx = torch.randn(97, 200).to(BF16) if delta else None
    got_x, got_y = eager_ops().add_norm(x, dx, norm)
    want_x, want_y = TorchOps.add_norm(x, dx, norm)
    assert torch.equal(got_x, want_x)  # the residual add is one rounding either way
    # LayerNorm: one rounding; RMSNorm: two (an ulp of the first is scaled by w, then rounded).
    within_ulps(got_y, want_y, ulps=1.0 if not rms else 2.0,
                floor=1e-6 if not rms else ULP * float(norm.weight.detach().float().abs().max()) * 0.01)
    assert (got_y == want_y).float().mean() > 0.95


@pytest.mark.parametrize("rows", [256, 97])
def test_add_rms_norm_fused(rows, recwarn):
    """The fused residual add + RMSNorm (decoder): eager, the reference's ops bit for bit;
    compiled, within the bound of its two roundings (fp32 sums in another order)."""
    torch.manual_seed(8)
    norm = Norm(1152, rms=True)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(BF16)
    x = (torch.randn(rows, 1152) * 3 + 1).to(BF16)
    dx = torch.randn(rows, 1152).to(BF16)
    want_x, want_y = TorchOps.add_norm(x, dx, norm)
    eager_x, eager_y = add_rms_norm(x, dx, norm.weight, norm.eps)
    assert torch.equal(eager_x, want_x) and torch.equal(eager_y, want_y)
    ops = CpuOps(compile=True)
    got_x, got_y = ops.add_norm(x, dx, norm)
    assert torch.equal(got_x, want_x)
    within_ulps(got_y, want_y, ulps=2.0,
                floor=ULP * float(norm.weight.detach().float().abs().max()) * 0.01)
    assert (got_y == want_y).float().mean() > 0.99
    if cpu_features().cxx:
        assert ops._add_rms.state == "ready"  # the compiled kernel checked itself against eager


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope_bf16(qk_norm):
    plan = plan_for([37, 64, 5])
    torch.manual_seed(6)
    qkv = torch.randn(106, 3, 4, 72).to(BF16)
    g = (torch.randn(2, 4, 72) if qk_norm else torch.zeros(2, 4, 72)).to(BF16)
    args = (g[0], g[1]) if qk_norm else ()
    got = eager_ops().qkv_rope(qkv, plan, *args)
    want = TorchOps().qkv_rope(qkv, plan, *args)
    for a, b in zip(got, want):
        assert a.dtype == BF16 and a.shape == b.shape
        within_ulps(a, b, ulps=1.0, floor=1e-3)
    assert torch.equal(got[2], want[2])


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def attention64(q, k, v, cu):
    out = torch.zeros(q.shape, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k, v))
        p = (qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
        out[a:b] = (p @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("lengths", [[64, 64, 64], [100, 7, 33]], ids=["equal", "varlen"])
def test_attention_bf16_flash_vs_exact(lengths):
    plan = plan_for(lengths)
    torch.manual_seed(7)
    q, k, v = (torch.randn(sum(lengths), 3, 72).mul(2).to(BF16) for _ in range(3))
    want64 = attention64(q, k, v, plan.cu_seqlens)
    exact = TorchOps.attention(q, k, v, plan)
    assert torch.equal(eager_ops(attention="exact").attention(q, k, v, plan), exact)
    flash = eager_ops(attention="flash").attention(q, k, v, plan)
    assert flash.dtype == BF16
    # flash rounds the probabilities to bf16 before P V (as flash-attn does): a few half-ulps more
    # than the single output rounding of the exact path
    assert rel_err(flash, want64) <= 3 * rel_err(exact, want64) + 2e-3


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="attention"):
        CpuOps(attention="fast")
    with pytest.raises(ValueError, match="compile"):
        CpuOps(compile="maybe")


def test_features_report():
    f = cpu_features()
    assert isinstance(f, CpuFeatures) and f.model and f.threads >= 1
    lines = f.lines()
    assert lines[0].startswith("cpu: ") and "bf16" in lines[1]
    no = dataclasses.replace(f, **NO_ONEDNN)
    assert no.bf16_gemm == "none" and "correctly" in no.lines()[1]


# ----------------------------------------------------------------------------------------------
# Whole sessions against the fixtures
# ----------------------------------------------------------------------------------------------


def check_fixture_bounds(enc, dec, ref_outputs, cfg):
    for key, ours in fixture_outputs(enc, dec, cfg == "tiny-sod").items():
        assert ours.dtype == BF16, key
        fp32_ref = ref_outputs[f"{cfg}.fp32.{key}"]
        ref_own = rel_err(ref_outputs[f"{cfg}.bf16.{key}"], fp32_ref)
        err = rel_err(ours, fp32_ref)
        assert err <= 2 * ref_own + 1e-3, (key, err, ref_own)


@pytest.mark.parametrize("variant", ["default", "no onednn, eager, exact attention"])
def test_session_bf16_fixture_bounds(variant, ref_outputs, ref_inputs, quiet):
    s = make_session("tiny-sod", BF16)
    assert isinstance(s.ops, CpuOps)
    if variant != "default":
        s.ops = CpuOps(attention="exact", compile=False,
                       features=dataclasses.replace(cpu_features(), **NO_ONEDNN))
        assert s.ops.gemm == "torch"
    enc = s.encode(ref_inputs)
    check_fixture_bounds(enc, s.decode(enc), ref_outputs, "tiny-sod")


def test_reference_backend_keeps_torch_ops():
    s = make_session("tiny-soc", BF16, backend="reference")
    assert type(s.ops) is TorchOps
    assert type(make_session("tiny-soc", torch.float32).ops) is TorchOps


_NO_AMX_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from safetensors.torch import load_file
import atoken_rt
from atoken_rt.cpu_ops import CpuOps
from conftest import WEIGHTS, DATA, fixture_outputs, rel_err
outs = load_file(str(DATA / "reference-outputs.safetensors"))
s = atoken_rt.Session("tiny-sod", WEIGHTS, dtype=torch.bfloat16)
assert isinstance(s.ops, CpuOps), type(s.ops)
enc = s.encode([outs[f"input.{{i}}"] for i in range(4)])
dec = s.decode(enc)
for key, ours in fixture_outputs(enc, dec, True).items():
    f32 = outs[f"tiny-sod.fp32.{{key}}"]
    own = rel_err(outs[f"tiny-sod.bf16.{{key}}"], f32)
    err = rel_err(ours, f32)
    assert err <= 2 * own + 1e-3, (key, err, own)
print("ok", s.ops.gemm)
"""


def test_session_bf16_without_amx_subprocess():
    """oneDNN limited to AVX-512 without AMX (and without AVX512-BF16): still within bounds."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE", ATOKEN_RT_CPU_COMPILE="0",
               PYTHONPATH=str(tests.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-W", "ignore", "-c",
                        _NO_AMX_SCRIPT.format(tests=str(tests))],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith("ok")
