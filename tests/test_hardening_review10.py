"""Issue 10 review: crafted files that still reached a traceback or allocated before validation,
and a resumed download that could be spliced from two different files."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from atoken_rt import Limits, media, tokenfile

safetensors = pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402


def test_token_file_with_deeply_nested_metadata_is_a_valueerror(tmp_path):
    # json.loads recurses per level: "[[[[...]]]]" raised RecursionError, not a ValueError.
    p = tmp_path / "deep.safetensors"
    save_file({"sample.0.coords": torch.zeros(1, 4, dtype=torch.int32),
               "sample.0.latents": torch.zeros(1, 4)}, str(p),
              metadata={media.TOKEN_METADATA_KEY: "[" * 200000 + "]" * 200000})
    with pytest.raises(ValueError, match="nested too deeply"):
        tokenfile.load(p)


def test_manifest_with_deeply_nested_json_is_a_valueerror(tmp_path):
    from atoken_rt.data.shards import read_manifest
    (tmp_path / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_manifest(tmp_path)


def _npz_claiming(path, shapes: dict):
    """A .npz whose members' headers declare ``shapes`` but hold no data (what a zip bomb's
    headers look like before its deflated zeros)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, (shape, dtype) in shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str,
                                                       "fortran_order": False, "shape": shape})
            z.writestr(name + ".npy", buf.getvalue())


def test_npz_voxels_checked_from_headers_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "bomb.npz"
    _npz_claiming(p, {"coords": ((10 ** 9, 3), "<i8"), "feats": ((10 ** 9, 768), "<f4")})

    def no_read(*a, **k):
        raise AssertionError("array data read before the header check")

    monkeypatch.setattr(np.lib.format, "read_array", no_read)
    with pytest.raises(media.MediaError, match=r"1000000000 voxels, more than the limit of 65536"):
        media.read_voxels(p)
    with pytest.raises(media.MediaError, match="Limits.max_voxels"):
        media.load(p)


def test_npz_voxels_over_a_session_limit_and_wide_arrays(tmp_path):
    p = tmp_path / "v.npz"
    np.savez_compressed(p, coords=np.zeros((40, 3), np.int32),
                        feats=np.zeros((40, 768), np.float32))
    assert media.load(p).shape == (40, 768)
    with pytest.raises(media.MediaError, match="limit of 39"):
        media.load(p, Limits(max_voxels=39))
    q = tmp_path / "wide.npz"
    _npz_claiming(q, {"coords": ((4, 10 ** 9), "<i8"), "feats": ((4, 768), "<f4")})
    with pytest.raises(media.MediaError, match=r"shape \[4, 1000000000\]"):
        media.read_voxels(q)
