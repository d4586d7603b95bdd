"""atoken_rt: install with `pip install -e .` (install torch==2.13.0 first on CPU machines)."""

from setuptools import setup

setup(
    name="atoken_rt",
    version="0.1.0",
    description="A fast, faithful runtime for the AToken vision tokenizer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` and `configs/` stay top-level folders but live inside the package namespace:
    # `atoken_rt.kernels`, `atoken_rt.configs` (a PyPI package named `kernels` exists).
    packages=["atoken_rt", "atoken_rt.kernels", "atoken_rt.configs"],
    package_dir={"atoken_rt": "atoken_rt", "atoken_rt.kernels": "kernels",
                 "atoken_rt.configs": "configs"},
    package_data={"atoken_rt.configs": ["*.yaml"]},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "safetensors"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark"],
        "cli": ["av", "pillow", "tqdm", "matplotlib"],
        "gs": ["diff-gaussian-rasterization"],
    },
    entry_points={"console_scripts": ["atoken-rt = atoken_rt.cli:main"]},
)
