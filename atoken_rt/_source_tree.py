"""Import ``atoken_rt.kernels`` / ``atoken_rt.configs`` from a source checkout without installing.

setup.py maps the checkout's top-level ``kernels/`` and ``configs/`` folders into the package
(``package_dir``); an installed package has them inside it. Running straight from a clone (the GPU
machine runs the copied working tree as is) needs the same mapping at import time: that is this
module, imported first by ``atoken_rt/__init__.py``. It also makes a checkout always use *its own*
kernels, never those of another checkout an editable install points to.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Maps ``atoken_rt.kernels`` / ``atoken_rt.configs`` to the checkout's top-level ``kernels/``
    and ``configs/`` folders, as setup.py's ``package_dir`` does for an installed package.

    Used only when this package runs from a source checkout (``setup.py`` beside it, no
    ``atoken_rt/kernels`` folder): a clone then works without ``pip install`` (the GPU machine
    runs the checkout as is), and always with *its own* kernels, never those of another checkout
    an editable install points to.
    """

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, name, path=None, target=None):
        folder = self.folders.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])


def map_source_tree() -> None:
    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "kernels").exists() or not (root / "setup.py").is_file():
        return  # an installed package (setup.py put the folders inside it)
    folders = {f"atoken_rt.{n}": root / n for n in ("kernels", "configs")
               if (root / n / "__init__.py").is_file()}
    if folders and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder(folders))


map_source_tree()
