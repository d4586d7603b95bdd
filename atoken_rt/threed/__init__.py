"""3D end to end (issue 8): from a 3D asset to ``Voxels``, and from Gaussians to pictures and files.

Asset in (``pack``, ``folder``, ``views``): multi-view renders -> the sparse 64^3 voxels the encoder
takes (spec §1.3). Tokens out (``render``, ``export``, ``metrics``): Gaussians -> images, orbit videos,
viewer files and scores (spec §9.5-9.6).

The names below are imported lazily so that ``import atoken_rt`` never needs the ``3d`` extra
(trimesh, plyfile, embreex, OpenEXR): only the function that needs a library imports it.
"""

from __future__ import annotations

import importlib

# public name -> submodule of atoken_rt.threed that defines it
_EXPORTS = {
    "pack_views": "pack",
    "occupancy": "pack",
    "load_render_folder": "folder",
    "read_render_folder": "folder",
    "render_views": "views",
    "sphere_cameras": "views",
    "render": "render",
    "RenderResult": "render",
    "orbit": "render",
    "orbit_cameras": "render",
    "save_splat": "export",
    "save_ply": "export",
    "psnr": "metrics",
    "ssim": "metrics",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atoken_rt.threed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
