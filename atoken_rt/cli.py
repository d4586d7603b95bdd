"""``atoken-rt``: the command line (also ``python -m atoken_rt.cli``).

    atoken-rt encode INPUTS... --config atoken-sod --checkpoint atoken-sod.pt --out tok.safetensors
    atoken-rt decode tokens.safetensors --out decoded/
    atoken-rt reconstruct INPUTS... --config atoken-sod --checkpoint atoken-sod.pt --out recon/
    atoken-rt bench [--config atoken-sod] [--shapes image:256,video:16x256] [--batch 1,8] ...
    atoken-rt info [--config C] [--checkpoint P]

INPUTS are image files, video files, 3D voxel files (``.npz`` / ``.safetensors`` with ``coords``
and ``feats``), folders (recursive) and globs; see :mod:`atoken_rt.media`. Exit codes: 0 success,
1 a failure while running (or ``info`` on a checkpoint that does not match), 2 a usage or input
error (unreadable or unsupported file with ``--on-error fail``, config/checkpoint mismatch, token
file from another config). Errors are one line on stderr naming the file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import __version__, media
from .checkpoint import (IGNORED_PREFIXES, CheckpointMismatch, compare_keys,
                         expected_checkpoint_keys, file_sha256, read_state_dict)
from .config import ATokenConfig, list_presets, load_config, resolve_config_path
from .inputs import prepare_sample
from .media import MediaError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_TOKENS = 16384


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _one_line(exc: BaseException) -> str:
    """An exception as one line; a checkpoint report is condensed to its section headers."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
    if isinstance(exc, CheckpointMismatch):
        heads = [ln.rstrip(":") for ln in lines[1:] if not ln.startswith(" ")]
        return (lines[0].rstrip(":") + (": " + "; ".join(heads) if heads else "")
                + " (atoken-rt info --config C --checkpoint P lists the keys)")
    return "; ".join(ln.strip() for ln in lines)


class _Log:
    """Notes and skipped files on stderr, written around the progress bar; ``quiet`` drops the
    notes (and the bar), never the skips."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def note(self, msg: str) -> None:
        if not self.quiet:
            self._write(f"note: {msg}")

    def skip(self, msg: str) -> None:
        self._write(f"atoken-rt: skipped: {msg}")

    def progress(self, total: int, unit: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        disable=self.quiet or not sys.stderr.isatty())
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------------
# sessions and provenance
# ------------------------------------------------------------------------------------------------

def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return name


def _load_config(name: str) -> ATokenConfig:
    try:
        return load_config(name)
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(f"--config {name}: {_one_line(exc)}") from None


def architecture(cfg: ATokenConfig) -> dict:
    """What a token file must agree on with the config that decodes it."""
    q = cfg.quantizer
    return {"discrete": cfg.discrete, "latent_channels": cfg.latent_channels,
            "width": cfg.encoder.width,
            "encoder": {"width": cfg.encoder.width, "blocks": cfg.encoder.num_blocks,
                        "heads": cfg.encoder.num_heads, "mlp_width": cfg.encoder.mlp_width},
            "decoder": {"width": cfg.decoder.width, "blocks": cfg.decoder.num_blocks,
                        "heads": cfg.decoder.num_heads, "mlp_width": cfg.decoder.mlp_width},
            "fsq": ({"num_codebooks": q.num_codebooks, "levels": list(q.levels)} if q else None)}


def _describe_arch(a: dict) -> str:
    fsq = a.get("fsq")
    kind = (f"discrete, FSQ {fsq['num_codebooks']} codebooks x levels "
            f"{','.join(map(str, fsq['levels']))} ({math.prod(fsq['levels'])} codes each)"
            if fsq else "continuous")
    return (f"{kind}, {a['latent_channels']} latent channels, encoder "
            f"{a['encoder']['blocks']}x{a['encoder']['width']}, decoder "
            f"{a['decoder']['blocks']}x{a['decoder']['width']}")


def _resolve_checkpoint(value: str | None, what: str = "checkpoint") -> str | None:
    """``--checkpoint``: a path, or the name of an official checkpoint (``atoken-sod``), which
    is downloaded into the cache and verified (``atoken_rt.hub``; ATOKEN_RT_OFFLINE=1: the
    cache only). An existing file of that name wins over the registry."""
    from . import hub

    if value is None or Path(value).exists() or not hub.is_official(value):
        return value
    try:
        return str(hub.download(value))
    except (hub.DownloadError, hub.ChecksumError) as exc:
        raise CLIError(f"{what} {value}: {_one_line(exc)}") from None


def _check_file(path: str | None, what: str) -> None:
    """A readable regular file, or a one-line CLIError saying what it is instead (a directory
    or FIFO is not "no such file")."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {path}: no such file")
    if not p.is_file():
        raise CLIError(f"{what} {path}: not a regular file{' (a directory)' if p.is_dir() else ''}")
    if not os.access(p, os.R_OK):
        raise CLIError(f"{what} {path}: not readable (permission denied)")


def _open_session(config: str, checkpoint: str | None, args, log: _Log, *,
                  gs: bool = False):
    """A Session from CLI options; every construction error becomes a one-line CLIError."""
    from .session import Session

    cfg = _load_config(config)
    checkpoint = _resolve_checkpoint(checkpoint)
    _check_file(checkpoint, "checkpoint")
    kw = {}
    if gs and (args.gs_config or args.gs_checkpoint):
        args.gs_checkpoint = _resolve_checkpoint(args.gs_checkpoint, "GS checkpoint")
        kw = {"gs_config": args.gs_config, "gs_checkpoint": args.gs_checkpoint}
        _check_file(args.gs_checkpoint, "GS checkpoint")
    if checkpoint is None:
        log.note(f"no checkpoint: config '{config}' runs seeded random weights (seed 0)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Session(cfg, checkpoint, device=_device(args.device),
                           dtype=DTYPES[args.dtype or "fp32"], backend=args.backend, **kw)
    except CLIError:
        raise
    except CheckpointMismatch as exc:
        raise CLIError(f"{_one_line(exc)} [config '{config}']") from None
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(_one_line(exc)) from None


def _checkpoint_sha256(path) -> str:
    """SHA-256 of a checkpoint file; a verified cached official file is not hashed again (GBs)."""
    from . import hub

    return hub.cached_sha256(path) or file_sha256(path)


def _provenance(sess, config: str, checkpoint: str | None) -> dict:
    checkpoint = _resolve_checkpoint(checkpoint)  # a name: its (already verified) cache path
    try:
        config_path = str(resolve_config_path(config).resolve())
    except ValueError:
        config_path = None
    return {"config": config, "config_path": config_path,
            "architecture": architecture(sess.config),
            # resolved: a relative path means nothing once the token file is moved or read
            # from another folder (decode also finds the file again by its hash).
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "checkpoint_sha256": _checkpoint_sha256(checkpoint) if checkpoint else "random",
            "seed": None if checkpoint else 0,
            "dtype": [k for k, v in DTYPES.items() if v == sess.dtype][0],
            "backend": sess.backend, "device": str(sess.device),
            "atoken_rt_version": __version__,
            "created": _dt.datetime.now().isoformat(timespec="seconds")}


def _check_out(out: Path, flag: str, *, folder: bool) -> None:
    """Fail before any work when ``out`` (a folder, or a file) cannot be written: the path is of
    the wrong type, an ancestor is a file, or the nearest existing ancestor is not writable."""
    if out.exists():
        if folder and not out.is_dir():
            raise CLIError(f"{flag} {out}: exists and is not a folder")
        if not folder and out.is_dir():
            raise CLIError(f"{flag} {out}: is a folder; give a file name")
        target = out if folder else out.parent
    else:
        target = out.parent
    while not target.exists():
        if target.is_symlink():
            raise CLIError(f"{flag} {out}: {target} is a broken link")
        target = target.parent
    if not target.is_dir():
        raise CLIError(f"{flag} {out}: {target} is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {out}: {target} is not writable")


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------------
# reading and encoding inputs
# ------------------------------------------------------------------------------------------------

_SAMPLE_PREFIX = re.compile(r"^sample \d+( \(Voxels\))?: ")


class _Encoder:
    """Reads input files, batches them by a token budget and encodes each batch.

    A file that cannot be read or is rejected by the model's checks is reported and skipped
    (``on_error="skip"``, recorded in ``failed``) or stops the run (``"fail"``, CLIError).
    """

    def __init__(self, sess, max_tokens: int, on_error: str, log: _Log, *,
                 mesh_views: int | None = None, mesh_resolution: int | None = None,
                 keep_views: bool = False):
        self.sess, self.max_tokens, self.on_error, self.log = sess, max_tokens, on_error, log
        # keep_views: reconstruct scores renders against the views a 3D input was packed from.
        self.mesh = {"mesh_views": mesh_views, "mesh_resolution": mesh_resolution,
                     "keep_views": keep_views}
        self.failed: list[dict] = []
        self.bar = None

    def fail(self, path: Path, msg: str) -> None:
        if not msg.startswith(str(path)):
            msg = f"{path}: {msg}"
        if self.on_error == "fail":
            raise CLIError(msg)
        self.log.skip(msg)
        self.failed.append({"source": str(path), "error": msg})
        if self.bar is not None:
            self.bar.update(1)

    def batches(self, paths: Sequence[Path]) -> Iterator[tuple[list[media.Loaded], Any]]:
        """Yield (items, EncodeResult on the CPU) per batch."""
        pending: list[media.Loaded] = []
        budget = 0
        self._position = {str(p): i for i, p in reversed(list(enumerate(paths)))}
        for p in paths:
            try:
                item = media.load(p, self.sess.limits, **self.mesh)
            except MediaError as exc:
                self.fail(p, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001
                # One bad file must never abort the run: a reader may raise anything for crafted
                # input (PIL's DecompressionBombError is not an OSError, a huge frame a
                # MemoryError). KeyboardInterrupt is a BaseException and still stops.
                self.fail(p, f"cannot read the file ({type(exc).__name__}: "
                             f"{_one_line(exc)})")
                continue
            for note in item.notes:  # what reading changed (orientation, alpha, channels...)
                self.log.note(f"{p}: {note}")
            if item.tokens > self.max_tokens:
                self.log.note(f"{p}: {item.tokens} tokens, more than --max-tokens "
                              f"{self.max_tokens}: encoded in a batch of its own")
            if pending and budget + item.tokens > self.max_tokens:
                yield from self._encode(pending)
                pending, budget = [], 0
            pending.append(item)
            budget += item.tokens
        if pending:
            yield from self._encode(pending)
        self.failed.sort(key=lambda f: self._position.get(f["source"], len(paths)))

    def _encode(self, items: list[media.Loaded]):
        try:
            enc = self.sess.encode([it.data for it in items])
        except (ValueError, TypeError):
            # Find which file(s) the checks reject (the model itself never ran).
            good = []
            for it in items:
                try:
                    prepare_sample(it.data, 0)
                except (ValueError, TypeError) as e:
                    self.fail(it.path, _SAMPLE_PREFIX.sub("", str(e)))
                else:
                    good.append(it)
            if len(good) == len(items):
                raise
            if good:
                yield from self._encode(good)
            return
        except torch.cuda.OutOfMemoryError:
            raise CLIError(f"out of GPU memory encoding {len(items)} file(s) "
                           f"({sum(it.tokens for it in items)} tokens): lower --max-tokens",
                           EXIT_FAILED) from None
        except (RuntimeError, MemoryError) as exc:
            # e.g. the CPU allocator failing on one oversized file: retry the files one by one,
            # so that only the file(s) that fail alone are reported and skipped.
            if len(items) > 1:
                for it in items:
                    yield from self._encode([it])
                return
            self.fail(items[0].path, f"cannot encode ({type(exc).__name__}: {_one_line(exc)})")
            return
        for it, info in zip(items, enc.info):
            self._notes(it, info)
        if self.bar is not None:
            self.bar.update(len(items))
        yield items, enc.cpu()

    def _notes(self, it: media.Loaded, info) -> None:
        if info.cropped:
            self.log.note(f"{it.path}: centre-cropped {_shape(info.original_shape)} -> "
                          f"{_shape(info.used_shape)} (H and W multiples of 16)")
        if info.frames_dropped and info.kind == "video":
            self.log.note(f"{it.path}: {info.original_shape[0]} frames -> {info.frames_used} "
                          f"({info.frames_dropped} trailing dropped: multiples of 4)")
        if info.frames_padded:
            self.log.note(f"{it.path}: {info.original_shape[0]} frames padded with "
                          f"{info.frames_padded} grey frames to 4")


def _shape(shape: Sequence[int]) -> str:
    """A pixel shape in the one convention the CLI prints: H x W x C (T x H x W x C)."""
    return "x".join(str(int(d)) for d in shape)


_IGNORED_SHOWN = 5


def _expand(inputs: Sequence[str], log: _Log) -> list[Path]:
    ignored_paths: list[Path] = []
    try:
        paths, ignored = media.expand_inputs(inputs, ignored_paths=ignored_paths)
    except MediaError as exc:
        raise CLIError(str(exc)) from None
    if ignored:
        names = ", ".join(str(p) for p in ignored_paths[:_IGNORED_SHOWN])
        more = f" and {ignored - _IGNORED_SHOWN} more" if ignored > _IGNORED_SHOWN else ""
        log.note(f"ignored {ignored} file(s) with unsupported extensions inside folders: "
                 f"{names}{more}")
    if not paths:
        raise CLIError("no input files (give image, video or voxel files, folders or globs)")
    return paths


def _sample_meta(it: media.Loaded, info) -> dict:
    d = {"source": str(it.path), **info.as_dict()}
    if it.mode is not None:
        d["source_mode"] = it.mode
    if it.notes:
        d["read_notes"] = list(it.notes)
    if it.fps is not None:
        d["fps"] = it.fps
    return d


def _stem(source: str | None, i: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem) if source else ""
    return f"{i:04d}_{stem or 'sample'}"


# ------------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------------

def cmd_encode(args) -> int:
    log = _Log(args.quiet)
    paths = _expand(args.inputs, log)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: the token file must end in .safetensors")
    _check_out(out, "--out", folder=False)  # before the encoding, not after it
    sess = _open_session(args.config, args.checkpoint, args, log)
    prov = _provenance(sess, args.config, args.checkpoint)
    enc_runner = _Encoder(sess, args.max_tokens, args.on_error, log, mesh_views=args.views,
                          mesh_resolution=args.view_size)
    tensors: dict[str, torch.Tensor] = {}
    samples: list[dict] = []
    enc_runner.bar = log.progress(len(paths), "file")
    try:
        for items, enc in enc_runner.batches(paths):
            for j, it in enumerate(items):
                i = len(samples)
                tensors[f"sample.{i}.coords"] = enc.coords[j].to(torch.int32)
                if sess.discrete:
                    tensors[f"sample.{i}.indices"] = enc.indices[j].to(torch.int32)
                else:
                    tensors[f"sample.{i}.latents"] = enc.latents[j]
                tensors[f"sample.{i}.embedding"] = enc.embedding[j]
                samples.append({**_sample_meta(it, enc.info[j]), "tokens": len(enc.coords[j])})
    finally:
        log.close()
    if not samples:
        raise CLIError(f"none of the {len(paths)} input file(s) could be encoded")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        media.write_token_file(out, tensors, {**prov, "max_tokens": args.max_tokens,
                                              "samples": samples, "failed": enc_runner.failed})
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write the token file ({exc.strerror or exc})",
                       EXIT_FAILED) from None
    tokens = sum(s["tokens"] for s in samples)
    failed = f"; {len(enc_runner.failed)} file(s) failed" if enc_runner.failed else ""
    print(f"wrote {out}: {len(samples)} sample(s), {tokens} tokens{failed}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------

def _token_config(tokfile: Path, meta: dict | None, given: str | None) -> str:
    """The config to decode with: the given one (checked against the file) or the file's own."""
    if meta is None:
        if given is None:
            raise CLIError(f"{tokfile}: no '{media.TOKEN_METADATA_KEY}' metadata (not written by "
                           "atoken-rt encode); give --config")
        return given
    recorded = meta.get("config")
    if given is None:
        if recorded in list_presets():
            return recorded
        path = meta.get("config_path")
        if path and Path(path).is_file():
            return path
        raise CLIError(f"{tokfile}: made with config {recorded!r}, which is not found here; "
                       "give --config")
    arch = architecture(_load_config(given))
    if meta.get("architecture") != arch:
        theirs = meta.get("architecture")
        raise CLIError(f"{tokfile}: made with config {recorded!r} "
                       f"({_describe_arch(theirs) if theirs else 'unknown architecture'}), which "
                       f"does not match --config {given} ({_describe_arch(arch)})")
    return given


def _token_checkpoint(tokfile: Path, meta: dict | None, given: str | None, log: _Log
                      ) -> str | None:
    """The checkpoint to decode with: the given one (warned if its hash differs from the file's)
    or the one the file was encoded with (random weights when it was made with random ones)."""
    from . import hub

    recorded = (meta or {}).get("checkpoint_sha256")
    if given is not None:
        if recorded and Path(given).is_file():
            sha = _checkpoint_sha256(given)
            if recorded == "random":
                log.note(f"{tokfile} was encoded with random weights; decoding with {given}")
            elif sha != recorded:
                log.note(f"{tokfile} was encoded with another checkpoint "
                         f"({meta.get('checkpoint')}, sha256 {recorded[:12]}...) than {given} "
                         f"(sha256 {sha[:12]}...)")
        return given
    if recorded in (None, "random"):
        return None
    path = meta.get("checkpoint")
    if path and Path(path).is_file() and _checkpoint_sha256(path) == recorded:
        log.note(f"using the checkpoint recorded in {tokfile}: {path}")
        return path
    # Moved: the same file name beside the token file or in the working folder, or an official
    # file in the cache, whichever has the recorded hash.
    found = None
    if path:
        for cand in (tokfile.parent / Path(path).name, Path.cwd() / Path(path).name):
            if cand.is_file() and _checkpoint_sha256(cand) == recorded:
                found = cand
                break
    found = found or hub.find_by_sha256(recorded)
    if found is not None:
        log.note(f"using {found} (same sha256 as the checkpoint {path} recorded in {tokfile})")
        return str(found)
    raise CLIError(f"{tokfile}: encoded with checkpoint {path} (sha256 {recorded[:12]}...), "
                   "which is not found here (or has changed); give --checkpoint")


def _write_decoded(out: Path, i: int, smeta: dict, kind: str, sample: torch.Tensor,
                   coords: torch.Tensor, gaussians, *, previews: dict | None = None) -> list[Path]:
    base = out / _stem(smeta.get("source"), i)
    if kind == "image":
        return [media.write_png(base.with_suffix(".png"), media.to_uint8(sample))]
    if kind == "video":
        frames = media.to_uint8(sample)
        used = smeta.get("frames_used")
        if used:
            frames = frames[:used]  # the grey padding frames of short videos are not written
        return [media.write_video(base.with_suffix(".mp4"), frames, smeta.get("fps"))]
    written = [media.write_voxels(base.with_suffix(".npz"), coords[:, 1:].numpy(), sample)]
    if gaussians is not None:
        ply = base.with_suffix(".ply")
        gaussians.to("cpu").save_ply(ply)
        written.append(ply)
        if previews:  # NAME.mp4 (orbit) and NAME.png (2x2 views) beside the PLY
            from .threed.render import write_previews
            written += write_previews(gaussians, base, **previews)
    return written


def _previews(args) -> dict:
    """write_previews options of the decode command."""
    return {"frames": args.orbit_frames, "resolution": args.render_size,
            "backend": args.render_backend}


def _token_batches(samples: list, max_tokens: int) -> Iterator[list[int]]:
    batch, budget = [], 0
    for i, s in enumerate(samples):
        n = len(s.coords)
        if batch and budget + n > max_tokens:
            yield batch
            batch, budget = [], 0
        batch.append(i)
        budget += n
    if batch:
        yield batch


def cmd_decode(args) -> int:
    if Path(args.tokens).suffix == ".parquet":  # a shard of `atoken-rt tokenize`
        from .data.cli import decode_shard
        return decode_shard(args)
    from . import tokenfile

    log = _Log(args.quiet)
    tokfile = Path(args.tokens)
    out = Path(args.out)
    _check_out(out, "--out", folder=True)
    try:
        meta, samples = media.read_token_file(tokfile)
    except MediaError as exc:
        raise CLIError(str(exc)) from None
    if not samples:
        raise CLIError(f"{tokfile}: the token file holds no samples")
    config = _token_config(tokfile, meta, args.config)
    # The whole file is checked against the config before anything is written: an edited file
    # must not fail half-way through the outputs, nor decode into something else.
    try:
        tokenfile.validate(tokfile, meta, samples, _load_config(config))
    except tokenfile.TokenFileError as exc:
        raise CLIError(str(exc)) from None
    checkpoint = _token_checkpoint(tokfile, meta, _resolve_checkpoint(args.checkpoint), log)
    if args.dtype is None:
        args.dtype = (meta or {}).get("dtype") or "fp32"
    sess = _open_session(config, checkpoint, args, log, gs=True)
    _make_out_dir(out)
    kinds_known = all(s.meta.get("kind") in ("image", "video", "3d") for s in samples)
    written: list[Path] = []
    log.progress(len(samples), "sample")
    try:
        for idx in _token_batches(samples, args.max_tokens):
            batch = [samples[i] for i in idx]
            coords = [s.coords for s in batch]
            kinds = [s.meta["kind"] for s in batch] if kinds_known else None
            try:
                if all(s.indices is not None for s in batch):
                    dec = sess.decode(coords=coords, indices=[s.indices for s in batch],
                                      kinds=kinds)
                else:
                    lat = [s.latents if s.latents is not None else sess.indices_to_codes(s.indices)
                           for s in batch]
                    dec = sess.decode(coords=coords, latents=lat, kinds=kinds)
            except (ValueError, TypeError) as exc:
                raise CLIError(f"{tokfile}: samples {idx[0]}..{idx[-1]}: {_one_line(exc)}") \
                    from None
            for j, i in enumerate(idx):
                written += _write_decoded(out, i, samples[i].meta, dec.kinds[j], dec.samples[j],
                                          samples[i].coords, dec.gaussians[j],
                                          previews=_previews(args))
            if log.bar is not None:
                log.bar.update(len(idx))
    finally:
        log.close()
    print(f"wrote {len(written)} file(s) for {len(samples)} sample(s) into {out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# reconstruct
# ------------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two arrays on the same scale (inf when equal): uint8 by default."""
    from .threed.metrics import psnr as metrics_psnr  # the one formula (float64)
    return metrics_psnr(np.asarray(a), np.asarray(b), data_range=peak)


def _cropped_original(it: media.Loaded, info) -> np.ndarray:
    top, left = info.crop_offset
    h, w = info.used_shape[-3:-1]
    data = it.data if it.data.dtype == np.uint8 else media.to_uint8(it.data)  # 16-bit: [-1, 1]
    if info.kind == "image":
        return data[top:top + h, left:left + w]
    return data[:info.frames_used, top:top + h, left:left + w]


def _score_3d(it: media.Loaded, gaussians, out: Path, stem: str, args) -> dict | None:
    """Render scores of a 3D input with views (mesh or render folder) and a GS decoder; None
    otherwise. See atoken_rt.threed.metrics.score_input (the views read with the input)."""
    path = it.path
    if gaussians is None or Path(path).suffix.lower() in (".npz", ".safetensors"):
        return None
    from .threed.metrics import score_input
    try:
        return score_input(path, gaussians, out, stem, backend=args.render_backend,
                           views=args.views, resolution=args.view_size,
                           known_views=it.views)
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(f"{path}: scoring the rendered views: {_one_line(exc)}") from None


def cmd_reconstruct(args) -> int:
    log = _Log(args.quiet)
    paths = _expand(args.inputs, log)
    out = Path(args.out)
    _check_out(out, "--out", folder=True)
    sess = _open_session(args.config, args.checkpoint, args, log, gs=True)
    _make_out_dir(out)
    runner = _Encoder(sess, args.max_tokens, args.on_error, log, mesh_views=args.views,
                      mesh_resolution=args.view_size, keep_views=sess.gs is not None)
    rows: list[dict] = []
    extra_3d: dict[int, dict] = {}
    runner.bar = log.progress(len(paths), "file")
    try:
        for items, enc in runner.batches(paths):
            dec = sess.decode(enc)
            for j, it in enumerate(items):
                info = enc.info[j]
                i = len(rows)
                base = out / _stem(str(it.path), i)
                if it.kind == "3d":
                    orig = np.asarray(it.data.feats, dtype=np.float64)
                    rec = ((dec.samples[j].detach().cpu().double() + 1) / 2).clamp(0, 1).numpy()
                    value = psnr(orig, rec, peak=1.0)
                    files = _write_decoded(out, i, {"source": str(it.path)}, "3d",
                                           dec.samples[j], enc.coords[j], dec.gaussians[j])
                    what = "feature PSNR ([0, 1] scale)"
                    scores = _score_3d(it, dec.gaussians[j], out, base.name, args)
                    if scores:  # a mesh or render folder: renders vs the input views
                        files += scores.pop("files")
                        extra_3d[i] = scores
                        line = (f"PSNR {scores['psnr']:6.2f} dB  SSIM {scores['ssim']:.4f}  "
                                f"{it.path}  (3d: Gaussians rendered from the "
                                f"{scores['views']} input views at "
                                f"{'x'.join(map(str, scores['resolution']))})")
                        if log.bar is not None:
                            log.bar.write(line, file=sys.stdout)
                        else:
                            print(line)
                else:
                    orig = _cropped_original(it, info)
                    rec = media.to_uint8(dec.samples[j])
                    if it.kind == "video":
                        rec = rec[:info.frames_used]
                    value = psnr(orig, rec)
                    side = np.concatenate([orig, rec], axis=-2)
                    if it.kind == "image":
                        files = [media.write_png(base.with_suffix(".png"), side)]
                    else:
                        files = [media.write_video(base.with_suffix(".mp4"), side, it.fps)]
                    what = "PSNR (uint8, cropped)"
                shape = (_shape(orig.shape) if it.kind != "3d"
                         else f"{info.used_shape[0]} voxels, features in [0, 1]")
                shown = "inf" if math.isinf(value) else f"{value:.2f}"
                line = f"PSNR {shown:>6} dB  {it.path}  ({it.kind} {shape})"
                if log.bar is not None:
                    log.bar.write(line, file=sys.stdout)
                else:
                    print(line)
                rows.append({**_sample_meta(it, info), "psnr_db": None if math.isinf(value)
                             else value, "psnr_kind": what, "files": [str(f) for f in files],
                             **({"render_scores": extra_3d[i]} if i in extra_3d else {})})
    finally:
        log.close()
    if not rows:
        raise CLIError(f"none of the {len(paths)} input file(s) could be reconstructed")
    (out / "reconstruct.json").write_text(json.dumps(
        {**_provenance(sess, args.config, args.checkpoint), "samples": rows,
         "failed": runner.failed}, indent=2) + "\n")
    pix = [r["psnr_db"] for r in rows if r["kind"] != "3d" and r["psnr_db"] is not None]
    mean = f"; mean PSNR {np.mean(pix):.2f} dB over {len(pix)} image/video sample(s)" if pix else ""
    failed = f"; {len(runner.failed)} file(s) failed" if runner.failed else ""
    print(f"wrote {len(rows)} comparison(s) into {out}{mean}{failed}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def cmd_bench(args) -> int:
    from . import benchmark

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ("torch", "triton")]
    if unknown:
        raise CLIError(f"--backend: unknown backend(s) {unknown}; use torch and/or triton")
    shapes = [s for s in args.shapes.split(",") if s.strip()]
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    if graphs is not None and (not graphs or any(g not in ("off", "on") for g in graphs)):
        raise CLIError(f"--graphs: expected off and/or on, got {args.graphs!r}")
    try:
        for s in shapes:
            benchmark.parse_shape(s)
        device = None if args.device == "auto" else _device(args.device)
        _load_config(args.config)
        _check_out(Path(args.out), "--out", folder=True)  # before minutes of timing
        args.checkpoint = _resolve_checkpoint(args.checkpoint)
        _check_file(args.checkpoint, "checkpoint")
        report = benchmark.run_bench(
            config=args.config, shapes=shapes, batches=args.batch, backends=backends,
            graphs=graphs, dtype=args.dtype, device=device, repeats=args.repeats,
            warmup=args.warmup, checkpoint=args.checkpoint, seed=args.seed,
            log=lambda m: print(m, file=sys.stderr))
    except CheckpointMismatch as exc:
        raise CLIError(_one_line(exc)) from None
    except ValueError as exc:
        raise CLIError(_one_line(exc)) from None
    paths = benchmark.write_report(report, Path(args.out))
    print(benchmark.markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK if report["results"] else EXIT_FAILED


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------

def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _config_lines(name: str) -> tuple[list[str], Any]:
    from .config import _read_yaml, is_gs_document, load_gs_config

    try:
        path = resolve_config_path(name)
        doc = _read_yaml(path)
        cfg = load_gs_config(name) if is_gs_document(doc) else load_config(name)
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(f"--config {name}: {_one_line(exc)}") from None
    lines = [f"config {name} ({path})"]
    if isinstance(cfg, ATokenConfig):
        a = architecture(cfg)
        lines.append(f"  autoencoder: {_describe_arch(a)}")
        for t in ("encoder", "decoder"):
            tc = getattr(cfg, t)
            lines.append(f"  {t}: {tc.num_blocks} blocks, width {tc.width}, {tc.num_heads} heads "
                         f"(head dim {tc.head_dim}), MLP {tc.mlp_width}, "
                         f"{'RMSNorm' if tc.use_rms_norm else 'LayerNorm'}, "
                         f"{'QK-norm, ' if tc.qk_rms_norm else ''}"
                         f"{'bias' if tc.use_bias else 'no bias'}")
    else:
        lines.append(f"  Gaussian-splat decoder: {cfg.num_blocks} blocks, width "
                     f"{cfg.model_channels}, {cfg.num_heads} heads, window {cfg.window_size}, "
                     f"{cfg.num_gaussians} Gaussians per voxel")
    expected = expected_checkpoint_keys(cfg)
    params = sum(math.prod(s) for s in expected.values())
    lines.append(f"  expected checkpoint: {len(expected)} keys, {params:,} parameters "
                 f"({_count(params)})")
    return lines, cfg


def cmd_info(args) -> int:
    from . import backends, benchmark

    code = EXIT_OK
    print(f"atoken_rt {__version__} (torch {torch.__version__}, Python "
          f"{sys.version.split()[0]})")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device: CUDA available: yes ({names}; CUDA {torch.version.cuda})")
    else:
        print("device: CUDA available: no (CPU only)")
    from .cpu_features import cpu_features
    print("\n".join(cpu_features().lines()))
    ok, why = backends.triton_ready()
    print("backends: torch: available; triton: " + ("available" if ok else f"not available "
                                                    f"({why})"))
    for name, status in benchmark.detect_baselines().items():
        print(f"baseline {name}: {status}")
    print("CUDA graphs: " + ("available (Session graphs='auto' captures them on CUDA)"
                             if torch.cuda.is_available() else "need CUDA (graphs=True runs the "
                             "static bucketed path eagerly on the CPU)"))
    print("presets: " + ", ".join(list_presets()))
    cfg = None
    if args.config:
        lines, cfg = _config_lines(args.config)
        print("\n".join(lines))
    if args.checkpoint:
        path = Path(_resolve_checkpoint(args.checkpoint))
        try:
            sd = read_state_dict(path)
        except (ValueError, OSError) as exc:
            raise CLIError(_one_line(exc)) from None
        dtypes: dict[str, int] = {}
        for v in sd.values():
            key = str(v.dtype).replace("torch.", "")
            dtypes[key] = dtypes.get(key, 0) + 1
        params = sum(v.numel() for v in sd.values())
        print(f"checkpoint {path}: {path.stat().st_size / 2 ** 20:.1f} MiB, sha256 "
              f"{_checkpoint_sha256(path)}")
        print(f"  {len(sd)} keys; dtypes: "
              + ", ".join(f"{k} ({n})" for k, n in sorted(dtypes.items()))
              + f"; {params:,} parameters ({_count(params)})")
        if cfg is not None:
            expected = expected_checkpoint_keys(cfg)
            problems = compare_keys(sd, expected, IGNORED_PREFIXES)
            if problems:
                print(f"  does NOT match config {args.config} ({len(expected)} keys expected):")
                print("\n".join("    " + ln for ln in problems))
                code = EXIT_FAILED
            else:
                print(f"  matches config {args.config}: all {len(expected)} expected keys, "
                      "equal shapes")
        else:
            matching = []
            for preset in list_presets():
                try:
                    if not compare_keys(sd, expected_checkpoint_keys(preset), IGNORED_PREFIXES):
                        matching.append(preset)
                except (ValueError, TypeError):
                    continue
            print("  matches presets: " + (", ".join(matching) if matching else "none"))
    return code


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atoken-rt", description="Encode, decode, reconstruct and benchmark with AToken.",
        epilog="Exit codes: 0 ok, 1 failure while running, 2 usage or input error.")
    p.add_argument("--version", action="version", version=f"atoken_rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_opts(sp, config_required=True, gs=False):
        if config_required:
            sp.add_argument("--config", required=True,
                            help="preset name (atoken-sod, ...) or a YAML path")
        else:
            sp.add_argument("--config", default=None,
                            help="preset name or YAML path (default: the token file's)")
        sp.add_argument("--checkpoint", default=None,
                        help=".pt or .safetensors weights, or an official name (atoken-sod, "
                             "atoken-soc, atoken-soc-s1: downloaded into $ATOKEN_RT_HOME and "
                             "verified) (default: seeded random weights)")
        sp.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
        sp.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="fp32 (default; decode: the token file's) or bf16")
        sp.add_argument("--backend", choices=["torch", "triton"], default="torch")
        sp.add_argument("--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS,
                        help=f"token budget per batch (default {DEFAULT_MAX_TOKENS})")
        sp.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar and no notes (errors still print)")
        if gs:
            sp.add_argument("--gs-config", default=None,
                            help="Gaussian-splat decoder config (default 3d-decode-gs with "
                                 "--gs-checkpoint)")
            sp.add_argument("--gs-checkpoint", default=None,
                            help="GS decoder weights: 3D samples are also written as PLY")
            sp.add_argument("--render-backend", default="auto",
                            choices=["auto", "torch", "triton", "diff_gaussian_rasterization",
                                     "gsplat"], help="Gaussian renderer (default auto)")
            sp.add_argument("--render-size", type=_positive, default=512,
                            help="decode: orbit video / 2x2 picture size (default 512)")
            sp.add_argument("--orbit-frames", type=int, default=60,
                            help="decode: frames of the orbit video beside each PLY (default "
                                 "60; 0 = no video or picture). Each frame is one render: "
                                 "seconds per frame for a large object on a CPU")

    def mesh_opts(sp):
        sp.add_argument("--views", type=_positive, default=None,
                        help="meshes: views rendered for packing (default 16, the official)")
        sp.add_argument("--view-size", type=_positive, default=None,
                        help="meshes: size of each rendered view in pixels (default 512, the "
                             "official; the views are resized to 256 for packing)")

    e = sub.add_parser("encode", help="files -> one token file (.safetensors)",
                       description="Encode images, videos and 3D voxel files into one token file.")
    e.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    e.add_argument("--out", required=True, help="token file to write (.safetensors)")
    model_opts(e)
    e.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="a bad input file: report it and go on (skip), or stop (fail)")
    mesh_opts(e)
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="token file -> PNG / MP4 / NPZ (/ PLY)",
                       description="Decode a token file written by 'atoken-rt encode'.")
    d.add_argument("tokens", help="token file (.safetensors) or tokenize shard (.parquet)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--key", default=None, help="shard: decode only the row of this key")
    d.add_argument("--clip", type=int, default=0, help="shard: the clip of --key (default 0)")
    model_opts(d, config_required=False, gs=True)
    d.set_defaults(func=cmd_decode)

    from .data.cli import add_tokenize_parser
    add_tokenize_parser(sub)

    r = sub.add_parser("reconstruct", help="encode + decode, side-by-side files and PSNR",
                       description="Encode and decode files; write original | reconstruction "
                                   "side by side and print the PSNR of each.")
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    r.add_argument("--out", required=True, help="output folder")
    model_opts(r, gs=True)
    r.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    mesh_opts(r)
    r.set_defaults(func=cmd_reconstruct)

    b = sub.add_parser("bench", help="latency, throughput and TFLOP/s of encode / decode",
                       description="Benchmark a Session on random inputs (random weights unless "
                                   "--checkpoint is given). Writes bench.json, bench.md and "
                                   "bench.png into --out.")
    b.add_argument("--config", default="atoken-sod")
    b.add_argument("--checkpoint", default=None)
    from .benchmark import DEFAULT_SHAPES
    b.add_argument("--shapes", default=DEFAULT_SHAPES,
                   help=f"comma-separated: image:S, image:HxW, video:TxS, video:TxHxW, 3d:M "
                        f"(default {DEFAULT_SHAPES})")
    b.add_argument("--batch", type=_int_list, default=[1, 8], help="batch sizes (default 1,8)")
    b.add_argument("--backend", default="torch,triton", help="comma-separated (default both)")
    b.add_argument("--graphs", default=None,
                   help="off and/or on, comma-separated: Session(graphs=False/True) (default "
                        "off,on on CUDA, off on the CPU, where 'on' is the static path, eager)")
    b.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bf16 on CUDA, fp32 on the CPU")
    b.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    b.add_argument("--repeats", type=_positive, default=10, help="timed calls (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="config, checkpoint, device and backend summary")
    i.add_argument("--config", default=None)
    i.add_argument("--checkpoint", default=None)
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse usage errors exit with 2)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "warmup", 0) < 0:
        print("atoken-rt: error: --warmup must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    from .session import InputWarning, RandomWeightsWarning

    try:
        with warnings.catch_warnings():
            # Reported by the CLI itself, per file (notes) and in the outputs' metadata.
            warnings.simplefilter("ignore", InputWarning)
            warnings.simplefilter("ignore", RandomWeightsWarning)
            return args.func(args)
    except CLIError as exc:
        print(f"atoken-rt: error: {exc}", file=sys.stderr)
        return exc.code
    except (MediaError, CheckpointMismatch) as exc:
        print(f"atoken-rt: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("atoken-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m atoken_rt.cli`: run the package module's main, so that every module raises and
    # catches the same CLIError class (this file also runs as __main__).
    from atoken_rt.cli import main as _main
    raise SystemExit(_main())
