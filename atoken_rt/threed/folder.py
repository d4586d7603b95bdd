"""Render folders: the official multi-view layout -> views -> :class:`~atoken_rt.Voxels`.

A render folder (what TRELLIS's Blender script writes and the official ``pack_multiview_feat.py``
reads) holds:

* ``transforms.json`` in NeRF/Blender form: ``{"frames": [{"file_path": "000.png",
  "camera_angle_x": fov, "transform_matrix": c2w 4x4}, ...]}``. ``camera_angle_x`` may also sit at
  the top level (NeRF synthetic). ``transform_matrix`` is camera-to-world with OpenGL/Blender camera
  axes (x right, y up, looking down -z);
* per frame the image ``NNN.png`` (``file_path``; without an extension ``.png`` is added) and its
  z-depth ``NNN_depth.exr`` or ``NNN_depth.npy`` beside it (the EXR wins when both exist: the
  official converts the EXR into that ``.npy``).

Cameras follow the official ``convert_cam_poses`` (spec §1.3): negate columns 1 and 2 of c2w
(OpenGL -> OpenCV: x right, y down, z forward), invert in float32 to get ``w2c``; intrinsics are
normalised, ``fx = fy = 0.5/tan(fov/2)``, ``cx = cy = 0.5``. EXR depths follow the official
``convert_all_depths``: values > 1e6 (Blender's background) become -1, then the map is rounded to
float16 as the official stores it before packing (depths in (65504, 1e6] become +inf there and
are kept: they unproject to non-finite points that occupy nothing, as in the official). Only the
depth channel is decoded, after the channel count and data window are checked from the header.
Palette and 1-bit PNGs are resized with NEAREST for packing, which is what Pillow does with the
official's ``resize(LANCZOS)`` of such an image.

The folder is untrusted: the JSON's size, nesting and schema (numbers within float range), the
number of views, every image and depth size (read from file headers), and where every path
resolves (symlinks included: inside the folder) are checked before anything large is allocated.
Errors are :class:`~atoken_rt.media.MediaError` (a ValueError) starting with the offending path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from ..inputs import Voxels
from ..media import RENDER_FOLDER_FILE as TRANSFORMS
from ..media import MediaError, is_render_folder

PathLike = Union[str, Path]

MAX_JSON_BYTES = 16 << 20
# TRELLIS renders 150 views per object for its datasets and the official packing reads 16; 256
# leaves room while bounding the per-view buffers (768x16x16 float32 features: 0.8 MB a view).
MAX_VIEWS = 256
MAX_SIDE = 4096  # pixels, per image or depth side (the official renders are 512)
MAX_TOTAL_PIXELS = 1 << 27  # image plus depth pixels over all views, checked from headers
INVALID_DEPTH = 1e6  # official: EXR depth > 1e6 is background
MAX_PATH_CHARS = 1024  # a frame's file_path
MAX_EXR_CHANNELS = 64  # header check; only the depth channel is decoded
MAX_EXR_DECODE = 1 << 26  # values (channels x pixels) when every channel must be decoded
MAX_JSON_NUMBER = 1e300  # beyond float64's reach numbers are refused before any arithmetic


class RenderViews(NamedTuple):
    """The views of one render folder, ready for :func:`~atoken_rt.threed.pack_views`.

    images: uint8 ``[V, H, W, 3]``, or ``[V, H, W, 4]`` when the PNGs are RGBA. Alpha is kept
        because PIL's LANCZOS resize, which packing applies, premultiplies by it.
    depths: float32 ``[V, h, w]`` z-depth, -1 where nothing was hit.
    w2c: float32 ``[V, 4, 4]`` world-to-camera, OpenCV axes.
    intrinsics: float32 ``[V, 3, 3]`` normalised.
    """

    images: np.ndarray
    depths: np.ndarray
    w2c: np.ndarray
    intrinsics: np.ndarray


def c2w_opengl_to_w2c_opencv(c2w: Any) -> torch.Tensor:
    """``[..., 4, 4]`` Blender/NeRF camera-to-world -> float32 OpenCV world-to-camera."""
    m = torch.as_tensor(np.asarray(c2w), dtype=torch.float32).clone()
    m[..., :3, 1:3] *= -1
    return torch.inverse(m)


def intrinsics_from_fov(fov: Any) -> torch.Tensor:
    """Full field of view (radians) -> float32 normalised ``[..., 3, 3]`` intrinsics."""
    f = 0.5 / torch.tan(torch.as_tensor(fov, dtype=torch.float32) / 2)
    k = torch.zeros(f.shape + (3, 3))
    k[..., 0, 0] = f
    k[..., 1, 1] = f
    k[..., 0, 2] = 0.5
    k[..., 1, 2] = 0.5
    k[..., 2, 2] = 1
    return k


# ------------------------------------------------------------------------------------------------
# transforms.json
# ------------------------------------------------------------------------------------------------

def _number(x: Any) -> bool:
    """A finite JSON number. Huge integers (JSON allows any number of digits) are refused
    here rather than raising OverflowError later in float arithmetic."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    if isinstance(x, int):
        return -MAX_JSON_NUMBER < x < MAX_JSON_NUMBER
    return math.isfinite(x)


def _fov(x: Any, where: str) -> float:
    if not _number(x) or not 0 < x < math.pi:
        raise MediaError(f"{where}: camera_angle_x must be a number in (0, pi) radians, got {x!r}")
    return float(x)


def _inside(root: Path, path: Path, what: str) -> Path:
    """``path`` with symlinks resolved; MediaError unless it stays under ``root`` (resolved)."""
    try:
        real, base = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on older Pythons
        raise MediaError(f"{path}: cannot resolve {what} ({exc})") from None
    if real != base and base not in real.parents:
        raise MediaError(f"{path}: {what} resolves to {real}, outside the folder {base} "
                         f"(symlinks must stay inside the folder)")
    return path


def _frame_path(root: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise MediaError(f"{where}: file_path must be a non-empty string, got {value!r}")
    if len(value) > MAX_PATH_CHARS:
        raise MediaError(f"{where}: file_path is {len(value)} characters, more than the "
                         f"{MAX_PATH_CHARS} allowed")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise MediaError(f"{where}: file_path {value!r} must stay inside the folder")
    if not rel.suffix:
        rel = rel.with_suffix(".png")
    return _inside(root, root / rel, f"{where}: file_path {value!r}")


def _parse_transforms(root: Path, max_views: int) -> list[tuple[Path, float, list]]:
    tpath = _inside(root, root / TRANSFORMS, TRANSFORMS)
    size = tpath.stat().st_size
    if size > MAX_JSON_BYTES:
        raise MediaError(f"{tpath}: {size} bytes, more than the {MAX_JSON_BYTES} allowed")
    try:
        doc = json.loads(tpath.read_text(encoding="utf-8"))
    except RecursionError:
        raise MediaError(f"{tpath}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise MediaError(f"{tpath}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list):
        raise MediaError(f"{tpath}: expected an object with a 'frames' list")
    frames = doc["frames"]
    if not frames:
        raise MediaError(f"{tpath}: 'frames' is empty")
    if len(frames) > max_views:
        raise MediaError(f"{tpath}: {len(frames)} frames, more than max_views={max_views}")
    top_fov = doc.get("camera_angle_x")
    out = []
    for i, fr in enumerate(frames):
        where = f"{tpath} frame {i}"
        if not isinstance(fr, dict):
            raise MediaError(f"{where}: expected an object, got {type(fr).__name__}")
        fov = fr.get("camera_angle_x", top_fov)
        if fov is None:
            raise MediaError(f"{where}: no camera_angle_x (per frame or at the top level)")
        m = fr.get("transform_matrix")
        if not (isinstance(m, list) and len(m) == 4 and
                all(isinstance(r, list) and len(r) == 4 and all(_number(x) for x in r)
                    for r in m)):
            raise MediaError(f"{where}: transform_matrix must be a 4x4 list of finite numbers")
        with np.errstate(over="ignore"):
            m32 = np.asarray(m, np.float64).astype(np.float32)
        if not np.isfinite(m32).all():
            raise MediaError(f"{where}: transform_matrix has entries beyond float32's range")
        if any(abs(m[3][j] - (0, 0, 0, 1)[j]) > 1e-6 for j in range(4)):
            raise MediaError(f"{where}: transform_matrix's last row must be [0, 0, 0, 1], "
                             f"got {m[3]}")
        if abs(float(np.linalg.det(np.asarray(m, np.float64)[:3, :3]))) < 1e-9:
            raise MediaError(f"{where}: transform_matrix is singular")
        out.append((_frame_path(root, fr.get("file_path"), where), _fov(fov, where), m))
    return out


# ------------------------------------------------------------------------------------------------
# images and depths (headers first)
# ------------------------------------------------------------------------------------------------

def _check_side(path: Path, h: int, w: int, max_side: int) -> None:
    if not (0 < h <= max_side and 0 < w <= max_side):
        raise MediaError(f"{path}: {w}x{h} pixels; each side must be in [1, {max_side}]")


def _read_image(path: Path, max_side: int) -> tuple[np.ndarray, bool]:
    """(uint8 RGB or RGBA pixels, whether the file is palette or 1-bit).

    The flag matters for packing: the official resizes the PIL image it opened, and Pillow's
    ``resize`` uses NEAREST for modes P and 1 whatever filter is asked for; the paste onto the
    RGB canvas then converts the palette to RGB, dropping any transparency.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MediaError(f"{path}: no such image")
    try:
        with Image.open(path) as im:
            _check_side(path, im.height, im.width, max_side)  # header only: nothing decoded yet
            im.load()
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            mode = "RGBA" if has_alpha else "RGB"
            nearest = im.mode in ("P", "1")
            return np.array(im if im.mode == mode else im.convert(mode), dtype=np.uint8), nearest
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as exc:
        raise MediaError(f"{path}: cannot read the image ({exc})") from None
    except Exception as exc:  # noqa: BLE001 (Pillow raises other types for crafted files)
        raise MediaError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") \
            from None


def _exr_module():
    try:
        import OpenEXR
    except ImportError:
        raise MediaError("reading .exr depth maps needs the OpenEXR package: "
                         "pip install 'atoken_rt[3d]'") from None
    return OpenEXR


def _exr_header(path: Path, max_side: int) -> tuple[int, int, str, int]:
    """(height, width, depth channel, channel count) from the EXR header alone, bounds-checked.

    The channel count and the data window are checked before any pixels are decoded: a small
    compressed file may declare many large channels.
    """
    exr = _exr_module()
    try:
        head = exr.File(str(path), header_only=True).header()
        lo, hi = head["dataWindow"]
        x0, y0, x1, y1 = int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])  # Python ints: no wrap
        chans = head["channels"]
        if not isinstance(chans, (list, tuple)):
            chans = list(chans.values()) if isinstance(chans, dict) else list(chans)
        channels = {str(c.name): c for c in chans[:MAX_EXR_CHANNELS + 1]}
        n_channels = len(chans)
        kind = str(head.get("type", ""))
    except MediaError:
        raise
    except Exception as exc:  # OpenEXR raises RuntimeError / OSError / KeyError on bad files
        raise MediaError(f"{path}: cannot read the EXR header ({type(exc).__name__}: {exc})") \
            from None
    if "deep" in kind.lower():
        raise MediaError(f"{path}: deep EXR images are not depth maps")
    if n_channels > MAX_EXR_CHANNELS:
        raise MediaError(f"{path}: {n_channels} channels, more than the {MAX_EXR_CHANNELS} "
                         f"allowed in a depth EXR")
    _check_side(path, y1 - y0 + 1, x1 - x0 + 1, max_side)
    names = list(channels)
    if len(names) == 1:
        name = names[0]
    else:
        # the official reads with cv2 and keeps channel 0, which is B for an RGB(A) EXR
        name = next((n for n in ("B", "Z", "Y", "V", "R") if n in channels), None)
        if name is None:
            raise MediaError(f"{path}: no depth channel among {names} (expected one channel, "
                             f"or B/Z/Y/V/R)")
    ch = channels[name]
    if getattr(ch, "xSampling", 1) != 1 or getattr(ch, "ySampling", 1) != 1:
        raise MediaError(f"{path}: depth channel {name!r} is subsampled")
    return y1 - y0 + 1, x1 - x0 + 1, name, n_channels


_EXR_TYPES = {0: np.uint32, 1: np.float16, 2: np.float32}  # Imath.PixelType UINT, HALF, FLOAT


def _read_exr_depth(path: Path, max_side: int) -> np.ndarray:
    h, w, name, n_channels = _exr_header(path, max_side)
    exr = _exr_module()
    legacy = hasattr(exr, "InputFile")
    if not legacy and n_channels * h * w > MAX_EXR_DECODE:
        raise MediaError(f"{path}: {n_channels} channels of {w}x{h}: decoding them all (this "
                         f"OpenEXR has no single-channel reader) exceeds {MAX_EXR_DECODE} values")
    try:
        if legacy:
            # The legacy InputFile decodes only the channel asked for, in its stored type
            # (File(separate_channels=True) decodes every channel, and asking InputFile for a
            # conversion to FLOAT also costs far more memory than the channel itself).
            f = exr.InputFile(str(path))
            dtype = _EXR_TYPES[int(f.header()["channels"][name].type.v)]
            d = np.frombuffer(f.channel(name), dtype=dtype)
        else:  # OpenEXR without the deprecated API: every channel, within the budget above
            d = np.asarray(exr.File(str(path), separate_channels=True).channels()[name].pixels)
        if d.size != h * w:
            raise ValueError(f"channel {name!r} has {d.size} values, expected {h}x{w}")
        d = d.reshape(h, w).astype(np.float32)
    except Exception as exc:  # OpenEXR raises RuntimeError / OSError on bad files
        raise MediaError(f"{path}: cannot read the EXR depth ({type(exc).__name__}: {exc})") \
            from None
    d = np.where(d > INVALID_DEPTH, np.float32(-1), d)
    # The official stores the converted depth as float16 .npy before packing: depths in
    # (65504, 1e6] become +inf there, stay unmasked (0 > inf is false) and unproject to
    # non-finite points that occupy no voxel. They are kept as +inf here for the same result.
    with np.errstate(over="ignore"):
        return d.astype(np.float16).astype(np.float32)


def _read_npy_depth(path: Path, max_side: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
    except (OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot read the .npy depth ({exc})") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise MediaError(f"{path}: depth must be [H, W], got {list(arr.shape)}")
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise MediaError(f"{path}: depth must be float16/32/64, got {arr.dtype}")
    _check_side(path, arr.shape[0], arr.shape[1], max_side)
    return np.array(arr, dtype=np.float32)


def _header_size(path: Path, kind: str, max_side: int) -> tuple[int, int]:
    """(height, width) from the file header only, bounds-checked."""
    if kind == "image":
        from PIL import Image
        if not path.is_file():
            raise MediaError(f"{path}: no such image")
        try:
            with Image.open(path) as im:
                h, w = im.height, im.width
        except Exception as exc:  # Pillow raises many types for bad headers
            raise MediaError(f"{path}: cannot read the image ({exc})") from None
    elif path.suffix == ".exr":
        h, w, _, _ = _exr_header(path, max_side)
    else:
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as exc:
            raise MediaError(f"{path}: cannot read the .npy depth ({exc})") from None
        if len(shape) not in (2, 3):
            raise MediaError(f"{path}: depth must be [H, W], got {list(shape)}")
        h, w = shape[:2]
    _check_side(path, h, w, max_side)
    return h, w


def _depth_path(image: Path) -> Path:
    for ext in (".exr", ".npy"):
        p = image.with_name(image.stem + "_depth" + ext)
        if p.is_file():
            return p
    raise MediaError(f"{image}: no depth map beside it ({image.stem}_depth.exr or "
                     f"{image.stem}_depth.npy)")


# ------------------------------------------------------------------------------------------------
# public
# ------------------------------------------------------------------------------------------------

def read_render_folder(path: PathLike, *, max_views: int = MAX_VIEWS,
                       max_side: int = MAX_SIDE) -> RenderViews:
    """A render folder -> :class:`RenderViews` (images, depths, w2c, intrinsics), in frame order.

    Every view must have the same image size and mode and the same depth size. Raises
    MediaError naming the file and the problem.
    """
    return _read_views(path, max_views, max_side)[0]


def _read_views(path: PathLike, max_views: int = MAX_VIEWS,
                max_side: int = MAX_SIDE) -> tuple[RenderViews, list[bool]]:
    """:func:`read_render_folder`, plus per view whether the PNG was palette / 1-bit."""
    try:
        return _read_views_unchecked(Path(path), max_views, max_side)
    except OSError as exc:  # a path the OS refuses (too long, unreadable, ...) and the like
        where = f"{exc.filename}: " if exc.filename else ""
        raise MediaError(f"{path}: cannot read the render folder ({where}"
                         f"{exc.strerror or exc})") from None


def _read_views_unchecked(root: Path, max_views: int, max_side: int
                          ) -> tuple[RenderViews, list[bool]]:
    if not root.is_dir():
        raise MediaError(f"{root}: not a folder")
    if not (root / TRANSFORMS).is_file():
        raise MediaError(f"{root}: no {TRANSFORMS} (not a render folder)")
    frames = _parse_transforms(root, max_views)
    depth_paths = [_inside(root, _depth_path(img), "depth map") for img, _, _ in frames]
    # headers first: sizes, agreement between views and the total, before decoding anything
    total, first = 0, None
    for (img, _, _), dp in zip(frames, depth_paths):
        sizes = (_header_size(img, "image", max_side), _header_size(dp, "depth", max_side))
        first = first or sizes
        for p, got, want, what in ((img, sizes[0], first[0], "image"),
                                   (dp, sizes[1], first[1], "depth")):
            if got != want:
                raise MediaError(f"{p}: {what} is {got[1]}x{got[0]}, the first view's "
                                 f"{want[1]}x{want[0]}: all views must match")
        total += sizes[0][0] * sizes[0][1] + sizes[1][0] * sizes[1][1]
        if total > MAX_TOTAL_PIXELS:
            raise MediaError(f"{root}: more than {MAX_TOTAL_PIXELS} image and depth pixels "
                             f"in all views")
    images, depths, nearest = [], [], []
    for (img, _, _), dp in zip(frames, depth_paths):
        im, near = _read_image(img, max_side)
        nearest.append(near)
        d = _read_exr_depth(dp, max_side) if dp.suffix == ".exr" else _read_npy_depth(dp, max_side)
        if images and im.shape != images[0].shape:
            raise MediaError(f"{img}: image is {list(im.shape)}, the first view "
                             f"{list(images[0].shape)}: all views must match")
        if depths and d.shape != depths[0].shape:
            raise MediaError(f"{dp}: depth is {list(d.shape)}, the first view "
                             f"{list(depths[0].shape)}: all views must match")
        if np.isnan(d).any():
            raise MediaError(f"{dp}: depth contains NaN")
        # +inf is kept: the official's float16 store turns depths above 65504 into +inf, which
        # unproject to non-finite points that occupy nothing (pack_views accepts them).
        images.append(im)
        depths.append(d)
    c2w = np.asarray([m for _, _, m in frames], dtype=np.float32)
    w2c = c2w_opengl_to_w2c_opencv(c2w).numpy()
    k = intrinsics_from_fov(np.asarray([f for _, f, _ in frames], dtype=np.float32)).numpy()
    return RenderViews(np.stack(images), np.stack(depths), w2c, k), nearest


def load_render_folder(path: PathLike, *, return_views: bool = False, **pack_kwargs: Any):
    """A render folder -> :class:`~atoken_rt.Voxels` via :func:`~atoken_rt.threed.pack_views`
    (``return_views``: ``(voxels, RenderViews)``, so a caller scoring renders against the input
    views does not read the folder twice).

    ``pack_kwargs`` go to ``pack_views`` (resolution, radius, max_points, seed). Raises
    MediaError starting with the folder's path.
    """
    from PIL import Image

    from .pack import IMAGE_SIZE, pack_views

    views, nearest = _read_views(path)
    # Palette / 1-bit PNGs: the official's LANCZOS resize of such an image is Pillow's NEAREST
    # (see _read_image), which commutes with the palette lookup; resizing here makes the
    # packer's own resize a no-op (Pillow returns a copy at the same size).
    images = [Image.fromarray(np.ascontiguousarray(im[..., :3])).resize(
                  (IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST) if near else im
              for im, near in zip(views.images, nearest)]
    try:
        voxels = pack_views(images, views.depths, views.w2c, views.intrinsics, **pack_kwargs)
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{path}: {exc}") from None
    return (voxels, views) if return_views else voxels


__all__ = ["RenderViews", "read_render_folder", "load_render_folder", "is_render_folder",
           "c2w_opengl_to_w2c_opencv", "intrinsics_from_fov", "TRANSFORMS"]
