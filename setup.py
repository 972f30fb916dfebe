"""Install fastalign. `kernels/` (Triton) is installed as `fastalign.kernels`, never as a
top-level `kernels` package (transformers probes for Hugging Face's package of that name).
`configs/` (the shipped recipes) is installed as `fastalign.configs` (package data).
The C++ CPU kernels in `csrc/` ship as sources and are JIT-compiled on first use (see
fastalign/ops/_cpp.py), so installing needs no compiler and no torch at build time."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["fastalign", "fastalign.*"]),
        "fastalign.kernels",
        "fastalign.csrc",
        "fastalign.configs",
    ],
    package_dir={"fastalign.kernels": "kernels", "fastalign.csrc": "csrc", "fastalign.configs": "configs"},
    package_data={
        "fastalign.csrc": ["*.cpp", "*.h"],
        "fastalign.cai": ["*.yaml"],
        "fastalign.configs": ["*.yaml", "*.json"],
    },
)
