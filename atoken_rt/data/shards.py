"""The output folder: Parquet shards, ``manifest.json`` and ``failures.parquet``.

Layout of ``--out``::

    manifest.json          what made the tokens (config, checkpoint SHA-256, options, inputs hash)
                           and the finished shards (rows, tokens, failures, SHA-256, bytes)
    shard-00000.parquet    one row per sample or clip of items [0, shard_size)
    shard-00001.parquet    ...
    failures.parquet       key, source, clip, shard, error (rewritten at the end of each run)

Commit protocol: a shard is written to a hidden temporary name in the same folder and renamed
(``os.replace``, atomic) once complete. The shard file is the commit record: its Parquet
metadata (key ``atoken_rt``) holds its item range, the run fingerprint and the failures of its
items, so a shard and its failures appear together or not at all. ``manifest.json`` is derived
state, rewritten atomically after each shard; ``failures.parquet`` is assembled from the shards.

Row schema (one row per image, video clip or 3D asset):

| column | type | meaning |
|---|---|---|
| key, source | string | the item's key and the file holding it |
| source_index | int64 | tar sample / Parquet row number in ``source`` (-1 for files) |
| kind | string | image, video, 3d |
| clip, frame_start | int32 | clip number and its first frame in the video (0 otherwise) |
| fps | float64 | videos, else null |
| original_shape | list<int32> | as read: (H, W, 3), clip (T, H, W, 3) at the file's size, (M, 768) |
| resized_shape | list<int32> | (H', W', 3) after ``--resize`` (null for 3D) |
| crop | list<int32> | (top, left, height, width) of the tokenised region in the resized frame |
| used_shape | list<int32> | what was tokenised (the model crops to multiples of 16 and 4 frames) |
| frames_used, frames_dropped, frames_padded | int32 | the model's 4-frame rule |
| num_tokens | int32 | n |
| coords | list<fixed_size_list<int32, 4>> | [n, 4] (t, x, y, z) |
| indices | list<fixed_size_list<int32, C>> | [n, C] FSQ indices (discrete configs) |
| latents | list<fixed_size_list<float, L>> | [n, L] (continuous configs): float32, float16, or bfloat16 as uint16 bit patterns (field metadata ``atoken_rt.dtype = bfloat16``; ``(bits.astype(uint32) << 16).view(float32)``) |
| embedding | fixed_size_list<float32, W> | the L2-normalised MAP-head embedding |
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SHARD_FORMAT = "atoken_rt.shard/1"
MANIFEST_FORMAT = "atoken_rt.dataset/1"
META_KEY = b"atoken_rt"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
LATENT_DTYPES = ("fp32", "fp16", "bf16")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step (a temporary file in the same folder, renamed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(out: Path) -> int:
    """Delete temporaries left by killed runs (hidden ``.*.tmp-*`` files); returns the count."""
    n = 0
    for p in out.glob(".*.tmp-*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


# ------------------------------------------------------------------------------------------------
# schema and tables
# ------------------------------------------------------------------------------------------------

def row_schema(discrete: bool, channels: int, width: int, latent_dtype: str = "fp32"):
    """The Arrow schema of the token rows (see the module docstring)."""
    import pyarrow as pa

    i32 = pa.int32()
    shape = pa.list_(i32)
    fields = [pa.field("key", pa.string()), pa.field("source", pa.string()),
              pa.field("source_index", pa.int64()), pa.field("kind", pa.string()),
              pa.field("clip", i32), pa.field("frame_start", i32), pa.field("fps", pa.float64()),
              pa.field("original_shape", shape), pa.field("resized_shape", shape),
              pa.field("crop", shape), pa.field("used_shape", shape),
              pa.field("frames_used", i32), pa.field("frames_dropped", i32),
              pa.field("frames_padded", i32), pa.field("num_tokens", i32),
              pa.field("coords", pa.list_(pa.list_(i32, 4)))]
    if discrete:
        fields.append(pa.field("indices", pa.list_(pa.list_(i32, channels))))
    else:
        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
        elem = {"fp32": pa.float32(), "fp16": pa.float16(), "bf16": pa.uint16()}[latent_dtype]
        meta = {b"atoken_rt.dtype": {"fp32": b"float32", "fp16": b"float16",
                                     "bf16": b"bfloat16"}[latent_dtype]}
        fields.append(pa.field("latents", pa.list_(pa.list_(elem, channels)), metadata=meta))
    fields.append(pa.field("embedding", pa.list_(pa.float32(), width)))
    return pa.schema(fields)


def _nested(values: list[np.ndarray], inner: int, arrow_type):
    """Per-row [n_i, inner] arrays -> list<fixed_size_list<T, inner>> (no per-element Python)."""
    import pyarrow as pa

    counts = np.array([len(v) for v in values], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = (np.concatenate([v.reshape(-1, inner) for v in values]) if values
            else np.zeros((0, inner))).reshape(-1)
    fsl = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=arrow_type), inner)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), fsl)


def rows_to_table(rows: Sequence[dict], schema, meta: dict):
    """Token rows (dicts; arrays as numpy) -> an Arrow table with ``meta`` as its metadata."""
    import pyarrow as pa

    cols = {}
    for f in schema:
        name = f.name
        if name == "coords":
            cols[name] = _nested([r["coords"] for r in rows], 4, pa.int32())
        elif name in ("indices", "latents"):
            inner = f.type.value_type
            cols[name] = _nested([r[name] for r in rows], inner.list_size, inner.value_type)
        elif name == "embedding":
            w = f.type.list_size
            flat = (np.stack([r["embedding"] for r in rows]) if rows
                    else np.zeros((0, w), np.float32)).reshape(-1)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), w)
        else:
            cols[name] = pa.array([r[name] for r in rows], type=f.type)
    table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_shard(out: Path, k: int, table) -> dict:
    """Write shard k atomically; returns its manifest entry (file, rows, bytes, sha256)."""
    import pyarrow.parquet as pq

    final = out / shard_name(k)
    tmp = out / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file": final.name, "sha256": sha, "bytes": size}


def read_shard_meta(path: Path) -> dict | None:
    """The ``atoken_rt`` metadata of a shard file, or None if it is not a readable shard."""
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(path).metadata or {}
        meta = json.loads(md[META_KEY])
    except Exception:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == SHARD_FORMAT else None


def existing_shards(out: Path) -> dict[int, Path]:
    """Shard files present in ``out`` by shard number."""
    found = {}
    for p in out.iterdir() if out.is_dir() else []:
        m = SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


# ------------------------------------------------------------------------------------------------
# manifest and failures
# ------------------------------------------------------------------------------------------------

def read_manifest(out: Path) -> dict | None:
    path = out / "manifest.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    except RecursionError:  # "[[[[...]]]]"
        raise ValueError(f"{path}: not a readable manifest (nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not an atoken_rt dataset manifest (format "
                         f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    return doc


def write_manifest(out: Path, doc: dict) -> None:
    write_atomic(out / "manifest.json", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def write_failures(out: Path, failures: Sequence[dict]) -> None:
    """failures.parquet: key, source, clip (-1: the whole item), shard, error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": pa.array([f["key"] for f in failures], pa.string()),
                      "source": pa.array([f["source"] for f in failures], pa.string()),
                      "clip": pa.array([f["clip"] for f in failures], pa.int32()),
                      "shard": pa.array([f["shard"] for f in failures], pa.int32()),
                      "error": pa.array([f["error"] for f in failures], pa.string())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_atomic(out / "failures.parquet", sink.getvalue().to_pybytes())


def _flatten(d, prefix=""):
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint_diff(old: dict, new: dict, limit: int = 6) -> list[str]:
    """Human-readable differences between two run fingerprints ("field: old -> new")."""
    a, b = _flatten(old or {}), _flatten(new or {})
    out = [f"{k}: {json.dumps(a.get(k))[:60]} -> {json.dumps(b.get(k))[:60]}"
           for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


__all__ = ["row_schema", "rows_to_table", "write_shard", "read_shard_meta", "existing_shards",
           "read_manifest", "write_manifest", "write_failures", "shard_name", "file_sha256",
           "remove_stale_temporaries", "fingerprint_diff", "SHARD_FORMAT", "MANIFEST_FORMAT",
           "LATENT_DTYPES"]
