"""``read_tokens``: a tokenize output folder (or one shard) -> rows with numpy arrays.

    ds = atoken_rt.data.read_tokens("tokens/")
    len(ds), ds.manifest["config"], ds.failures.num_rows
    row = ds.find("photos/cat.jpg")          # or ds[i]
    row.coords   # [n, 4] int32        row.indices  # [n, C] int32 (discrete) / row.latents [n, L]
    ds.table     # the pyarrow Table of every shard (zero-copy; hand it to pandas, HF datasets...)

The shards are plain Parquet: ``pyarrow.parquet.read_table(folder)``, ``pandas.read_parquet``,
``ray.data.read_parquet`` and ``datasets.load_dataset("parquet", ...)`` read them without
atoken_rt (see :mod:`atoken_rt.data.shards` for the schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .shards import existing_shards, file_sha256, read_manifest, shard_name


@dataclass
class TokenRow:
    """One sample: arrays as numpy (latents as float32, bf16 ones widened exactly)."""

    key: str
    source: str
    kind: str
    clip: int
    coords: np.ndarray
    indices: np.ndarray | None
    latents: np.ndarray | None
    embedding: np.ndarray
    meta: dict


def _matrix(col, i: int) -> np.ndarray:
    """Row i of a list<fixed_size_list<T, C>> column -> [n, C] numpy."""
    cell = col[i]
    inner = cell.values
    c = inner.type.list_size
    return np.asarray(inner.flatten().to_numpy(zero_copy_only=False)).reshape(-1, c)


def _widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.astype(np.float32)


class TokenSet:
    """The rows of a tokenize output (every committed shard, in shard order)."""

    def __init__(self, table, manifest: dict | None, failures):
        self.table = table
        self.manifest = manifest
        self.failures = failures
        self._index = None
        lat = table.schema.field("latents") if "latents" in table.schema.names else None
        md = (lat.metadata or {}) if lat is not None else {}
        self.latent_dtype = md.get(b"atoken_rt.dtype", b"float32").decode()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> TokenRow:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        t = self.table
        scalars = {name: t.column(name)[i].as_py() for name in t.schema.names
                   if name not in ("coords", "indices", "latents", "embedding")}
        lat = None
        if "latents" in t.schema.names:
            lat = _widen(_matrix(t.column("latents"), i), self.latent_dtype)
        return TokenRow(key=scalars["key"], source=scalars["source"], kind=scalars["kind"],
                        clip=scalars["clip"], coords=_matrix(t.column("coords"), i),
                        indices=(_matrix(t.column("indices"), i)
                                 if "indices" in t.schema.names else None),
                        latents=lat,
                        embedding=np.asarray(t.column("embedding")[i].values.to_numpy()),
                        meta=scalars)

    def find(self, key: str, clip: int = 0) -> TokenRow:
        """The row of item ``key`` (and clip); KeyError if absent."""
        if self._index is None:
            keys = self.table.column("key").to_pylist()
            clips = self.table.column("clip").to_pylist()
            self._index = {(k, c): i for i, (k, c) in enumerate(zip(keys, clips))}
        hit = self._index.get((key, clip))
        if hit is None:
            raise KeyError(f"no row with key {key!r} and clip {clip}")
        return self[hit]


def read_tokens(path: Union[str, Path], *, verify: bool = False) -> TokenSet:
    """A tokenize output folder (every committed shard) or one shard file -> :class:`TokenSet`.

    verify: check every shard's SHA-256 against the manifest (ValueError on a mismatch).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file():
        files, manifest, folder = [path], read_manifest(path.parent), path.parent
    elif path.is_dir():
        manifest = read_manifest(path)
        if manifest is None:
            raise ValueError(f"{path}: no manifest.json (not a tokenize output)")
        folder = path
        found = existing_shards(path)
        listed = {e["shard"]: e for e in manifest.get("shards", [])}
        files = [found[k] for k in sorted(found) if k in listed]
        if verify:
            for k in sorted(listed):
                p = path / shard_name(k)
                if not p.is_file() or file_sha256(p) != listed[k]["sha256"]:
                    raise ValueError(f"{p}: missing or changed (SHA-256 differs from the "
                                     "manifest)")
    else:
        raise ValueError(f"{path}: no such file or folder")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as exc:
            raise ValueError(f"{f}: not a readable shard ({exc})") from None
    if not tables:
        raise ValueError(f"{path}: no committed shards")
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    failures = None
    fpath = folder / "failures.parquet"
    if fpath.is_file():
        failures = pq.read_table(fpath)
    return TokenSet(table, manifest, failures)


def shard_metadata(path: Union[str, Path]) -> dict:
    """The ``atoken_rt`` metadata of one shard (items, fingerprint, failures)."""
    import pyarrow.parquet as pq
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[b"atoken_rt"])


__all__ = ["read_tokens", "TokenSet", "TokenRow", "shard_metadata"]
