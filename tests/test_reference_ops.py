"""Each reference op against its formula in ATOKEN_SPEC (the oracle's own oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atoken_rt import reference as ref
from atoken_rt.packing import build_plan

from .conftest import rel_err


def test_rope_frequencies_match_spec():
    want = [1, 0.879923, 0.774264, 0.681292, 0.599484, 0.5275, 0.464159, 0.408424, 0.359381]
    assert torch.allclose(ref.rope_frequencies(72), torch.tensor(want), atol=1e-6)


def test_rope_rotates_documented_pairs():
    # t = 1 rotates pair 0 by 1 rad and pair 1 by theta_1; y = 2 rotates pair 18 by 2 rad.
    x = torch.zeros(2, 1, 72)
    x[:, :, 0::2] = 1.0  # every pair is (1, 0)
    pos = torch.tensor([[1, 0, 0, 0], [0, 0, 2, 0]])
    cos, sin = ref.rope_cos_sin(pos, 72)
    y = ref.apply_rope(x, cos, sin)
    assert torch.allclose(y[0, 0, 0:2], torch.tensor([math.cos(1), math.sin(1)]), atol=1e-6)
    th1 = 10000 ** (-1 / 72)
    assert torch.allclose(y[0, 0, 2:4], torch.tensor([math.cos(th1), math.sin(th1)]), atol=1e-6)
    assert torch.allclose(y[1, 0, 36:38], torch.tensor([math.cos(2), math.sin(2)]), atol=1e-6)
    assert torch.equal(y[1, 0, :36], x[1, 0, :36])  # t = x = 0: identity pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_complex_equals_real_formula(dtype):
    x = torch.randn(50, 3, 72).to(dtype)
    pos = torch.randint(0, 40, (50, 4))
    cos, sin = ref.rope_cos_sin(pos, 72)
    a, b = ref.apply_rope(x, cos, sin), ref.apply_rope_real(x, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(a, b) < tol


def test_layer_norm32_rounds_once():
    x = torch.randn(7, 144).to(torch.bfloat16)
    w, b = torch.randn(144).to(torch.bfloat16), torch.randn(144).to(torch.bfloat16)
    want = F.layer_norm(x.double(), (144,), w.double(), b.double(), 1e-6).to(torch.bfloat16)
    assert (ref.layer_norm32(x, w, b).float() - want.float()).abs().max() <= 2 ** -6 * 4


def test_rms_norm32_double_rounding():
    x = torch.randn(9, 144).to(torch.bfloat16)
    w = (torch.rand(144) + 0.5).to(torch.bfloat16)
    x32 = x.float()
    y = (x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    want = (y.float() * w.float()).to(torch.bfloat16)
    assert torch.equal(ref.rms_norm32(x, w), want)


def test_qk_norm_is_l2_times_gamma_sqrt_d():
    u = torch.randn(5, 2, 72)
    g = torch.rand(2, 72)
    want = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) * g * math.sqrt(72)
    assert rel_err(ref.qk_l2_norm(u, g), want) < 1e-6
    assert torch.equal(ref.qk_l2_norm(torch.zeros(1, 2, 72), g), torch.zeros(1, 2, 72))


def test_gelu_tanh_formula():
    u = torch.linspace(-6, 6, 1001)
    want = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    assert rel_err(ref.gelu_tanh(u), want) < 1e-6
    v = u.clone()
    assert torch.equal(ref.gelu_tanh_(v), ref.gelu_tanh(u))


@pytest.mark.parametrize("out_hw", [(2, 3), (16, 16), (17, 8), (5, 40), (1, 1)])
def test_pos_table_antialias_matches_spec_formula(out_hw):
    table = torch.randn(256, 8)
    h, w = out_hw
    mh, mw = ref.antialias_bilinear_matrix(16, h), ref.antialias_bilinear_matrix(16, w)
    g = table.double().reshape(16, 16, 8)
    want = torch.einsum("ia,jb,abc->ijc", mh, mw, g).reshape(h * w, 8)
    assert rel_err(ref.interpolate_pos_table(table, 16, h, w), want) < 1e-6
    if out_hw == (16, 16):
        assert torch.equal(ref.interpolate_pos_table(table, 16, 16, 16), table)


@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0])
@pytest.mark.parametrize("lens", [[1], [17], [423], [5, 17, 1, 30], [8, 8, 8]])
def test_varlen_attention_equals_per_sequence(lens, softcap):
    cu = np.concatenate([[0], np.cumsum(lens)])
    n = int(cu[-1])
    q, k, v = (torch.randn(n + 3, 2, 72) for _ in range(3))  # 3 padding rows past the end
    q0 = q.clone()
    out = ref.varlen_attention(q, k, v, cu, softcap=softcap)
    want = ref.attention_per_sequence(q, k, v, cu, softcap=softcap)
    assert rel_err(out[:n], want[:n]) < 1e-5
    assert torch.equal(out[n:], torch.zeros(3, 2, 72))  # rows outside every sequence are zero
    assert torch.equal(q, q0)
    for s in range(len(lens)):  # each sequence alone gives the same slice
        a, b = cu[s], cu[s + 1]
        alone = ref.varlen_attention(q[a:b], k[a:b], v[a:b], [0, b - a], softcap=softcap)
        assert rel_err(out[a:b], alone) < 1e-5


def test_varlen_attention_separate_kv_lengths_and_memory_groups():
    cu_q, cu_k = [0, 1, 2, 3], [0, 10, 11, 40]
    q, k, v = torch.randn(3, 4, 64), torch.randn(40, 4, 64), torch.randn(40, 4, 64)
    want = ref.attention_per_sequence(q, k, v, cu_q, cu_k)
    assert rel_err(ref.varlen_attention(q, k, v, cu_q, cu_k), want) < 1e-5
    assert rel_err(ref.varlen_attention(q, k, v, cu_q, cu_k, max_score_elems=1), want) < 1e-5


def test_fsq_matches_spec_formula():
    z = torch.randn(300, 48) * 2
    codes, idx = ref.fsq_quantize(z, [4] * 6, 8)
    half_l, offset = 3 * 1.001 / 2, 0.5
    shift = math.atanh(offset / half_l)
    bounded = torch.tanh(z.double() + shift) * half_l - offset
    want = torch.round(bounded) / 2
    near = (bounded - bounded.floor() - 0.5).abs() < 1e-5
    assert torch.equal(codes[~near], want[~near].float())
    digits = (codes.reshape(300, 8, 6) * 2 + 2).long()
    assert torch.equal(idx.long(), (digits * torch.tensor([1, 4, 16, 64, 256, 1024])).sum(-1))
    assert idx.dtype == torch.int32 and int(idx.min()) >= 0 and int(idx.max()) < 4096
    assert torch.equal(ref.fsq_indices_to_codes(idx, [4] * 6), codes)


def test_fsq_thresholds_and_bf16_input():
    # Thresholds on u from the spec: -1.14972, -0.34620, 0.45732.
    u = torch.tensor([-1.1498, -1.1496, -0.3463, -0.3461, 0.4572, 0.4574]).repeat(8)[:48]
    codes, _ = ref.fsq_quantize(u[None], [4] * 6, 8)
    assert codes[0, :6].tolist() == [-1.0, -0.5, -0.5, 0.0, 0.0, 0.5]
    zb = torch.randn(10, 48).to(torch.bfloat16)
    cb, ib = ref.fsq_quantize(zb, [4] * 6, 8)
    c32, i32 = ref.fsq_quantize(zb.float(), [4] * 6, 8)
    assert cb.dtype == torch.bfloat16 and torch.equal(cb.float(), c32) and torch.equal(ib, i32)


def test_gaussian_sample_formula():
    m = torch.randn(20, 96)
    g = torch.Generator().manual_seed(1)
    s = ref.gaussian_sample(m, g)
    eps = torch.randn(20, 48, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s, m[:, :48] + torch.exp(0.5 * m[:, 48:]) * eps)


def test_plan_handles_unsorted_tokens_and_3d():
    c = np.array([[5, 0, 0, 0], [1, 0, 0, 0], [4, 1, 1, 0], [0, 0, 1, 0]])
    plan = build_plan([c], chunk=4)
    assert plan.order.tolist() == [1, 3, 0, 2]  # chunk 0 rows (t=1, 0) then chunk 1 (t=5, 4)
    assert plan.cu_seqlens.tolist() == [0, 2, 4]
    assert plan.positions[:, 0].tolist() == [1, 0, 1, 0]
    vox = np.array([[1, 3, 4, 5], [1, 9, 2, 0]])
    p3 = build_plan([vox])
    assert p3.positions[:, 0].tolist() == [0, 0]  # t = 1 re-based to 0 (3D alone)
    assert p3.pe_shapes == [(10, 5)]
    assert p3.pe_rows.tolist() == [3 * 5 + 4, 9 * 5 + 2]
