"""``atoken_rt.data.tokenize``: a dataset -> a folder of token shards (local or Ray engine).

    summary = atoken_rt.data.tokenize(["photos/", "clips/*.mp4", "shards/*.tar"], "tokens/",
                                      config="atoken-sod", checkpoint="atoken-sod.pt",
                                      device="cuda", dtype="bf16", resize=256, crop=256)

A run: enumerate the items of every source (:mod:`~atoken_rt.data.sources`); compare the run's
fingerprint (config, checkpoint SHA-256, dtype, backend, device type, deterministic mode,
preprocessing, shard size, latent dtype and the hash of the item list) with the manifest of an
existing ``out`` (a mismatch is refused); skip shards already committed; tokenise the others
(:class:`~atoken_rt.data.pipeline.ShardPipeline` in this process, or one per Ray actor); rewrite
``manifest.json`` and ``failures.parquet``. Re-running the same call resumes an interrupted run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch

from .. import __version__
from ..limits import DEFAULT_LIMITS, Limits
from .pipeline import ShardPipeline, ShardSpec
from .readers import Preprocess
from .shards import (LATENT_DTYPES, MANIFEST_FORMAT, existing_shards, fingerprint_diff,
                     read_manifest, read_shard_meta, remove_stale_temporaries, row_schema,
                     write_failures, write_manifest)
from .sources import SourceError, enumerate_items, items_sha256

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENGINES = ("local", "ray")


@dataclass
class Summary:
    """What one :func:`tokenize` call did (this run), plus the dataset's totals."""

    out: str
    engine: str
    items: int              # items read in this run
    samples: int            # rows written in this run (one per image, clip or 3D asset)
    tokens: int
    failures: int
    seconds: float
    samples_per_s: float
    tokens_per_s: float
    shards_written: int
    shards_skipped: int     # already committed by an earlier run
    shards_total: int
    complete: bool          # every shard of the dataset is committed
    dataset_rows: int = 0
    dataset_failures: int = 0
    encode_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    """Everything a worker needs to build a Session and a ShardPipeline (picklable)."""

    config: str
    checkpoint: str | None
    device: str
    dtype: str
    backend: str
    deterministic: bool
    graphs: Union[bool, str]
    prep: Preprocess
    out: str
    fingerprint: str
    shard_size: int
    max_tokens: int
    readers: int
    prefetch: int
    latent_dtype: str
    seed: int = 0
    cpu_threads: int | None = None  # CPU runs: torch threads (MKL splits some GEMMs by thread)

    def session(self):
        import warnings

        from ..session import RandomWeightsWarning, Session
        if self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            return Session(self.config, self.checkpoint, device=self.device,
                           dtype=DTYPES[self.dtype], backend=self.backend, graphs=self.graphs,
                           deterministic=self.deterministic, seed=self.seed,
                           limits=self.prep.limits)

    def schema(self, session):
        cfg = session.config
        channels = cfg.quantizer.num_codebooks if cfg.discrete else cfg.latent_channels
        return row_schema(cfg.discrete, channels, cfg.encoder.width, self.latent_dtype)

    def pipeline(self, session, items, on_shard=None, progress=None) -> ShardPipeline:
        return ShardPipeline(session, items, self.prep, Path(self.out), self.schema(session),
                             self.fingerprint, shard_size=self.shard_size,
                             max_tokens=self.max_tokens, readers=self.readers,
                             prefetch=self.prefetch, latent_dtype=self.latent_dtype,
                             on_shard=on_shard, progress=progress)


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out`` for the run (a second run on the same folder is refused)."""
    import fcntl

    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{out}: another tokenize run is writing to this folder") from None
        yield
    finally:
        os.close(fd)


def _device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return str(device)


def _provenance(config: str, checkpoint: str | None, cfg) -> dict:
    from ..checkpoint import file_sha256
    from ..cli import architecture
    from ..config import resolve_config_path

    try:
        config_path = str(resolve_config_path(config).resolve())
    except (ValueError, TypeError):
        config_path = None
    return {"config": str(config), "config_path": config_path, "architecture": architecture(cfg),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else "random"}


def _fingerprint(prov: dict, job: Job, n_items: int, items_hash: str) -> dict:
    return {"config": prov["config"], "architecture": prov["architecture"],
            "checkpoint_sha256": prov["checkpoint_sha256"],
            "seed": None if job.checkpoint else job.seed, "dtype": job.dtype,
            "backend": job.backend, "device_type": torch.device(job.device).type,
            "cpu_threads": job.cpu_threads,
            "deterministic": job.deterministic, "preprocess": job.prep.as_dict(),
            "shard_size": job.shard_size, "latent_dtype": job.latent_dtype,
            "inputs": {"items": n_items, "sha256": items_hash}}


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="item", file=sys.stderr, dynamic_ncols=True,
                disable=not enabled, smoothing=0.1)


def tokenize(sources: Sequence[str], out: Union[str, Path], config: str,
             checkpoint: str | None = None, *, engine: str = "local", device: str | None = None,
             dtype: str = "fp32", backend: str = "torch", deterministic: bool = True,
             graphs: Union[bool, str] = "auto", shard_size: int = 4096,
             resize: int | None = None, crop: Union[int, tuple[int, int], None] = None,
             clip_frames: int = 16, clip_stride: int = 16, limits: Limits | None = None,
             image_column: str | None = None, key_column: str | None = None,
             latent_dtype: str = "fp32", max_tokens: int = 16384, readers: int | None = None,
             prefetch: int = 256, workers: int = 1, gpus_per_worker: float | None = None,
             cpus_per_worker: float | None = None, ray_address: str | None = None,
             progress: bool = False, seed: int = 0, cpu_threads: int | None = None) -> Summary:
    """Tokenise ``sources`` into the folder ``out``; returns a :class:`Summary`.

    sources: files, folders, globs, ``.tar`` (WebDataset), ``.parquet`` (HF image layout) and
        ``.txt`` path lists (:mod:`atoken_rt.data.sources`).
    config, checkpoint: as for :class:`atoken_rt.Session` (no checkpoint: seeded random weights).
    engine: "local" (this process) or "ray" (Ray Data actors; ``workers`` actors with
        ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs each; ``ray_address`` of a running
        cluster, or a local one).
    device: "auto" (CUDA if available), "cpu", "cuda"; dtype: "fp32", "bf16" or "fp16";
        backend: "torch" or "triton"; deterministic: batch-invariant tokens (default on);
        graphs: the Session's static plans / CUDA graphs ("auto": CUDA with Triton).
    shard_size: items per shard (a video item gives one row per clip).
    resize: short side in pixels; crop: centre crop (int for a square, or (height, width)) after
        the resize; clip_frames / clip_stride: video clips (clip_frames a multiple of 4).
    limits: per-sample :class:`~atoken_rt.limits.Limits` (over-limit samples are failures).
    image_column / key_column: Parquet columns (default: the HF image struct / ``file#row``).
    latent_dtype: how continuous latents are stored ("fp32", "fp16", "bf16" as uint16 bits).
    max_tokens: token budget of one encode call; readers: reader threads per process (default:
        the CPU count, at most 16); prefetch: decoded samples queued ahead of the encoder.
    progress: a progress bar (items, samples/s, tokens/s, ETA) on stderr.
    cpu_threads: CPU runs only: torch threads of every worker (the CPU BLAS splits some GEMMs
        across threads, which changes their bits); default: the count recorded in an existing
        ``out``, else ``torch.get_num_threads()``. Part of the fingerprint.

    Raises ValueError (or TypeError) for bad options, unusable sources, an ``out`` made with
    another configuration, or a folder another run is writing to.
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
    for name, v in (("shard_size", shard_size), ("max_tokens", max_tokens),
                    ("prefetch", prefetch), ("workers", workers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    if not sources:
        raise ValueError("no sources given")
    if isinstance(crop, int):
        crop = (crop, crop)
    prep = Preprocess(resize=resize, crop=tuple(crop) if crop else None, clip_frames=clip_frames,
                      clip_stride=clip_stride, limits=limits or DEFAULT_LIMITS,
                      image_column=image_column, key_column=key_column)
    from ..config import load_config
    cfg = load_config(config)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint {checkpoint}: no such file")
    try:
        items = enumerate_items([str(s) for s in sources], image_column=image_column,
                                key_column=key_column)
    except SourceError:
        raise
    if not items:
        raise ValueError("the sources hold no items (give image/video files, folders, globs, "
                         ".tar, .parquet or .txt list files)")
    readers = readers or max(1, min(16, os.cpu_count() or 1))
    job = Job(config=str(config), checkpoint=str(checkpoint) if checkpoint else None,
              device=_device(device) if engine == "local" else (device or "auto"),
              dtype=dtype, backend=backend, deterministic=bool(deterministic), graphs=graphs,
              prep=prep, out=str(Path(out).resolve()), fingerprint="", shard_size=shard_size,
              max_tokens=max_tokens, readers=readers, prefetch=prefetch,
              latent_dtype=latent_dtype, seed=seed)
    if engine == "ray" and job.device == "auto":
        job.device = "cuda" if (gpus_per_worker or 0) > 0 else "cpu"
    if torch.device(job.device).type == "cpu":
        if cpu_threads is None:  # resume with the recorded count
            try:
                old = read_manifest(Path(out)) if Path(out).is_dir() else None
            except ValueError:
                old = None
            cpu_threads = ((old or {}).get("fingerprint", {}).get("cpu_threads")
                           or torch.get_num_threads())
        if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
            raise ValueError(f"cpu_threads must be a positive integer, got {cpu_threads!r}")
        job.cpu_threads = cpu_threads
    prov = _provenance(str(config), job.checkpoint, cfg)
    fp = _fingerprint(prov, job, len(items), items_sha256(items))
    job.fingerprint = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        manifest = read_manifest(out)
        if manifest is None:
            others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
            if others:
                raise ValueError(f"{out}: the folder is not empty ({', '.join(sorted(others)[:3])}"
                                 f"{', ...' if len(others) > 3 else ''}) and holds no "
                                 "manifest.json: not a tokenize output; use an empty folder")
            manifest = {"format": MANIFEST_FORMAT, **prov, "fingerprint": fp,
                        "fingerprint_sha256": job.fingerprint, "dtype": dtype,
                        "backend": backend, "deterministic": job.deterministic,
                        "shard_size": shard_size, "num_items": len(items),
                        "num_shards": -(-len(items) // shard_size), "shards": [],
                        "complete": False, "runs": [],
                        "created": _dt.datetime.now().isoformat(timespec="seconds")}
            write_manifest(out, manifest)
        elif manifest.get("fingerprint_sha256") != job.fingerprint:
            diff = fingerprint_diff(manifest.get("fingerprint", {}), fp)
            raise ValueError(f"{out} was tokenised with another configuration; refusing to mix "
                             f"tokens (use a new --out): {'; '.join(diff) or 'fingerprint differs'}")
        remove_stale_temporaries(out)
        return _run(items, job, out, manifest, engine, workers, gpus_per_worker,
                    cpus_per_worker, ray_address, progress, t0)


def _committed(out: Path, job: Job, num_shards: int) -> dict[int, dict]:
    """Shards already committed with this fingerprint: shard -> its metadata."""
    done = {}
    for k, path in existing_shards(out).items():
        meta = read_shard_meta(path)
        lo, hi = k * job.shard_size, (k + 1) * job.shard_size
        if (meta is not None and meta.get("fingerprint") == job.fingerprint and k < num_shards
                and meta.get("items", [None])[0] == lo):
            done[k] = meta
    return done


def _run(items, job: Job, out: Path, manifest: dict, engine: str, workers: int,
         gpus_per_worker, cpus_per_worker, ray_address, progress: bool, t0: float) -> Summary:
    n = len(items)
    num_shards = -(-n // job.shard_size)
    done = _committed(out, job, num_shards)
    entries = {e["shard"]: e for e in manifest.get("shards", []) if e.get("shard") in done}
    pending = [ShardSpec(k, k * job.shard_size, min(n, (k + 1) * job.shard_size))
               for k in range(num_shards) if k not in done]
    lock = threading.Lock()
    totals = {"items": 0, "samples": 0, "tokens": 0, "failures": 0, "encode_seconds": 0.0}

    def on_shard(entry: dict) -> None:  # writer thread (local) or driver (Ray)
        with lock:
            entries[entry["shard"]] = entry
            manifest["shards"] = [entries[k] for k in sorted(entries)]
            write_manifest(out, manifest)

    bar = _progress_bar(sum(s.hi - s.lo for s in pending), progress)
    try:
        if pending and engine == "local":
            threads = torch.get_num_threads()
            sess = job.session()

            def tick(items_done: int, samples: int, tokens: int) -> None:
                bar.update(items_done)
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{samples / el:.1f} samples/s, {tokens / el:.0f} tok/s",
                                    refresh=False)

            pipe = job.pipeline(sess, items, on_shard=on_shard, progress=tick)
            try:
                stats = pipe.run(pending)
            finally:
                torch.set_num_threads(threads)
            totals.update(items=stats.items, samples=stats.samples, tokens=stats.tokens,
                          failures=stats.failures, encode_seconds=stats.encode_seconds)
        elif pending:
            from .ray_engine import run_ray
            for key, v in run_ray(items, pending, job, workers, gpus_per_worker,
                                  cpus_per_worker, ray_address, on_shard, bar).items():
                totals[key] = v
    finally:
        bar.close()
    # Derived state: the manifest's shard list and failures.parquet, from the committed shards.
    committed = _committed(out, job, num_shards)
    failures = []
    for k in sorted(committed):
        meta = committed[k]
        if k not in entries:  # committed but the manifest update was lost (killed in between)
            from .shards import file_sha256, shard_name
            p = out / shard_name(k)
            entries[k] = {"file": p.name, "shard": k, "items": meta["items"],
                          "rows": meta["rows"], "tokens": meta["tokens"],
                          "failures": len(meta["failures"]), "sha256": file_sha256(p),
                          "bytes": p.stat().st_size}
        failures += [{**f, "shard": k} for f in meta["failures"]]
    seconds = time.perf_counter() - t0
    complete = len(committed) == num_shards
    manifest["shards"] = [entries[k] for k in sorted(entries) if k in committed]
    manifest["complete"] = complete
    manifest["rows"] = sum(e["rows"] for e in manifest["shards"])
    manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
    manifest["failures"] = len(failures)
    manifest.setdefault("runs", []).append({
        "finished": _dt.datetime.now().isoformat(timespec="seconds"), "engine": engine,
        "atoken_rt_version": __version__, "device": job.device,
        "torch_threads": torch.get_num_threads(), "seconds": round(seconds, 3),
        "shards_written": len(pending), "samples": totals["samples"],
        "tokens": totals["tokens"]})
    write_failures(out, failures)
    write_manifest(out, manifest)
    return Summary(out=str(out), engine=engine, items=totals["items"], samples=totals["samples"],
                   tokens=totals["tokens"], failures=totals["failures"], seconds=seconds,
                   samples_per_s=totals["samples"] / seconds if seconds > 0 else 0.0,
                   tokens_per_s=totals["tokens"] / seconds if seconds > 0 else 0.0,
                   shards_written=len(pending), shards_skipped=len(done),
                   shards_total=num_shards, complete=complete,
                   dataset_rows=manifest["rows"], dataset_failures=len(failures),
                   encode_seconds=totals["encode_seconds"])


__all__ = ["tokenize", "Summary", "Job"]
