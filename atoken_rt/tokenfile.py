"""Token files are untrusted input: the whole file is validated before anything is decoded.

A token file (``atoken-rt encode``, format in :mod:`atoken_rt.media`) may have been edited, cut,
or made by another program. Decoding must not crash half-way (after writing some outputs) nor
quietly produce something else (a video decoded as an image, frames dropped by a negative count),
so :func:`validate` checks, before the first output is written:

* the metadata document: a JSON object, each known field of the right type and range;
* every sample: tensors (dtype, shape, finite values, coords and index ranges) and the metadata's
  consistency with them (kind vs coords, frames vs the token grid's t, tokens vs rows).

Every problem is a :class:`TokenFileError` (a ``ValueError``), one line naming the file, the
sample and the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .inputs import PATCH_H, PATCH_T, PATCH_W, VOXEL_CHANNELS, VOXEL_GRID
from .media import TOKEN_FORMAT, MediaError, TokenSample, read_token_file
from .packing import MAX_COORD

KINDS = ("image", "video", "3d")
DTYPE_NAMES = ("fp32", "bf16")
VOXEL_T = 1  # every 3D token sits at t = 1 (inputs.VOXEL_T, the official 3D loader)
# A frame rate outside this range is an edited value, not a video (PyAV cannot even encode
# 1e300 fps, and a rate of 1e-300 would make a file lasting longer than the universe).
MAX_FPS = 1000.0
MIN_FPS = 1e-3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Integer dtypes a token file may hold for coords / indices: what `encode` writes (int32) and
# the other signed widths. uint64 and bool are refused: they do not mean an index.
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TokenFileError(MediaError):
    """An invalid token file (a ValueError); the message names the file, sample and field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, msg: str):
        raise TokenFileError(f"{self.path}: {where}{': ' if where else ''}{msg}")

    def typed(self, d: dict, key: str, where: str, check, what: str, required: bool = False):
        if key not in d:
            if required:
                self.fail(where, f"field {key!r} is missing")
            return None
        v = d[key]
        if not check(v):
            shown = repr(v)
            self.fail(where, f"field {key!r} must be {what}, got "
                             f"{shown if len(shown) <= 60 else shown[:57] + '...'}")
        return v

    def int_list(self, d: dict, key: str, where: str, length: int | None = None):
        return self.typed(d, key, where, lambda v: isinstance(v, list) and all(
            _is_int(x) and 0 <= x < 2 ** 31 for x in v) and (length is None or len(v) == length),
            f"a list of {length if length is not None else ''} non-negative integers"
            .replace("  ", " "))


def validate_metadata(path: Path, meta: Any, num_samples: int) -> None:
    """The JSON document: an object whose known fields have the right types (unknown fields are
    kept for forward compatibility and ignored)."""
    ck = _Checker(path)
    if meta is None:
        return
    if not isinstance(meta, dict):
        ck.fail("metadata", f"must be a JSON object, got {type(meta).__name__}")
    ck.typed(meta, "format", "metadata", lambda v: v == TOKEN_FORMAT, repr(TOKEN_FORMAT))
    for key in ("config", "config_path", "checkpoint"):
        ck.typed(meta, key, "metadata", lambda v: v is None or isinstance(v, str),
                 "a string or null")
    ck.typed(meta, "checkpoint_sha256", "metadata",
             lambda v: v is None or (isinstance(v, str) and (v == "random" or _SHA256.match(v))),
             "'random' or 64 lowercase hex digits")
    ck.typed(meta, "dtype", "metadata", lambda v: v in DTYPE_NAMES, f"one of {list(DTYPE_NAMES)}")
    ck.typed(meta, "architecture", "metadata", lambda v: v is None or isinstance(v, dict),
             "an object")
    ck.typed(meta, "max_tokens", "metadata", lambda v: _is_int(v) and v > 0,
             "a positive integer")
    ck.typed(meta, "failed", "metadata", lambda v: isinstance(v, list), "a list")
    samples = ck.typed(meta, "samples", "metadata", lambda v: isinstance(v, list), "a list")
    if samples is not None:
        if len(samples) != num_samples:
            ck.fail("metadata", f"field 'samples' describes {len(samples)} sample(s) but the file "
                                f"holds {num_samples}")
        for i, s in enumerate(samples):
            if not isinstance(s, dict):
                ck.fail(f"sample {i}", f"metadata must be a JSON object, got {type(s).__name__}")


def _tensor_checks(ck: _Checker, where: str, name: str, t: torch.Tensor, dtypes, ndim: int):
    if t.dtype not in dtypes:
        ck.fail(where, f"tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}, "
                       f"expected one of {[str(d).replace('torch.', '') for d in dtypes]}")
    if t.dim() != ndim:
        ck.fail(where, f"tensor {name!r} must have {ndim} dimension(s), got shape "
                       f"{list(t.shape)}")


def _grid(coords: np.ndarray) -> tuple[int, int, int] | None:
    """(tt, th, tw) when the coords are a full raster grid with z == 0 (any row order)."""
    if (coords[:, 3] != 0).any():
        return None
    tt, th, tw = (int(coords[:, j].max()) + 1 for j in range(3))
    if tt * th * tw != len(coords):
        return None
    return tt, th, tw


def validate_sample(path: Path, i: int, s: TokenSample, config=None,
                    where: str | None = None) -> None:
    """One sample's tensors, and its metadata's consistency with them (``where``: how errors
    name the sample; default ``sample i``)."""
    ck = _Checker(Path(path))
    where = where or f"sample {i}"
    c = s.coords
    _tensor_checks(ck, where, "coords", c, _INT_DTYPES, 2)
    if c.shape[1] != 4 or c.shape[0] == 0:
        ck.fail(where, f"tensor 'coords' must have shape [n >= 1, 4], got {list(c.shape)}")
    n = c.shape[0]
    coords = c.to(torch.int64).numpy()
    if (coords < 0).any() or (coords >= MAX_COORD).any():
        ck.fail(where, f"tensor 'coords' must lie in [0, {MAX_COORD})")
    key = ((coords[:, 0] * MAX_COORD + coords[:, 1]) * MAX_COORD + coords[:, 2]) * MAX_COORD \
        + coords[:, 3]
    if len(np.unique(key)) != n:
        ck.fail(where, "tensor 'coords' has duplicated token coordinates")
    q = getattr(config, "quantizer", None) if config is not None else None
    if s.indices is not None:
        _tensor_checks(ck, where, "indices", s.indices, _INT_DTYPES, 2)
        if s.indices.shape[0] != n:
            ck.fail(where, f"tensor 'indices' has {s.indices.shape[0]} rows for {n} coords")
        if config is not None:
            if q is None:
                ck.fail(where, f"holds FSQ indices but config '{config.name}' is continuous")
            if s.indices.shape[1] != q.num_codebooks:
                ck.fail(where, f"tensor 'indices' must have shape [n, {q.num_codebooks}], got "
                               f"{list(s.indices.shape)}")
            size = math.prod(q.levels)
            if n and (int(s.indices.min()) < 0 or int(s.indices.max()) >= size):
                ck.fail(where, f"tensor 'indices' must lie in [0, {size})")
    if s.latents is not None:
        _tensor_checks(ck, where, "latents", s.latents, _FLOAT_DTYPES, 2)
        if s.latents.shape[0] != n:
            ck.fail(where, f"tensor 'latents' has {s.latents.shape[0]} rows for {n} coords")
        if config is not None and s.latents.shape[1] != config.latent_channels:
            ck.fail(where, f"tensor 'latents' must have shape [n, {config.latent_channels}], "
                           f"got {list(s.latents.shape)}")
        if not bool(torch.isfinite(s.latents.float()).all()):
            ck.fail(where, "tensor 'latents' contains NaN or Inf")
    if s.embedding is not None:
        _tensor_checks(ck, where, "embedding", s.embedding, _FLOAT_DTYPES, 1)
        if config is not None and s.embedding.shape[0] != config.encoder.width:
            ck.fail(where, f"tensor 'embedding' must have shape [{config.encoder.width}], got "
                           f"{list(s.embedding.shape)}")
    _validate_sample_meta(ck, where, s.meta, coords)


def _validate_sample_meta(ck: _Checker, where: str, m: dict, coords: np.ndarray) -> None:
    n = len(coords)
    ck.typed(m, "source", where, lambda v: v is None or isinstance(v, str), "a string or null")
    ck.typed(m, "tokens", where, lambda v: v == n, f"{n} (the rows of 'coords')")
    kind = ck.typed(m, "kind", where, lambda v: v in KINDS, f"one of {list(KINDS)}")
    for key in ("frames_used", "frames_dropped", "frames_padded"):
        ck.typed(m, key, where, lambda v: _is_int(v) and 0 <= v < 2 ** 31,
                 "a non-negative integer")
    ck.typed(m, "fps", where, lambda v: v is None or (_is_number(v) and math.isfinite(v)
                                                      and MIN_FPS <= v <= MAX_FPS),
             f"a number in [{MIN_FPS:g}, {MAX_FPS:g}]")
    ck.int_list(m, "crop_offset", where, 2)
    ck.int_list(m, "original_shape", where)
    if kind is None:
        return
    if kind == "3d":
        if (coords[:, 0] != VOXEL_T).any() or (coords[:, 1:] >= VOXEL_GRID).any():
            ck.fail(where, f"field 'kind' is '3d' but the coords are not voxels (t = {VOXEL_T}, "
                           f"x, y, z in [0, {VOXEL_GRID}))")
        ck.int_list(m, "used_shape", where, 2)
        if m.get("used_shape") not in (None, [n, VOXEL_CHANNELS]):
            ck.fail(where, f"field 'used_shape' must be [{n}, {VOXEL_CHANNELS}] for {n} voxels, "
                           f"got {m['used_shape']}")
        return
    grid = _grid(coords)
    if grid is None:
        ck.fail(where, f"field 'kind' is {kind!r} but the coords are not a full (t, x, y) grid "
                       "with z = 0")
    tt, th, tw = grid
    if kind == "image" and tt != 1:
        ck.fail(where, f"field 'kind' is 'image' but the coords span {tt} temporal tokens")
    ck.int_list(m, "grid", where, 3)
    if m.get("grid") is not None and m["grid"] != [tt, th, tw]:
        ck.fail(where, f"field 'grid' is {m['grid']} but the coords form a {tt}x{th}x{tw} grid")
    h, w = th * PATCH_H, tw * PATCH_W
    frames = tt * PATCH_T
    expect = [h, w, 3] if kind == "image" else [frames, h, w, 3]
    ck.int_list(m, "used_shape", where, len(expect))
    if m.get("used_shape") is not None and m["used_shape"] != expect:
        ck.fail(where, f"field 'used_shape' is {m['used_shape']} but the tokens decode to "
                       f"{expect}")
    used = m.get("frames_used")
    if used is not None:
        if kind == "image" and used != 1:
            ck.fail(where, f"field 'frames_used' must be 1 for an image, got {used}")
        if kind == "video" and not 1 <= used <= frames:
            ck.fail(where, f"field 'frames_used' must lie in [1, {frames}] ({tt} temporal "
                           f"tokens), got {used}")


def validate(path, meta: Any, samples: Sequence[TokenSample], config=None) -> None:
    """Validate a whole token file (metadata and every sample) against ``config`` (an
    ATokenConfig, or None to check only what the file says of itself). Raises TokenFileError."""
    path = Path(path)
    validate_metadata(path, meta, len(samples))
    if config is not None and meta is not None:
        arch = meta.get("architecture")
        if isinstance(arch, dict) and "discrete" in arch and arch["discrete"] != config.discrete:
            _Checker(path).fail("metadata", f"field 'architecture.discrete' is "
                                            f"{arch['discrete']!r} but config '{config.name}' is "
                                            f"{'discrete' if config.discrete else 'continuous'}")
    for i, s in enumerate(samples):
        validate_sample(path, i, s, config)


def load(path, config=None) -> tuple[dict | None, list[TokenSample]]:
    """Read and validate a token file (``config``: see :func:`validate`)."""
    meta, samples = read_token_file(path)
    validate(path, meta, samples, config)
    return meta, samples


__all__ = ["TokenFileError", "validate", "validate_metadata", "validate_sample", "load"]
