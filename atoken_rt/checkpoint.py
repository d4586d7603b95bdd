"""Checkpoints: safe, memory-mapped loading with a strict key/shape report, and conversion.

Official checkpoints are plain state dicts saved with ``torch.save`` (``atoken-soc.pt``,
``atoken-sod.pt``, ``3d_decode_gs.pt``); ``.safetensors`` files are accepted too. Loading never
executes code from the file: ``.pt`` files go through ``torch.load(weights_only=True)`` (an
allow-list unpickler) and are memory-mapped, so a multi-GB file opens in milliseconds and pages in
as the weights are used.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping, Union

import torch

from .caches import LRUCache
from .config import ATokenConfig, GSConfig, load_config, load_gs_config

PathLike = Union[str, Path]

# A GS checkpoint saved from the training wrapper also carries the LPIPS loss network (spec §9.4).
IGNORED_PREFIXES = ("lpips_loss.",)


class CheckpointMismatch(ValueError):
    """A checkpoint whose keys or shapes differ from the model's (a ValueError)."""


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth``/``.bin`` (plain state dict) or ``.safetensors`` file, mmapped.

    Raises FileNotFoundError (an OSError) when missing, ValueError naming the file when it is not a
    state dict, is corrupt, or asks to execute code.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():  # a directory or FIFO: "not found" would be misleading
        raise ValueError(f"checkpoint {path}: not a regular file"
                         f"{' (a directory)' if path.is_dir() else ''}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure to parse is "not readable"
            raise ValueError(f"checkpoint {path}: not a readable safetensors file "
                             f"({type(exc).__name__}: {exc})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True,
                            mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else "unpickling failed"
            raise ValueError(f"checkpoint {path}: refused to load: the file is not a plain state "
                             f"dict of tensors, or it asks to run code ({msg})") from None
        except Exception as exc:  # noqa: BLE001
            # Garbage bytes make the weights-only unpickler fail in arbitrary ways (IndexError,
            # KeyError, struct.error, UnicodeDecodeError, ... depending on the bytes and the torch
            # version); none of them executes code, and all mean "not a readable checkpoint".
            raise ValueError(f"checkpoint {path}: not a readable torch checkpoint "
                             f"({type(exc).__name__}: {exc})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise ValueError(f"checkpoint {path}: expected a flat state dict {{name: tensor}}, "
                         f"got {type(sd).__name__}")
    return sd


def compare_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                 ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Problems (missing, unexpected, wrong shape) as readable lines; empty if they match."""
    got = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [(k, got[k], tuple(expected[k])) for k in expected
             if k in got and got[k] != tuple(expected[k])]
    lines = []

    def section(title, items):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {it}" for it in items[:12])
            if len(items) > 12:
                lines.append(f"  ... and {len(items) - 12} more")

    section("missing keys", missing)
    section("unexpected keys", unexpected)
    section("wrong shapes (key: file vs model)",
            [f"{k}: {list(g)} vs {list(e)}" for k, g, e in wrong])
    return lines


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                     source: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointMismatch` with a readable report unless keys and shapes match."""
    problems = compare_keys(state, expected, ignore_prefixes)
    if problems:
        raise CheckpointMismatch(f"checkpoint {source} does not match the model:\n"
                                 + "\n".join(problems))
    bad = [k for k, v in state.items() if not k.startswith(ignore_prefixes)
           and k in expected and not (v.dtype.is_floating_point)]
    if bad:
        raise CheckpointMismatch(f"checkpoint {source}: non-float tensors for {bad[:5]}")


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def expected_checkpoint_keys(preset: Union[PathLike, ATokenConfig, GSConfig]) -> dict:
    """``{key: shape}`` of a checkpoint for a preset (autoencoder or GS decoder), in file order.

    Builds the model on the meta device: nothing is allocated.
    """
    from .gs import GaussianDecoder
    from .model import AToken

    if isinstance(preset, GSConfig):
        cfg = preset
    elif isinstance(preset, ATokenConfig):
        cfg = preset
    else:
        from .config import _read_yaml, is_gs_document, resolve_config_path
        doc = _read_yaml(resolve_config_path(preset))
        cfg = load_gs_config(preset) if is_gs_document(doc) else load_config(preset)
    with torch.device("meta"):
        model = GaussianDecoder(cfg) if isinstance(cfg, GSConfig) else AToken(cfg)
    return _meta_shapes(model)


# Whole-file hashes already computed in this process, keyed by the file's identity and version
# (path, device, inode, size, mtime): one CLI call verifies a checkpoint (hub), records it in the
# token file's provenance and checks it against a token file's record; with a read-only hub cache
# each of those hashed the same GBs again. Bounded: 32 entries of ~100 bytes.
_SHA256_MEMO = LRUCache(max_entries=32, max_bytes=1 << 16, sizeof=lambda v: len(v))


def _file_version(path: PathLike) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_sha256(path: PathLike, limit: int | None = None) -> str:
    """SHA-256 of a file (streamed; the first ``limit`` bytes or so when given), for provenance
    and checkpoint verification. A whole-file hash is remembered for the file's current version
    (same path, inode, size and mtime) and not recomputed; a file that changes while it is read
    is not remembered."""
    if limit is not None:
        return _sha256_stream(path, limit)
    before = _file_version(path)
    hit = _SHA256_MEMO.get(before)
    if hit is not None:
        return hit
    digest = _sha256_stream(path, None)
    if _file_version(path) == before:
        _SHA256_MEMO.put(before, digest)
    return digest


def _sha256_stream(path: PathLike, limit: int | None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        read = 0
        while True:
            buf = f.read(1 << 22)
            if not buf:
                break
            h.update(buf)
            read += len(buf)
            if limit is not None and read >= limit:
                break
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(old)
    return old


def respect_umask(path: PathLike) -> None:
    """Give a file the mode a plain ``open()`` would (0o666 minus the umask).

    ``safetensors`` writes through a private temporary file and renames it, so its outputs are
    0600 whatever the umask: a token file or converted checkpoint would be unreadable to the
    group that shares the output folder."""
    os.chmod(path, 0o666 & ~_umask())


def convert_checkpoint(src: PathLike, dst: PathLike, dtype: torch.dtype = torch.float32,
                       config: Union[PathLike, ATokenConfig, GSConfig, None] = None) -> Path:
    """Write a checkpoint as ``.safetensors`` in fp32 or bf16 (``lpips_loss.*`` keys dropped).

    With ``config`` the keys and shapes are checked strictly first.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"convert_checkpoint: dtype must be torch.float32 or torch.bfloat16, "
                         f"got {dtype}")
    from safetensors.torch import save_file
    sd = read_state_dict(src)
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    if config is not None:
        check_state_dict(sd, expected_checkpoint_keys(config), str(src))
    out = {k: (v.to(dtype) if v.dtype.is_floating_point else v).contiguous() for k, v in sd.items()}
    dst = Path(dst)
    save_file(out, str(dst), metadata={"format": "pt", "source": Path(src).name,
                                       "dtype": str(dtype).replace("torch.", "")})
    respect_umask(dst)
    return dst


__all__ = ["read_state_dict", "check_state_dict", "compare_keys", "expected_checkpoint_keys",
           "convert_checkpoint", "CheckpointMismatch", "IGNORED_PREFIXES", "file_sha256",
           "respect_umask"]
