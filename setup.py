"""Installs pychop; the Triton kernels in kernels/ become pychop.kernels.

The C++/CUDA extension pychop._C is built on first use (ninja, cached). Set PYCHOP_BUILD_EXTENSION=1 to
build it ahead of time here instead.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup


def extension_build_args():
    """ext_modules and cmdclass for the ahead-of-time build of pychop._C (PYCHOP_BUILD_EXTENSION=1)."""
    if os.environ.get("PYCHOP_BUILD_EXTENSION", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("pychop_build", Path(__file__).parent / "pychop" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # pychop/_build.py: sources and flags, shared with the JIT build
    with_cuda = build.cuda_missing_reason() is None
    kwargs = build.extension_kwargs(with_cuda)
    root = Path(__file__).resolve().parent
    extension = (CUDAExtension if with_cuda else CppExtension)(
        "pychop._C", sources=[str(Path(source).relative_to(root)) for source in kwargs["sources"]],
        include_dirs=kwargs["extra_include_paths"],
        extra_compile_args={"cxx": kwargs["extra_cflags"], "nvcc": kwargs.get("extra_cuda_cflags", [])},
        extra_link_args=kwargs["extra_ldflags"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


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
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis>=6", "triton>=3.2", "ninja", "ruff>=0.6",
                 "accelerate"],
        "bench": ["matplotlib", "triton>=3.2"],
        "diffusers": ["diffusers>=0.35"],  # AutoencoderKLQwenImage
    },
    **extension_build_args(),
)
