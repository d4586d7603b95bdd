"""Model configurations: the official YAML layouts, parsed into frozen dataclasses.

Two layouts are read (see ATOKEN_SPEC §3 and §9.1):

* the autoencoder: ``model.model_cfg.arch_cfg`` with flat ``encoder_*`` / ``decoder_*`` fields;
* the 3D Gaussian-splat decoder: the fields directly under ``model:``.

A config is named exactly after a preset shipped in ``configs/`` (``"atoken-sod"``) or given as a
path to a YAML file. Missing and unknown fields are errors, never defaults: the official code has
conflicting defaults (spec §12.18), so we only trust what the file says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

PathLike = Union[str, Path]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_dir() -> Path:
    """Where the preset YAML files live: the source tree's ``configs/`` or the installed copy."""
    if CONFIG_DIR.is_dir():
        return CONFIG_DIR
    installed = Path(__file__).resolve().parent / "configs"
    return installed


def list_presets() -> list[str]:
    """Names of the presets shipped in ``configs/`` (file stems)."""
    return sorted(p.stem for p in _config_dir().glob("*.yaml"))


@dataclass(frozen=True)
class TowerConfig:
    """One transformer stack (encoder or decoder) of the autoencoder."""

    width: int
    num_blocks: int
    num_heads: int
    mlp_width: int
    attn_mode: str
    pe_mode: str
    qk_rms_norm: bool
    use_bias: bool
    use_rms_norm: bool

    def __post_init__(self) -> None:
        # Also built directly from Python: a zero size would divide by zero later, far away.
        for k in ("width", "num_blocks", "num_heads", "mlp_width"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TowerConfig: field {k!r} must be a positive integer, got {v!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class FSQConfig:
    """Finite scalar quantisation: ``num_codebooks`` groups of ``dims`` scalars with ``levels`` each."""

    codebook_size: int
    feature_dim: int
    num_codebooks: int
    chunk_size: int
    levels: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        for k in ("codebook_size", "feature_dim", "num_codebooks", "chunk_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FSQ: field {k!r} must be a positive integer, got {v!r}")
        dims = self.feature_dim // self.chunk_size // self.num_codebooks
        if dims * self.num_codebooks * self.chunk_size != self.feature_dim or dims < 1:
            raise ValueError(
                f"FSQ: quantizer_feature_dim {self.feature_dim} is not divisible into "
                f"{self.num_codebooks} codebooks x chunk {self.chunk_size}")
        level = round(self.codebook_size ** (1.0 / dims))
        if level ** dims != self.codebook_size or level < 2:
            raise ValueError(
                f"FSQ: codebook size {self.codebook_size} is not a power level**{dims}")
        object.__setattr__(self, "levels", (level,) * dims)

    @property
    def dims_per_codebook(self) -> int:
        return len(self.levels)


@dataclass(frozen=True)
class ATokenConfig:
    """The AToken autoencoder (``AutoencoderKL``) architecture."""

    name: str
    patch_size: tuple[int, int, int]
    in_channels: int
    out_channels: int
    latent_channels: int
    encoder: TowerConfig
    decoder: TowerConfig
    use_decoder: bool
    quantizer: FSQConfig | None

    @property
    def discrete(self) -> bool:
        return self.quantizer is not None

    @property
    def chunk_frames(self) -> int:
        """Latent frames per temporal chunk: 16 video frames / Pt (spec §2)."""
        return 16 // self.patch_size[0]


@dataclass(frozen=True)
class GSConfig:
    """The 3D Gaussian-splat decoder (``SLatGaussianDecoder``), spec §9."""

    name: str
    resolution: int
    model_channels: int
    latent_channels: int
    num_blocks: int
    num_heads: int
    mlp_channels: int
    window_size: int
    lr: Mapping[str, float]
    perturb_offset: bool
    voxel_size: float
    num_gaussians: int
    min_kernel_size: float
    scaling_bias: float
    opacity_bias: float

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def out_channels(self) -> int:
        # xyz 3 + features_dc 3 + scaling 3 + rotation 4 + opacity 1 per Gaussian.
        return self.num_gaussians * 14


_AE_REQUIRED = {
    "patch_size": list, "in_channels": int, "out_channels": int, "latent_channels": int,
    "use_decoder": bool,
    **{f"{t}_{k}": v for t in ("encoder", "decoder") for k, v in {
        "model_channels": int, "num_blocks": int, "num_heads": int, "mlp_channels": int,
        "attn_mode": str, "pe_mode": str, "qk_rms_norm": bool, "use_bias": bool,
        "use_rms_norm": bool}.items()},
}
_AE_OPTIONAL = {"use_quantizer": bool}
_FSQ_FIELDS = {"quantizer_type": str, "quantizer_codebook_size": int, "quantizer_feature_dim": int,
               "quantizer_num_codebooks": int, "quantizer_chunk_size": int}

_GS_REQUIRED = {"resolution": int, "model_channels": int, "latent_channels": int, "num_blocks": int,
                "num_heads": int, "mlp_channels": int, "attn_mode": str, "window_size": int,
                "representation_config": dict}
# Fields the official class accepts that only matter for training or are fixed in our runtime.
_GS_OPTIONAL = {"class_name": str, "use_fp16": bool, "use_checkpoint": bool, "pe_mode": str,
                "qk_rms_norm": bool}
_GS_REP_REQUIRED = {"lr": dict, "perturb_offset": bool, "voxel_size": (int, float),
                    "num_gaussians": int, "3d_filter_kernel_size": (int, float),
                    "scaling_bias": (int, float), "opacity_bias": (int, float),
                    "scaling_activation": str}
_GS_REP_OPTIONAL = {"2d_filter_kernel_size": (int, float)}  # not read by the official code
_GS_LR_KEYS = ("_xyz", "_features_dc", "_scaling", "_rotation", "_opacity")


def _check_fields(section: Mapping[str, Any], required: Mapping[str, Any],
                  optional: Mapping[str, Any], where: str) -> None:
    missing = [k for k in required if k not in section]
    unknown = [k for k in section if k not in required and k not in optional]
    problems = []
    if missing:
        problems.append(f"missing field(s) {missing}")
    if unknown:
        problems.append(f"unknown field(s) {unknown}")
    for k, typ in {**required, **optional}.items():
        if k in section:
            v = section[k]
            types = typ if isinstance(typ, tuple) else (typ,)
            # bool is an int subclass: do not let `true` pass as a size.
            if (bool not in types and isinstance(v, bool)) or not isinstance(v, types):
                names = "/".join(t.__name__ for t in types)
                problems.append(f"field {k!r} should be {names}, got {v!r}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


# A config is a page of YAML; anything far larger is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 << 20


def _read_yaml(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    # A directory or FIFO is "found" but not a file: reading a FIFO would block forever.
    if not path.is_file():
        raise ValueError(f"config {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"config {path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"config {path}: larger than {MAX_CONFIG_BYTES} bytes (not a config)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        doc = yaml.safe_load(text)
        size = _expanded_size(doc, {}, set())
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path}: not valid YAML ({_first_line(exc)})") from None
    except RecursionError:
        # PyYAML's composer recurses per nesting level: "[[[[...]]]]" exhausts the stack.
        raise ValueError(f"config {path}: nested too deeply (not a config)") from None
    if size is None:
        raise ValueError(f"config {path}: an alias refers to itself (a recursive document)")
    if size > MAX_CONFIG_NODES:
        # "Billion laughs": aliases of aliases make a 1 KB file a 10^9-element document; any
        # walk of it (an error message's repr of a field) would never finish.
        raise ValueError(f"config {path}: {size} values once its aliases are expanded, more "
                         f"than {MAX_CONFIG_NODES} (not a config)")
    return doc


# Values of a config document with its YAML aliases expanded (the official ones have ~100).
MAX_CONFIG_NODES = 1 << 16


def _expanded_size(node: Any, memo: dict, active: set) -> int | None:
    """Nodes of ``node`` with shared (aliased) subtrees counted at each use, in time linear in
    the document as loaded; None if a container contains itself."""
    if not isinstance(node, (list, dict)):
        return 1
    key = id(node)
    if key in active:
        return None
    if key in memo:
        return memo[key]
    active.add(key)
    total = 1
    for child in (node if isinstance(node, list) else [*node.keys(), *node.values()]):
        n = _expanded_size(child, memo, active)
        if n is None:
            return None
        total = min(total + n, 1 << 62)
    active.discard(key)
    memo[key] = total
    return total


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# Bounds of every size field: a zero or negative size divides by zero or builds an empty model,
# and an absurd one allocates until the machine gives up. The official configs are far inside.
_SIZE_LIMITS = {"latent_channels": 4096, "model_channels": 16384, "num_blocks": 256,
                "num_heads": 256, "mlp_channels": 65536, "resolution": 4096, "window_size": 4096,
                "num_gaussians": 1024, "quantizer_codebook_size": 1 << 24,
                "quantizer_feature_dim": 4096, "quantizer_num_codebooks": 4096,
                "quantizer_chunk_size": 4096}


def _check_sizes(section: Mapping[str, Any], where: str) -> None:
    """Every integer size field present in ``section`` lies in [1, its limit]."""
    for k, v in section.items():
        base = k.split("_", 1)[1] if k.startswith(("encoder_", "decoder_")) else k
        limit = _SIZE_LIMITS.get(base)
        if limit is not None and isinstance(v, int) and not 1 <= v <= limit:
            raise ValueError(f"{where}: field {k!r} must lie in [1, {limit}], got {v}")


def resolve_config_path(name_or_path: PathLike) -> Path:
    """A preset name (exact, e.g. ``"atoken-sod"``) or a path to a YAML file."""
    if isinstance(name_or_path, Path) or str(name_or_path).endswith((".yaml", ".yml")) \
            or "/" in str(name_or_path) or "\\" in str(name_or_path):
        return Path(name_or_path)
    preset = _config_dir() / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ValueError(f"unknown config preset {str(name_or_path)!r}; presets are "
                         f"{list_presets()}, or give a path to a .yaml file")
    return preset


def parse_atoken_config(doc: Any, name: str = "<dict>") -> ATokenConfig:
    """Build an :class:`ATokenConfig` from the official document (``model.model_cfg.arch_cfg``)."""
    try:
        arch = doc["model"]["model_cfg"]["arch_cfg"]
    except (TypeError, KeyError):
        raise ValueError(f"config {name}: no model.model_cfg.arch_cfg section "
                         "(not an AToken autoencoder config)") from None
    if not isinstance(arch, dict):
        raise ValueError(f"config {name}: model.model_cfg.arch_cfg is not a mapping")
    use_q = bool(arch.get("use_quantizer", False))
    _check_fields(arch, _AE_REQUIRED, {**_AE_OPTIONAL, **(_FSQ_FIELDS if use_q else {})},
                  f"config {name}")
    if use_q:
        _check_fields({k: arch[k] for k in arch if k in _FSQ_FIELDS}, _FSQ_FIELDS, {},
                      f"config {name} (use_quantizer: true)")
    where = f"config {name}"
    _check_sizes(arch, where)
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in arch["patch_size"]):
        raise ValueError(f"{where}: field 'patch_size' must be a list of integers")
    patch = tuple(arch["patch_size"])
    if patch != (4, 16, 16):
        raise ValueError(f"{where}: patch_size {list(patch)} is not supported (only [4, 16, 16])")
    pt, ph, pw = patch
    if arch["in_channels"] != pt * ph * pw * 3 or arch["out_channels"] != pt * ph * pw * 3:
        raise ValueError(f"{where}: in/out_channels must be {pt * ph * pw * 3} for patch {list(patch)}")
    towers = {}
    for t in ("encoder", "decoder"):
        towers[t] = TowerConfig(
            width=arch[f"{t}_model_channels"], num_blocks=arch[f"{t}_num_blocks"],
            num_heads=arch[f"{t}_num_heads"], mlp_width=arch[f"{t}_mlp_channels"],
            attn_mode=arch[f"{t}_attn_mode"], pe_mode=arch[f"{t}_pe_mode"],
            qk_rms_norm=arch[f"{t}_qk_rms_norm"], use_bias=arch[f"{t}_use_bias"],
            use_rms_norm=arch[f"{t}_use_rms_norm"])
        tc = towers[t]
        if tc.attn_mode != "full" or tc.pe_mode != "joint":
            raise ValueError(f"{where}: {t} attn_mode {tc.attn_mode!r} / pe_mode {tc.pe_mode!r} "
                             "not supported (only 'full' / 'joint', as in every official config)")
        if tc.width % tc.num_heads or tc.head_dim % 8:
            raise ValueError(f"{where}: field '{t}_num_heads': {t} width {tc.width} / "
                             f"{tc.num_heads} heads must give a head dim divisible by 8 (4D RoPE)")
    if not arch["use_decoder"]:
        raise ValueError(f"{where}: use_decoder false is not supported")
    quant = None
    if use_q:
        if arch["quantizer_type"] != "fsq":
            raise ValueError(f"{where}: quantizer_type {arch['quantizer_type']!r} not supported "
                             "(only 'fsq')")
        if arch["quantizer_feature_dim"] != arch["latent_channels"]:
            raise ValueError(f"{where}: quantizer_feature_dim must equal latent_channels")
        try:
            quant = FSQConfig(arch["quantizer_codebook_size"], arch["quantizer_feature_dim"],
                              arch["quantizer_num_codebooks"], arch["quantizer_chunk_size"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return ATokenConfig(name=name, patch_size=patch, in_channels=arch["in_channels"],
                        out_channels=arch["out_channels"], latent_channels=arch["latent_channels"],
                        encoder=towers["encoder"], decoder=towers["decoder"],
                        use_decoder=True, quantizer=quant)


def parse_gs_config(doc: Any, name: str = "<dict>") -> GSConfig:
    """Build a :class:`GSConfig` from the official ``3d_decode_gs.yaml`` document (``model:``)."""
    where = f"config {name}"
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or "model_cfg" in model:
        raise ValueError(f"{where}: no GS decoder 'model:' section (not a 3d_decode_gs config)")
    _check_fields(model, _GS_REQUIRED, _GS_OPTIONAL, where)
    _check_sizes(model, where)
    rep = model["representation_config"]
    _check_fields(rep, _GS_REP_REQUIRED, _GS_REP_OPTIONAL, f"{where} representation_config")
    _check_sizes(rep, f"{where} representation_config")
    lr = rep["lr"]
    if sorted(lr) != sorted(_GS_LR_KEYS):
        raise ValueError(f"{where}: representation_config.lr must have keys {list(_GS_LR_KEYS)}")
    for k, v in lr.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{where}: field 'representation_config.lr.{k}' must be a number, "
                             f"got {v!r}")
    for k in ("voxel_size", "3d_filter_kernel_size", "scaling_bias", "opacity_bias"):
        if not math.isfinite(rep[k]) or (k == "voxel_size" and rep[k] <= 0):
            raise ValueError(f"{where}: field 'representation_config.{k}' must be a finite "
                             f"{'positive ' if k == 'voxel_size' else ''}number, got {rep[k]!r}")
    if model["attn_mode"] != "swin":
        raise ValueError(f"{where}: attn_mode {model['attn_mode']!r} not supported (only 'swin')")
    if model.get("pe_mode", "ape") != "ape" or model.get("qk_rms_norm", False):
        raise ValueError(f"{where}: only pe_mode 'ape' without qk_rms_norm is supported")
    if rep["scaling_activation"] != "softplus":
        raise ValueError(f"{where}: scaling_activation {rep['scaling_activation']!r} not supported")
    if model["latent_channels"] != 768:
        raise ValueError(f"{where}: latent_channels must be 768 (the first 768 decoded channels)")
    if model["model_channels"] % model["num_heads"]:
        raise ValueError(f"{where}: field 'num_heads': model_channels {model['model_channels']} "
                         f"not divisible by num_heads {model['num_heads']}")
    return GSConfig(
        name=name, resolution=model["resolution"], model_channels=model["model_channels"],
        latent_channels=model["latent_channels"], num_blocks=model["num_blocks"],
        num_heads=model["num_heads"], mlp_channels=model["mlp_channels"],
        window_size=model["window_size"], lr={k: float(v) for k, v in lr.items()},
        perturb_offset=rep["perturb_offset"], voxel_size=float(rep["voxel_size"]),
        num_gaussians=rep["num_gaussians"], min_kernel_size=float(rep["3d_filter_kernel_size"]),
        scaling_bias=float(rep["scaling_bias"]), opacity_bias=float(rep["opacity_bias"]))


def _load(config, cls, parse, arg: str):
    if isinstance(config, cls):
        return config
    if not isinstance(config, (str, Path)):
        raise TypeError(f"{arg} must be a preset name, a path or a {cls.__name__}, "
                        f"got {type(config).__name__}")
    return parse(_read_yaml(resolve_config_path(config)), name=str(config))


def load_config(config: Union[PathLike, ATokenConfig]) -> ATokenConfig:
    """An autoencoder config from a preset name, a YAML path, or an existing config object."""
    return _load(config, ATokenConfig, parse_atoken_config, "config")


def load_gs_config(config: Union[PathLike, GSConfig]) -> GSConfig:
    """A GS-decoder config from a preset name, a YAML path, or an existing config object."""
    return _load(config, GSConfig, parse_gs_config, "gs_config")


def is_gs_document(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("model"), dict) \
        and "model_cfg" not in doc["model"]


def atoken_flops_per_token(cfg: ATokenConfig) -> dict[str, float]:
    """Dense FLOPs per token for each tower (ENGINEERING.md's formula; attention excluded)."""
    out = {}
    for name, t in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        per_block = 2 * t.width * 3 * t.width + 2 * t.width * t.width + 2 * 2 * t.width * t.mlp_width
        out[name] = float(per_block * t.num_blocks)
    return out


__all__ = ["ATokenConfig", "TowerConfig", "FSQConfig", "GSConfig", "load_config", "load_gs_config",
           "list_presets", "parse_atoken_config", "parse_gs_config", "resolve_config_path",
           "atoken_flops_per_token"]
