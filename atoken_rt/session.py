"""``atoken_rt.Session``: the thin object that drives the model.

    sess = atoken_rt.Session("atoken-sod", "atoken-sod.pt", device="cuda", dtype=torch.bfloat16)
    enc = sess.encode([image, video, atoken_rt.Voxels(coords, feats)])
    dec = sess.decode(enc)

One call = one packed batch: every sample is validated first (nothing runs on bad input), then
all tokens of all samples go through each tower in a single variable-length pass, one attention
sequence per (sample, 16-frame chunk).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import reference as ref
from .checkpoint import IGNORED_PREFIXES, check_state_dict, read_state_dict
from .config import ATokenConfig, GSConfig, load_config, load_gs_config
from .inputs import (VOXEL_CHANNELS, Prepared, SampleInfo, Voxels, as_frames_tensor,
                     grid_coords, prepare_pixel_batch, prepare_sample, unpatchify)
from .backends import make_ops
from .caches import LRUCache, tensor_bytes
from .model import AToken, init_random_
from .graphs import GraphCache
from .limits import DEFAULT_LIMITS, Limits, check_decode_coords, check_sample
from .packing import SequencePlan, build_plan, check_token_coords
from .static import Bucket, BucketSet, StaticBuffers, StaticPlan

PathLike = Union[str, Path]
BACKENDS = ("torch", "triton", "reference")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("image", "video", "3d")
# Plans (with their derived device tensors, e.g. per-token position embeddings) kept per batch
# geometry: at most 8, of at most 16384 tokens (a full-size bf16 plan of 16384 tokens holds
# ~75 MB of position embeddings for the two towers).
PLAN_CACHE_SIZE = 8
PLAN_CACHE_MAX_TOKENS = 16384
# Static buffers per bucket without CUDA graphs (the CPU static path): an LRU of at most 1 GiB
# (the largest default bucket at full width holds ~0.42 GB in bf16). With graphs they live as
# long as the captured graphs that hold their addresses: one per bucket of the finite BucketSet.
STATIC_BUFFER_BYTES = 1 << 30
# A sanity bound on the model a config describes, checked before any module is built (a config
# with 200000 blocks spent minutes allocating): 1024 blocks per stack, 16e9 parameters (the full
# atoken-soc/sod is 27 + 27 blocks, 0.85e9 parameters; the GS decoder 0.09e9).
MAX_MODEL_BLOCKS = 1024
MAX_MODEL_PARAMETERS = 16_000_000_000


class InputWarning(UserWarning):
    """Pixels cropped or frames dropped by the model's patch rules (reported on the result too)."""


class RandomWeightsWarning(UserWarning):
    """A session built without a checkpoint runs seeded random weights."""


class _PerSample(list):
    """A list of per-sample views into one packed tensor (``.packed`` holds the tensor)."""

    def __init__(self, packed: torch.Tensor | None, offsets: np.ndarray):
        if packed is None:
            super().__init__([None] * (len(offsets) - 1))
        else:
            super().__init__(packed[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:]))
        self.packed = packed


@dataclass
class EncodeResult:
    """What :meth:`Session.encode` returns; lists are per sample, in batch order.

    coords[i]:   [n_i, 4] int32 (t, x, y, z), the reference's row order.
    latents[i]:  [n_i, L] posterior mean (continuous), a seeded sample (``sample=True``) or the FSQ
                 codes (discrete), model dtype.
    indices[i]:  [n_i, num_codebooks] int32 FSQ indices (discrete configs), else None.
    moments[i]:  [n_i, 2L] mean | logvar, model dtype.
    features[i]: [n_i, width] post-LayerNorm encoder features (the official ``x_no_proj``).
    embedding:   [B, width] L2-normalised MAP-head embedding.
    info[i]:     :class:`~atoken_rt.inputs.SampleInfo` (kind, crop, frames used/dropped).

    The tensors belong to the result (no session buffer is aliased: static-path outputs are
    copied out), except after ``encode(..., out=buffers)``: then they are views of those
    :class:`~atoken_rt.buffers.EncodeBuffers`, valid until the buffers' next use.
    """

    coords: list
    latents: list
    indices: list
    moments: list
    features: list
    embedding: torch.Tensor
    info: list
    offsets: np.ndarray = field(repr=False)
    plan: SequencePlan = field(repr=False)
    # Per-sample coords on the host ([n_i, 4] int32 numpy, read-only): decode needs them on the
    # host, and reading enc.coords back from a GPU would wait for the encode to finish.
    coords_host: list | None = field(default=None, repr=False)

    @property
    def kinds(self) -> list[str]:
        return [i.kind for i in self.info]

    def __len__(self) -> int:
        return len(self.info)

    def to(self, device) -> "EncodeResult":
        """A copy with every tensor moved to ``device`` (e.g. ``"cpu"``)."""
        def mv(lst):
            packed = lst.packed.to(device) if lst.packed is not None else None
            return _PerSample(packed, self.offsets)
        return EncodeResult(coords=mv(self.coords), latents=mv(self.latents),
                            indices=mv(self.indices), moments=mv(self.moments),
                            features=mv(self.features), embedding=self.embedding.to(device),
                            info=self.info, offsets=self.offsets, plan=self.plan,
                            coords_host=self.coords_host)

    def cpu(self) -> "EncodeResult":
        return self.to("cpu")


@dataclass
class DecodeResult:
    """What :meth:`Session.decode` returns; lists are per sample, in batch order.

    tokens[i]:    [n_i, 3072] raw decoder output (model dtype), the input row order.
    samples[i]:   image [H', W', 3] / video [T', H', W', 3] in [-1, 1] (not clamped), at the cropped
                  size; for 3D the [n_i, 768] voxel features (the decoded channels 0..767, in the
                  model's [-1, 1] space, the GS decoder's input).
    gaussians[i]: :class:`~atoken_rt.gs.Gaussians` for 3D samples when a GS decoder is loaded.
    """

    tokens: list
    samples: list
    gaussians: list
    kinds: list
    info: list | None = None


class Handle:
    """A request in flight (from :meth:`Session.encode_async` / :meth:`Session.decode_async`).

    ``done()`` polls without blocking; ``wait()`` blocks until the result is ready on the device
    (the request's CUDA event has completed) and returns it, or re-raises the request's error.
    """

    def __init__(self, future: Future):
        self._future = future

    def done(self) -> bool:
        if not self._future.done():
            return False
        if self._future.exception() is not None:
            return True
        event = self._future.result()[1]
        return event is None or event.query()

    def wait(self, timeout: float | None = None):
        result, event = self._future.result(timeout)
        if event is not None:
            event.synchronize()
        return result

    result = wait


def _is_dtype(x) -> bool:
    return isinstance(x, torch.dtype)


def _check_device(device) -> torch.device:
    """A torch.device the model can run on: ``cpu`` or an existing ``cuda[:N]``.

    torch raises RuntimeError for an unknown name ("tpu") and accepts devices the model cannot
    run on ("meta": no data); both are a ValueError naming the argument here."""
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"device must be a string, torch.device or CUDA index, got "
                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda[:N]'") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(dev)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    return dev


def _check_seed(seed, name: str) -> None:
    """torch.manual_seed takes a 64-bit integer; anything else is a TypeError/ValueError here
    (torch raises RuntimeError for a str or float, and an opaque overflow for 2**70)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(seed).__name__}")
    if not -(1 << 63) <= int(seed) < (1 << 63):
        raise ValueError(f"{name} must fit in 64 bits (signed), got {seed}")


def _no_meta(x, where: str) -> None:
    """Meta tensors have shapes but no data: reading them fails deep inside torch."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        raise ValueError(f"{where}: a meta-device tensor (no data)")


class Session:
    """Load AToken once, then encode and decode batches of images, videos and 3D assets.

    Parameters
    ----------
    config: preset name (``"atoken-sod"``, ``"atoken-soc"``, ``"atoken-soc-s1"``, ``"tiny-sod"``,
        ...), a path to an official-layout YAML file, or an :class:`ATokenConfig`.
    checkpoint: ``.pt`` or ``.safetensors`` path; None gives seeded random weights (with a warning).
    device: where the model runs and results stay.
    dtype: ``torch.float32`` or ``torch.bfloat16`` (every floating parameter is cast, as the official
        ``.to(torch.bfloat16)`` does); ``torch.float16`` is accepted but not a reference dtype.
    backend: ``"torch"`` (the reference path; for bf16 on a CPU the fast ops of
        :mod:`atoken_rt.cpu_ops`, same rounding points), ``"reference"`` (the torch reference
        everywhere) or ``"triton"`` (the kernels in ``kernels/``: on a CUDA device, or on CPU
        tensors under ``TRITON_INTERPRET=1`` for testing).
    gs_config, gs_checkpoint: the optional 3D Gaussian-splat decoder (``"3d-decode-gs"``).
    seed: seed of the random weights when no checkpoint is given.
    epilogue: ``backend="triton"`` only: ``"cublas"`` (torch GEMM + one fused element-wise kernel
        for bias + GELU) or ``"triton"`` (a Triton GEMM with the epilogue fused).
    graphs: ``True``: run the towers on static, bucketed plans (:mod:`atoken_rt.static`), captured
        as CUDA graphs per bucket on a GPU (on CPU the same static path runs eagerly); ``False``:
        the dynamic path; ``"auto"``: True on CUDA with ``backend="triton"``, else False.
    buckets: the token/sequence capacities of the static plans (:class:`BucketSet`).
    deterministic: batch-invariant numerics (:mod:`atoken_rt.deterministic`): a sample's
        outputs are bit-identical whatever it is batched with and whatever bucket it lands in.
    limits: per-sample size limits (:class:`~atoken_rt.limits.Limits`; default
        ``DEFAULT_LIMITS``), checked on shapes before any work: a sample over one raises a
        ``ValueError`` naming the sample, its size and the limit. Decode checks token coords
        against the grids encode could have produced under the same limits.

    Thread safety: a Session may be shared by threads; ``encode``/``decode`` calls are serialised
    by a lock (one batch at a time on the device, which keeps the static buffers and captured
    graphs consistent). For parallelism across GPUs, use one Session per device.
    """

    def __init__(self, config: Union[PathLike, ATokenConfig], checkpoint: PathLike | None = None,
                 *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 backend: str = "torch", gs_config: Union[PathLike, GSConfig, None] = None,
                 gs_checkpoint: PathLike | None = None, seed: int = 0, epilogue: str = "cublas",
                 graphs: Union[bool, str] = "auto", buckets: BucketSet | None = None,
                 deterministic: bool = False, limits: Limits | None = None):
        if not _is_dtype(dtype) or dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {list(BACKENDS)}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be an atoken_rt.Limits, got {type(limits).__name__}")
        self.limits = limits or DEFAULT_LIMITS
        self.device = _check_device(device)
        _check_seed(seed, "seed")
        self.dtype = dtype
        self.backend = backend
        self.ops = make_ops(backend, epilogue, self.device, dtype)
        if backend == "triton" and self.device.type == "cpu":
            from .kernels._utils import interpreter_active
            if not interpreter_active():
                raise ValueError("backend 'triton' on device 'cpu' needs TRITON_INTERPRET=1 (set "
                                 "before triton is imported; slow, for testing); use "
                                 "device='cuda' or backend='torch'")
        self.config = load_config(config)
        _check_model_size(self.config)
        self.model = self._build(AToken, self.config, checkpoint, (), seed, "checkpoint")
        self.gs_config = None
        self.gs = None
        if gs_checkpoint is not None and gs_config is None:
            gs_config = "3d-decode-gs"
        if gs_config is not None:
            from .gs import GaussianDecoder
            self.gs_config = load_gs_config(gs_config)
            _check_model_size(self.gs_config)
            self.gs = self._build(GaussianDecoder, self.gs_config, gs_checkpoint, IGNORED_PREFIXES,
                                  seed + 1, "gs_checkpoint")
        self._warned: set[str] = set()
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        # Guards creating, submitting to and closing the executor: without it, close() between
        # a submit's check and its submit raised "cannot schedule new futures after shutdown".
        self._executor_lock = threading.Lock()
        if graphs not in (True, False, "auto"):
            raise ValueError(f"graphs must be True, False or 'auto', got {graphs!r}")
        # "auto": graphs where they pay off and stay cheap: CUDA with the Triton kernels (the torch
        # backend's capturable attention is a dense masked one, O(bucket^2) memory).
        auto = self.device.type == "cuda" and backend == "triton"
        self.static = auto if graphs == "auto" else bool(graphs)
        self.graphs_active = self.static and self.device.type == "cuda"
        self.buckets = buckets or BucketSet()
        self._buffers = {} if self.graphs_active else LRUCache(
            len(self.buckets.all()), STATIC_BUFFER_BYTES, sizeof=lambda b: tensor_bytes(b.t),
            on_evict=self._forget_bucket)
        self._plans: OrderedDict = OrderedDict()  # batch geometry -> (plan, coords, statics)
        self._plans_lock = threading.Lock()
        self._last_call = None  # CUDA event recorded at the end of the last encode/decode
        self._graphs = GraphCache(self.device) if self.graphs_active else None
        # deterministic=True: batch-invariant ops and MAP head (atoken_rt/deterministic.py).
        self.deterministic = bool(deterministic)
        if self.deterministic:
            from .deterministic import make_deterministic
            make_deterministic(self)

    @classmethod
    def from_pretrained(cls, name: str, *, gs: bool = False, offline: bool | None = None,
                        progress: bool = True, **kwargs) -> "Session":
        """A Session with an official checkpoint (``"atoken-sod"``, ``"atoken-soc"``,
        ``"atoken-soc-s1"``), downloaded into the cache and verified on first use
        (:mod:`atoken_rt.hub`). ``gs=True`` adds the official 3D Gaussian-splat decoder.
        ``offline`` (default: ``$ATOKEN_RT_OFFLINE``) never touches the network. Other keyword
        arguments go to :class:`Session` (device, dtype, backend, ...)."""
        from . import hub

        if not hub.is_official(name) or hub.REGISTRY[name].config == "3d-decode-gs":
            raise ValueError(f"unknown official autoencoder {name!r}; known: "
                             f"{[n for n in hub.names() if n != '3d-decode-gs']}")
        checkpoint = hub.download(name, offline=offline, progress=progress)
        if gs:
            kwargs["gs_config"] = "3d-decode-gs"
            kwargs["gs_checkpoint"] = hub.download("3d-decode-gs", offline=offline,
                                                   progress=progress)
        return cls(hub.REGISTRY[name].config, checkpoint, **kwargs)

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------

    def _build(self, cls, cfg, checkpoint, ignore, seed, what):
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if checkpoint is None:
            warnings.warn(f"no {what} given: {cls.__name__} '{cfg.name}' runs seeded random "
                          f"weights (seed {seed}), for demos and benchmarks only",
                          RandomWeightsWarning, stacklevel=3)
            model = model.to_empty(device=self.device)
            init_random_(model, seed)
            if hasattr(model, "reset_buffers"):
                model.reset_buffers()
        else:
            sd = read_state_dict(checkpoint)
            sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
            check_state_dict(sd, expected, str(checkpoint))
            model.load_state_dict(sd, strict=True, assign=True)
        model = model.to(device=self.device, dtype=self.dtype)
        model.eval()
        model.requires_grad_(False)
        if hasattr(model, "clear_caches"):
            model.clear_caches()
        return model

    def __repr__(self) -> str:
        gs = f", gs={self.gs_config.name!r}" if self.gs_config else ""
        return (f"Session({self.config.name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"backend={self.backend!r}{gs})")

    @property
    def discrete(self) -> bool:
        return self.config.discrete

    # ------------------------------------------------------------------------------------------
    # encode
    # ------------------------------------------------------------------------------------------

    def _prepare(self, batch: Any) -> list[Prepared]:
        if isinstance(batch, (torch.Tensor, np.ndarray)) or not isinstance(batch, (list, tuple)):
            raise TypeError("batch must be a list of samples (images, videos, Voxels); "
                            f"got {type(batch).__name__} (wrap a single sample as [x])")
        if len(batch) == 0:
            raise ValueError("empty batch: give at least one sample")
        for i, x in enumerate(batch):  # no data, shapes only: before any copy or allocation
            for name, t in ((None, x), ("coords", getattr(x, "coords", None)),
                            ("feats", getattr(x, "feats", None))):
                _no_meta(t, f"sample {i}" + (f" {name}" if name else ""))
            check_sample(x, i, self.limits)
        # Same-shaped uint8 images/videos together (one copy and one patchify per shape), the
        # rest one by one (in order: the first bad sample raises).
        grouped = prepare_pixel_batch(batch, self.device) if len(batch) > 1 else {}
        return [grouped[i] if i in grouped else prepare_sample(x, i, self.device)
                for i, x in enumerate(batch)]

    def _report(self, infos: Sequence[SampleInfo]) -> None:
        cropped = [i for i, s in enumerate(infos) if s.cropped]
        dropped = [i for i, s in enumerate(infos) if s.frames_dropped]
        if cropped and "crop" not in self._warned:
            self._warned.add("crop")
            warnings.warn(f"samples {cropped}: centre-cropped to multiples of 16 pixels (see "
                          "EncodeResult.info[i].used_shape / crop_offset; warned once per session)",
                          InputWarning, stacklevel=3)
        if dropped and "drop" not in self._warned:
            self._warned.add("drop")
            warnings.warn(f"samples {dropped}: trailing frames dropped to a multiple of 4 (see "
                          "EncodeResult.info[i].frames_dropped; warned once per session)",
                          InputWarning, stacklevel=3)

    def encode(self, batch: Sequence[Any], *, sample: bool = False,
               generator: torch.Generator | None = None, seed: int | None = None,
               out=None) -> EncodeResult:
        """Encode a list of images ``(H, W, 3)``, videos ``(T, H, W, 3)`` and :class:`Voxels`.

        Continuous configs return the posterior mean as ``latents``; ``sample=True`` draws
        ``mean + std * eps`` with ``generator`` (or ``seed``). Discrete configs return FSQ codes and
        indices of the mean (as the reference, which discards its sample).
        out: an :class:`~atoken_rt.buffers.EncodeBuffers` to write the results into (the result's
        tensors are then views of it, valid until its next use; see atoken_rt/buffers.py).
        """
        if out is not None:
            from .buffers import EncodeBuffers
            if not isinstance(out, EncodeBuffers):
                raise TypeError(f"out must be an EncodeBuffers, got {type(out).__name__}")
        prepared = self._prepare(batch)
        infos = [p.info for p in prepared]
        unit = [i for i, p in enumerate(prepared) if p.unit_range]
        if unit:  # every call: a normalisation bug, not a property of one input
            warnings.warn(f"samples {unit}: float pixels all lie in [0, 1], but the model takes "
                          "[-1, 1] (0 is mid-grey): encoded as given. If they are [0, 1] images "
                          "(e.g. torchvision ToTensor), pass x * 2 - 1, or uint8 [0, 255]",
                          InputWarning, stacklevel=2)
        if seed is not None:
            _check_seed(seed, "encode: seed")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"encode: generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        if sample and generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        # no_grad, not inference_mode: results must stay ordinary tensors that a training loop
        # can feed to a trainable model (inference tensors cannot be saved for backward).
        with self._lock, torch.no_grad():
            self._after_previous_call()
            try:
                plan, coords = self._plan(prepared)
                if out is not None:  # before any work is queued
                    out.check(self, plan.num_tokens, plan.num_samples)
                # The result's own copy (the cached one serves others).
                coords = coords.clone() if out is None else \
                    out.coords[:plan.num_tokens].copy_(coords)
                # One sample: its tokens as they are (no concatenated copy of [n, 3072]).
                feats = (prepared[0].feats if len(prepared) == 1 else
                         torch.cat([p.feats for p in prepared])).to(self.dtype)
                res = self._encode_tokens(feats, plan, sample, generator, out)
                if out is not None:
                    res = out.write(res, plan.num_samples)
            finally:  # a call failing half-way has queued work too: the next one waits for it
                self._mark_call_done()
        self._report(infos)
        off = plan.sample_offsets
        return EncodeResult(coords=_PerSample(coords, off), latents=_PerSample(res["latents"], off),
                            indices=_PerSample(res["indices"], off),
                            moments=_PerSample(res["moments"], off),
                            features=_PerSample(res["features"], off), embedding=res["embedding"],
                            info=infos, offsets=off, plan=plan,
                            coords_host=[_read_only(p.coords.numpy()) for p in prepared])

    def _after_previous_call(self) -> None:
        """Order this call's device work after the previous call's (CUDA; under the lock).

        Calls may come on different streams (``encode_async(stream=...)``, threads with their
        own current stream) but share the static buffers, the captured graphs and the cached
        plans' device tensors: without this, a call could overwrite a bucket's buffers while the
        previous call's replay still reads them, or use a cached tensor still being copied."""
        if self._last_call is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_call)

    def _mark_call_done(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._last_call = event

    def _plan(self, prepared: Sequence[Prepared]) -> tuple[SequencePlan, torch.Tensor]:
        """The batch's plan and device coords [N, 4] int32.

        Images and videos: a plan depends only on the samples' token grids, so it is cached by
        them (LRU: PLAN_CACHE_SIZE batches of up to PLAN_CACHE_MAX_TOKENS tokens), together with everything derived from it (device
        index tensors, position embeddings, the static plans per bucket). A stream of same-sized
        frames plans once. 3D coords are data: planned per call.
        """
        key = None
        if all(p.info.kind != "3d" for p in prepared) and \
                sum(p.feats.shape[0] for p in prepared) <= PLAN_CACHE_MAX_TOKENS:
            key = tuple(p.info.grid for p in prepared)
            with self._plans_lock:
                hit = self._plans.get(key)
                if hit is not None:
                    self._plans.move_to_end(key)
                    return hit[0], hit[1]
        plan = build_plan([p.coords.numpy() for p in prepared], self.config.chunk_frames)
        coords = torch.cat([p.coords for p in prepared]).to(self.device)
        if key is not None:
            with self._plans_lock:
                # (plan, device coords, the plan's StaticPlans by (lo, hi, bucket)): kept here,
                # not on the plan, so that results holding the plan hold no session buffers.
                self._plans[key] = (plan, coords, {})
                while len(self._plans) > PLAN_CACHE_SIZE:
                    self._plans.popitem(last=False)
        return plan, coords

    def _static_plan(self, plan: SequencePlan, lo: int, hi: int, bucket: Bucket) -> StaticPlan:
        """The StaticPlan of sequences [lo, hi) of ``plan`` in ``bucket``: reused for a cached
        plan (so the bucket's buffers can tell that they already hold its layout), new for any
        other (3D, large, or another session's plan)."""
        with self._plans_lock:
            store = next((e[2] for e in self._plans.values() if e[0] is plan), None)
        sp = None if store is None else store.get((lo, hi, bucket))
        if sp is None:
            sp = StaticPlan(plan, lo, hi, bucket, self._static_buffers(bucket))
            if store is not None:
                store[(lo, hi, bucket)] = sp
        return sp

    def _encode_tokens(self, feats: torch.Tensor, plan: SequencePlan, sample: bool,
                       generator, dest=None) -> dict:
        """Packed tokens [N, 3072] (model dtype, input order) -> packed encoder outputs
        (``dest``: EncodeBuffers the static path may write into directly)."""
        m, dev = self.model, self.device
        x = feats if plan.order is None else feats[plan.tensor("order", dev)]
        lat = self.config.latent_channels
        q = self.config.quantizer
        emb = None
        if self.static:
            e, moments, latents, indices, emb = self._static_run(
                "encode", x, plan, dest if plan.inverse is None else None)
        else:
            e = m.encoder(x, plan, self.ops)
            moments = self.ops.linear(e, m.proj)
            latents, indices = moments[:, :lat], None
            if q is not None:
                latents, indices = self.ops.fsq(latents, q.levels, q.num_codebooks)
        if plan.inverse is not None:
            inv = plan.tensor("inverse", dev)
            e, moments, latents = e[inv], moments[inv], latents[inv]
            indices = indices[inv] if indices is not None else None
        # The MAP head pools over all chunks of a sample: it runs on the reassembled features
        # (unless the static path already ran it inside the bucket that held every sample).
        if emb is None:
            emb = F.normalize(m.encoder.head(e, plan.sample_offsets, self.ops), dim=-1)
        if q is None and sample:
            latents = ref.gaussian_sample(moments, generator)
        return {"features": e, "embedding": emb, "moments": moments, "latents": latents,
                "indices": indices}

    # ------------------------------------------------------------------------------------------
    # static plans and CUDA graphs
    # ------------------------------------------------------------------------------------------

    def _static_buffers(self, bucket: Bucket) -> StaticBuffers:
        bufs = self._buffers.get(bucket)
        if bufs is None:
            c = self.config
            # Normal tensors even if this first call runs under the caller's inference_mode
            # (later calls outside it write into them).
            widths = {"x_encode": c.in_channels, "x_decode": c.latent_channels,
                      "pe_encode": c.encoder.width, "pe_decode": c.decoder.width}
            with torch.inference_mode(False):
                bufs = StaticBuffers(bucket, self.device, self.dtype, widths)
            self._buffers[bucket] = bufs
        return bufs

    def _forget_bucket(self, bucket: Bucket, _buffers) -> None:
        """Evicted buffers: drop the cached StaticPlans that point at them (so they are freed)."""
        with self._plans_lock:
            for _, _, store in self._plans.values():
                for k in [k for k in store if k[2] == bucket]:
                    del store[k]

    def _static_stage(self, stage: str, sp: StaticPlan) -> tuple:
        """The fixed-shape body of one stage over a loaded bucket (what a CUDA graph captures)."""
        m, ops, b = self.model, self.ops, sp.buffers
        sp.reset_derived()  # cos/sin etc. come from the buffers of *this* run (and replay)
        if stage == "decode":
            return (m.decoder(b["x_decode"], sp, ops),)
        e = m.encoder(b["x_encode"], sp, ops)
        moments = ops.linear(e, m.proj)
        latents, indices = moments[:, :self.config.latent_channels], None
        q = self.config.quantizer
        if q is not None:
            latents, indices = ops.fsq(latents, q.levels, q.num_codebooks)
        emb = None
        if sp.sample_cu is not None and not self.deterministic:  # the head is captured too
            emb = F.normalize(m.encoder.head.forward_static(e, b["sample_cu"], ops), dim=-1)
        return e, moments, latents, indices, emb

    def _static_call(self, stage: str, sp: StaticPlan) -> tuple:
        if not self.graphs_active:
            return self._static_stage(stage, sp)
        key = (stage, sp.bucket)
        if key not in self._graphs:
            self._graphs.capture(key, lambda: self._static_stage(stage, sp))
        return self._graphs.replay(key)

    def _static_run(self, stage: str, x: torch.Tensor, plan: SequencePlan, dest=None) -> tuple:
        """Run one tower stage over a plan, bucket by bucket; rows come back in sequence order.

        The plan is cut into groups of whole sequences that fit the largest bucket (a long video
        streams through in several replays); results are identical to one pass. ``dest``
        (encode): EncodeBuffers written instead of new output tensors (no allocation).
        """
        tower = self.model.encoder if stage == "encode" else self.model.decoder
        outs = None
        groups = self.buckets.split(np.diff(plan.cu_seqlens))
        per_sample = None  # outputs per sample (the embedding), when one group holds them all
        full_pe: dict = {}  # this run's whole-batch position embeddings, built when first needed
        for lo, hi in groups:
            n = int(plan.cu_seqlens[hi] - plan.cu_seqlens[lo])
            sp = self._static_plan(plan, lo, hi, self.buckets.choose(n, hi - lo))
            sp.load(x[sp.row_lo:sp.row_hi], f"x_{stage}", {stage: tower.pos_embedder}, full_pe)
            res = self._static_call(stage, sp)
            if stage == "encode":
                res, emb = res[:-1], res[-1]
                if emb is not None and len(groups) == 1:
                    per_sample = emb[:plan.num_samples].clone() if dest is None else \
                        dest.embedding[:plan.num_samples].copy_(emb[:plan.num_samples])
            if outs is None and dest is not None:
                outs = list(dest.views(plan.num_tokens))
            if outs is None:
                outs = [None if r is None else r.new_empty((plan.num_tokens, *r.shape[1:]))
                        for r in res]
            for o, r in zip(outs, res):
                if o is not None:
                    o[sp.row_lo:sp.row_hi].copy_(r[:n])
        return (*outs, per_sample) if stage == "encode" else tuple(outs)

    def warmup(self, buckets: Sequence | None = None, stages: Sequence[str] = ("encode", "decode")
               ) -> dict:
        """Compile the kernels and capture the graphs of chosen buckets up front.

        buckets: :class:`Bucket` or ``(tokens, seqs)`` pairs (default: every bucket of the set,
        which can take a while); captured largest first, in one shared memory pool.
        Returns ``{"seconds", "buckets", "memory_bytes"}`` (memory: CUDA bytes reserved by the
        captures; 0 on CPU).
        """
        if not self.static:
            raise ValueError("warmup() needs the static path: Session(..., graphs=True)")
        chosen = [b if isinstance(b, Bucket) else Bucket(*b) for b in (buckets or
                                                                         self.buckets.all())]
        chosen.sort(reverse=True)
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            # Capture empties the allocator's cache; empty it first so that memory freed before
            # (e.g. the fp32 copy of the weights) is not subtracted from the captures' own.
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        mem0 = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        with self._lock, torch.no_grad():
            self._after_previous_call()
            try:
                self._warmup_buckets(chosen, stages)
            finally:
                self._mark_call_done()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mem = (torch.cuda.memory_reserved(self.device) - mem0) if self.device.type == "cuda" else 0
        return {"seconds": time.perf_counter() - t0, "buckets": chosen,
                "memory_bytes": max(0, int(mem))}

    def _warmup_buckets(self, chosen: Sequence[Bucket], stages: Sequence[str]) -> None:
        """Run each chosen bucket once per stage on a dummy image-like plan (capturing on CUDA)."""
        for bucket in chosen:
            n = min(bucket.tokens, 16 * 16)
            side = max(1, n // 16)
            coords = np.stack(np.meshgrid(np.zeros(1), np.arange(n // side), np.arange(side),
                                          np.zeros(1), indexing="ij"), -1).reshape(-1, 4)
            plan = build_plan([coords.astype(np.int64)], self.config.chunk_frames)
            sp = StaticPlan(plan, 0, 1, bucket, self._static_buffers(bucket))
            for stage in stages:
                width = self.config.in_channels if stage == "encode" \
                    else self.config.latent_channels
                tower = self.model.encoder if stage == "encode" else self.model.decoder
                rows = torch.zeros(plan.num_tokens, width, dtype=self.dtype, device=self.device)
                sp.load(rows, f"x_{stage}", {stage: tower.pos_embedder})
                self._static_call(stage, sp)

    # ------------------------------------------------------------------------------------------
    # decode
    # ------------------------------------------------------------------------------------------

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """FSQ indices [n, num_codebooks] -> codes [n, latent] in the model dtype."""
        q = self.config.quantizer
        if q is None:
            raise ValueError("indices_to_codes: this config is continuous (no FSQ quantizer)")
        if not isinstance(indices, torch.Tensor):
            arr = np.asarray(indices)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"indices must be integers, got {arr.dtype}")
            if arr.dtype == np.uint64:  # torch has no min/max for uint64
                raise TypeError("indices must be a signed integer dtype (or uint8), got uint64")
            indices = torch.as_tensor(arr)
        _no_meta(indices, "indices")
        # bool is not an index, and torch cannot take min/max of uint16/32/64.
        if indices.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"indices must be a signed integer dtype (or uint8), got "
                            f"{str(indices.dtype).replace('torch.', '')}")
        if indices.dim() != 2 or indices.shape[1] != q.num_codebooks:
            raise ValueError(f"indices must be integers of shape [n, {q.num_codebooks}], got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        if indices.shape[0] == 0:  # no rows, no codes (the reshape below cannot infer -1)
            return torch.empty(0, self.config.latent_channels, dtype=self.dtype,
                               device=self.device)
        size = int(np.prod(q.levels))
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
            raise ValueError(f"indices must lie in [0, {size})")
        return ref.fsq_indices_to_codes(indices.to(self.device), q.levels, self.dtype)

    def decode(self, enc: EncodeResult | None = None, *, coords: Sequence | None = None,
               latents: Sequence | None = None, indices: Sequence | None = None,
               kinds: Sequence[str] | None = None) -> DecodeResult:
        """Decode an :class:`EncodeResult`, or per-sample ``coords`` with ``latents`` or ``indices``.

        coords[i]: [n_i, 4] int (t, x, y, z); latents[i]: [n_i, L] float; indices[i]: [n_i, C] int.
        kinds[i]: "image", "video" or "3d"; if omitted, a sample with z != 0 somewhere is "3d", one
        with a single temporal token and t == 0 is an "image", anything else a "video".
        """
        if enc is not None:
            if coords is not None or latents is not None or indices is not None:
                raise ValueError("decode: give either an EncodeResult or coords with latents/indices")
            if not isinstance(enc, EncodeResult):
                raise TypeError(f"decode: expected an EncodeResult, got {type(enc).__name__}")
            plan, infos = enc.plan, enc.info
            z = enc.latents.packed  # moved and cast inside the ordered region below
            kinds = [i.kind for i in infos]
            coords_host = enc.coords_host if enc.coords_host is not None else \
                [c.cpu().numpy() for c in enc.coords]
        else:
            z, plan, coords_host, kinds = self._decode_inputs(coords, latents, indices, kinds)
            infos = None
        with self._lock, torch.no_grad():
            self._after_previous_call()
            try:
                z = z.to(self.device, self.dtype)
                x = z if plan.order is None else z[plan.tensor("order", self.device)]
                if self.static:
                    y = self._static_run("decode", x, plan)[0]
                else:
                    y = self.model.decoder(x, plan, self.ops)
                if plan.inverse is not None:
                    y = y[plan.tensor("inverse", self.device)]
            finally:
                self._mark_call_done()
        off = plan.sample_offsets
        tokens = _PerSample(y, off)
        samples, gs_jobs = [], []
        for i, (kind, tok, c) in enumerate(zip(kinds, tokens, coords_host)):
            if kind == "3d":
                samples.append(tok[:, :VOXEL_CHANNELS])
                gs_jobs.append(i)
            else:
                samples.append(_tokens_to_pixels(tok, c, kind, i))
        gaussians: list = [None] * len(kinds)
        if self.gs is not None and gs_jobs:
            from .gs import to_gaussians
            feats = torch.cat([samples[i] for i in gs_jobs]).to(self.dtype)
            gc = torch.cat([torch.cat([torch.full((len(coords_host[i]), 1), b, dtype=torch.int32),
                                       torch.from_numpy(coords_host[i][:, 1:].astype(np.int32))],
                                      dim=1) for b, i in enumerate(gs_jobs)]).to(self.device)
            with torch.no_grad():
                raw = self.gs(feats, gc)
                objs = to_gaussians(raw, gc, self.gs_config, self.gs.offset_perturbation)
            for i, g in zip(gs_jobs, objs):
                gaussians[i] = g
        return DecodeResult(tokens=tokens, samples=samples, gaussians=gaussians, kinds=list(kinds),
                            info=infos)

    def _decode_inputs(self, coords, latents, indices, kinds):
        if coords is None or (latents is None) == (indices is None):
            raise ValueError("decode: give coords and exactly one of latents or indices")
        if not isinstance(coords, (list, tuple)) or len(coords) == 0:
            raise TypeError("decode: coords must be a non-empty list of [n_i, 4] arrays")
        values = latents if latents is not None else indices
        if not isinstance(values, (list, tuple)) or len(values) != len(coords):
            raise ValueError(f"decode: {len(coords)} coords but "
                             f"{len(values) if isinstance(values, (list, tuple)) else '?'} "
                             "latents/indices entries")
        if kinds is not None and (len(kinds) != len(coords) or any(k not in KINDS for k in kinds)):
            raise ValueError(f"decode: kinds must be one of {KINDS} per sample")
        host, zs, ks = [], [], []
        lat = self.config.latent_channels
        for i, (c, v) in enumerate(zip(coords, values)):
            _no_meta(c, f"sample {i}: coords")
            _no_meta(v, f"sample {i}: latents/indices")
            c = np.asarray(c.cpu() if isinstance(c, torch.Tensor) else c)
            if c.dtype.kind not in "iu":
                raise TypeError(f"sample {i}: coords must be integers, got {c.dtype}")
            c = c.astype(np.int64)
            given = c
            pixels = c.ndim == 2 and c.shape[1] == 4 and len(c) > 0 and \
                (kinds is None or kinds[i] != "3d") and not (c[:, 3] != 0).any()
            if pixels:
                # Stream time: a live stream's t passes 4096 (the coordinate hash's 12 bits)
                # after 16384 frames. The temporal splitter re-bases t per chunk (spec §2), so
                # shifting t down by whole chunks changes nothing the model computes: t is
                # re-based to the first chunk the sample touches. (Pixels are assembled from
                # the given grid's corner anyway.)
                base = int(c[:, 0].min()) // self.config.chunk_frames * self.config.chunk_frames
                if base > 0:
                    c = c.copy()
                    c[:, 0] -= base
            check_token_coords(c, i)
            # Before any work: the position table is sized by the coords' extent.
            check_decode_coords(c, i, kinds[i] if kinds is not None else None, self.limits)
            v = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
            if v.dim() >= 1 and v.shape[0] != len(c):  # before converting rows nobody decodes
                raise ValueError(f"sample {i}: {len(c)} coords but {v.shape[0]} latent rows")
            if latents is not None:
                if not v.dtype.is_floating_point or v.dim() != 2 or v.shape[1] != lat:
                    raise ValueError(f"sample {i}: latents must be float [n, {lat}], got "
                                     f"{v.dtype} {tuple(v.shape)}")
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"sample {i}: latents contain NaN or Inf")
                v = v.to(self.device, self.dtype)
            else:
                try:
                    v = self.indices_to_codes(v)
                except (ValueError, TypeError) as exc:  # same type, naming the sample
                    raise type(exc)(f"sample {i}: {exc}") from None
            if kinds is not None and kinds[i] == "image" and given[:, 0].max() != 0:
                # _tokens_to_pixels would return the first frame only: a silent truncation.
                raise ValueError(f"sample {i}: kinds[{i}] is 'image' but the coords span "
                                 f"{int(c[:, 0].max()) + 1} temporal tokens (a video?)")
            host.append(c.astype(np.int32))
            zs.append(v)
            if kinds is None:
                if (given[:, 3] != 0).any():
                    ks.append("3d")
                elif given[:, 0].max() == 0:
                    ks.append("image")
                else:
                    ks.append("video")
        plan = build_plan(host, self.config.chunk_frames)
        return torch.cat(zs), plan, host, list(kinds) if kinds is not None else ks

    # ------------------------------------------------------------------------------------------
    # non-blocking API
    # ------------------------------------------------------------------------------------------

    def _submit(self, fn, stream) -> Handle:
        if stream is not None and self.device.type != "cuda":
            raise ValueError("stream= needs a CUDA session")
        if stream is None and self.device.type == "cuda":
            # The caller's current stream, read in the caller's thread (the worker thread's own
            # current stream is the default stream).
            stream = torch.cuda.current_stream(self.device)

        def job():
            if self.device.type != "cuda":
                return fn(), None
            s = stream
            with torch.cuda.stream(s):
                out = fn()
                event = torch.cuda.Event()
                event.record(s)
            return out, event

        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atoken_rt")
            return Handle(self._executor.submit(job))

    def encode_async(self, batch: Sequence[Any], *, stream=None, **kw) -> Handle:
        """:meth:`encode` without blocking the caller: the request runs on a worker thread (in
        submission order) on ``stream`` (a ``torch.cuda.Stream``; default: the caller's current
        stream at the time of the call). Returns a :class:`Handle`; errors are raised by ``handle.wait()``. On CUDA, host
        inputs are staged through pinned memory and copied asynchronously. The samples' arrays
        are copied before this returns (after the limit checks), so the caller may reuse or
        overwrite its buffers at once."""
        if isinstance(batch, (list, tuple)):
            try:
                for i, x in enumerate(batch):  # before copying: an over-limit sample is not
                    check_sample(x, i, self.limits)
            except ValueError as exc:
                failed: Future = Future()
                failed.set_exception(exc)
                return Handle(failed)
            # The worker reads the inputs later: a caller that reuses its frame buffer (a
            # capture loop) must not change what is encoded. Host arrays are copied now.
            batch = [_snapshot(x) for x in batch]
        return self._submit(lambda: self.encode(batch, **kw), stream)

    def decode_async(self, enc=None, *, stream=None, **kw) -> Handle:
        """:meth:`decode` without blocking the caller (see :meth:`encode_async`)."""
        return self._submit(lambda: self.decode(enc, **kw), stream)

    def close(self) -> None:
        """Finish queued requests and stop the worker thread (the session stays usable)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        # Outside the lock: a request queued before close() may still be running; a submit
        # racing this call goes to a fresh executor instead of a shut-down one.
        if executor is not None:
            executor.shutdown(wait=True)

    def reconstruct(self, batch: Sequence[Any], **kw) -> DecodeResult:
        """``decode(encode(batch))``."""
        return self.decode(self.encode(batch, **kw))


def _check_model_size(cfg) -> None:
    """ValueError if a config (ATokenConfig or GSConfig) describes a model past the sanity bounds
    (MAX_MODEL_BLOCKS per stack, MAX_MODEL_PARAMETERS), from its numbers alone: building it
    (even on the meta device) would take minutes or allocate without end."""
    if isinstance(cfg, ATokenConfig):
        stacks = {"encoder": (cfg.encoder.num_blocks, cfg.encoder.width, cfg.encoder.mlp_width),
                  "decoder": (cfg.decoder.num_blocks, cfg.decoder.width, cfg.decoder.mlp_width)}
        io = cfg.in_channels * cfg.encoder.width + cfg.out_channels * cfg.decoder.width
    else:
        stacks = {"gs decoder": (cfg.num_blocks, cfg.model_channels, cfg.mlp_channels)}
        io = 0
    params = io
    for name, (blocks, width, mlp) in stacks.items():
        if blocks > MAX_MODEL_BLOCKS:
            raise ValueError(f"config {cfg.name}: {name} has {blocks} blocks, more than the "
                             f"sanity bound of {MAX_MODEL_BLOCKS}")
        params += blocks * (4 * width * width + 2 * width * mlp)  # qkv + out, fc1 + fc2
    if params > MAX_MODEL_PARAMETERS:
        raise ValueError(f"config {cfg.name}: ~{params:.3g} parameters, more than the sanity "
                         f"bound of {MAX_MODEL_PARAMETERS:.3g}")


def _snapshot(x):
    """A private copy of one sample's arrays (numpy / torch / DLPack or CUDA-array-interface
    objects, host or device; Voxels' coords and feats); anything else as is (encode reports it).
    Device tensors are cloned on the caller's current stream, so the copy is ordered after the
    caller's writes."""
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, Voxels):
        return Voxels(_snapshot(x.coords), _snapshot(x.feats))
    if hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__"):  # CuPy, JAX, ...
        try:
            return as_frames_tensor(x, "sample").clone()
        except (TypeError, ValueError):
            return x  # encode reports it, naming the sample
    return x


def _read_only(a: np.ndarray) -> np.ndarray:
    """A non-writable view (the array may be shared with a cache)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _tokens_to_pixels(tokens: torch.Tensor, coords: np.ndarray, kind: str, index: int
                      ) -> torch.Tensor:
    """Decoded tokens [n, 3072] at coords [n, 4] -> [T, H, W, 3] (video) or [H, W, 3] (image).

    Streamed chunks (t from 4k) and crops (x, y not from 0) are grids with an offset: a grid is
    full if it is full once each axis' smallest value is subtracted; the pixels are then those of
    the grid from that corner (frame 0 = the chunk's first frame)."""
    lo = coords[:, :3].min(axis=0)
    if lo.any():
        coords = coords - np.array([*lo, 0], dtype=coords.dtype)
    tt, th, tw = (int(coords[:, j].max()) + 1 for j in range(3))
    if tt * th * tw != len(coords) or (coords[:, 3] != 0).any():
        raise ValueError(f"sample {index}: the coords are not a full (t, x, y) grid of tokens "
                         f"({len(coords)} tokens for a {tt}x{th}x{tw} grid); cannot make pixels")
    raster = grid_coords(tt, th, tw).numpy()
    if not np.array_equal(coords, raster):
        flat = (coords[:, 0] * th + coords[:, 1]) * tw + coords[:, 2]
        order = torch.from_numpy(np.argsort(flat)).to(tokens.device)
        tokens = tokens[order]
    frames = unpatchify(tokens, (tt, th, tw))
    return frames[0] if kind == "image" else frames


__all__ = ["Session", "EncodeResult", "DecodeResult", "InputWarning", "RandomWeightsWarning"]
