"""atoken_rt: the metadata lives in pyproject.toml (PEP 621); this shim keeps `python setup.py ...`
and older tools working. Install: see README.md (torch==2.13.0 first on CPU machines)."""

from setuptools import setup

setup()
