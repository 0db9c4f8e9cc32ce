"""Build gradclip: the Python package, and the CUDA extension `gradclip._C` when it can be built.

Never needs a visible GPU to decide. The extension is built when torch has CUDA support and nvcc
is found, unless GRADCLIP_SKIP_CUDA_BUILD=1. Arch list: TORCH_CUDA_ARCH_LIST, default "8.0;9.0".
Install with `pip install --no-build-isolation -e .` so the build sees the torch already installed.
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def cuda_extension_plan():
    """([extension], cmdclass, summary) for the CUDA build, or ([], {}, why it is skipped)."""
    if os.environ.get("GRADCLIP_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}, "skipped (GRADCLIP_SKIP_CUDA_BUILD=1)"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return [], {}, f"skipped (torch not importable: {exc})"
    if torch.version.cuda is None:
        return [], {}, f"skipped (torch {torch.__version__} is a CPU-only build)"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return [], {}, "skipped (nvcc not found; set CUDA_HOME)"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    extension = CUDAExtension(
        name="gradclip._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        depends=sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("csrc/*.cuh")),
        # No -std flag: torch's BuildExtension adds the one its headers need (C++17, or C++20 for
        # torch >= 2.10); the kernel sources compile under either.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-Xptxas=-v", "-lineinfo"],
        },
    )
    summary = (
        f"building gradclip._C for sm {os.environ['TORCH_CUDA_ARCH_LIST']} with torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}) from {len(sources)} sources"
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, summary


ext_modules, cmdclass, summary = cuda_extension_plan()
print(f"gradclip: CUDA extension {summary}")

setup(
    name="gradclip",
    version="0.1.0",
    description="One-launch fused gradient clipping for PyTorch (CUDA and Triton kernels)",
    python_requires=">=3.10",
    # triton_kernels/ is mapped under gradclip: Triton ships a top-level package of that name.
    packages=["gradclip", "gradclip.triton_kernels", "gradclip.bench"],
    package_dir={
        "gradclip": "gradclip",
        "gradclip.triton_kernels": "triton_kernels",
        "gradclip.bench": "bench",
    },
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton==3.6.0"],
        "dev": ["triton==3.6.0", "pytest", "ninja", "pybind11", "matplotlib", "ruff"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
