"""Packaging for the GPD engine: gpd_kernels, gpd_model, gpd_train."""

from setuptools import find_packages, setup

setup(
    name="gpd-engine",
    version="0.1.0",
    description="Guided Progressive Distillation of Wan2.1-style video DiTs",
    python_requires=">=3.10",
    packages=find_packages(include=["gpd_kernels*", "gpd_model*", "gpd_train*"]),
    package_data={"gpd_kernels": ["schemas.txt"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.3",
        "einops",
        "safetensors",
        "numpy",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.33", "ruff"],
    },
)
