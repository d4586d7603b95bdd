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


# ------------------------------------------------------------------------------------------------
# `atoken-rt decode SHARD.parquet`: a shard is untrusted like a token file
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    pytest.importorskip("pyarrow")
    from PIL import Image

    from atoken_rt import cli

    from .conftest import WEIGHTS
    d = tmp_path_factory.mktemp("shard")
    (d / "src").mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(d / "src" / "img.png")
    assert cli.main(["tokenize", str(d / "src"), "--out", str(d / "tok"), "--config", "tiny-sod",
                     "--checkpoint", str(WEIGHTS), "--device", "cpu", "--quiet"]) == 0
    return next((d / "tok").glob("shard-*.parquet")), str(d / "src" / "img.png")


def _edited_shard(shard, tmp_path, column, array):
    import shutil

    import pyarrow.parquet as pq
    path, key = shard
    folder = tmp_path / "tok"
    shutil.copytree(path.parent, folder)
    out = folder / path.name
    t = pq.read_table(out)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, array), out)
    return out, key


def test_shard_with_a_column_of_another_type_is_an_error_not_a_traceback(shard, tmp_path,
                                                                          capsys):
    import pyarrow as pa

    from atoken_rt import cli
    out, key = _edited_shard(shard, tmp_path, "coords",
                             pa.array([[0] * 24], pa.list_(pa.int32())))
    capsys.readouterr()
    rc = cli.main(["decode", str(out), "--key", key, "--out", str(tmp_path / "dec"),
                   "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "column 'coords' must be list<fixed_size_list" in err, err
    assert not (tmp_path / "dec").exists()


def test_shard_with_null_cells_is_a_valueerror(shard, tmp_path):
    import pyarrow as pa

    from atoken_rt.data import read_tokens
    out, key = _edited_shard(shard, tmp_path, "coords",
                             pa.array([None], pa.list_(pa.list_(pa.int32(), 4))))
    with pytest.raises(ValueError, match="row 0: not a token row"):
        read_tokens(out).find(key)


def test_shard_sizes_bounded_from_the_footer_before_reading(shard, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from atoken_rt.data import read_tokens
    # One row of 100000 tokens (a few KB of Parquet: run-length-encoded zeros).
    big = pa.array([[[0, 0, 0, 0]] * 100000], pa.list_(pa.list_(pa.int32(), 4)))
    out, _ = _edited_shard(shard, tmp_path, "coords", big)
    assert out.stat().st_size < 1 << 20
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ValueError, match=r"holds 400000 values in column 'coords' for 1 row"):
        read_tokens(out, max_tokens_per_row=65536)


# ------------------------------------------------------------------------------------------------
# config YAML: aliases of aliases ("billion laughs")
# ------------------------------------------------------------------------------------------------

def _bomb_config(tmp_path, field):
    import re

    from atoken_rt import config
    src = config.resolve_config_path("tiny-sod").read_text().replace("\n---\n", "\n")
    bomb = "b0: &b0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]\n" for i in range(1, 9))
    m = re.search(rf"^(\s*){field}:.*$", src, re.M)
    p = tmp_path / f"bomb-{field}.yaml"
    p.write_text(bomb + src[:m.start()] + f"{m.group(1)}{field}: *b8" + src[m.end():])
    return p


@pytest.mark.parametrize("field", ["encoder_attn_mode", "latent_channels"])
def test_yaml_alias_bomb_config_fails_fast(tmp_path, field):
    # A 1 KB document of 10^9 values: before, the error message's repr of the field never ended.
    import subprocess
    import sys
    p = _bomb_config(tmp_path, field)
    code = ("import atoken_rt\ntry:\n    atoken_rt.load_config(%r)\nexcept ValueError as e:\n"
            "    print('ValueError:', e)\n" % str(p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "values once its aliases are expanded" in r.stdout, (r.stdout, r.stderr[-500:])


def test_yaml_recursive_alias_config(tmp_path):
    import atoken_rt
    p = tmp_path / "rec.yaml"
    p.write_text("model: &a {model_cfg: [1, *a]}\n")
    with pytest.raises(ValueError, match="refers to itself"):
        atoken_rt.load_config(p)


# ------------------------------------------------------------------------------------------------
# `atoken-rt tokenize` of a Parquet image dataset: row groups bounded as they decode
# ------------------------------------------------------------------------------------------------

def _image_parquet(path, blob, rows, struct=True):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if struct:
        arr = pa.array([{"bytes": blob, "path": "a.png"}] * rows,
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        arr = pa.array([blob] * rows, pa.binary())
    pq.write_table(pa.table({"image": arr}), path, compression="zstd")


def test_parquet_row_group_bound_is_uncompressed(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from atoken_rt.data import readers
    p = tmp_path / "zeros.parquet"
    _image_parquet(p, b"\0" * (8 << 20), 1)
    assert p.stat().st_size < 64 << 10
    monkeypatch.setattr(readers, "MAX_ROW_GROUP_BYTES", 4 << 20)
    cells = readers._ParquetCells(str(p), readers.Preprocess())
    with pytest.raises(media.MediaError, match="more than 4194304"):
        cells.cell(0, 0)


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_repeated_cells_stay_shared(tmp_path, struct):
    pytest.importorskip("pyarrow")
    from atoken_rt.data import readers
    p = tmp_path / "same.parquet"
    blob = b"\0" * (1 << 20)
    _image_parquet(p, blob, 64, struct)  # a ~1 KB file of 64 MB of cells
    cells = readers._ParquetCells(str(p), readers.Preprocess())
    data, _ = cells.cell(0, 5)
    assert data == blob
    assert cells.cells.nbytes < 8 << 20  # one shared value, not 64 copies


def test_shard_repeated_strings_stay_shared_when_untrusted(shard, tmp_path):
    import pyarrow as pa

    from atoken_rt.data import read_tokens
    path, key = shard
    big = "k" * (1 << 20)
    out, _ = _edited_shard(shard, tmp_path, "source", pa.array([big], pa.string()))
    ds = read_tokens(out, max_tokens_per_row=65536)
    assert pa.types.is_dictionary(ds.table.schema.field("source").type)
    row = ds.find(key)
    assert row.source == big and row.key == key and row.kind == "image"
    assert not pa.types.is_dictionary(read_tokens(out).table.schema.field("source").type)


def test_npz_member_without_npy_suffix_is_refused(tmp_path):
    # np.load returns a member named "coords" (no .npy) as its whole raw, inflated bytes.
    p = tmp_path / "raw.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("coords", b"\0" * (1 << 20))
        buf = io.BytesIO()
        np.save(buf, np.zeros((1, 768), np.float32))
        z.writestr("feats.npy", buf.getvalue())
    with pytest.raises(media.MediaError, match="not an .npy array"):
        media.read_voxels(p)
