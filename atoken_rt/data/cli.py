"""The ``atoken-rt tokenize`` subcommand and ``atoken-rt decode SHARD.parquet --key K``.

Kept out of :mod:`atoken_rt.cli` (which only registers them) so that the dataset code stays in
one package; heavy imports (pyarrow, Ray) happen when a command runs, not when the parser is
built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _crop(text: str):
    try:
        if "x" in text:
            h, w = (int(v) for v in text.lower().split("x"))
            return (h, w)
        v = int(text)
        return (v, v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}") from None


def add_tokenize_parser(sub) -> None:
    """Register ``tokenize`` on the CLI's subparsers."""
    from ..cli import _positive

    t = sub.add_parser(
        "tokenize", help="a dataset -> sharded, resumable Parquet token files",
        description="Tokenise folders/globs of images and videos, WebDataset tars, Parquet files "
                    "(Hugging Face image layout) and path lists into a folder of Parquet shards "
                    "with manifest.json and failures.parquet. Re-running the same command "
                    "resumes; a different config or checkpoint in an existing --out is refused.")
    t.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="files, folders, globs, .tar, .parquet or .txt path lists")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--config", required=True, help="preset name (atoken-sod, ...) or YAML path")
    t.add_argument("--checkpoint", default=None,
                   help=".pt or .safetensors weights (default: seeded random weights)")
    t.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray Data actors")
    t.add_argument("--ray-address", default=None,
                   help="Ray cluster address ('auto': the running cluster; default: start a "
                        "local Ray)")
    t.add_argument("--workers", type=_positive, default=1, help="Ray actors (default 1)")
    t.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray actor (default 1 with --device cuda, else 0)")
    t.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per Ray actor")
    t.add_argument("--shard-size", type=_positive, default=4096,
                   help="items per shard (default 4096; a video item gives one row per clip)")
    t.add_argument("--resize", type=_positive, default=None, metavar="SHORT_SIDE",
                   help="resize so that the short side has this many pixels (bicubic)")
    t.add_argument("--crop", type=_crop, default=None, metavar="SIZE|HxW",
                   help="centre crop after --resize (e.g. 256 or 256x384)")
    t.add_argument("--clip-frames", type=_positive, default=16,
                   help="frames per video clip, a multiple of 4 (default 16: lossless)")
    t.add_argument("--clip-stride", type=_positive, default=16,
                   help="frames between clip starts (default 16)")
    t.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    t.add_argument("--backend", choices=["torch", "triton"], default=None,
                   help="default: triton on CUDA, torch on the CPU")
    t.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="batch-invariant tokens (default on)")
    t.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                   help="static plans / CUDA graphs (auto: CUDA with triton)")
    t.add_argument("--max-tokens", type=_positive, default=16384,
                   help="token budget of one encode call (default 16384)")
    t.add_argument("--readers", type=_positive, default=None,
                   help="reader threads (default: CPU count, at most 16)")
    t.add_argument("--prefetch", type=_positive, default=256,
                   help="decoded samples queued ahead of the encoder (default 256)")
    t.add_argument("--latent-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="storage of continuous latents (bf16: uint16 bit patterns)")
    t.add_argument("--image-column", default=None, help="Parquet image column (default: detect)")
    t.add_argument("--key-column", default=None,
                   help="Parquet column of unique keys (default: FILE#ROW)")
    t.add_argument("--max-tokens-per-sample", type=_positive, default=None,
                   help="over-limit samples go to failures.parquet (default 65536)")
    t.add_argument("--max-pixels", type=_positive, default=None,
                   help="largest frame as read, H*W (default 4096*4096)")
    t.add_argument("--cpu-threads", type=_positive, default=None,
                   help="CPU runs: torch threads (default: as recorded in --out, else all)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args) -> int:
    import dataclasses

    from ..cli import EXIT_FAILED, EXIT_OK, CLIError, _one_line
    from ..limits import DEFAULT_LIMITS

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise CLIError("tokenize needs pyarrow: pip install 'atoken_rt[data]'") from None
    from .api import tokenize

    limits = DEFAULT_LIMITS
    if args.max_tokens_per_sample:
        limits = dataclasses.replace(limits, max_tokens_per_sample=args.max_tokens_per_sample)
    if args.max_pixels:
        limits = dataclasses.replace(limits, max_pixels=args.max_pixels)
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or ("triton" if device.startswith("cuda") else "torch")
    gpus = args.gpus_per_worker
    if args.engine == "ray" and gpus is None:
        gpus = 1.0 if device.startswith("cuda") else 0.0
    try:
        s = tokenize(args.sources, args.out, args.config, args.checkpoint, engine=args.engine,
                     device=device, dtype=args.dtype, backend=backend,
                     deterministic=args.deterministic,
                     graphs={"auto": "auto", "on": True, "off": False}[args.graphs],
                     shard_size=args.shard_size, resize=args.resize, crop=args.crop,
                     clip_frames=args.clip_frames, clip_stride=args.clip_stride, limits=limits,
                     image_column=args.image_column, key_column=args.key_column,
                     latent_dtype=args.latent_dtype, max_tokens=args.max_tokens,
                     readers=args.readers, prefetch=args.prefetch, workers=args.workers,
                     gpus_per_worker=gpus, cpus_per_worker=args.cpus_per_worker,
                     ray_address=args.ray_address, cpu_threads=args.cpu_threads,
                     progress=not args.quiet and sys.stderr.isatty())
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(_one_line(exc)) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise CLIError(f"out of memory: lower --max-tokens ({_one_line(exc)})",
                           EXIT_FAILED) from None
        raise
    print(f"wrote {args.out}: {s.samples} sample(s), {s.tokens} tokens, {s.failures} "
          f"failure(s) in {s.seconds:.1f} s ({s.samples_per_s:.1f} samples/s, "
          f"{s.tokens_per_s:.0f} tokens/s); shards {s.shards_written} written, "
          f"{s.shards_skipped} already done, {s.shards_total} in all"
          f"{'' if s.complete else ' (INCOMPLETE)'}")
    return EXIT_OK


def decode_shard(args) -> int:
    """``atoken-rt decode SHARD.parquet [--key K [--clip J]] --out DIR``: decode rows of a shard
    (config and checkpoint from the dataset's manifest.json, as for token files)."""
    import numpy as np
    import torch

    from .. import cli
    from ..cli import CLIError, EXIT_OK, _Log, _one_line
    from .read import read_tokens

    from .. import tokenfile
    from ..limits import DEFAULT_LIMITS
    from ..media import TokenSample

    log = _Log(args.quiet)
    path = Path(args.tokens)
    out = Path(args.out)
    cli._check_out(out, "--out", folder=True)
    try:
        # Untrusted like a token file: sizes bounded from the footer before anything is read.
        ds = read_tokens(path, max_tokens_per_row=DEFAULT_LIMITS.max_tokens_per_sample)
    except ImportError:
        raise CLIError("decoding a shard needs pyarrow: pip install 'atoken_rt[data]'") from None
    except ValueError as exc:
        raise CLIError(_one_line(exc)) from None
    if ds.manifest is None:
        raise CLIError(f"{path}: no manifest.json beside the shard (it names the config and "
                       "checkpoint)")
    if not isinstance(ds.manifest, dict):
        raise CLIError(f"{path}: manifest.json must be a JSON object, got "
                       f"{type(ds.manifest).__name__}")
    try:
        if args.key is not None:
            rows = [ds.find(args.key, args.clip)]
        else:
            rows = [ds[i] for i in range(len(ds))]
    except KeyError as exc:
        raise CLIError(f"{path}: {exc.args[0]}") from None
    except ValueError as exc:  # a row that is not a token row (TokenSet.__getitem__)
        raise CLIError(f"{path}: {_one_line(exc)}") from None
    if not rows:
        raise CLIError(f"{path}: the shard holds no rows")
    config = cli._token_config(path, ds.manifest, args.config)
    # Rows are untrusted like token files: check every row (tensors, kind vs coords, fps,
    # frames) before the first output is written.
    samples = []
    for r in rows:
        meta = r.meta if isinstance(r.meta, dict) else {}
        smeta = {"kind": r.kind, **{k: meta[k] for k in ("fps", "frames_used")
                                    if meta.get(k) is not None}}
        samples.append(TokenSample(
            coords=torch.from_numpy(np.array(r.coords)),
            indices=None if r.indices is None else torch.from_numpy(np.array(r.indices)),
            latents=None if r.latents is None else torch.from_numpy(np.array(r.latents)),
            embedding=None, meta=smeta))
    try:
        cfg = cli._load_config(config)
        for i, (r, s) in enumerate(zip(rows, samples)):
            tokenfile.validate_sample(path, i, s, cfg, where=f"key {r.key!r} clip {r.clip}")
    except tokenfile.TokenFileError as exc:
        raise CLIError(str(exc)) from None
    checkpoint = cli._token_checkpoint(path, ds.manifest, cli._resolve_checkpoint(args.checkpoint),
                                       log)
    if args.dtype is None:
        args.dtype = ds.manifest.get("dtype") if ds.manifest.get("dtype") in cli.DTYPES \
            else "fp32"
    sess = cli._open_session(config, checkpoint, args, log, gs=True)
    cli._make_out_dir(out)
    written = []
    for i, (r, s) in enumerate(zip(rows, samples)):
        coords = s.coords
        try:
            if s.indices is not None:
                dec = sess.decode(coords=[coords], indices=[s.indices], kinds=[r.kind])
            else:
                dec = sess.decode(coords=[coords], latents=[s.latents], kinds=[r.kind])
        except (ValueError, TypeError) as exc:
            raise CLIError(f"{path}: key {r.key!r} clip {r.clip}: {_one_line(exc)}") from None
        name = r.key if r.kind != "video" else f"{Path(r.key).stem}_clip{r.clip:04d}.mp4"
        smeta = {"source": name, "fps": r.meta.get("fps"),
                 "frames_used": r.meta.get("frames_used")}
        written += cli._write_decoded(out, i, smeta, dec.kinds[0], dec.samples[0], coords,
                                      dec.gaussians[0])
    print(f"wrote {len(written)} file(s) for {len(rows)} row(s) into {out}")
    return EXIT_OK


__all__ = ["add_tokenize_parser", "cmd_tokenize", "decode_shard"]
