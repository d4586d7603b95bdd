"""Input handling: normalisation, patchify rules, and a clear error for every kind of bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import atoken_rt
from atoken_rt.inputs import patchify, prepare_pixels, prepare_voxels, unpatchify

from .conftest import make_session, random_voxels, requires_cuda


@pytest.fixture(scope="module")
def sess():
    return make_session("tiny-sod")


def _img(h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_uint8_normalisation_matches_readme():
    img = _img()
    p = prepare_pixels(img, 0)
    want = (torch.from_numpy(img).float() / 255) * 2 - 1
    assert torch.equal(p.feats[:, :768].reshape(2, 3, 16, 16, 3).permute(0, 2, 1, 3, 4)
                       .reshape(32, 48, 3), want)
    assert torch.equal(p.feats[:, 768:], torch.zeros(6, 3072 - 768))  # zero padding frames


def test_numpy_and_torch_and_dtypes_agree():
    img = _img()
    f = (torch.from_numpy(img).float() / 255) * 2 - 1
    a = prepare_pixels(img, 0).feats
    assert torch.equal(prepare_pixels(torch.from_numpy(img), 0).feats, a)
    assert torch.equal(prepare_pixels(f.numpy(), 0).feats, a)
    assert torch.equal(prepare_pixels(f.double(), 0).feats, a)


def test_patchify_formula_and_inverse():
    v = torch.randn(8, 32, 48, 3)
    tok = patchify(v)
    tau, i, j, pt, ph, pw, c = 1, 1, 2, 3, 5, 7, 2
    row = (tau * 2 + i) * 3 + j
    assert tok[row, ((pt * 16 + ph) * 16 + pw) * 3 + c] == v[4 * tau + pt, 16 * i + ph, 16 * j + pw, c]
    assert torch.equal(unpatchify(tok, (2, 2, 3)), v)


def test_crop_and_frame_rules_are_reported(sess):
    vid = np.zeros((9, 40, 56, 3), np.uint8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        enc = sess.encode([vid])
    info = enc.info[0]
    assert info.kind == "video" and info.original_shape == (9, 40, 56, 3)
    assert info.used_shape == (8, 32, 48, 3) and info.crop_offset == (4, 4)
    assert info.frames_used == 8 and info.frames_dropped == 1 and info.cropped
    msgs = [str(w.message) for w in rec if issubclass(w.category, atoken_rt.InputWarning)]
    assert any("cropped" in m for m in msgs) and any("dropped" in m for m in msgs)
    with warnings.catch_warnings(record=True) as rec2:  # warned once per session
        warnings.simplefilter("always")
        sess.encode([vid])
    assert not [w for w in rec2 if issubclass(w.category, atoken_rt.InputWarning)]


def test_short_video_padded_and_reported(sess):
    enc = sess.encode([np.zeros((2, 32, 32, 3), np.uint8)])
    assert enc.info[0].frames_padded == 2 and enc.info[0].frames_used == 2
    assert enc.info[0].used_shape == (4, 32, 32, 3)
    assert sess.decode(enc).samples[0].shape == (4, 32, 32, 3)


BAD = [
    ("empty batch", [], ValueError, "empty batch"),
    ("not a list", np.zeros((32, 32, 3), np.uint8), TypeError, "list of samples"),
    ("nan", [np.full((32, 32, 3), np.nan, np.float32)], ValueError, "sample 0: contains NaN"),
    ("inf", [_img(), np.full((32, 32, 3), np.inf, np.float32)], ValueError, "sample 1: contains NaN or Inf"),
    ("out of range", [np.full((32, 32, 3), 1.5, np.float32)], ValueError, r"sample 0: float pixels must lie in \[-1, 1\]"),
    ("rank", [np.zeros((2, 2, 32, 32, 3), np.uint8)], ValueError, "sample 0: expected an image"),
    ("rank 2", [np.zeros((32, 32), np.uint8)], ValueError, "sample 0: expected an image"),
    ("channels", [np.zeros((32, 32, 4), np.uint8)], ValueError, "sample 0: expected 3 channels"),
    ("channels first", [np.zeros((3, 32, 32), np.uint8)], ValueError, "3 channels last"),
    ("tiny image", [np.zeros((8, 64, 3), np.uint8)], ValueError, "smaller than one 16x16 patch"),
    ("no frames", [np.zeros((0, 32, 32, 3), np.uint8)], ValueError, "sample 0: video has no frames"),
    ("not an array", ["cat.png"], TypeError, "sample 0: expected a torch.Tensor"),
    ("list sample", [[[0, 0, 0]]], TypeError, "sample 0"),
    ("int16", [np.zeros((32, 32, 3), np.int16)], TypeError, "sample 0: unsupported dtype"),
    ("bool", [torch.zeros(32, 32, 3, dtype=torch.bool)], TypeError, "unsupported dtype"),
    ("complex", [torch.zeros(32, 32, 3, dtype=torch.complex64)], TypeError, "unsupported dtype"),
    ("object", [np.array([[["a"] * 3] * 16] * 16, dtype=object)], TypeError, "unsupported numpy dtype"),
    ("voxel outside", [atoken_rt.Voxels(np.array([[0, 0, 64]]), np.zeros((1, 768), np.float32))], ValueError, "outside the grid"),
    ("voxel negative", [atoken_rt.Voxels(np.array([[0, -1, 3]]), np.zeros((1, 768), np.float32))], ValueError, "outside the grid"),
    ("voxel dup", [atoken_rt.Voxels(np.array([[1, 2, 3], [1, 2, 3]]), np.zeros((2, 768), np.float32))], ValueError, "duplicated"),
    ("voxel width", [atoken_rt.Voxels(np.array([[1, 2, 3]]), np.zeros((1, 512), np.float32))], ValueError, r"feats must have shape \[M, 768\]"),
    ("voxel counts", [atoken_rt.Voxels(np.array([[1, 2, 3]]), np.zeros((2, 768), np.float32))], ValueError, "1 coords but 2 feature rows"),
    ("voxel range", [atoken_rt.Voxels(np.array([[1, 2, 3]]), np.full((1, 768), 1.2, np.float32))], ValueError, r"feats must lie in \[0, 1\]"),
    ("voxel nan", [atoken_rt.Voxels(np.array([[1, 2, 3]]), np.full((1, 768), np.nan, np.float32))], ValueError, "NaN"),
    ("voxel float coords", [atoken_rt.Voxels(np.array([[1.0, 2.0, 3.0]]), np.zeros((1, 768), np.float32))], TypeError, "integers"),
    ("voxel coords shape", [atoken_rt.Voxels(np.array([[1, 2]]), np.zeros((1, 768), np.float32))], ValueError, r"\[M, 3\]"),
    ("voxel empty", [atoken_rt.Voxels(np.zeros((0, 3), np.int32), np.zeros((0, 768), np.float32))], ValueError, "no voxels"),
    ("voxel int feats", [atoken_rt.Voxels(np.array([[1, 2, 3]]), np.zeros((1, 768), np.int32))], TypeError, "float dtype"),
]


@pytest.mark.parametrize("name,batch,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_clear_and_session_stays_usable(sess, name, batch, exc, match):
    with pytest.raises(exc, match=match):
        sess.encode(batch)
    enc = sess.encode([_img(), random_voxels(20, 0)])  # the session still works
    assert enc.latents[0].shape == (6, 48) and enc.latents[1].shape == (20, 48)


def test_bad_sample_named_by_position(sess):
    with pytest.raises(ValueError, match="sample 2"):
        sess.encode([_img(), random_voxels(20, 0), np.zeros((32, 32, 5), np.uint8)])


def test_voxel_entry_matches_reference_rule():
    v = random_voxels(5, 0)
    p = prepare_voxels(v, 0)
    assert torch.equal(p.feats[:, :768], torch.from_numpy(v.feats) * 2 - 1)
    assert not p.feats[:, 768:].any()
    assert torch.equal(p.coords[:, 0], torch.ones(5, dtype=torch.int32))
    assert torch.equal(p.coords[:, 1:], torch.from_numpy(v.coords))
    p16 = prepare_voxels(atoken_rt.Voxels(v.coords, v.feats.astype(np.float16)), 0)
    assert p16.feats.dtype == torch.float32


def test_same_shaped_uint8_samples_are_prepared_together_bit_exactly():
    """prepare_pixel_batch groups host uint8 samples by shape (one copy, one patchify each) and
    gives exactly what prepare_pixels gives per sample: tokens, coords and info (crops, padded
    and dropped frames); float samples and shapes seen once are left to the per-sample path."""
    from atoken_rt.inputs import prepare_pixel_batch, prepare_pixels
    rng = np.random.default_rng(3)

    def u8(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    batch = [u8(40, 50, 3), u8(40, 50, 3), torch.from_numpy(u8(40, 50, 3)),  # crop
             u8(2, 32, 16, 3), u8(2, 32, 16, 3),  # frames padded to 4
             u8(9, 16, 33, 3), torch.from_numpy(u8(9, 16, 33, 3)),  # 1 frame dropped, crop
             u8(16, 16, 3),  # alone in its shape
             rng.uniform(-1, 1, (40, 50, 3)).astype(np.float32),  # float: per sample
             u8(8, 8, 3)]  # too small: left to the per-sample path (which raises)
    got = prepare_pixel_batch(batch)
    assert sorted(got) == [0, 1, 2, 3, 4, 5, 6]
    for i, p in got.items():
        want = prepare_pixels(batch[i], i)
        assert torch.equal(p.feats, want.feats), i
        assert torch.equal(p.coords, want.coords) and p.info == want.info, i
    assert got[3].info.frames_padded == 2 and got[5].info.frames_dropped == 1
    got[0].coords[0, 0] = 7  # each sample owns its coords
    assert got[1].coords[0, 0] == 0


def test_grouped_preparation_keeps_errors_per_sample():
    sess = make_session("tiny-sod")
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="sample 2: frames of 8x8"):
        sess.encode([img, img, np.zeros((8, 8, 3), dtype=np.uint8), img])
    enc = sess.encode([img, img, img[:, :16]])
    assert [len(c) for c in enc.coords] == [4, 4, 2]


@requires_cuda
def test_grouped_preparation_on_the_gpu_is_bit_exact():
    """On CUDA the group is stacked into pinned memory and sent in one transfer."""
    from atoken_rt.inputs import prepare_pixel_batch, prepare_pixels
    rng = np.random.default_rng(4)
    batch = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)] + \
        [rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    got = prepare_pixel_batch(batch, "cuda")
    assert sorted(got) == [0, 1, 2, 3, 4]
    for i, p in got.items():
        want = prepare_pixels(batch[i], i, "cuda")
        assert p.feats.is_cuda and torch.equal(p.feats, want.feats) and p.info == want.info
