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
        try:
            return self._row(i)
        except (AttributeError, TypeError, KeyError, ValueError, ArithmeticError) as exc:
            # A shard edited or made by another program (a null cell, a column of another
            # type): one ValueError, never a traceback from deep inside pyarrow/numpy.
            raise ValueError(f"row {i}: not a token row ({type(exc).__name__}: {exc})") \
                from None

    def _row(self, i: int) -> TokenRow:
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


# Widest fixed-size list a shard may declare (config bounds: 4096 latent channels or
# codebooks, 16384 model channels for the embedding).
_MAX_WIDTH = 1 << 16
_MATRICES = ("coords", "indices", "latents")


def _check_schema(f: Path, schema) -> None:
    """The columns a row is built from have the shard layout's types (ValueError if not)."""
    import pyarrow as pa

    def bad(name, want):
        raise ValueError(f"{f}: not a token shard: column {name!r} must be {want}, got "
                         f"{schema.field(name).type if name in schema.names else 'nothing'}")

    for name in ("key", "source", "kind"):
        if name not in schema.names or not pa.types.is_string(schema.field(name).type):
            bad(name, "a string column")
    if "clip" not in schema.names or not pa.types.is_integer(schema.field("clip").type):
        bad("clip", "an integer column")
    for name in _MATRICES + ("embedding",):
        if name not in schema.names:
            if name in ("coords", "embedding"):
                bad(name, "present")
            continue
        t = schema.field(name).type
        inner = t.value_type if name != "embedding" and pa.types.is_list(t) else None
        fixed = inner if name != "embedding" else t
        if not pa.types.is_fixed_size_list(fixed) or not 0 < fixed.list_size <= _MAX_WIDTH \
                or (name == "coords" and fixed.list_size != 4):
            bad(name, "list<fixed_size_list<T, C>>" if name != "embedding"
                else "fixed_size_list<T, W>")


def _widths(schema) -> dict[str, int]:
    """Values per token of each array column (per row for the embedding), from the schema."""
    out = {}
    for name in _MATRICES + ("embedding",):
        if name in schema.names:
            t = schema.field(name).type
            out[name] = (t if name == "embedding" else t.value_type).list_size
    return out


def _check_sizes(f: Path, schema, max_tokens: int) -> None:
    """Bound what reading shard ``f`` allocates, from its Parquet footer alone: a row's arrays
    are Parquet lists, which a few KB of run-length-encoded zeros can make gigabytes long."""
    import pyarrow.parquet as pq

    widths = _widths(schema)
    per_token = sum(widths[k] for k in _MATRICES if k in widths)
    per_row_bytes = 8 * (max_tokens * per_token + widths["embedding"]) + (1 << 20)
    try:
        md = pq.ParquetFile(f).metadata
        groups = [md.row_group(g) for g in range(md.num_row_groups)]
        cols = [[(rg.column(j).path_in_schema.split(".")[0], rg.column(j).num_values)
                 for j in range(rg.num_columns)] for rg in groups]
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for bad footers
        raise ValueError(f"{f}: not a readable shard ({exc})") from None
    for g, (rg, columns) in enumerate(zip(groups, cols)):
        for top, values in columns:
            per_row = max_tokens * widths[top] if top in _MATRICES else widths.get(top, 64)
            if values > rg.num_rows * per_row:
                raise ValueError(f"{f}: row group {g} holds {values} values in column {top!r} "
                                 f"for {rg.num_rows} row(s), more than rows of at most "
                                 f"{max_tokens} tokens can (Limits.max_tokens_per_sample)")
        if rg.total_byte_size > rg.num_rows * per_row_bytes:
            raise ValueError(f"{f}: row group {g} is {rg.total_byte_size} bytes uncompressed for "
                             f"{rg.num_rows} row(s), more than rows of at most {max_tokens} "
                             "tokens can (Limits.max_tokens_per_sample)")


def read_tokens(path: Union[str, Path], *, verify: bool = False,
                max_tokens_per_row: int | None = None) -> TokenSet:
    """A tokenize output folder (every committed shard) or one shard file -> :class:`TokenSet`.

    verify: check every shard's SHA-256 against the manifest (ValueError on a mismatch).
    max_tokens_per_row: refuse (ValueError), from the Parquet footers before reading, a shard
    whose arrays hold more values than rows of this many tokens can (an untrusted shard).
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
            schema = pq.read_schema(f)
        except Exception as exc:
            raise ValueError(f"{f}: not a readable shard ({exc})") from None
        _check_schema(f, schema)
        if max_tokens_per_row is not None:
            _check_sizes(f, schema, max_tokens_per_row)
        # Untrusted: string cells stay dictionary-encoded (one shared value for a repeated
        # one: the footer's sizes count a dictionary value once, dense it is once per row).
        strings = [n for n in schema.names if pa.types.is_string(schema.field(n).type)] \
            if max_tokens_per_row is not None else None
        try:
            tables.append(pq.read_table(f, read_dictionary=strings))
        except Exception as exc:
            raise ValueError(f"{f}: not a readable shard ({exc})") from None
    if not tables:
        raise ValueError(f"{path}: no committed shards")
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    failures = None
    fpath = folder / "failures.parquet"
    if fpath.is_file():
        try:
            failures = pq.read_table(fpath)
        except Exception as exc:
            raise ValueError(f"{fpath}: not a readable failures table ({exc})") from None
    return TokenSet(table, manifest, failures)


def shard_metadata(path: Union[str, Path]) -> dict:
    """The ``atoken_rt`` metadata of one shard (items, fingerprint, failures)."""
    import pyarrow.parquet as pq
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[b"atoken_rt"])


__all__ = ["read_tokens", "TokenSet", "TokenRow", "shard_metadata"]
