"""Build gradclip: the Python package and, where a C++ compiler is found, the native core `gradclip._C`.

Never needs a visible GPU to decide:
- torch CPU-only (or GRADCLIP_SKIP_CUDA_BUILD=1): `gradclip._C` with the host fast path and the
  CPU kernels (csrc/*.cpp, csrc/cpu/).
- torch with CUDA and nvcc found: the same plus the CUDA kernels (csrc/cuda/), for
  TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
- GRADCLIP_SKIP_NATIVE_BUILD=1: no native code at all (pure Python; the reference serves).
- GRADCLIP_CPU_CAPABILITY=default|avx2|avx512 picks the vector ISA of the CPU kernels (at::vec);
  the default, auto, takes avx2 when the build machine's torch reports AVX2 or AVX512 (x86-64 only),
  so the build runs on the machine it was built on: set default for a build that runs on any x86-64.
A native build that fails does not fail the install (gradclip falls back to the reference, and
`python -m gradclip info` says why) unless GRADCLIP_REQUIRE_NATIVE=1, which CI sets.
Install with `pip install --no-build-isolation -e .` so the build sees the torch already installed.
"""

import glob
import os
import runpy
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


# at::vec picks its implementation from these macros (the ones torch's own CPU kernels compile with).
_CPU_CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}


def cpu_capability(torch) -> str:
    """The vector ISA of the CPU kernels: $GRADCLIP_CPU_CAPABILITY, else avx2 where this machine has it."""
    choice = os.environ.get("GRADCLIP_CPU_CAPABILITY", "auto") or "auto"
    if choice != "auto":
        if choice not in _CPU_CAPABILITY_FLAGS:
            raise SystemExit(
                f"GRADCLIP_CPU_CAPABILITY must be auto or one of {sorted(_CPU_CAPABILITY_FLAGS)}"
            )
        return choice
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    # AVX512 machines get avx2 too: the kernels are memory-bound, and avx2 code runs on both.
    have = torch.backends.cpu.get_cpu_capability()
    return "avx2" if have in ("AVX2", "AVX512") else "default"


def _sources(*patterns: str) -> list[str]:
    return [path for pattern in patterns for path in sorted(glob.glob(pattern))]


def native_extension_plan():
    """([extension], cmdclass, summary) for the native build, or ([], {}, why it is skipped)."""
    if _flag("GRADCLIP_SKIP_NATIVE_BUILD"):
        return [], {}, "skipped (GRADCLIP_SKIP_NATIVE_BUILD=1)"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        return [], {}, f"skipped (torch not importable: {exc})"

    why_no_cuda = ""
    if _flag("GRADCLIP_SKIP_CUDA_BUILD"):
        why_no_cuda = "GRADCLIP_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        why_no_cuda = "nvcc not found; set CUDA_HOME"

    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    depends = _sources("csrc/*.h", "csrc/cpu/*.h")
    include_dirs = [os.path.join(HERE, "csrc")]
    isa = cpu_capability(torch)
    # -fopenmp: at::parallel_for is header code (OpenMP torch builds); the soname libgomp.so.1 binds to
    # the runtime torch already loaded, so the kernels share torch's thread pool and set_num_threads.
    cxx_flags = ["-O3", "-fopenmp", *_CPU_CAPABILITY_FLAGS[isa]]
    link_flags = ["-fopenmp"]
    if why_no_cuda:
        extension = CppExtension(
            name="gradclip._C",
            sources=sources,
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        summary = (
            f"CPU kernels only ({why_no_cuda}, {isa}), torch {torch.__version__}, {len(sources)} sources"
        )
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
        depends += _sources("csrc/cuda/*.h", "csrc/cuda/*.cuh")
        include_dirs.append(os.path.join(HERE, "csrc", "cuda"))
        extension = CUDAExtension(
            name="gradclip._C",
            sources=sources,
            include_dirs=include_dirs,
            depends=depends,
            define_macros=[("GRADCLIP_WITH_CUDA", "1")],
            extra_link_args=link_flags,
            # No -std flag: torch's BuildExtension adds the one its headers need (C++17, or C++20 for
            # torch >= 2.10); the kernel sources compile under either.
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-Xptxas=-v", "-lineinfo"],
            },
        )
        summary = (
            f"CPU ({isa}) and CUDA kernels for sm {os.environ['TORCH_CUDA_ARCH_LIST']}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), {len(sources)} sources"
        )

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """A failed native build leaves a pure-Python install (unless GRADCLIP_REQUIRE_NATIVE=1)."""

        def run(self):
            try:
                super().run()
                self._record_sources()
            except Exception as exc:  # compiler missing, headers missing, a compile error
                if _flag("GRADCLIP_REQUIRE_NATIVE"):
                    raise
                print(
                    f"gradclip: WARNING: the native build failed ({exc}); installing without gradclip._C "
                    "(the reference backend serves). GRADCLIP_REQUIRE_NATIVE=1 makes this fatal.",
                    file=sys.stderr,
                )

        def _record_sources(self):
            """The sources' fingerprint next to the built extension (gradclip/_native_sources.py)."""
            sources = runpy.run_path(os.path.join(HERE, "gradclip", "_native_sources.py"))
            target = os.path.dirname(self.get_ext_fullpath("gradclip._C"))
            with open(os.path.join(target, sources["STAMP"]), "w") as f:
                f.write(sources["digest"](os.path.join(HERE, "csrc")) + "\n")

    return [extension], {"build_ext": OptionalBuildExtension}, f"building {summary}"


ext_modules, cmdclass, summary = native_extension_plan()
print(f"gradclip: native extension gradclip._C: {summary}")

setup(
    name="gradclip",
    version="0.1.0",
    description="One-launch fused gradient clipping for PyTorch (CUDA, Triton and CPU kernels)",
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
