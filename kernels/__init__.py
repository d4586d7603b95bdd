"""Triton kernels for atoken_rt, importable as ``atoken_rt.kernels``.

This folder is mapped into the package namespace by ``setup.py`` (``package_dir``), so the
top-level name ``kernels`` (a different PyPI package) is never shadowed. One op per file; each is
checked against its torch reference in :mod:`atoken_rt.reference`.
"""
