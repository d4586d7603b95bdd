"""The 3D Gaussian-splat decoder (ATOKEN_SPEC §9): sparse voxel features -> 3D Gaussians.

Pipeline for one batch of voxels (``M`` occupied voxels of a ``resolution``^3 grid, coords
``(b, x, y, z)``):

1. :class:`GaussianDecoder`: a bias-free, RMSNorm, pre-norm transformer with absolute sin/cos
   position embedding and 8^3 Swin-window attention (§9.2, §9.3). Output ``raw`` [M, 14*G'].
2. :func:`to_gaussians`: split ``raw`` into per-Gaussian parameters (G' = ``num_gaussians``
   per voxel), apply the TRELLIS activations in fp32, return one :class:`Gaussians` per object
   (§9.5).
3. :meth:`Gaussians.save_ply`: the standard 3D Gaussian splatting PLY layout.

Numerics follow §10.5: every Linear, norm, residual add, GELU and attention output is rounded to
the model dtype (the weights' dtype); the APE table is computed in fp32 and rounded once before
the add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GSConfig, load_gs_config
from .reference import gelu_tanh, padded_layout, rms_norm32, varlen_attention

PathLike = Union[str, Path]

#: Logit soft-cap of the flash-varlen windowed attention path (§9.3).
SOFTCAP = 30.0
#: eps of the blocks' RMSNorm32 and of the final (affine-free) layer norm (§9.2).
RMS_EPS = 1e-6
FINAL_LN_EPS = 1e-5
#: Degree-0 real spherical-harmonic constant: rgb = SH_C0 * f_dc + 0.5.
SH_C0 = 0.28209479177387814
#: Scene box of the official decoder: [-0.5, 0.5]^3 as (origin, size), world = internal*size+origin.
AABB_ORIGIN = -0.5
AABB_SIZE = 1.0
#: (name, components per Gaussian) in channel order of the output layer (§9.5).
GS_LAYOUT = (("_xyz", 3), ("_features_dc", 3), ("_scaling", 3), ("_rotation", 4), ("_opacity", 1))


# ----------------------------------------------------------------------------------------------
# Fixed tables: Hammersley offset perturbation (§9.4) and absolute position embedding (§9.2)
# ----------------------------------------------------------------------------------------------


def _radical_inverse(n: np.ndarray, base: int) -> np.ndarray:
    """Van der Corput radical inverse phi_base(n) in float64, vectorised over the integers n."""
    n = n.astype(np.int64).copy()
    out = np.zeros(n.shape, dtype=np.float64)
    inv = 1.0 / base
    scale = inv
    while np.any(n > 0):  # one pass per digit, not per element
        out += (n % base) * scale
        n //= base
        scale *= inv
    return out


def hammersley_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """The ``offset_perturbation`` buffer: ``atanh((2*H(g) - 1) / voxel_size)``.

    ``H(g) = (g / G', phi_2(g), phi_3(g))`` is the 3D Hammersley point of Gaussian g. The points are
    built in float64 and cast to fp32 before the affine map and atanh, which run in fp32 (§9.4).
    Returns a CPU float32 tensor [num_gaussians, 3]; row 0 is atanh(-1/voxel_size) on every axis.
    """
    g = np.arange(num_gaussians)
    pts = np.stack([g / num_gaussians, _radical_inverse(g, 2), _radical_inverse(g, 3)], axis=1)
    # torch.from_numpy stays on the CPU even inside a `with torch.device("meta")` block.
    p = torch.from_numpy(pts).to(torch.float32)
    return torch.atanh((p * 2 - 1) / voxel_size)


def absolute_position_embedding(xyz: torch.Tensor, channels: int) -> torch.Tensor:
    """Fixed sin/cos embedding of integer voxel coordinates, fp32 [M, channels].

    xyz: [M, 3] integer (x, y, z). With ``fd = channels // 3 // 2`` frequencies
    ``1 / 10000**(k/fd)``, each axis gives ``[sin(a*f), cos(a*f)]`` (2*fd entries); the axes are
    concatenated x, y, z and zero-padded on the right up to ``channels`` (e.g. 126 -> 128).
    """
    m, dims = xyz.shape
    fd = channels // dims // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(fd, dtype=torch.float32, device=xyz.device) / fd))
    ang = torch.outer(xyz.reshape(-1).to(torch.float32), freqs)  # [M*3, fd], token-major
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(m, dims * 2 * fd)
    if emb.shape[1] < channels:
        emb = F.pad(emb, (0, channels - emb.shape[1]))
    return emb


# ----------------------------------------------------------------------------------------------
# Swin window partition (§9.3)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPartition:
    """How the tokens of a batch split into attention windows for one shift.

    fwd: [M] int64, the token order sorted by window id (``x[fwd]`` is window-packed);
    bwd: [M] int64, its inverse (``packed[bwd]`` restores the input order);
    cu_seqlens: host int64 [S+1], boundaries of the S non-empty windows in packed order;
    all_full: every window holds exactly ``window_size`` tokens (the official test compares the
    count with the window *edge* length), in which case the official code takes a dense path
    without the soft-cap; see :attr:`softcap`.
    """

    fwd: torch.Tensor
    bwd: torch.Tensor
    cu_seqlens: np.ndarray
    max_seqlen: int
    all_full: bool

    @property
    def num_windows(self) -> int:
        return len(self.cu_seqlens) - 1

    layouts: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def softcap(self) -> float:
        """The logit soft-cap the official code applies for this partition (0 = none)."""
        return 0.0 if self.all_full else SOFTCAP

    def layout(self, heads: int, device) -> list:
        """The padded attention layout of the windows (:func:`padded_layout`), built once and
        shared by every block with this shift."""
        key = (heads, str(device))
        if key not in self.layouts:
            m = int(self.cu_seqlens[-1])
            self.layouts[key] = padded_layout(self.cu_seqlens, self.cu_seqlens, m, m, heads, device)
        return self.layouts[key]


def window_partition(coords: torch.Tensor, window_size: int, shift: int) -> WindowPartition:
    """Partition tokens into ``window_size``^3 windows after shifting x, y, z by ``shift``.

    coords: [M, 4] integer (b, x, y, z), non-negative. Window id per axis is
    ``(coord + shift) // window_size``; the window count per axis is
    ``ceil((max over the whole batch of the shifted coord + 1) / window_size)``; the linear id is
    ``b*(nx*ny*nz) + wx*(ny*nz) + wy*nz + wz``. Vectorised; one host sync for the window sizes.
    """
    c = coords.to(torch.int64)
    m = c.shape[0]
    sc = c[:, 1:] + shift
    nw = (sc.max(dim=0).values + window_size) // window_size  # ceil((max+1)/ws), per axis
    w = sc // window_size
    ny_nz = nw[1] * nw[2]
    ids = c[:, 0] * (nw[0] * ny_nz) + w[:, 0] * ny_nz + w[:, 1] * nw[2] + w[:, 2]
    # Order inside a window does not change attention, so a stable sort is as good as the
    # official unstable one and makes runs reproducible.
    fwd = torch.argsort(ids, stable=True)
    bwd = torch.empty_like(fwd)
    bwd[fwd] = torch.arange(m, device=c.device)
    _, counts = torch.unique_consecutive(ids[fwd], return_counts=True)
    lens = counts.cpu().numpy().astype(np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return WindowPartition(fwd=fwd, bwd=bwd, cu_seqlens=cu,
                           max_seqlen=int(lens.max()) if len(lens) else 0,
                           all_full=bool(len(lens) > 0 and np.all(lens == window_size)))


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class RMSNorm32(nn.Module):
    """Weight-only RMSNorm with the official double rounding (§6.1). weight: [C]."""

    def __init__(self, channels: int, eps: float = RMS_EPS, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm32(x, self.weight, self.eps)


class GELUTanh(nn.Module):
    """GELU (tanh approximation) in fp32, rounded once to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class WindowAttention(nn.Module):
    """Bias-free self-attention inside Swin windows: ``to_qkv`` [3C, C], ``to_out`` [C, C]."""

    def __init__(self, channels: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False, device=device, dtype=dtype)
        self.to_out = nn.Linear(channels, channels, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, part: WindowPartition) -> torch.Tensor:
        """x: [M, C] model dtype, in input order; returns [M, C] in the same order and dtype."""
        m, c = x.shape
        qkv = self.to_qkv(x).view(m, 3, self.num_heads, self.head_dim)  # channels [s][h][d]
        qkv = qkv[part.fwd]
        o = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], part.cu_seqlens,
                             scale=1.0 / math.sqrt(self.head_dim), softcap=part.softcap,
                             layout=part.layout(self.num_heads, x.device))
        return self.to_out(o[part.bwd].reshape(m, c))


class FeedForward(nn.Module):
    """``mlp.0`` (fc1, no bias) -> GELU-tanh -> ``mlp.2`` (fc2, no bias)."""

    def __init__(self, channels: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=False, device=device, dtype=dtype),
            GELUTanh(),
            nn.Linear(hidden, channels, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class GSBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm1(x))``, ``x += mlp(norm2(x))`` (adds in the model dtype)."""

    def __init__(self, cfg: GSConfig, device=None, dtype=None):
        super().__init__()
        c = cfg.model_channels
        self.norm1 = RMSNorm32(c, device=device, dtype=dtype)
        self.norm2 = RMSNorm32(c, device=device, dtype=dtype)
        self.attn = WindowAttention(c, cfg.num_heads, device=device, dtype=dtype)
        self.mlp = FeedForward(c, cfg.mlp_channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, part: WindowPartition) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), part)
        return x + self.mlp(self.norm2(x))


class GaussianDecoder(nn.Module):
    """The official GS decoder (``SLatGaussianDecoder``), spec §9.

    State dict (in order): buffer ``offset_perturbation`` [G', 3], ``input_layer.weight``
    [C, latent], ``blocks.{i}.{norm1,norm2}.weight`` [C], ``blocks.{i}.attn.to_qkv.weight`` [3C, C],
    ``blocks.{i}.attn.to_out.weight`` [C, C], ``blocks.{i}.mlp.mlp.0.weight`` [mlp, C],
    ``blocks.{i}.mlp.mlp.2.weight`` [C, mlp], ``out_layer.weight`` [14G', C], ``out_layer.bias``.
    Checkpoints of the official training wrapper also carry ``lpips_loss.*`` keys: drop them
    before ``load_state_dict(strict=True)`` (see :func:`strip_lpips_keys`).

    Build on the meta device (``device="meta"``) and load with ``assign=True`` to skip the
    random init. The model dtype is the dtype of the weights (``.to(torch.bfloat16)`` converts the
    perturbation buffer too, as the official wrapper does).
    """

    def __init__(self, cfg: Union[GSConfig, str, Path], *, device=None, dtype=None):
        super().__init__()
        cfg = load_gs_config(cfg)
        self.cfg = cfg
        c = cfg.model_channels
        # Registered first so that it leads the state dict, as in the official checkpoint.
        dev = torch.empty(0, device=device).device
        self.register_buffer("offset_perturbation",
                             hammersley_perturbation(cfg.num_gaussians, cfg.voxel_size)
                             .to(device=dev, dtype=dtype or torch.float32), persistent=True)
        self.input_layer = nn.Linear(cfg.latent_channels, c, bias=False, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(GSBlock(cfg, device=device, dtype=dtype)
                                    for _ in range(cfg.num_blocks))
        self.out_layer = nn.Linear(c, cfg.out_channels, bias=True, device=device, dtype=dtype)

    def reset_buffers(self) -> None:
        """Recompute the fixed buffers (after ``to_empty``: a model built on the meta device and
        materialised without a checkpoint has no values in them)."""
        with torch.no_grad():
            buf = self.offset_perturbation
            buf.copy_(hammersley_perturbation(self.cfg.num_gaussians, self.cfg.voxel_size)
                      .to(device=buf.device, dtype=buf.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.input_layer.weight.dtype

    def block_shift(self, i: int) -> int:
        """Window shift of block i: 0 for even blocks, ``window_size // 2`` for odd ones."""
        return (self.cfg.window_size // 2) * (i % 2)

    def partitions(self, coords: torch.Tensor) -> dict[int, WindowPartition]:
        """The window partition for each distinct shift used by the blocks (computed once)."""
        return {s: window_partition(coords, self.cfg.window_size, s)
                for s in sorted({self.block_shift(i) for i in range(len(self.blocks))})}

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Decode voxel features to raw Gaussian parameters.

        feats: [M, latent_channels] float (cast to the model dtype: the official code feeds
        ``rec.feats[:, :768]`` in the model dtype). coords: [M, 4] integer (b, x, y, z),
        non-negative, on the same device. Returns raw [M, 14 * num_gaussians] in the model dtype,
        the input to :func:`to_gaussians`.
        """
        cfg = self.cfg
        if feats.dim() != 2 or feats.shape[1] != cfg.latent_channels:
            raise ValueError(f"feats must be [M, {cfg.latent_channels}], got {list(feats.shape)}")
        if coords.dim() != 2 or coords.shape[1] != 4 or coords.shape[0] != feats.shape[0]:
            raise ValueError(f"coords must be [M, 4] (b, x, y, z) with M = {feats.shape[0]}, "
                             f"got {list(coords.shape)}")
        if coords.dtype.is_floating_point or coords.dtype == torch.bool:
            raise TypeError(f"coords must be an integer tensor, got {coords.dtype}")
        if feats.shape[0] == 0:
            return feats.new_zeros(0, cfg.out_channels, dtype=self.dtype)
        if bool((coords < 0).any()):
            raise ValueError("coords must be non-negative")
        h = self.input_layer(feats.to(self.dtype))
        h = h + absolute_position_embedding(coords[:, 1:], cfg.model_channels).to(h.dtype)
        parts = self.partitions(coords)
        for i, block in enumerate(self.blocks):
            h = block(h, parts[self.block_shift(i)])
        # Affine-free, eps 1e-5, run directly in the model dtype (as the official code does).
        h = F.layer_norm(h, (h.shape[-1],), eps=FINAL_LN_EPS)
        return self.out_layer(h)


def strip_lpips_keys(state_dict: dict) -> dict:
    """Drop the ``lpips_loss.*`` entries of an official GS checkpoint (training-only modules)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("lpips_loss.")}


# ----------------------------------------------------------------------------------------------
# Gaussians (§9.5)
# ----------------------------------------------------------------------------------------------

#: Property names of the standard 3D Gaussian splatting PLY (all float32).
PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                  "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}


@dataclass
class Gaussians:
    """The 3D Gaussians of ONE object, fp32, G = voxels * num_gaussians rows (voxel-major).

    Activated: ``xyz`` [G, 3] world position, ``scale`` [G, 3] (>= min kernel size),
    ``rotation`` [G, 4] unit quaternion (w, x, y, z), ``opacity`` [G, 1] in (0, 1), ``rgb`` [G, 3]
    (``SH_C0 * f_dc + 0.5``, not clamped). Pre-activation (TRELLIS ``Gaussian`` attributes):
    ``xyz_internal`` [G, 3] in grid units [0, 1], ``features_dc`` [G, 1, 3],
    ``scaling_internal`` [G, 3], ``rotation_internal`` [G, 4], ``opacity_internal`` [G, 1].
    """

    xyz: torch.Tensor
    scale: torch.Tensor
    rotation: torch.Tensor
    opacity: torch.Tensor
    rgb: torch.Tensor
    xyz_internal: torch.Tensor
    features_dc: torch.Tensor
    scaling_internal: torch.Tensor
    rotation_internal: torch.Tensor
    opacity_internal: torch.Tensor

    @property
    def num_gaussians(self) -> int:
        return self.xyz.shape[0]

    def to(self, device) -> "Gaussians":
        """A copy with every tensor on ``device``."""
        return Gaussians(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def ply_arrays(self) -> dict[str, np.ndarray]:
        """The PLY columns as float32 numpy arrays [G], keyed by :data:`PLY_PROPERTIES` name.

        opacity is stored as logit(opacity) and scales as log(scale) of the *activated* values
        (so the min-kernel clamp is baked in); rot = rotation_internal + (1, 0, 0, 0), unnormalised.
        """
        g = self.num_gaussians
        xyz = self.xyz.detach().float().cpu()
        op = self.opacity.detach().float().cpu()
        cols = torch.cat([
            xyz,
            torch.zeros(g, 3),  # normals: unused by splatting viewers
            self.features_dc.detach().float().cpu().reshape(g, 3),
            torch.log(op / (1 - op)),
            torch.log(self.scale.detach().float().cpu()),
            self.rotation_internal.detach().float().cpu() + torch.tensor([1.0, 0.0, 0.0, 0.0]),
        ], dim=1).numpy()
        return {name: cols[:, i] for i, name in enumerate(PLY_PROPERTIES)}

    def save_ply(self, path: PathLike) -> None:
        """Write a binary little-endian PLY in the 3D Gaussian splatting layout (float32 columns
        :data:`PLY_PROPERTIES`). No axis transform is applied: positions are in the model's world
        frame (TRELLIS's own exporter optionally rotates them for viewers)."""
        write_ply(path, self.ply_arrays())


def write_ply(path: PathLike, columns: dict[str, np.ndarray]) -> None:
    """Write float32 vertex columns ({name: [G] array}, in dict order) as a binary
    little-endian PLY with one ``vertex`` element (the layout splatting viewers read)."""
    names = list(columns)
    g = len(next(iter(columns.values()))) if names else 0
    rec = np.empty(g, dtype=[(n, "<f4") for n in names])
    for n in names:
        rec[n] = columns[n]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {g}",
              *(f"property float {n}" for n in names), "end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rec.tobytes())


def load_ply(path: PathLike) -> dict[str, np.ndarray]:
    """Read the vertex element of a binary little-endian PLY: {property name: [N] array},
    in file order (scalar properties only, as written by :meth:`Gaussians.save_ply`)."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    props: list[tuple[str, str]] = []
    count = None
    element = None
    for line in data[:end].decode("ascii").splitlines()[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            if tok[1] != "binary_little_endian":
                raise ValueError(f"{path}: only binary_little_endian PLY is supported, "
                                 f"got {tok[1]}")
        elif tok[0] == "element":
            if element == "vertex":
                break  # only the leading vertex element is read
            element = tok[1]
            if element == "vertex":
                count = int(tok[2])
        elif tok[0] == "property" and element == "vertex":
            if tok[1] == "list" or tok[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unsupported property {line!r}")
            props.append((tok[2], "<" + _PLY_TYPES[tok[1]]))
    if count is None:
        raise ValueError(f"{path}: no vertex element")
    start = end + len(b"end_header\n")
    rec = np.frombuffer(data, dtype=np.dtype(props), count=count, offset=start)
    return {name: rec[name].copy() for name, _ in props}


def to_gaussians(raw: torch.Tensor, coords: torch.Tensor, cfg: Union[GSConfig, str, Path],
                 offset_perturbation: torch.Tensor) -> list[Gaussians]:
    """Turn the decoder output into Gaussians, one :class:`Gaussians` per object (§9.5).

    raw: [M, 14*G'] any float dtype (upcast to fp32; all math is fp32). coords: [M, 4] integer
    (b, x, y, z), the decoder's input coords. offset_perturbation: [G', 3] (the decoder buffer).
    Channels are ``_xyz``, ``_features_dc``, ``_scaling``, ``_rotation``, ``_opacity`` ranges, each
    Gaussian-major (``g*k + comp``) and scaled by ``cfg.lr``. Returns a list in ascending batch
    index over the b values present; each holds that object's voxels (in input row order) x G'.
    """
    cfg = load_gs_config(cfg)
    gn = cfg.num_gaussians
    if raw.dim() != 2 or raw.shape[1] != cfg.out_channels:
        raise ValueError(f"raw must be [M, {cfg.out_channels}], got {list(raw.shape)}")
    if coords.dim() != 2 or coords.shape != (raw.shape[0], 4):
        raise ValueError(f"coords must be [M, 4] with M = {raw.shape[0]}, got {list(coords.shape)}")
    o = raw.float()
    m, dev = o.shape[0], o.device
    p = {}
    start = 0
    for name, k in GS_LAYOUT:
        p[name] = o[:, start:start + gn * k].reshape(m, gn, k) * cfg.lr[name]
        start += gn * k

    offset = p["_xyz"]
    if cfg.perturb_offset:
        offset = offset + offset_perturbation.to(device=dev, dtype=torch.float32)
    offset = torch.tanh(offset) / cfg.resolution * 0.5 * cfg.voxel_size  # up to +-0.75 voxel
    center = (coords[:, 1:].to(device=dev, dtype=torch.float32) + 0.5) / cfg.resolution
    xyz_internal = center[:, None, :] + offset
    xyz = xyz_internal * AABB_SIZE + AABB_ORIGIN

    # Biases are fp32 tensors, as in the official Gaussian class.
    sb = torch.tensor(cfg.scaling_bias, dtype=torch.float32, device=dev)
    scale_bias = sb + torch.log(-torch.expm1(-sb))  # softplus^-1
    ob = torch.tensor(cfg.opacity_bias, dtype=torch.float32, device=dev)
    opacity_bias = torch.log(ob / (1 - ob))  # logit
    scale = torch.sqrt(torch.square(F.softplus(p["_scaling"] + scale_bias))
                       + cfg.min_kernel_size ** 2)
    opacity = torch.sigmoid(p["_opacity"] + opacity_bias)
    rot_bias = torch.tensor([1.0, 0.0, 0.0, 0.0], device=dev)
    rotation = F.normalize(p["_rotation"] + rot_bias, dim=-1)
    features_dc = p["_features_dc"][:, :, None, :]  # [M, G', 1, 3]
    rgb = SH_C0 * p["_features_dc"] + 0.5

    per_voxel = dict(xyz=xyz, scale=scale, rotation=rotation, opacity=opacity, rgb=rgb,
                     xyz_internal=xyz_internal, features_dc=features_dc,
                     scaling_internal=p["_scaling"], rotation_internal=p["_rotation"],
                     opacity_internal=p["_opacity"])
    b = coords[:, 0].to(dev)
    out = []
    for bi in torch.unique(b).tolist():  # one iteration per object, sorted ascending
        rows = torch.nonzero(b == bi).squeeze(1)
        out.append(Gaussians(**{k: v[rows].flatten(0, 1) for k, v in per_voxel.items()}))
    return out


__all__ = ["GaussianDecoder", "Gaussians", "WindowPartition", "to_gaussians", "window_partition",
           "hammersley_perturbation", "absolute_position_embedding", "load_ply", "strip_lpips_keys",
           "PLY_PROPERTIES", "SOFTCAP", "SH_C0"]
