"""Dataset sources -> one ordered list of input items (what a shard is cut from).

A SOURCE is one of:

* an image, video or 3D voxel file, a folder (recursive, sorted; hidden files skipped) or a glob,
  as ``atoken-rt encode`` reads them; folders and globs also pick up ``.tar`` and ``.parquet``
  files;
* a WebDataset tar shard (``.tar``): the ``webdataset`` conventions: members are grouped into
  samples by ``__key__`` (the member path up to the first dot of its file name; the rest, lower
  case, is the extension), consecutive members with one key form one sample, and the sample's
  media is its first member with an image or video extension in :data:`MEDIA_EXTS` order;
* a Parquet file with an image-bytes column in the Hugging Face ``datasets`` layout (a struct
  with ``bytes`` and ``path``; a plain binary column works too), one item per row;
* a text file (``.txt`` / ``.lst`` / ``.list``) listing media paths, one per line (blank lines and
  ``#`` comments skipped; relative paths are relative to the list file's folder).

Items are enumerated once, up front, in a fixed order (sources in the order given, each sorted);
the item list (its keys, sources and indices) is hashed into the manifest, and shard ``k`` is
items ``[k * shard_size, (k + 1) * shard_size)``: a re-run cuts exactly the same shards.

Tars are indexed with the standard library's ``tarfile`` (one pass over the headers; members are
then read with ``os.pread`` at their data offset, so any reader thread can fetch any sample). The
``webdataset`` package streams tars sequentially and has no index, which sharding, counting and
resuming at an arbitrary item need; the tests build tars in its layout (``__key__`` +
extension members, a sidecar ``.json`` per sample).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .. import media

MEDIA_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm",
              "mp4", "webm", "mov", "avi", "mkv", "m4v")
LIST_EXTS = (".txt", ".lst", ".list")
DATASET_EXTS = (".tar", ".parquet")
# Largest encoded input (one file, tar member or Parquet cell) read into memory.
MAX_INPUT_BYTES = 1 << 30
# Largest Parquet row group read at once (its compressed column chunk, from the metadata).
MAX_ROW_GROUP_BYTES = 4 << 30


class SourceError(ValueError):
    """A source that cannot be enumerated (missing, unreadable, wrong layout); names it."""


@dataclass(frozen=True, slots=True)
class Item:
    """One input: a media file, a tar sample or a Parquet row.

    key: unique over the dataset (file: the path as expanded; tar: ``__key__``; Parquet: the
        ``key_column`` value or ``"{file}#{row}"``).
    source: the file holding it. kind: "file", "tar" or "parquet".
    index: tar: sample number in the tar; Parquet: row number; file: -1.
    ext: the media extension (tar member / Parquet ``path`` field; "" when unknown).
    offset, size: tar: byte range of the media member's data; Parquet: row group, row within it.
    note: why an item has no media (read as a failure), else "".
    """

    key: str
    source: str
    kind: str
    index: int = -1
    ext: str = ""
    offset: int = -1
    size: int = -1
    note: str = ""


def _walk(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            if p.suffix.lower() in media.SUPPORTED_EXTS + DATASET_EXTS:
                out.append(p)
    return out


def expand_sources(sources: Sequence[str]) -> list[Path]:
    """SOURCE arguments -> files (folders recursively, globs), each group sorted."""
    out: list[Path] = []
    for s in sources:
        p = Path(str(s))
        if p.is_dir():
            out += _walk(p)
        elif p.exists() or not any(c in str(s) for c in "*?["):
            out.append(p)
        else:
            matches = sorted(glob.glob(str(s), recursive=True))
            if not matches:
                raise SourceError(f"{s}: the pattern matches no file")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    out += _walk(mp)
                elif mp.suffix.lower() in media.SUPPORTED_EXTS + DATASET_EXTS + LIST_EXTS:
                    out.append(mp)
    return out


_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META_RE = re.compile(r"__[^/]*__($|/)")               # webdataset's skip_meta
_DUP = "\0duplicate"  # marks a sample with two members of one extension (webdataset: an error)


def _split_key(name: str) -> tuple[str | None, str]:
    """("dir/abc", "jpg") for "dir/abc.jpg" (the rest after the first dot of the file name,
    lower case); (None, "") for names webdataset skips (no dot, or a leading dot)."""
    m = _KEY_RE.match(name)
    if not m:
        return None, ""
    return m.group(1), m.group(2).lower()


def tar_items(path: Path, media_exts: Sequence[str] = MEDIA_EXTS) -> list[Item]:
    """The samples of a WebDataset tar (see the module docstring)."""
    try:
        tf = tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{path}: not a readable uncompressed tar ({exc})") from None
    groups: list[tuple[str, dict]] = []
    with tf:
        try:
            for m in tf:
                if not m.isreg() or _META_RE.match(m.name):
                    continue
                key, ext = _split_key(m.name)
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                if ext in groups[-1][1]:
                    groups[-1][1][_DUP] = (m.name, 0)
                groups[-1][1].setdefault(ext, (m.offset_data, m.size))
        except (tarfile.TarError, OSError) as exc:
            raise SourceError(f"{path}: corrupt tar ({exc})") from None
    items = []
    for i, (key, members) in enumerate(groups):
        ext = next((e for e in media_exts if e in members), "")
        if _DUP in members:
            items.append(Item(key=key, source=str(path), kind="tar", index=i,
                              note=f"duplicate member {members[_DUP][0]!r} in the sample"))
        elif ext:
            off, size = members[ext]
            items.append(Item(key=key, source=str(path), kind="tar", index=i, ext=ext,
                              offset=off, size=size))
        else:
            found = ", ".join(sorted(e or "(no extension)" for e in members))
            items.append(Item(key=key, source=str(path), kind="tar", index=i,
                              note=f"no image or video member (found: {found})"))
    return items


def find_image_column(schema, wanted: str | None, path) -> str:
    """The Parquet column holding image bytes: ``wanted``, else the first struct column with
    ``bytes`` and ``path`` fields (Hugging Face Image/Video features), else the first binary one."""
    import pyarrow as pa

    names = schema.names
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{path}: no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for f in schema:
        if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}:
            return f.name
    for f in schema:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            return f.name
    raise SourceError(f"{path}: no image column (a struct with 'bytes' and 'path', or a binary "
                      f"column); columns: {', '.join(f'{f.name}: {f.type}' for f in schema)}")


def _check_image_column(schema, col: str, path) -> None:
    import pyarrow as pa

    t = schema.field(col).type
    if pa.types.is_struct(t):
        fields = {c.name: c.type for c in t}
        if "bytes" not in fields or not (pa.types.is_binary(fields["bytes"])
                                         or pa.types.is_large_binary(fields["bytes"])):
            raise SourceError(f"{path}: column {col!r} is a struct without a binary 'bytes' "
                              f"field ({t})")
    elif not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise SourceError(f"{path}: column {col!r} has type {t}, not image bytes")


def parquet_items(path: Path, image_column: str | None = None,
                  key_column: str | None = None) -> list[Item]:
    """One item per row of a Parquet file (row group and row-in-group in offset/size)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt footers
        raise SourceError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                          f"{exc})") from None
    schema = pf.schema_arrow
    col = find_image_column(schema, image_column, path)
    _check_image_column(schema, col, path)
    keys = None
    if key_column is not None:
        if key_column not in schema.names:
            raise SourceError(f"{path}: no key column {key_column!r} (columns: "
                              f"{', '.join(schema.names)})")
        try:
            keys = [None if k is None else str(k)
                    for k in pf.read(columns=[key_column]).column(0).to_pylist()]
        except Exception as exc:
            raise SourceError(f"{path}: cannot read the key column ({exc})") from None
    items: list[Item] = []
    row = 0
    for g in range(pf.metadata.num_row_groups):
        for r in range(pf.metadata.row_group(g).num_rows):
            key = keys[row] if keys is not None else None
            if key_column is not None and key is None:
                raise SourceError(f"{path}: row {row} has a null {key_column!r}")
            items.append(Item(key=key if key is not None else f"{path}#{row}", source=str(path),
                              kind="parquet", index=row, offset=g, size=r))
            row += 1
    return items


def list_items(path: Path) -> list[Item]:
    """The media files named by a list file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the list file ({exc})") from None
    items = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        if not p.is_absolute():
            p = path.parent / p
        items.append(Item(key=str(p), source=str(p), kind="file"))
    return items


def enumerate_items(sources: Sequence[str], *, image_column: str | None = None,
                    key_column: str | None = None,
                    media_exts: Sequence[str] = MEDIA_EXTS) -> list[Item]:
    """All items of all sources, in order. SourceError for an unusable source or a key that
    occurs twice (keys identify rows in the shards and failures)."""
    items: list[Item] = []
    for p in expand_sources(sources):
        suffix = p.suffix.lower()
        if suffix == ".tar":
            items += tar_items(p, media_exts)
        elif suffix == ".parquet":
            items += parquet_items(p, image_column, key_column)
        elif suffix in LIST_EXTS:
            items += list_items(p)
        else:
            items.append(Item(key=str(p), source=str(p), kind="file"))
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise SourceError(f"key {it.key!r} occurs twice (in {seen[it.key]} and {it.source}); "
                              "keys must be unique (for Parquet give --key-column)")
        seen[it.key] = it.source
    return items


def items_sha256(items: Iterable[Item]) -> str:
    """Hash of the ordered item list (key, source, index): a changed input set is detected."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.source}\t{it.index}\n".encode())
    return h.hexdigest()


__all__ = ["Item", "SourceError", "enumerate_items", "expand_sources", "tar_items",
           "parquet_items", "list_items", "items_sha256", "MEDIA_EXTS", "MAX_INPUT_BYTES"]
