"""Packaging: ``atoken_rt.kernels`` / ``atoken_rt.configs`` resolve from a plain source checkout
(no ``pip install``), to that checkout's own folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import sys
# Forget any editable install: this must work from the checkout alone.
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
sys.path.insert(0, {root!r})
import atoken_rt, atoken_rt.kernels, atoken_rt.kernels._utils, atoken_rt.configs
print(atoken_rt.__file__)
print(atoken_rt.kernels.__file__)
print(atoken_rt.configs.__file__)
print(len(atoken_rt.list_presets()))
"""


def test_source_checkout_imports_its_own_kernels_and_configs():
    p = subprocess.run([sys.executable, "-c", _PROBE.format(root=str(ROOT))], cwd="/",
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    pkg, kernels, configs, presets = p.stdout.split()
    assert Path(pkg) == ROOT / "atoken_rt" / "__init__.py"
    assert Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert Path(configs) == ROOT / "configs" / "__init__.py"
    assert int(presets) >= 7
    import atoken_rt
    assert "kernels" not in sys.modules  # never the top-level name (a different PyPI package)
    assert atoken_rt.__name__ == "atoken_rt"


def _import_from(cwd: Path) -> subprocess.CompletedProcess:
    """``import atoken_rt`` in a fresh interpreter started in ``cwd``, with the environment's
    installation only (no PYTHONPATH pointing at a checkout)."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import atoken_rt, atoken_rt.kernels; print(atoken_rt.Session.__name__)"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_clone_folder_named_atoken_rt_does_not_shadow_the_installed_package(tmp_path):
    """Issue 10: cloning into a folder named ``atoken_rt`` and running Python from its parent
    gave ``module 'atoken_rt' has no attribute 'Session'`` (setuptools' default editable hook runs
    after ``sys.path``, where the clone folder is an empty namespace package). The README's
    install (``editable_mode=compat``: a path entry) or a normal install must not be shadowed."""
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    if _import_from(neutral).returncode != 0:
        import pytest
        pytest.skip("atoken_rt is not installed in this environment (run from a checkout)")
    parent = tmp_path / "parent"
    (parent / "atoken_rt").mkdir(parents=True)
    (parent / "atoken_rt" / "README.md").write_text("a clone of the repository\n")
    result = _import_from(parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Session"
