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
