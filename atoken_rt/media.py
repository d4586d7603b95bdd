"""File I/O for the command line: images, videos, 3D voxel files and token files.

Readers return what :meth:`atoken_rt.Session.encode` takes:

* images (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff .ppm``, Pillow): uint8 ``(H, W, 3)`` RGB;
* videos (``.mp4 .webm .mov .avi .mkv .m4v``, PyAV): every frame, uint8 ``(T, H, W, 3)`` RGB;
* 3D voxels (``.npz`` with arrays ``coords [M, 3]`` and ``feats [M, 768]``, or a ``.safetensors``
  file with those two tensors): :class:`atoken_rt.Voxels`.

Every failure raises :class:`MediaError` (a ``ValueError``) whose message starts with the file name.
Pillow and PyAV are imported on first use (``pip install "atoken_rt[cli]"``).

Token files (``atoken-rt encode``) are one safetensors file: per sample ``sample.{i}.coords``
(int32 [n, 4]), ``sample.{i}.indices`` (int32 [n, C], discrete configs) or ``sample.{i}.latents``
([n, L], continuous), ``sample.{i}.embedding`` ([width]); the header metadata holds one key,
``"atoken_rt"``, a JSON document (config, checkpoint hash, per-sample provenance).
"""

from __future__ import annotations

import glob
import io
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch

from .inputs import PATCH_H, PATCH_T, PATCH_W, VOXEL_CHANNELS, Voxels

PathLike = Union[str, Path]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
VOXEL_EXTS = (".npz", ".safetensors")
SUPPORTED_EXTS = IMAGE_EXTS + VIDEO_EXTS + VOXEL_EXTS

TOKEN_METADATA_KEY = "atoken_rt"
TOKEN_FORMAT = "atoken_rt.tokens/1"
DEFAULT_FPS = 24.0


class MediaError(ValueError):
    """A file that cannot be read or written; the message starts with the file name."""


def kind_of(path: PathLike) -> str:
    """``"image"``, ``"video"`` or ``"3d"`` from the extension (MediaError if unsupported)."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in VOXEL_EXTS:
        return "3d"
    raise MediaError(f"{path}: unsupported file type {ext or '(no extension)'!r}; supported: "
                     f"images {' '.join(IMAGE_EXTS)}, videos {' '.join(VIDEO_EXTS)}, "
                     f"3D voxels {' '.join(VOXEL_EXTS)}")


def expand_inputs(inputs: Iterable[PathLike], ignored_paths: list | None = None
                  ) -> tuple[list[Path], int]:
    """Files named by ``inputs``: files as given, folders recursively and globs, each sorted.

    Returns (paths, ignored): folders contribute only files with a supported extension (``ignored``
    counts the others); a file named explicitly is kept whatever its extension, so that reading it
    reports the problem. A path that does not exist is kept too (reading it fails with a clear
    message); a glob that matches nothing raises MediaError. ``ignored_paths``: a list that
    receives the ignored files (so that a note can name them).
    """
    out: list[Path] = []
    ignored = 0

    def add_dir(d: Path) -> None:
        nonlocal ignored
        for p in sorted(d.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts):
                if p.suffix.lower() in SUPPORTED_EXTS:
                    out.append(p)
                else:
                    ignored += 1
                    if ignored_paths is not None:
                        ignored_paths.append(p)

    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            add_dir(p)
        elif p.exists() or not any(c in s for c in "*?["):
            out.append(p)
        else:
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise MediaError(f"{s}: the pattern matches no file")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    add_dir(mp)
                elif mp.suffix.lower() in SUPPORTED_EXTS:
                    out.append(mp)
                else:
                    ignored += 1
                    if ignored_paths is not None:
                        ignored_paths.append(mp)
    return out, ignored


def estimate_tokens(kind: str, shape: tuple[int, ...]) -> int:
    """Tokens a sample becomes (spec §1.2), from its shape alone.

    images ``(H//16) * (W//16)``; videos ``max(T, 4)//4 * (H//16) * (W//16)`` (shorter than 4 frames
    pads to 4, longer truncates to a multiple of 4); 3D: one token per voxel.
    """
    if kind == "3d":
        return int(shape[0])
    if kind == "image":
        h, w = shape[0], shape[1]
        return (h // PATCH_H) * (w // PATCH_W)
    t, h, w = shape[0], shape[1], shape[2]
    return max(t, PATCH_T) // PATCH_T * (h // PATCH_H) * (w // PATCH_W)


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------

def _check_frame_size(path: Path, h: int, w: int) -> None:
    if h < PATCH_H or w < PATCH_W:
        raise MediaError(f"{path}: {h}x{w} pixels (H x W) is smaller than one "
                         f"{PATCH_H}x{PATCH_W} patch")


def read_image(path: PathLike, data: bytes | None = None) -> np.ndarray:
    """An image file -> uint8 ``(H, W, 3)`` RGB (alpha dropped, palettes and greys expanded).

    data: the file's bytes (e.g. a tar member), decoded instead of reading ``path``, which then
    only names the image in errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.load()
            arr = np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{path}: cannot read the image ({exc})") from None
    _check_frame_size(path, arr.shape[0], arr.shape[1])
    return np.ascontiguousarray(arr)


def read_video(path: PathLike) -> tuple[np.ndarray, float]:
    """A video file -> (uint8 ``(T, H, W, 3)`` RGB, every frame of the first video stream; fps)."""
    import av

    path = Path(path)
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate
            fps = float(rate) if rate else DEFAULT_FPS
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot read the video ({exc})") from None
    if not frames:
        raise MediaError(f"{path}: the video has no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise MediaError(f"{path}: the frame size changes inside the video")
    _check_frame_size(path, frames[0].shape[0], frames[0].shape[1])
    return np.stack(frames), fps


def read_voxels(path: PathLike) -> Voxels:
    """A ``.npz`` (arrays ``coords``, ``feats``) or ``.safetensors`` (tensors of those names) file
    -> :class:`Voxels`. Shapes and ranges are checked when encoding."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file
            data = load_file(str(path))
    except Exception as exc:  # numpy and safetensors raise many types for corrupt files
        raise MediaError(f"{path}: cannot read the voxel file ({type(exc).__name__}: {exc})") \
            from None
    missing = [k for k in ("coords", "feats") if k not in data]
    if missing:
        raise MediaError(f"{path}: a voxel file needs arrays 'coords' [M, 3] and 'feats' "
                         f"[M, {VOXEL_CHANNELS}]; missing {missing} (found {sorted(data)})")
    coords, feats = data["coords"], data["feats"]
    if coords.ndim != 2 or coords.shape[1] != 3 or feats.ndim != 2 \
            or feats.shape[1] != VOXEL_CHANNELS or len(coords) != len(feats):
        raise MediaError(f"{path}: expected coords [M, 3] and feats [M, {VOXEL_CHANNELS}], got "
                         f"{list(coords.shape)} and {list(feats.shape)}")
    return Voxels(coords=coords, feats=feats)


@dataclass
class Loaded:
    """One input file, read: ``data`` is what Session.encode takes."""

    path: Path
    kind: str
    data: Any
    shape: tuple[int, ...]
    tokens: int
    fps: float | None = None


def load(path: PathLike) -> Loaded:
    """Read any supported file (dispatch on the extension)."""
    path = Path(path)
    kind = kind_of(path)
    fps = None
    if kind == "image":
        data = read_image(path)
        shape = tuple(data.shape)
    elif kind == "video":
        data, fps = read_video(path)
        shape = tuple(data.shape)
    else:
        data = read_voxels(path)
        shape = tuple(data.feats.shape)
    return Loaded(path=path, kind=kind, data=data, shape=shape,
                  tokens=estimate_tokens(kind, shape), fps=fps)


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------

def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pixels in [-1, 1] -> uint8: ``round(clamp((x + 1) / 2 * 255, 0, 255))`` (half to even)."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    return ((t + 1) / 2 * 255).clamp_(0, 255).round_().to(torch.uint8).numpy()


def write_png(path: PathLike, image: np.ndarray) -> Path:
    """uint8 ``(H, W, 3)`` -> PNG."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)
    return path


def _video_codec() -> str:
    """h264 when an encoder for it is built into PyAV's FFmpeg, else mpeg4."""
    import av

    try:
        av.codec.Codec("h264", "w")
        return "h264"
    except Exception:  # pragma: no cover - depends on the FFmpeg build
        return "mpeg4"


def write_video(path: PathLike, frames: np.ndarray, fps: float | None = None) -> Path:
    """uint8 ``(T, H, W, 3)`` -> MP4 (h264, or mpeg4 without an h264 encoder; yuv420p).

    H and W must be even (sizes from the model are multiples of 16).
    """
    import av

    path = Path(path)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise MediaError(f"{path}: yuv420p video needs even sizes, got {h}x{w} (H x W)")
    rate = Fraction(fps if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS)
    rate = rate.limit_denominator(1001)
    codec = _video_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "h264":
            stream.options = {"crf": "17"}
        else:  # pragma: no cover - mpeg4 fallback: ~0.5 bit per pixel
            stream.bit_rate = max(int(w * h * float(rate) * 0.5), 200_000)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_voxels(path: PathLike, coords: np.ndarray, feats_model: torch.Tensor) -> Path:
    """Decoded 3D -> ``.npz``: ``coords`` int32 [M, 3], ``feats`` float32 [M, 768] in [0, 1] (the
    input convention, ``clamp((x + 1) / 2)``, so the file can be encoded again) and
    ``feats_model`` float32 [M, 768], the raw decoded channels in the model's [-1, 1] space."""
    raw = torch.as_tensor(feats_model).detach().to("cpu", torch.float32)
    np.savez(Path(path), coords=np.asarray(coords, dtype=np.int32),
             feats=((raw + 1) / 2).clamp_(0, 1).numpy(), feats_model=raw.numpy())
    return Path(path)


# ------------------------------------------------------------------------------------------------
# token files
# ------------------------------------------------------------------------------------------------

def write_token_file(path: PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Tensors + a JSON metadata document -> one safetensors file (metadata key "atoken_rt")."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": TOKEN_FORMAT, **meta}
    # clone: per-sample views share one packed storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path),
              metadata={TOKEN_METADATA_KEY: json.dumps(meta)})
    from .checkpoint import respect_umask
    respect_umask(path)  # safetensors writes 0600 files; other outputs follow the umask
    return path


@dataclass
class TokenSample:
    """One sample of a token file: coords [n, 4] int32, indices or latents, embedding, metadata."""

    coords: torch.Tensor
    indices: torch.Tensor | None
    latents: torch.Tensor | None
    embedding: torch.Tensor | None
    meta: dict


def read_token_file(path: PathLike) -> tuple[dict | None, list[TokenSample]]:
    """A token file -> (metadata document or None, samples in index order)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MediaError(f"{path}: not a readable safetensors token file ({exc})") from None
    meta = None
    if TOKEN_METADATA_KEY in header:
        try:
            meta = json.loads(header[TOKEN_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise MediaError(f"{path}: the '{TOKEN_METADATA_KEY}' metadata is not JSON ({exc})") \
                from None
    ids = set()
    for k in tensors:
        parts = k.split(".")
        if len(parts) != 3 or parts[0] != "sample" or not parts[1].isdigit() \
                or parts[2] not in ("coords", "indices", "latents", "embedding"):
            raise MediaError(f"{path}: unexpected tensor {k!r} (expected sample.<i>.coords / "
                             ".indices / .latents / .embedding)")
        ids.add(int(parts[1]))
    if ids != set(range(len(ids))):
        raise MediaError(f"{path}: sample numbers are not 0..{len(ids) - 1}")
    # The metadata is untrusted (an edited file): check its shape before indexing into it.
    from .tokenfile import validate_metadata
    validate_metadata(path, meta, len(ids))
    per_meta = (meta or {}).get("samples", [])
    samples = []
    for i in range(len(ids)):
        c = tensors.get(f"sample.{i}.coords")
        ind, lat = tensors.get(f"sample.{i}.indices"), tensors.get(f"sample.{i}.latents")
        if c is None or (ind is None) == (lat is None):
            raise MediaError(f"{path}: sample {i} needs coords and exactly one of indices/latents")
        samples.append(TokenSample(coords=c, indices=ind, latents=lat,
                                   embedding=tensors.get(f"sample.{i}.embedding"),
                                   meta=per_meta[i] if i < len(per_meta) else {}))
    return meta, samples


__all__ = ["MediaError", "IMAGE_EXTS", "VIDEO_EXTS", "VOXEL_EXTS", "SUPPORTED_EXTS", "kind_of",
           "expand_inputs", "estimate_tokens", "read_image", "read_video", "read_voxels", "Loaded",
           "load", "to_uint8", "write_png", "write_video", "write_voxels", "write_token_file",
           "read_token_file", "TokenSample", "TOKEN_METADATA_KEY", "TOKEN_FORMAT"]
