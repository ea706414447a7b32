"""Build memdec_fast and its compiled extension memdec_fast._C.

CUDA kernels are compiled when torch is a CUDA build and a toolkit is found
(CUDA_HOME, else /usr/local/cuda); no GPU is needed. Environment:

  MEMDEC_FAST_CPU_ONLY=1      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0")
  MAX_JOBS, NVCC_THREADS      parallelism (default: from cores and memory)
  MEMDEC_FAST_CXX_FLAGS       extra host compiler flags, space separated
  MEMDEC_FAST_NVCC_FLAGS      extra nvcc flags, space separated
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """The CUDA toolkit to use, or None when there is none with an nvcc."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def pip_cuda_includes() -> list[str]:
    """Header folders of torch's pip-installed CUDA packages (cuBLAS, cuSPARSE, ...).

    Some toolkits (nvcc-only installs) lack these headers, which torch's own
    headers include; the nvidia-* wheels that torch depends on carry them.
    """
    found = []
    for base in sys.path:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return list(dict.fromkeys(p for p in found if os.path.isdir(p)))


def parallelism() -> tuple[int, int]:
    """(MAX_JOBS, NVCC_THREADS) from the environment, else from cores and memory."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    nvcc_threads = int(os.environ.get("NVCC_THREADS", "2"))
    # each nvcc job with its threads needs about 3 GB
    jobs = int(os.environ.get("MAX_JOBS", max(1, min(cores, int(mem_gb / (3 * nvcc_threads))))))
    return jobs, nvcc_threads


def extension():
    cpu_only = os.environ.get("MEMDEC_FAST_CPU_ONLY", "0") not in ("", "0")
    cuda_home = None if cpu_only else find_cuda_home()
    with_cuda = torch.version.cuda is not None and cuda_home is not None
    if not cpu_only and not with_cuda:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found"
        print(f"memdec_fast: building CPU kernels only: {why}")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: ATen's at::parallel_for is inline and runs serially without it
    cxx = ["-O3", "-fopenmp", *os.environ.get("MEMDEC_FAST_CXX_FLAGS", "").split()]
    info = {"cpu": True, "cuda": with_cuda, "cuda_archs": [], "cuda_version": None, "torch_built": torch.__version__}
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs = []
    jobs, nvcc_threads = parallelism()
    os.environ["MAX_JOBS"] = str(jobs)

    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        info["cuda_archs"] = archs.replace(" ", ";").split(";")
        info["cuda_version"] = torch.version.cuda
        include_dirs += pip_cuda_includes()
        library_dirs += [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        nvcc = ["-O3", f"--threads={nvcc_threads}", "-lineinfo",
                *os.environ.get("MEMDEC_FAST_NVCC_FLAGS", "").split()]
        print(f"memdec_fast: CUDA {torch.version.cuda} from {cuda_home}, archs {archs}, "
              f"MAX_JOBS={jobs}, NVCC_THREADS={nvcc_threads}")
    info_macro = json.dumps(json.dumps(info, sort_keys=True))  # a C string literal of the JSON
    macros = [("MEMDEC_FAST_BUILD_INFO", info_macro)]
    if with_cuda:
        macros.append(("MEMDEC_FAST_WITH_CUDA", "1"))
        cls, args = CUDAExtension, {"cxx": cxx, "nvcc": nvcc}
    else:
        cls, args = CppExtension, {"cxx": cxx}
    return cls(
        "memdec_fast._C",
        sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=macros,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
