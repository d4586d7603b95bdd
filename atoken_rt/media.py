"""File I/O for the command line: images, videos, 3D voxel files and token files.

Readers return what :meth:`atoken_rt.Session.encode` takes:

* images (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff .ppm``, Pillow): uint8 ``(H, W, 3)`` RGB;
* videos (``.mp4 .webm .mov .avi .mkv .m4v``, PyAV): every frame, uint8 ``(T, H, W, 3)`` RGB;
* 3D voxels (``.npz`` with arrays ``coords [M, 3]`` and ``feats [M, 768]``, or a ``.safetensors``
  file with those two tensors): :class:`atoken_rt.Voxels`;
* 3D assets, packed into :class:`atoken_rt.Voxels` by :mod:`atoken_rt.threed` (extra ``3d``): meshes
  (``.glb .gltf .obj .ply .stl .off``, rendered on the CPU, see ``threed.views``) and render folders
  (a folder holding ``transforms.json``: ONE sample, see ``threed.folder``).

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
import os
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch

from .inputs import PATCH_H, PATCH_W, VOXEL_CHANNELS, Voxels
from .limits import DEFAULT_LIMITS, Limits, tokens_of_shape

PathLike = Union[str, Path]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
VOXEL_EXTS = (".npz", ".safetensors")
SUPPORTED_EXTS = IMAGE_EXTS + VIDEO_EXTS + VOXEL_EXTS
# Meshes are rendered and packed by atoken_rt.threed; kept out of SUPPORTED_EXTS, which the
# tokenize data engine also uses for its folder walks. A .ply must have faces (not a GS PLY).
MESH_EXTS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
RENDER_FOLDER_FILE = "transforms.json"  # a folder holding it is one 3D sample (threed.folder)

TOKEN_METADATA_KEY = "atoken_rt"
TOKEN_FORMAT = "atoken_rt.tokens/1"
DEFAULT_FPS = 24.0


class MediaError(ValueError):
    """A file that cannot be read or written; the message starts with the file name."""


def is_render_folder(path: PathLike) -> bool:
    """A folder holding ``transforms.json``: multi-view renders of one 3D asset."""
    p = Path(path)
    return p.is_dir() and (p / RENDER_FOLDER_FILE).is_file()


def kind_of(path: PathLike) -> str:
    """``"image"``, ``"video"`` or ``"3d"`` from the extension, or ``"3d"`` for a render folder
    (MediaError if unsupported)."""
    if is_render_folder(path):
        return "3d"
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in VOXEL_EXTS or ext in MESH_EXTS:
        return "3d"
    if not os.path.lexists(path):  # a typo is "no such file", not an unsupported type
        raise MediaError(f"{path}: no such file or folder")
    raise MediaError(f"{path}: unsupported file type {ext or '(no extension)'!r}; supported: "
                     f"images {' '.join(IMAGE_EXTS)}, videos {' '.join(VIDEO_EXTS)}, "
                     f"3D voxels {' '.join(VOXEL_EXTS)}, meshes {' '.join(MESH_EXTS)}, "
                     f"render folders (with {RENDER_FOLDER_FILE})")


def expand_inputs(inputs: Iterable[PathLike], ignored_paths: list | None = None
                  ) -> tuple[list[Path], int]:
    """Files named by ``inputs``: files as given, folders recursively and globs, each sorted.

    Returns (paths, ignored): folders contribute only files with a supported extension (``ignored``
    counts the others); a render folder (holding ``transforms.json``), given or met inside a
    folder, is one path, whose files are not listed; a file named explicitly is kept whatever its
    extension, so that reading it
    reports the problem. A path that does not exist is kept too (reading it fails with a clear
    message); a glob that matches nothing raises MediaError. ``ignored_paths``: a list that
    receives the ignored files (so that a note can name them).
    """
    out: list[Path] = []
    ignored = 0

    def add_dir(d: Path) -> None:
        nonlocal ignored
        if is_render_folder(d):
            out.append(d)
            return
        renders: set[Path] = set()
        for p in sorted(d.rglob("*")):
            if any(part.startswith(".") for part in p.relative_to(d).parts) or \
                    any(r in p.parents for r in renders):
                continue
            if is_render_folder(p):
                renders.add(p)
                out.append(p)
            elif p.is_file():
                if p.suffix.lower() in SUPPORTED_EXTS + MESH_EXTS:
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
                elif mp.suffix.lower() in SUPPORTED_EXTS + MESH_EXTS:
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
    dims = shape[:2] if kind == "image" else shape[:3]  # (bench shapes omit the channels)
    return tokens_of_shape((*dims, 3))


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------

def _check_frame_size(path: Path, h: int, w: int) -> None:
    if h < PATCH_H or w < PATCH_W:
        raise MediaError(f"{path}: {h}x{w} pixels (H x W) is smaller than one "
                         f"{PATCH_H}x{PATCH_W} patch")


def _check_limits(path: Path | str, h: int, w: int, limits: Limits) -> None:
    """Before decoding (from the header): a small file can hold a huge image."""
    if h * w > limits.max_pixels:
        raise MediaError(f"{path}: {w}x{h} = {h * w} pixels exceed the limit of "
                         f"{limits.max_pixels} per frame (Limits.max_pixels)")


# EXIF orientation (tag 0x0112) -> the array operation that shows the image upright, as
# PIL.ImageOps.exif_transpose does (2: mirror, 3: 180, 4: flip, 5: transpose, 6: 90 clockwise,
# 7: transverse, 8: 90 counter-clockwise). Arrays are (H, W, C).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a corrupt EXIF block: ignore it, as viewers do
        return 1


def _is_16bit_colour(im) -> bool:
    """A 16-bit-per-channel colour image (PNG/TIFF RGB(A)/LA) that Pillow would cut to 8 bits."""
    if im.mode not in ("RGB", "RGBA", "LA"):
        return False
    tile = getattr(im, "tile", None) or []
    raw = tile[0][3] if tile and len(tile[0]) > 3 else None
    raw = raw[0] if isinstance(raw, tuple) else raw
    return isinstance(raw, str) and ";16" in raw


def _decode_16bit(path: Path, data: bytes | None, alpha: bool) -> np.ndarray:
    """16-bit colour through FFmpeg's PNG/TIFF decoders (Pillow has no 16-bit RGB mode):
    uint16 (H, W, 3 or 4)."""
    import av

    with av.open(str(path) if data is None else io.BytesIO(data)) as c:
        frame = next(c.decode(video=0))
        return frame.to_ndarray(format="rgba64le" if alpha else "rgb48le")


def _to_rgb(im, path: Path, data: bytes | None, notes: list[str], deep: bool = False
            ) -> np.ndarray:
    """One loaded Pillow frame -> (H, W, 3): uint8 for 8-bit sources, float32 in [-1, 1] for
    16-bit ones (x / 65535 * 2 - 1: full precision). Alpha is composited over white, greys and
    palettes expanded, other modes converted, each noted in ``notes`` when it changes pixels.
    deep: :func:`_is_16bit_colour` of the file, read before ``im.load()`` (which forgets it)."""
    mode = im.mode
    peak = 255.0
    if deep:
        a = _decode_16bit(path, data, mode in _ALPHA_MODES)
        if mode == "LA":  # FFmpeg expands grey+alpha to RGBA
            notes.append("16-bit grayscale expanded to 3 equal channels")
        peak = 65535.0
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise MediaError(f"{path}: {mode} pixels outside [0, 65535]: unsupported bit depth")
        a = np.repeat(a[..., None], 3, axis=2)
        notes.append("16-bit grayscale expanded to 3 equal channels")
        peak = 65535.0
    elif mode == "F":
        raise MediaError(f"{path}: 32-bit float images are not supported (save as 8- or 16-bit)")
    else:
        if mode == "P":
            mode = "RGBA" if "transparency" in im.info else "RGB"
            im = im.convert(mode)
        elif mode == "PA":
            mode, im = "RGBA", im.convert("RGBA")
        elif mode in ("L", "1"):
            notes.append(f"grayscale ({im.mode}) expanded to 3 equal channels")
            im, mode = im.convert("RGB"), "RGB"
        elif mode in ("LA", "La"):
            notes.append(f"grayscale ({im.mode}) expanded to 3 equal channels")
            im, mode = im.convert("RGBA"), "RGBA"
        elif mode == "RGBa":
            im, mode = im.convert("RGBA"), "RGBA"
        elif mode not in ("RGB", "RGBA"):
            notes.append(f"converted from {mode} to RGB")
            im, mode = im.convert("RGB"), "RGB"
        a = np.array(im)  # a writable copy
    if a.shape[-1] == 4:
        alpha = a[..., 3:].astype(np.float64) / peak
        transparent = float((alpha < 1).mean())
        if transparent:
            # Composite over white: rgb * alpha + peak * (1 - alpha), in float64, rounded.
            a = a[..., :3].astype(np.float64) * alpha + peak * (1.0 - alpha)
            notes.append(f"alpha composited over white ({transparent:.1%} of pixels not opaque)")
        else:
            a = a[..., :3]
            notes.append("alpha channel dropped (every pixel opaque)")
    if peak == 255.0:
        return np.rint(a).astype(np.uint8) if a.dtype != np.uint8 else np.asarray(a)
    notes.append("16-bit: read at full precision as float32 in [-1, 1] (x / 65535 * 2 - 1)")
    return (np.asarray(a, np.float64) / peak * 2.0 - 1.0).astype(np.float32)


def _open_image(path: Path, data: bytes | None, limits: Limits):
    """Pillow's lazy open, with the size checked from the header and Pillow's decompression-bomb
    guard turned into a MediaError naming the file (never a warning, never an allocation)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path if data is None else io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Pillow's own threshold (Image.MAX_IMAGE_PIXELS), checked from the header; its
            # warning range is refused too: a tiny file must not decode to hundreds of MB here.
            raise MediaError(f"{path}: refused as a decompression bomb ({type(exc).__name__}: "
                             f"{exc}); Pillow's limit is Image.MAX_IMAGE_PIXELS="
                             f"{Image.MAX_IMAGE_PIXELS}, ours Limits.max_pixels="
                             f"{limits.max_pixels}") from None
    w, h = im.size
    try:
        _check_limits(path, h, w, limits)
    except MediaError:
        im.close()
        raise
    return im


def _check_frames_tokens(path, frames: list, limits: Limits) -> None:
    """Raise as soon as the frames read so far make more tokens than one sample may have (a
    video or an animated image is read frame by frame: the check runs before the next frame)."""
    tokens = tokens_of_shape((len(frames), *frames[0].shape))
    if tokens > limits.max_tokens_per_sample:
        raise MediaError(f"{path}: {len(frames)} frames of {frames[0].shape[1]}x"
                         f"{frames[0].shape[0]} make {tokens} tokens, more than the limit of "
                         f"{limits.max_tokens_per_sample} (Limits.max_tokens_per_sample)")


def read_image(path: PathLike, data: bytes | None = None, *, limits: Limits | None = None,
               notes: list[str] | None = None) -> np.ndarray:
    """An image file -> ``(H, W, 3)`` RGB: uint8 for 8-bit files, float32 in [-1, 1] for 16-bit
    files (full precision; what Session.encode takes).

    Rules (each appended to ``notes`` when it changes what is read): EXIF orientation applied;
    alpha composited over white; greys and palettes expanded to 3 channels; multi-frame files
    give frame 1 (:func:`load` reads animated GIF/PNG/WebP as videos). The size is checked against
    ``limits`` from the header, before decoding.

    data: the file's bytes (e.g. a tar member), decoded instead of reading ``path``, which then
    only names the image in errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    notes = [] if notes is None else notes
    try:
        with _open_image(path, data, limits) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                notes.append(f"{frames} frames: frame 1 used, {frames - 1} dropped")
            deep = _is_16bit_colour(im)  # first: reading EXIF may load the pixels
            orient = _orientation(im)
            if not deep:  # (16-bit colour is decoded by FFmpeg instead)
                im.load()
            arr = _to_rgb(im, path, data, notes, deep)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, StopIteration) as exc:
        raise MediaError(f"{path}: cannot read the image ({exc})") from None
    if orient in _ORIENT:
        arr = _ORIENT[orient](arr)
        notes.append(f"EXIF orientation {orient} applied (stored {arr.shape[1]}x{arr.shape[0]} "
                     "pixels shown upright)" if orient in (5, 6, 7, 8) else
                     f"EXIF orientation {orient} applied")
    _check_frame_size(path, arr.shape[0], arr.shape[1])
    return np.ascontiguousarray(arr)


def _peek_image(path: Path) -> tuple[bool, str | None]:
    """(animated, mode) from the header: whether the file is an animated GIF, APNG or WebP (a
    moving picture: read as a video by :func:`load`), and its Pillow pixel mode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            animated = bool(getattr(im, "is_animated", False)) and im.format in ("GIF", "PNG",
                                                                                 "WEBP")
            return animated, im.mode
    except Exception:  # read_image / read_animation report unreadable files
        return False, None


def read_animation(path: PathLike, *, limits: Limits | None = None,
                   notes: list[str] | None = None) -> tuple[np.ndarray, float]:
    """An animated GIF/APNG/WebP -> (uint8 ``(T, H, W, 3)``, fps from the mean frame duration),
    every frame composited as a viewer shows it, read frame by frame within ``limits``."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    notes = [] if notes is None else notes
    frames, durations, frame_notes = [], [], []
    try:
        with _open_image(path, None, limits) as im:
            fmt = im.format
            for fr in ImageSequence.Iterator(im):
                if len(frames) >= limits.max_frames:
                    raise MediaError(f"{path}: more than {limits.max_frames} frames "
                                     "(Limits.max_frames)")
                durations.append(float(fr.info.get("duration", 0) or 0))
                # converted to 8-bit RGBA: _to_rgb returns uint8
                frames.append(_to_rgb(fr.convert("RGBA"), path, None, frame_notes))
                _check_frames_tokens(path, frames, limits)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(f"{path}: cannot read the animation ({exc})") from None
    mean = sum(durations) / len(durations) if durations else 0.0
    fps = 1000.0 / mean if mean > 0 else DEFAULT_FPS
    notes.append(f"animated {fmt}: {len(frames)} frames read as a video at {fps:.4g} fps")
    notes.extend(sorted(set(n for n in frame_notes if not n.startswith("alpha"))))
    if any(n.startswith("alpha composited") for n in frame_notes):
        notes.append("alpha composited over white (transparent pixels in some frames)")
    _check_frame_size(path, frames[0].shape[0], frames[0].shape[1])
    return np.stack(frames), fps


def read_video(path: PathLike, *, limits: Limits | None = None) -> tuple[np.ndarray, float]:
    """A video file -> (uint8 ``(T, H, W, 3)`` RGB, every frame of the first video stream; fps).

    Decoded frame by frame within ``limits``: the frame size is checked from the stream header
    (and the first frame), the frame count and the tokens as frames arrive, so a tiny file that
    would decode to tens of GB fails after at most one sample's worth of frames."""
    import av

    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            cc = stream.codec_context
            if cc.width and cc.height:
                _check_limits(path, cc.height, cc.width, limits)
            rate = stream.average_rate or stream.base_rate
            fps = float(rate) if rate else DEFAULT_FPS
            for frame in container.decode(stream):
                if not frames:
                    _check_limits(path, frame.height, frame.width, limits)
                if len(frames) >= limits.max_frames:
                    raise MediaError(f"{path}: more than {limits.max_frames} frames "
                                     "(Limits.max_frames; cut the video into clips)")
                frames.append(frame.to_ndarray(format="rgb24"))
                if frames[-1].shape != frames[0].shape:
                    raise MediaError(f"{path}: the frame size changes inside the video")
                _check_frames_tokens(path, frames, limits)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot read the video ({exc})") from None
    if not frames:
        raise MediaError(f"{path}: the video has no frames")
    _check_frame_size(path, frames[0].shape[0], frames[0].shape[1])
    return np.stack(frames), fps


def _voxel_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the arrays of a voxel file, from its headers only (nothing is read).

    A ``.npz`` is a zip: a few MB of deflated zeros can declare gigabytes, which ``np.load``
    would allocate and inflate before any check could see the voxel count."""
    if path.suffix.lower() != ".npz":
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import zipfile
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name in ("coords", "feats"):  # np.load would return the member's raw bytes
                raise ValueError(f"member {name!r} is not an .npy array")
            if not name.endswith(".npy"):
                continue
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
            shapes[name[:-len(".npy")]] = tuple(int(d) for d in shape)
    return shapes


def read_voxels(path: PathLike, *, limits: Limits | None = None) -> Voxels:
    """A ``.npz`` (arrays ``coords``, ``feats``) or ``.safetensors`` (tensors of those names) file
    -> :class:`Voxels`. The voxel count is checked against ``limits.max_voxels`` (default
    ``DEFAULT_LIMITS``) from the file's headers, before any array is read; values and ranges
    are checked when encoding."""
    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        shapes = _voxel_shapes(path)
    except Exception as exc:  # zipfile, numpy and safetensors raise many types for bad files
        raise MediaError(f"{path}: cannot read the voxel file ({type(exc).__name__}: {exc})") \
            from None
    for k, shape in shapes.items():
        rows = shape[0] if shape else 1
        if k in ("coords", "feats") and rows > limits.max_voxels:
            raise MediaError(f"{path}: array {k!r} holds {rows} voxels, more than the limit of "
                             f"{limits.max_voxels} (Limits.max_voxels)")
        if k in ("coords", "feats") and math.prod(shape) > rows * VOXEL_CHANNELS:
            raise MediaError(f"{path}: array {k!r} has shape {list(shape)}, not [M, 3] / "
                             f"[M, {VOXEL_CHANNELS}]")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                # only the two arrays used (their headers were checked above)
                data = {k: z[k] for k in z.files if k in ("coords", "feats")}
        else:
            from safetensors.numpy import load_file
            data = load_file(str(path))
    except Exception as exc:  # numpy and safetensors raise many types for corrupt files
        raise MediaError(f"{path}: cannot read the voxel file ({type(exc).__name__}: {exc})") \
            from None
    missing = [k for k in ("coords", "feats") if k not in data]
    if missing:
        raise MediaError(f"{path}: a voxel file needs arrays 'coords' [M, 3] and 'feats' "
                         f"[M, {VOXEL_CHANNELS}]; missing {missing} (found {sorted(shapes)})")
    coords, feats = data["coords"], data["feats"]
    if coords.ndim != 2 or coords.shape[1] != 3 or feats.ndim != 2 \
            or feats.shape[1] != VOXEL_CHANNELS or len(coords) != len(feats):
        raise MediaError(f"{path}: expected coords [M, 3] and feats [M, {VOXEL_CHANNELS}], got "
                         f"{list(coords.shape)} and {list(feats.shape)}")
    return Voxels(coords=coords, feats=feats)


def read_3d_asset(path: PathLike, *, views: int | None = None,
                  resolution: int | None = None, return_views: bool = False):
    """A mesh file or a render folder -> :class:`Voxels` (``atoken_rt.threed``, extra ``3d``).

    views / resolution: how many views of a mesh are rendered and their size (default
    ``threed.views.DEFAULT_VIEWS`` / ``DEFAULT_RESOLUTION``: the official 16 x 512^2).
    return_views: ``(voxels, (images, w2c, intrinsics))``, the views the voxels were packed from
    (uint8 [V, H, W, 3|4], float32 [V, 4, 4] OpenCV, [V, 3, 3] normalised)."""
    path = Path(path)
    try:
        if path.is_dir():
            from .threed.folder import load_render_folder
            got = load_render_folder(path, return_views=return_views)
            if return_views:
                got = got[0], (got[1].images, got[1].w2c, got[1].intrinsics)
            return got
        from .threed.views import load_mesh
        got = load_mesh(path, views=views, resolution=resolution, return_views=return_views)
        if return_views:
            images, _depths, w2c, k = got[1]
            got = got[0], (images, w2c, k)
        return got
    except ImportError as exc:
        raise MediaError(f"{path}: reading 3D assets needs the '3d' extra "
                         f"(pip install 'atoken_rt[3d]'): {exc}") from None
    except MediaError:
        raise
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{path}: {exc}") from None


@dataclass
class Loaded:
    """One input file, read: ``data`` is what Session.encode takes.

    mode: the file's own pixel mode (Pillow's: "RGB", "L", "RGBA", "P", "I;16", ...; videos:
    the stream's pixel format; 3D: None). notes: what reading changed (orientation, alpha,
    channels, bit depth, frames), one sentence each."""

    path: Path
    kind: str
    data: Any
    shape: tuple[int, ...]
    tokens: int
    fps: float | None = None
    mode: str | None = None
    notes: list = field(default_factory=list)
    # 3D from a mesh or render folder, when asked (load(..., keep_views=True)): the views the
    # voxels were packed from, (images, w2c, intrinsics) as read_3d_asset returns them.
    views: Any = None


def load(path: PathLike, limits: Limits | None = None, *, mesh_views: int | None = None,
         mesh_resolution: int | None = None, keep_views: bool = False) -> Loaded:
    """Read any supported file (dispatch on the extension; animated GIF/APNG/WebP are videos),
    within ``limits`` (default ``DEFAULT_LIMITS``). ``mesh_views`` / ``mesh_resolution``: the
    views a mesh is rendered from (see :func:`read_3d_asset`); ``keep_views``: keep them (and a
    render folder's) in ``Loaded.views``."""
    path = Path(path)
    kind = kind_of(path)
    fps = None
    mode = None
    notes: list[str] = []
    views = None
    if kind == "image":
        animated, mode = _peek_image(path)
        if animated:
            kind = "video"
            data, fps = read_animation(path, limits=limits, notes=notes)
        else:
            data = read_image(path, limits=limits, notes=notes)
        shape = tuple(data.shape)
    elif kind == "video":
        data, fps = read_video(path, limits=limits)
        shape = tuple(data.shape)
    elif path.is_dir() or path.suffix.lower() in MESH_EXTS:
        data = read_3d_asset(path, views=mesh_views, resolution=mesh_resolution,
                             return_views=keep_views)
        if keep_views:
            data, views = data
        shape = tuple(data.feats.shape)
    else:
        data = read_voxels(path, limits=limits)
        shape = tuple(data.feats.shape)
    return Loaded(path=path, kind=kind, data=data, shape=shape,
                  tokens=estimate_tokens(kind, shape), fps=fps, mode=mode, notes=notes,
                  views=views)


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
        except RecursionError:  # "[[[[...]]]]": the decoder recurses per nesting level
            raise MediaError(f"{path}: the '{TOKEN_METADATA_KEY}' metadata is nested too deeply "
                             "(not a token file)") from None
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
           "MESH_EXTS", "is_render_folder", "read_3d_asset",
           "load", "to_uint8", "write_png", "write_video", "write_voxels", "write_token_file",
           "read_token_file", "TokenSample", "TOKEN_METADATA_KEY", "TOKEN_FORMAT",
           "read_animation"]
