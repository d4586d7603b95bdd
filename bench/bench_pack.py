"""3D asset in (issue 8 §1) on the CPU: render a mesh, read a render folder, pack it into voxels.

Builds a test object (an icosphere, a box and a cylinder, ~45k triangles, vertex colours), then
measures, median of ``--repeats`` runs each:

1. ``render_views(mesh, 16, 512)``: embree ray casting of 16 x 512^2 pixel-centre rays plus the
   albedo lookup; and the per-ray rate of trimesh's pure-numpy fallback on one small view;
2. a 16-view 512x512 render folder in the official layout (RGBA PNGs, EXR depths as Blender
   writes them): ``read_render_folder`` (PNG + EXR decode), ``pack_views`` and its stages
   (features, unprojection, seeded subsampling, occupancy, per-voxel features), and
   ``load_render_folder`` end to end (the issue's target: < 2 s on the 2-core CPU);
3. occupancy: the binned version on 500k points against the official O(points x voxels) test on
   a few thousand points, extrapolated linearly to 500k.

Usage::

    python bench/bench_pack.py [--repeats 3] [--out bench/results/<date>-cpu-3d-pack.md]
    python bench/bench_pack.py --quick   # smoke run, < 1 min: 4 x 128^2, 1 repeat, 1 thread,
                                         # the table printed (and written only with --out)

Packing runs on the CPU whatever the machine; on a CUDA machine the script runs unchanged. An
EXR-less install (no OpenEXR) writes .npy depths instead.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

from atoken_rt.threed import (load_render_folder, occupancy, pack_views,  # noqa: E402
                              read_render_folder, render_views, sphere_cameras)
from atoken_rt.threed import pack as P  # noqa: E402


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def make_mesh(path: Path) -> int:
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)  # 20480 faces
    sphere.visual.vertex_colors = np.c_[(sphere.vertices * 200 + 128).clip(0, 255),
                                        np.full(len(sphere.vertices), 255)].astype(np.uint8)
    box = trimesh.creation.box(extents=(0.8, 0.3, 0.3))
    box.apply_translation((0.6, 0, 0))
    box.visual.face_colors = [200, 40, 40, 255]
    cyl = trimesh.creation.cylinder(radius=0.1, height=1.2, sections=4000)
    cyl.apply_translation((0, 0, 0.4))
    cyl.visual.face_colors = [40, 40, 200, 255]
    scene = trimesh.Scene([sphere, box, cyl])
    scene.export(path)
    return sum(len(g.faces) for g in scene.geometry.values())


def write_folder(root: Path, images, depths, c2w, fov) -> None:
    import json

    from PIL import Image
    try:
        import OpenEXR
    except ImportError:
        OpenEXR = None

    root.mkdir(parents=True)
    frames = []
    for i, (im, d) in enumerate(zip(images, depths)):
        Image.fromarray(im, "RGBA").save(root / f"{i:03d}.png")
        if OpenEXR is None:
            np.save(root / f"{i:03d}_depth.npy", d.astype(np.float16))
        else:
            raw = np.where(d < 0, np.float32(1e10), d).astype(np.float32)
            OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION,
                          "type": OpenEXR.scanlineimage},
                         {"R": raw, "G": raw, "B": raw}).write(str(root / f"{i:03d}_depth.exr"))
        frames.append({"file_path": f"{i:03d}.png", "camera_angle_x": fov,
                       "transform_matrix": c2w[i].tolist()})
    (root / "transforms.json").write_text(json.dumps({"frames": frames}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--threads", default="1,2",
                    help="torch intra-op thread counts to measure packing with (default 1,2)")
    ap.add_argument("--out", default=None,
                    help="Markdown file (default bench/results/<date>-cpu-3d-pack.md; "
                         "with --quick, none)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 views at 128^2, 1 repeat, 1 thread, small official loop")
    args = ap.parse_args()
    if args.quick:
        args.views, args.resolution, args.repeats, args.threads = 4, 128, 1, "1"
    elif args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-cpu-3d-pack.md")
    rows: list[tuple[str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    mesh = tmp / "object.glb"
    n_faces = make_mesh(mesh)
    v, r = args.views, args.resolution
    rays = v * r * r

    # warm-up: first matmul / PIL / embree BVH setup costs are not what we measure
    render_views(mesh, 2, 32)
    t_render, (images, depths, w2c, ks) = timed(lambda: render_views(mesh, v, r), args.repeats)
    rows.append((f"render_views, {v} x {r}^2, embree", f"{t_render:.2f} s",
                 f"{rays / t_render / 1e6:.2f} M rays/s, {n_faces} triangles, "
                 f"{(depths >= 0).mean():.0%} of pixels hit"))

    try:
        import rtree  # noqa: F401  (the pure-numpy caster needs it)
    except ImportError:
        rows.append(("pure-numpy fallback (no embreex)", "not measured",
                     "rtree is not installed here (the fallback needs it)"))
    else:
        import trimesh
        from trimesh.ray.ray_triangle import RayMeshIntersector as Slow
        scene = trimesh.load(str(mesh), force="scene", process=False)
        slow = Slow(scene.to_geometry())
        n_slow = 48 * 48
        origins = np.tile([0.0, -2.0, 0.0], (n_slow, 1))
        g = np.linspace(-0.35, 0.35, 48)
        dirs = np.stack(np.meshgrid(g, [1.0], g), -1).reshape(-1, 3)
        t_slow, _ = timed(lambda: slow.intersects_location(origins, dirs, multiple_hits=False), 1)
        rows.append(("pure-numpy fallback (no embreex)", f"{t_slow:.2f} s for {n_slow} rays",
                     f"{n_slow / t_slow / 1e3:.1f} k rays/s: ~{rays / (n_slow / t_slow) / 60:.0f}"
                     f" min for {v} x {r}^2"))

    folder = tmp / "renders" / "object"
    cams = sphere_cameras(v)
    write_folder(folder, images, depths, cams.c2w, math.radians(40))
    default_threads = torch.get_num_threads()
    for n_threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(n_threads)
        rows.append((f"*torch threads = {n_threads}*", "", ""))
        rows += pack_rows(folder, args.repeats, n_threads == 1, quick=args.quick)
    torch.set_num_threads(default_threads)

    lines = [f"# 3D asset in on the CPU ({time.strftime('%Y-%m-%d')})", "",
             f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible, torch "
             f"{torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end (a shared "
             f"machine: other jobs were running, so 2 torch threads contend for 2 busy cores)",
             f"- object: {n_faces} triangles (icosphere + box + cylinder, vertex/face colours); "
             f"{v} views at {r}x{r}; medians of {args.repeats} runs",
             f"- command: `python bench/bench_pack.py "
             f"{'--quick' if args.quick else f'--repeats {args.repeats}'}`", "",
             "| what | time | notes |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


def pack_rows(folder: Path, repeats: int, official: bool, quick: bool = False
              ) -> list[tuple[str, str, str]]:
    rows = []
    t_read, views = timed(lambda: read_render_folder(folder), repeats)
    n_views, size = views.depths.shape[:2]
    rows.append((f"read_render_folder ({n_views} RGBA PNG + EXR, {size}^2)", f"{t_read:.2f} s",
                 ""))
    imgs = list(views.images)
    t_pack, vox = timed(lambda: pack_views(imgs, views.depths, views.w2c, views.intrinsics),
                        repeats)
    rows.append(("pack_views", f"{t_pack:.2f} s", f"{len(vox.coords)} voxels"))
    t_load, _ = timed(lambda: load_render_folder(folder), repeats)
    rows.append(("**load_render_folder end to end** (target < 2 s)", f"**{t_load:.2f} s**", ""))

    # pack_views stages
    d = torch.from_numpy(views.depths)
    e = torch.from_numpy(views.w2c)
    k = torch.from_numpy(views.intrinsics)
    t_feat, feats = timed(lambda: P.view_features(imgs), repeats)
    t_unp, pts = timed(lambda: P.unproject(d, e, k), repeats)
    n_pts = pts.shape[0]
    gen = torch.Generator()
    t_sub, sub = timed(lambda: pts[torch.randperm(n_pts, generator=gen.manual_seed(0))[:500_000]],
                       repeats)
    t_occ, occ = timed(lambda: occupancy(sub), repeats)
    centres, _ = P.voxel_centres(64, 0.5)
    xyz = centres[torch.argwhere(occ)]
    t_vf, _ = timed(lambda: P.voxel_features(xyz, feats, e, k), repeats)
    rows += [("  stage: view features (LANCZOS 256, patches)", f"{t_feat * 1e3:.0f} ms", ""),
             ("  stage: unproject", f"{t_unp * 1e3:.0f} ms", f"{n_pts} valid depth pixels"),
             ("  stage: seeded subsample to 500k", f"{t_sub * 1e3:.0f} ms", ""),
             (f"  stage: occupancy (binned, {len(sub)} points)", f"{t_occ * 1e3:.0f} ms", ""),
             ("  stage: per-voxel features", f"{t_vf * 1e3:.0f} ms", f"{len(xyz)} voxels")]

    # the official O(points x voxels) test, on a few thousand points, extrapolated
    c = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1)
    n_off = 128 if quick else 1024
    chunk = 32  # [chunk, 64, 64, 64, 3] float32 temporaries: 100 MB

    def official_like():
        hit = torch.zeros(64, 64, 64, dtype=torch.bool)
        for s in range(0, n_off, chunk):
            dd = (c[None] - sub[s:s + chunk, None, None, None]).abs()
            hit |= (dd <= 1 / 128).all(-1).any(0)
        return hit

    if not official:
        return rows
    t_off, _ = timed(official_like, 1)
    rows.append(("official-style occupancy loop", f"{t_off:.2f} s for {n_off} points",
                 f"~{t_off * 500_000 / n_off:.0f} s for 500k (linear; its shrinking mask "
                 f"helps a little)"))

    return rows


if __name__ == "__main__":
    main()
