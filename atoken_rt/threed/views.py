"""Mesh file -> multi-view renders on a CPU, without Blender: the input of ``pack_views``.

The official 3D inputs are Blender (Cycles) renders made by TRELLIS's ``dataset_toolkits``. This
module reproduces their **cameras and framing** and replaces the renderer by ray casting
(trimesh + embreex), returning **unlit albedo** colours, not shaded Cycles images. The model was
trained on the lit renders, so expect tokens that differ from what Blender renders would give.

What is reproduced from TRELLIS (``dataset_toolkits/render.py``, ``utils.py`` and
``blender_script/render.py``, read for the facts):

* object normalisation: the axis-aligned bounding box of all mesh vertices is scaled by
  ``1 / (its largest side)`` and centred at the origin, so the object fits ``[-0.5, 0.5]^3``;
* Blender's importers turn Y-up glTF and OBJ into Z-up: ``(x, y, z) -> (x, -z, y)``. The same
  rotation is applied to ``.glb/.gltf/.obj`` here (``y_up=None`` chooses by extension; PLY, STL
  and OFF are taken as Z-up, as Blender's PLY/STL importers do);
* cameras: view ``i`` of ``n`` takes the 2-D Hammersley point ``(i/n, radical_inverse_2(i))``,
  shifts it by a random offset ``(o1/n, o2)`` and remaps ``u -> 2u`` if ``u < 0.25`` else
  ``2u/3 + 1/3``; then ``pitch = arccos(1 - 2u) - pi/2``, ``yaw = 2 pi v``. The camera sits at
  ``radius (cos yaw cos pitch, sin yaw cos pitch, sin pitch)`` (radius 2), looks at the origin
  with world +Z up (Blender's TRACK_TO, -Z tracking, Y up) and has a 40 degree field of view on a
  square sensor. TRELLIS draws the offset with unseeded ``np.random.rand()``; here it comes from
  ``np.random.default_rng(seed)``;
* depth is the z-distance along the camera axis (Blender's Z pass), -1 where no surface is hit.

Not reproduced: lighting and shading, Cycles' many antialiased samples per pixel (here one ray
through each pixel centre), and transparency.

Colours: the mesh's base colour at the hit, with no lighting and no colour-space conversion:
a texture (``baseColorTexture`` times ``baseColorFactor`` for glTF, ``map_Kd`` for OBJ) sampled
bilinearly (repeat wrap) at the hit's barycentric UV, else vertex colours interpolated
barycentrically, else face colours, else the material's constant colour, else Blender's default
grey. Images are RGBA like TRELLIS's (``film_transparent``) PNGs: alpha 255 where a surface is
hit, 0 (and black) elsewhere; alpha matters because packing's LANCZOS resize premultiplies by it.
The material's own alpha is ignored.

Ray casting uses embreex (Intel Embree) when installed; without it trimesh's pure-numpy ray
caster is used, which is orders of magnitude slower (a warning says so).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np

from ..media import MediaError

PathLike = Union[str, Path]

MESH_EXTS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
Y_UP_EXTS = (".glb", ".gltf", ".obj")  # Blender converts these from Y-up to Z-up on import
DEFAULT_RADIUS = 2.0
DEFAULT_FOV = math.radians(40)
DEFAULT_VIEWS = 16  # what load_mesh (the command line) renders: the official 16 views at 512^2
DEFAULT_RESOLUTION = 512
# Blender's default surface colour is 0.8 linear, 231 once written as an 8-bit sRGB PNG.
DEFAULT_ALBEDO = np.array([231, 231, 231], np.uint8)


class Cameras(NamedTuple):
    """Cameras on a sphere around the origin.

    w2c: float32 ``[V, 4, 4]`` world-to-camera, OpenCV axes (what ``pack_views`` takes).
    intrinsics: float32 ``[V, 3, 3]`` normalised (``fx = fy = 0.5/tan(fov/2)``, ``c = 0.5``).
    c2w: float64 ``[V, 4, 4]`` camera-to-world, OpenGL/Blender axes (``transforms.json``'s
        ``transform_matrix``).
    yaw, pitch: float64 ``[V]`` radians.
    """

    w2c: np.ndarray
    intrinsics: np.ndarray
    c2w: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray


def _radical_inverse_2(i: int) -> float:
    """Van der Corput: the base-2 digits of i mirrored after the binary point."""
    out, scale = 0.0, 0.5
    while i:
        out += (i & 1) * scale
        i >>= 1
        scale *= 0.5
    return out


def hammersley_yaw_pitch(n: int, offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """TRELLIS's spherical Hammersley sequence (see the module docstring): yaw, pitch ``[n]``."""
    yaw, pitch = np.empty(n), np.empty(n)
    for i in range(n):
        u = i / n + offset[0] / n
        v = _radical_inverse_2(i) + offset[1]
        u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
        pitch[i] = math.acos(1 - 2 * u) - math.pi / 2
        yaw[i] = 2 * math.pi * v
    return yaw, pitch


def look_at_c2w(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenGL/Blender camera-to-world ``[4, 4]`` at ``eye`` looking at ``target`` (-Z forward,
    +Y as close to ``up`` as possible, as Blender's TRACK_TO constraint)."""
    eye = np.asarray(eye, np.float64)
    back = eye - np.asarray(target, np.float64)
    back /= np.linalg.norm(back)
    y = np.asarray(up, np.float64) - np.dot(up, back) * back
    if np.linalg.norm(y) < 1e-9:  # looking straight along `up`: any perpendicular will do
        y = np.array([0.0, 1.0, 0.0]) - back[1] * back
    y /= np.linalg.norm(y)
    x = np.cross(y, back)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, back, eye
    return c2w


def sphere_cameras(views: int = 16, radius: float = DEFAULT_RADIUS, fov: float = DEFAULT_FOV,
                   seed: int = 0) -> Cameras:
    """``views`` cameras placed as TRELLIS's renderer does (Hammersley sphere, random offset
    seeded by ``seed``), at ``radius`` from the origin, looking at it, full field of view ``fov``
    radians. Returns :class:`Cameras`."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if not radius > 0 or not 0 < fov < math.pi:
        raise ValueError(f"need radius > 0 and 0 < fov < pi, got {radius}, {fov}")
    offset = tuple(np.random.default_rng(seed).random(2))
    yaw, pitch = hammersley_yaw_pitch(views, offset)
    eyes = radius * np.stack([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch),
                              np.sin(pitch)], axis=1)
    c2w = np.stack([look_at_c2w(e) for e in eyes])
    cv = c2w.copy()
    cv[:, :3, 1:3] *= -1  # OpenGL -> OpenCV camera axes
    w2c = np.linalg.inv(cv).astype(np.float32)
    f = 0.5 / math.tan(fov / 2)
    k = np.array([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], np.float32)
    return Cameras(w2c, np.repeat(k[None], views, 0), c2w, yaw, pitch)


# ------------------------------------------------------------------------------------------------
# mesh loading and colours
# ------------------------------------------------------------------------------------------------

class _Part(NamedTuple):
    vertices: np.ndarray  # [n, 3] float64
    faces: np.ndarray  # [f, 3] int64
    visual: Any


def _load_parts(path: Path) -> list[_Part]:
    import trimesh

    try:
        # process=False: no vertex merging, which would average colours across faces (Blender
        # keeps colours and UVs per face corner even where it merges positions)
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as exc:  # trimesh raises many types for bad files
        raise MediaError(f"{path}: cannot read the mesh ({type(exc).__name__}: {exc})") from None
    parts = []
    for g in scene.dump():  # world transforms applied
        faces = getattr(g, "faces", None)
        if faces is not None and len(faces):
            parts.append(_Part(np.asarray(g.vertices, np.float64),
                               np.asarray(g.faces, np.int64), g.visual))
    if not parts:
        hint = " (a Gaussian-splat or point-cloud PLY has no faces)" \
            if path.suffix.lower() == ".ply" else ""
        raise MediaError(f"{path}: no triangle faces in the file{hint}")
    return parts


def _texture_image(material: Any):
    for name in ("baseColorTexture", "image"):
        im = getattr(material, name, None)
        if im is not None:
            return im
    return None


def _material_colour(material: Any) -> np.ndarray | None:
    for name in ("baseColorFactor", "main_color", "diffuse"):
        c = getattr(material, name, None)
        if c is not None:
            raw = np.asarray(c).reshape(-1)
            if raw.size >= 3 and raw.dtype.kind in "uif":
                # colours may be uint8 or floats in [0, 1] (glTF factors)
                scale = 255.0 if raw.dtype.kind == "f" and raw.max() <= 1.0 else 1.0
                return raw[:3].astype(np.float64) * scale
    return None


def _sample_texture(image, uv: np.ndarray) -> np.ndarray:
    """Bilinear, repeat wrap, UV origin bottom-left (trimesh flips glTF UVs to that). -> [n, 3]"""
    tex = np.asarray(image.convert("RGB"), np.float64)
    h, w = tex.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    x1, y1 = (x0 + 1) % w, (y0 + 1) % h
    x0, y0 = x0 % w, y0 % h
    return (tex[y0, x0] * (1 - fx) * (1 - fy) + tex[y0, x1] * fx * (1 - fy) +
            tex[y1, x0] * (1 - fx) * fy + tex[y1, x1] * fx * fy)


def _part_colours(part: _Part, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Albedo (float in [0, 255], [n, 3]) at hits on ``face`` with barycentric ``bary``."""
    vis = part.visual
    kind = getattr(vis, "kind", None)
    if kind == "texture":
        material = getattr(vis, "material", None)
        image = _texture_image(material)
        uv = getattr(vis, "uv", None)
        const = _material_colour(material)
        if image is not None and uv is not None and len(uv) == len(part.vertices):
            uv = np.asarray(uv, np.float64)
            uv_hit = np.einsum("nk,nkc->nc", bary, uv[part.faces[face]])
            col = _sample_texture(image, uv_hit)
            if getattr(material, "baseColorFactor", None) is not None and const is not None:
                col = col * const / 255  # glTF: base colour = factor x texture
            return col
        if const is not None:
            return np.broadcast_to(const, (len(face), 3))
    elif kind == "vertex":
        vc = np.asarray(vis.vertex_colors, np.float64)[:, :3]
        return np.einsum("nk,nkc->nc", bary, vc[part.faces[face]])
    elif kind == "face":
        return np.asarray(vis.face_colors, np.float64)[face, :3]
    return np.broadcast_to(DEFAULT_ALBEDO.astype(np.float64), (len(face), 3))


def _intersector(vertices: np.ndarray, faces: np.ndarray):
    """(trimesh ray intersector, "embree" | "numpy"): embreex if installed, else trimesh's
    pure-numpy caster (needs rtree), else an ImportError naming both."""
    import trimesh

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    try:
        from trimesh.ray.ray_pyembree import RayMeshIntersector
        return RayMeshIntersector(mesh), "embree"
    except ImportError:
        pass
    try:
        import rtree  # noqa: F401  (trimesh's numpy caster builds an rtree of the triangles)
    except ImportError:
        raise ImportError("ray casting needs embreex (pip install 'atoken_rt[3d]'), or rtree for "
                          "trimesh's slow pure-numpy fallback") from None
    warnings.warn("embreex is not installed: using trimesh's pure-numpy ray caster, which is "
                  "orders of magnitude slower at render resolutions (pip install 'atoken_rt[3d]')",
                  RuntimeWarning, stacklevel=3)
    from trimesh.ray.ray_triangle import RayMeshIntersector
    return RayMeshIntersector(mesh), "numpy"


# ------------------------------------------------------------------------------------------------
# public
# ------------------------------------------------------------------------------------------------

def normalise(vertices: np.ndarray) -> tuple[float, np.ndarray]:
    """(scale, offset) so that ``v * scale + offset`` has its bounding box centred at the origin
    with largest side 1 (TRELLIS/Blender ``normalize_scene``)."""
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    if not extent > 0 or not math.isfinite(extent):
        raise ValueError(f"degenerate mesh: bounding box {lo.tolist()} .. {hi.tolist()}")
    scale = 1.0 / extent
    return scale, -(lo + hi) / 2 * scale


def render_views(mesh_path: PathLike, views: int = 16, resolution: int = 512, seed: int = 0, *,
                 radius: float = DEFAULT_RADIUS, fov: float = DEFAULT_FOV,
                 y_up: bool | None = None):
    """Render a mesh file into ``views`` albedo images and z-depth maps (see the module docstring).

    mesh_path: ``.glb .gltf .obj .ply .stl .off`` (anything trimesh reads with faces).
    y_up: rotate Y-up to Z-up as Blender's importer does; None: by extension (glb/gltf/obj).
    Returns ``(images uint8 RGBA [V, R, R, 4], depths float32 [V, R, R] (-1 = background),
    w2c float32 [V, 4, 4] OpenCV, intrinsics float32 [V, 3, 3] normalised)``, the arguments of
    :func:`~atoken_rt.threed.pack_views`.
    """
    path = Path(mesh_path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    if not 1 <= resolution <= 4096:
        raise ValueError(f"resolution must be in [1, 4096], got {resolution}")
    parts = _load_parts(path)
    if y_up is None:
        y_up = path.suffix.lower() in Y_UP_EXTS
    verts = np.concatenate([p.vertices for p in parts])
    if not np.isfinite(verts).all():
        raise MediaError(f"{path}: vertices contain NaN or Inf")
    if y_up:
        verts = np.stack([verts[:, 0], -verts[:, 2], verts[:, 1]], axis=1)
    try:
        scale, offset = normalise(verts)
    except ValueError as exc:
        raise MediaError(f"{path}: {exc}") from None
    verts = verts * scale + offset
    face_offsets = np.cumsum([0] + [len(p.faces) for p in parts])
    vert_offsets = np.cumsum([0] + [len(p.vertices) for p in parts])
    faces = np.concatenate([p.faces + vo for p, vo in zip(parts, vert_offsets[:-1])])
    caster, _ = _intersector(verts, faces)
    triangles = verts[faces]  # [F, 3, 3]

    cams = sphere_cameras(views, radius, fov, seed)
    k = cams.intrinsics[0].astype(np.float64)
    pix = (np.arange(resolution) + 0.5) / resolution
    cols, rows = np.meshgrid(pix, pix, indexing="xy")
    d_cam = np.stack([(cols - k[0, 2]) / k[0, 0], (rows - k[1, 2]) / k[1, 1],
                      np.ones_like(cols)], -1).reshape(-1, 3)  # OpenCV camera rays, z = 1
    images = np.zeros((views, resolution, resolution, 4), np.uint8)
    depths = np.full((views, resolution, resolution), -1.0, np.float32)
    from trimesh.triangles import points_to_barycentric

    for v in range(views):
        c2w_cv = np.linalg.inv(cams.w2c[v].astype(np.float64))
        eye, rot = c2w_cv[:3, 3], c2w_cv[:3, :3]
        dirs = d_cam @ rot.T
        origins = np.broadcast_to(eye, dirs.shape)
        loc, ray, tri = caster.intersects_location(origins, dirs, multiple_hits=False)
        if len(ray) == 0:
            continue
        z = (loc - eye) @ rot[:, 2]  # distance along the camera axis, not along the ray
        depths[v].reshape(-1)[ray] = z
        bary = points_to_barycentric(triangles[tri], loc)
        bary = np.clip(bary, 0, 1)
        bary /= bary.sum(1, keepdims=True)
        part_of = np.searchsorted(face_offsets, tri, side="right") - 1
        colour = np.zeros((len(ray), 3))
        for pi in np.unique(part_of):
            sel = part_of == pi
            colour[sel] = _part_colours(parts[pi], tri[sel] - face_offsets[pi], bary[sel])
        rgba = images[v].reshape(-1, 4)
        rgba[ray, :3] = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
        rgba[ray, 3] = 255
    return images, depths, cams.w2c, cams.intrinsics


def load_mesh(path: PathLike, *, views: int | None = None, resolution: int | None = None,
              seed: int = 0, return_views: bool = False, **pack_kwargs: Any):
    """Mesh file -> :class:`~atoken_rt.Voxels`: :func:`render_views` then ``pack_views``
    (``return_views``: ``(voxels, (images, depths, w2c, intrinsics))``, the rendered views, so a
    caller scoring against them does not ray-cast the mesh twice).

    views / resolution default to DEFAULT_VIEWS / DEFAULT_RESOLUTION (read at call time)."""
    from .pack import pack_views

    images, depths, w2c, k = render_views(path, views or DEFAULT_VIEWS,
                                          resolution or DEFAULT_RESOLUTION, seed)
    try:
        voxels = pack_views(list(images), depths, w2c, k, seed=seed, **pack_kwargs)
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{path}: {exc}") from None
    return (voxels, (images, depths, w2c, k)) if return_views else voxels


__all__ = ["render_views", "sphere_cameras", "Cameras", "hammersley_yaw_pitch", "look_at_c2w",
           "normalise", "load_mesh", "MESH_EXTS"]
