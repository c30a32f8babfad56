"""Installs pychop; the Triton kernels in kernels/ become pychop.kernels.

The C++/CUDA extension pychop._C is built on first use (ninja, cached). Set PYCHOP_BUILD_EXTENSION=1 to
build it ahead of time here instead.
"""

from setuptools import find_packages, setup

setup(
    name="pychop",
    version="0.1.0",
    description="Fused kernels for video diffusion training: ChopGrad truncated backprop and Mobius attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pychop", "pychop.*"]) + ["pychop.kernels"],
    package_dir={"pychop.kernels": "kernels"},
    install_requires=["torch>=2.4", "einops", "tqdm"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6", "triton>=3.2", "ninja"],
        "bench": ["matplotlib", "triton>=3.2"],
        "diffusers": ["diffusers>=0.32"],
    },
)
