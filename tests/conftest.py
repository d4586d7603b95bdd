"""Shared test fixtures: the official reference outputs (tests/data, copied from the fixtures)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The variable must be
# set before triton is first imported (conftest runs before any test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_old_triton_interpreter() -> None:
    """Triton <= 3.6's interpreter turns a run-time loop bound into an int with ``int()`` of a
    1-element NumPy array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be
    converted"): every ``range()`` over a computed bound fails. Triton 3.7+ takes the element
    itself; do the same on older versions (test-time only; compiled GPU kernels are unaffected).
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        import triton
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    if (major, minor) > (3, 6) or not hasattr(interp, "_patch_lang_tensor"):
        return
    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch


_patch_old_triton_interpreter()

# Where kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DATA = Path(__file__).parent / "data"
WEIGHTS = DATA / "tiny-weights.pt"
GS_WEIGHTS = DATA / "tiny-gs-weights.pt"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||ours - ref|| / ||ref||, in float64."""
    ours, ref = ours.detach().cpu().double(), ref.detach().cpu().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="session")
def ref_outputs() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(DATA / "reference-outputs.safetensors"))


@pytest.fixture(scope="session")
def ref_inputs(ref_outputs) -> list[torch.Tensor]:
    return [ref_outputs[f"input.{i}"] for i in range(4)]


def make_session(config="tiny-soc", dtype=torch.float32, **kw):
    """A Session on the tiny fixture weights (no random-weights warning)."""
    import atoken_rt
    return atoken_rt.Session(config, WEIGHTS, dtype=dtype, **kw)


def fixture_outputs(enc, dec, discrete: bool) -> dict[str, torch.Tensor]:
    """The outputs compared with the fixtures' ``{cfg}.{dtype}.{key}`` tensors, by key (the FSQ
    codes only for a discrete config)."""
    out = {"encoder_out": enc.features.packed, "image_feat": enc.embedding,
           "moments": enc.moments.packed, "decoded": dec.tokens.packed}
    if discrete:
        out["fsq_codes"] = enc.latents.packed
    return out


def random_voxels(m: int, seed: int):
    """m distinct random voxels of the 64^3 grid (sorted), random fp32 [m, 768] features."""
    import atoken_rt
    rng = np.random.default_rng(seed)
    flat = rng.choice(64 ** 3, size=m, replace=False)
    coords = np.stack(np.unravel_index(np.sort(flat), (64, 64, 64)), 1).astype(np.int32)
    return atoken_rt.Voxels(coords, rng.random((m, 768), dtype=np.float32))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


requires_triton = pytest.mark.skipif(not _triton_ok(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def quiet():
    """Silence the expected input warnings (crops, dropped frames) inside one test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
