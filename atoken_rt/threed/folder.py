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
float16 as the official stores it before packing.

The folder is untrusted: the JSON's size and schema, the number of views, and every image and
depth size (read from file headers) are checked before anything large is allocated. Errors are
:class:`~atoken_rt.media.MediaError` (a ValueError) starting with the offending path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from ..inputs import Voxels
from ..media import MediaError

PathLike = Union[str, Path]

TRANSFORMS = "transforms.json"
MAX_JSON_BYTES = 16 << 20
MAX_VIEWS = 1024
MAX_SIDE = 4096  # pixels, per image or depth side (the official renders are 512)
MAX_TOTAL_PIXELS = 1 << 27  # image plus depth pixels over all views, checked from headers
INVALID_DEPTH = 1e6  # official: EXR depth > 1e6 is background


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


def is_render_folder(path: PathLike) -> bool:
    """A folder holding ``transforms.json``."""
    p = Path(path)
    return p.is_dir() and (p / TRANSFORMS).is_file()


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
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fov(x: Any, where: str) -> float:
    if not _number(x) or not 0 < x < math.pi:
        raise MediaError(f"{where}: camera_angle_x must be a number in (0, pi) radians, got {x!r}")
    return float(x)


def _frame_path(root: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise MediaError(f"{where}: file_path must be a non-empty string, got {value!r}")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise MediaError(f"{where}: file_path {value!r} must stay inside the folder")
    if not rel.suffix:
        rel = rel.with_suffix(".png")
    return root / rel


def _parse_transforms(root: Path, max_views: int) -> list[tuple[Path, float, list]]:
    tpath = root / TRANSFORMS
    size = tpath.stat().st_size
    if size > MAX_JSON_BYTES:
        raise MediaError(f"{tpath}: {size} bytes, more than the {MAX_JSON_BYTES} allowed")
    try:
        doc = json.loads(tpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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


def _read_image(path: Path, max_side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MediaError(f"{path}: no such image")
    try:
        with Image.open(path) as im:
            _check_side(path, im.height, im.width, max_side)  # header only: nothing decoded yet
            im.load()
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            mode = "RGBA" if has_alpha else "RGB"
            return np.array(im if im.mode == mode else im.convert(mode), dtype=np.uint8)
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as exc:
        raise MediaError(f"{path}: cannot read the image ({exc})") from None


def _exr_module():
    try:
        import OpenEXR
    except ImportError:
        raise MediaError("reading .exr depth maps needs the OpenEXR package: "
                         "pip install 'atoken_rt[3d]'") from None
    return OpenEXR


def _read_exr_depth(path: Path, max_side: int) -> np.ndarray:
    exr = _exr_module()
    try:
        head = exr.File(str(path), header_only=True).header()
        lo, hi = (np.asarray(a) for a in head["dataWindow"])
        _check_side(path, int(hi[1] - lo[1] + 1), int(hi[0] - lo[0] + 1), max_side)
        channels = exr.File(str(path), separate_channels=True).channels()
    except MediaError:
        raise
    except Exception as exc:  # OpenEXR raises RuntimeError / OSError / KeyError on bad files
        raise MediaError(f"{path}: cannot read the EXR depth ({type(exc).__name__}: {exc})") \
            from None
    names = list(channels)
    if len(names) == 1:
        name = names[0]
    else:
        # the official reads with cv2 and keeps channel 0, which is B for an RGB(A) EXR
        name = next((n for n in ("B", "Z", "Y", "V", "R") if n in channels), None)
        if name is None:
            raise MediaError(f"{path}: no depth channel among {names} (expected one channel, "
                             f"or B/Z/Y/V/R)")
    d = np.asarray(channels[name].pixels, dtype=np.float32)
    d = np.where(d > INVALID_DEPTH, np.float32(-1), d)
    # The official stores the converted depth as float16 .npy before packing.
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
        exr = _exr_module()
        try:
            lo, hi = (np.asarray(a) for a in
                      exr.File(str(path), header_only=True).header()["dataWindow"])
        except Exception as exc:
            raise MediaError(f"{path}: cannot read the EXR header ({type(exc).__name__}: "
                             f"{exc})") from None
        h, w = int(hi[1] - lo[1] + 1), int(hi[0] - lo[0] + 1)
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
    root = Path(path)
    if not root.is_dir():
        raise MediaError(f"{root}: not a folder")
    if not (root / TRANSFORMS).is_file():
        raise MediaError(f"{root}: no {TRANSFORMS} (not a render folder)")
    frames = _parse_transforms(root, max_views)
    depth_paths = [_depth_path(img) for img, _, _ in frames]
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
    images, depths = [], []
    for (img, _, _), dp in zip(frames, depth_paths):
        im = _read_image(img, max_side)
        d = _read_exr_depth(dp, max_side) if dp.suffix == ".exr" else _read_npy_depth(dp, max_side)
        if images and im.shape != images[0].shape:
            raise MediaError(f"{img}: image is {list(im.shape)}, the first view "
                             f"{list(images[0].shape)}: all views must match")
        if depths and d.shape != depths[0].shape:
            raise MediaError(f"{dp}: depth is {list(d.shape)}, the first view "
                             f"{list(depths[0].shape)}: all views must match")
        if not np.isfinite(d).all():
            raise MediaError(f"{dp}: depth contains NaN or Inf")
        images.append(im)
        depths.append(d)
    c2w = np.asarray([m for _, _, m in frames], dtype=np.float32)
    w2c = c2w_opengl_to_w2c_opencv(c2w).numpy()
    k = intrinsics_from_fov(np.asarray([f for _, f, _ in frames], dtype=np.float32)).numpy()
    return RenderViews(np.stack(images), np.stack(depths), w2c, k)


def load_render_folder(path: PathLike, **pack_kwargs: Any) -> Voxels:
    """A render folder -> :class:`~atoken_rt.Voxels` via :func:`~atoken_rt.threed.pack_views`.

    ``pack_kwargs`` go to ``pack_views`` (resolution, radius, max_points, seed). Raises
    MediaError starting with the folder's path.
    """
    from .pack import pack_views

    views = read_render_folder(path)
    try:
        return pack_views(list(views.images), views.depths, views.w2c, views.intrinsics,
                          **pack_kwargs)
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{path}: {exc}") from None


__all__ = ["RenderViews", "read_render_folder", "load_render_folder", "is_render_folder",
           "c2w_opengl_to_w2c_opencv", "intrinsics_from_fov", "TRANSFORMS"]
