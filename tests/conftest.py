"""Shared test fixtures: the official reference outputs (tests/data, copied from the fixtures)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The variable must be
# set before triton is first imported (conftest runs before any test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
