"""Packaging for the GPD engine: gpd_kernels, gpd_model, gpd_train.

`pip install --no-build-isolation -e .` also builds the optional native CPU op library
(CMakeLists.txt) into gpd_kernels/_lib/ when cmake, a C++ compiler and torch are present;
--no-build-isolation lets the build see the installed torch. Without them the install still
succeeds and gpd_kernels serves the CPU from its PyTorch reference (gpd_kernels.cpu_backend()
says which). GPD_SKIP_NATIVE=1 skips the build; GPD_REQUIRE_NATIVE=1 makes a failed build an
error.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
NATIVE_BUILD_DIR = ROOT / "build" / "native"


def _native_build_blocker() -> str | None:
    """Why the native library cannot be built here, or None."""
    if os.environ.get("GPD_SKIP_NATIVE") == "1":
        return "GPD_SKIP_NATIVE=1"
    if shutil.which("cmake") is None:
        return "cmake not found"
    compiler = os.environ.get("CXX", "c++")
    if not any(shutil.which(c) for c in (compiler, "c++", "g++", "clang++")):
        return "no C++ compiler found"
    try:
        import torch.utils  # noqa: F401
    except ImportError:
        return "torch is not importable by the build (install torch, then pip install " \
               "--no-build-isolation)"
    return None


def build_native_library(output_dir: Path) -> None:
    """Configure and build libgpd_native into output_dir through CMake."""
    import torch.utils

    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(NATIVE_BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DGPD_PYTHON={sys.executable}",
         f"-DGPD_NATIVE_OUTPUT_DIR={output_dir}", "-DGPD_BUILD_EXAMPLES=OFF"],
        check=True)
    subprocess.run(
        ["cmake", "--build", str(NATIVE_BUILD_DIR), "--target", "gpd_native",
         "--parallel", str(os.cpu_count() or 1)],
        check=True)


class BuildPyWithNative(build_py):
    """build_py, then the native library (into the source tree for editable installs)."""

    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False)
        package_root = ROOT if editable else Path(self.build_lib)
        blocker = _native_build_blocker()
        if blocker is None:
            try:
                build_native_library(package_root / "gpd_kernels" / "_lib")
                return
            except (OSError, subprocess.CalledProcessError) as exc:
                blocker = f"build failed: {exc}"
        if os.environ.get("GPD_REQUIRE_NATIVE") == "1":
            raise RuntimeError(f"gpd native library required but not built: {blocker}")
        print(f"gpd: native CPU op library not built ({blocker}); "
              "gpd_kernels will use its PyTorch reference on the CPU", file=sys.stderr)


class PlatformDistribution(Distribution):
    """The wheel may carry a compiled library, so it is platform-specific."""

    def has_ext_modules(self) -> bool:
        return True


# The commands a pip install puts on PATH; `python -m <module>` runs the same main.
CONSOLE_SCRIPTS = [
    "gpd-train = gpd_train.__main__:main",
    "gpd-sample = gpd_train.sample:main",
    "gpd-export = gpd_train.export:main",
    "gpd-encode-prompts = gpd_train.encode_prompts:main",
]
REAL = ["diffusers>=0.33", "accelerate", "transformers>=4.56", "tokenizers", "ftfy", "av>=12"]

setup(
    name="gpd-engine",
    version="0.1.0",
    description="Guided Progressive Distillation of Wan2.1-style video DiTs",
    python_requires=">=3.11",
    packages=find_packages(include=["gpd_kernels*", "gpd_model*", "gpd_train*"]),
    package_data={"gpd_kernels": ["schemas.txt"]},
    cmdclass={"build_py": BuildPyWithNative},
    distclass=PlatformDistribution,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
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
        # Real scale (a Wan2.1-T2V-Diffusers folder): umT5 prompt encoding (transformers,
        # tokenizers; ftfy cleans prompts as WanPipeline does), AutoencoderKLWan decoding and
        # export (diffusers, accelerate), MP4 writing (PyAV bundles FFmpeg with libx264).
        "real": REAL,
        # LoRA distillation and diffusers LoRA export (gpd_train.lora).
        "lora": ["peft>=0.15"],
        # --log tensorboard (gpd_train.monitor) and the evaluation's plots (report.html).
        "tensorboard": ["tensorboard"],
        "report": ["matplotlib"],
        # accelerate: diffusers needs it for WanTransformer3DModel.from_pretrained
        "test": ["pytest", "pytest-benchmark", "ruff", "peft>=0.15", "tensorboard",
                 "matplotlib", *REAL],
    },
)
