"""Build memdec_fast and its compiled extension memdec_fast._C.

CUDA kernels are compiled when torch is a CUDA build and a toolkit is found
(CUDA_HOME, else /usr/local/cuda); no GPU is needed. Only what is needed is
compiled: the architectures of the GPUs present, or, without a GPU, sm_80 with
PTX (which the driver compiles for any newer GPU on first use). Environment:

  MEMDEC_FAST_CPU_ONLY=1      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST        CUDA architectures, e.g. "9.0" or "8.0;9.0+PTX"
  MEMDEC_FAST_ALL_ARCHS=1     every architecture we support (8.0 8.6 8.9 9.0 10.0 12.0, + PTX)
  MAX_JOBS, NVCC_THREADS      parallelism (default: from cores and memory)
  MEMDEC_FAST_CXX_FLAGS       extra host compiler flags, space separated
  MEMDEC_FAST_NVCC_FLAGS      extra nvcc flags, space separated
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import threading
import time

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
ALL_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
NO_GPU_ARCHS = "8.0+PTX"


def cuda_archs() -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST, where it came from): the environment, all, the GPUs present, or the no-GPU default."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if os.environ.get("MEMDEC_FAST_ALL_ARCHS", "0") not in ("", "0"):
        return ALL_ARCHS, "MEMDEC_FAST_ALL_ARCHS"
    if torch.cuda.is_available():
        found = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
        return ";".join(found), "the GPUs present"
    return NO_GPU_ARCHS, "no GPU visible: sm_80 + PTX, which runs on every GPU from sm_80 on"


def source_digest() -> str:
    """memdec_fast/source_digest.py's digest of this checkout, loaded by path (the package needs torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("source_digest", os.path.join(ROOT, "memdec_fast", "source_digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digest(ROOT)


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
        progress(f"memdec_fast: building CPU kernels only: {why}")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: ATen's at::parallel_for is inline and runs serially without it
    cxx = ["-O3", "-fopenmp", *os.environ.get("MEMDEC_FAST_CXX_FLAGS", "").split()]
    info = {"cpu": True, "cuda": with_cuda, "cuda_archs": [], "cuda_version": None, "torch_built": torch.__version__,
            "source_digest": source_digest()}
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs = []
    jobs, nvcc_threads = parallelism()
    os.environ["MAX_JOBS"] = str(jobs)

    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        archs, why = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        info["cuda_archs"] = archs.replace(" ", ";").split(";")
        info["cuda_version"] = torch.version.cuda
        include_dirs += pip_cuda_includes()
        library_dirs += [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        nvcc = ["-O3", f"--threads={nvcc_threads}", "-lineinfo",
                *os.environ.get("MEMDEC_FAST_NVCC_FLAGS", "").split()]
        progress(f"memdec_fast: compiling {len(sources)} files: CUDA {torch.version.cuda} from {cuda_home}, archs "
                 f"{archs} ({why}), MAX_JOBS={jobs}, NVCC_THREADS={nvcc_threads}; a few minutes on 2 cores")
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


def progress(line: str, fd: int | None = None) -> None:
    """Print a build progress line where the user sees it: pip hides the build's output unless run with -v, so
    the line also goes to the terminal directly when there is one."""
    if fd is None:
        print(line, flush=True)
    else:
        os.write(fd, (line + "\n").encode())
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


class ProgressBuildExtension(BuildExtension):
    """BuildExtension that reports ninja's [done/total] steps with the elapsed time.

    Objects go to a folder of their own for each torch build (version, CPU or CUDA), and the extension is always
    relinked: two environments built from one checkout (the main one and tests/vllm's) never reuse each other's
    objects or library. Ninja still skips the objects that are up to date.
    """

    def finalize_options(self):
        super().finalize_options()
        kind = "cuda" if any(e.define_macros and ("MEMDEC_FAST_WITH_CUDA", "1") in e.define_macros
                             for e in self.extensions) else "cpu"
        self.build_temp = os.path.join(self.build_temp, f"torch-{torch.__version__}-{kind}")
        self.force = True

    def build_extensions(self):
        read_fd, write_fd = os.pipe()
        saved = os.dup(1)
        os.dup2(write_fd, 1)  # ninja writes its status lines to our stdout
        os.close(write_fd)
        start = time.monotonic()

        def relay():
            with os.fdopen(read_fd, "rb") as pipe:
                for raw in pipe:
                    os.write(saved, raw)
                    m = re.match(rb"\[(\d+)/(\d+)\]", raw)
                    if m:
                        # straight to the saved stdout: printing here would write into the pipe this thread drains
                        progress(f"memdec_fast: compiled {int(m[1])}/{int(m[2])} "
                                 f"({time.monotonic() - start:.0f} s)", fd=saved)

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        try:
            super().build_extensions()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)  # closes the pipe's last write end: the reader sees EOF
            reader.join(timeout=10)
            os.close(saved)
        progress(f"memdec_fast: extension built in {time.monotonic() - start:.0f} s")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": ProgressBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
