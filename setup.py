"""Build memdec_fast and its compiled extension memdec_fast._C.

The CPU kernels are always compiled. The CUDA kernels are compiled when a GPU
is visible, or when asked for (MEMDEC_FAST_CUDA=1, TORCH_CUDA_ARCH_LIST or
MEMDEC_FAST_ALL_ARCHS): a machine without a GPU cannot run them, and they are
most of the compile. They need torch's CUDA build and a toolkit (CUDA_HOME,
else /usr/local/cuda). Only what is needed is compiled: the architectures of the
GPUs present, or, without a GPU, sm_80 with PTX (which the driver compiles for
any newer GPU on first use). Environment:

  MEMDEC_FAST_CUDA=1          compile the CUDA kernels even without a GPU (CI, wheels for GPU machines);
                              an error if they cannot be. MEMDEC_FAST_CUDA=0: the CPU kernels only.
  MEMDEC_FAST_CPU_ONLY=1      the same as MEMDEC_FAST_CUDA=0
  TORCH_CUDA_ARCH_LIST        CUDA architectures, e.g. "9.0" or "8.0;9.0+PTX" (implies MEMDEC_FAST_CUDA=1)
  MEMDEC_FAST_ALL_ARCHS=1     every architecture we support (8.0 8.6 8.9 9.0 10.0 12.0, + PTX; implies it too)
  MAX_JOBS, NVCC_THREADS      parallelism (default: from cores and memory)
  MEMDEC_FAST_DEBUG_INFO=1    compile with -g (C++) and -lineinfo (CUDA); release builds have neither
  MEMDEC_FAST_CXX_FLAGS       extra host compiler flags, space separated
  MEMDEC_FAST_NVCC_FLAGS      extra nvcc flags, space separated
  MEMDEC_FAST_BUILD_CACHE     folder of built extensions, reused when nothing that goes into one changed
                              (default build/memdec_fast_cache in the checkout; 0 turns it off)
  MEMDEC_FAST_PROGRESS_SECONDS  seconds between progress lines on stderr while compiling (default 60)
"""

from __future__ import annotations

import glob
import hashlib
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
CACHE_KEEP = 4  # built extensions kept in the cache folder, newest first
BUILD_FILE: dict = {}  # memdec_fast/_build.json, beside the extension: read by memdec_fast.build_info()


def env_flag(name: str) -> bool | None:
    """True / False for an environment variable set to 1 / 0 (or yes / no, on / off), None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "yes", "on", "true"):
        return True
    if value in ("0", "no", "off", "false"):
        return False
    raise SystemExit(f"memdec_fast: {name}={os.environ[name]!r}: expected 1 or 0")


def cuda_wanted() -> tuple[bool, bool, str]:
    """(compile the CUDA kernels?, was that asked for explicitly?, why)."""
    if env_flag("MEMDEC_FAST_CPU_ONLY"):
        return False, True, "MEMDEC_FAST_CPU_ONLY=1"
    asked = env_flag("MEMDEC_FAST_CUDA")
    if asked is not None:
        return asked, True, f"MEMDEC_FAST_CUDA={int(asked)}"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, True, "TORCH_CUDA_ARCH_LIST is set"
    if env_flag("MEMDEC_FAST_ALL_ARCHS"):
        return True, True, "MEMDEC_FAST_ALL_ARCHS=1"
    if torch.version.cuda is not None and torch.cuda.is_available():
        return True, False, "a GPU is visible"
    return False, False, ("no GPU is visible (MEMDEC_FAST_CUDA=1 compiles the CUDA kernels anyway)"
                          if torch.version.cuda is not None else "torch is a CPU build")


def cuda_archs() -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST, where it came from): the environment, all, the GPUs present, or the no-GPU default."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if env_flag("MEMDEC_FAST_ALL_ARCHS"):
        return ALL_ARCHS, "MEMDEC_FAST_ALL_ARCHS"
    if torch.cuda.is_available():
        found = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
        return ";".join(found), "the GPUs present"
    return NO_GPU_ARCHS, "no GPU visible: sm_80 + PTX, which runs on every GPU from sm_80 on"


def source_digest(compiled_only: bool = False) -> str:
    """source_digest.py's digest of this checkout (or of the files the extension is compiled from),
    loaded by path (the package needs torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("source_digest", os.path.join(ROOT, "source_digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digest(ROOT, module.COMPILED_PATTERNS) if compiled_only else module.digest(ROOT)


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
    want_cuda, asked, why_cuda = cuda_wanted()
    cuda_home = find_cuda_home() if want_cuda else None
    if want_cuda and (torch.version.cuda is None or cuda_home is None):
        missing = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found"
        if asked:  # an explicit request must not end in a build without CUDA
            raise SystemExit(f"memdec_fast: the CUDA kernels were asked for ({why_cuda}), but {missing}. Install "
                             "torch's CUDA build and a CUDA toolkit (set CUDA_HOME), or unset it for a CPU-only build.")
        want_cuda, why_cuda = False, f"{why_cuda}, but {missing}"
    with_cuda = want_cuda
    if not with_cuda:
        progress(f"memdec_fast: compiling the CPU kernels only: {why_cuda}")

    # csrc/ops.cpp (the schemas) and csrc/cpu/ (the CPU kernels); csrc/cuda/ below
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    debug = bool(env_flag("MEMDEC_FAST_DEBUG_INFO"))
    # -fopenmp: ATen's at::parallel_for is inline and runs serially without it. -g0 undoes the -g of Python's
    # CFLAGS: debug info makes the CPU kernels compile ~1.6x slower and ~10x bigger.
    cxx = ["-O3", "-fopenmp", "-g" if debug else "-g0", *os.environ.get("MEMDEC_FAST_CXX_FLAGS", "").split()]
    # compiled in: what the objects are. The package's digest and the reason for the choice go to _build.json
    # instead, so that an edit of a Python file changes no compiler command (ninja and the cache reuse the objects).
    info = {"cpu": True, "cuda": with_cuda, "cuda_archs": [], "cuda_version": None, "torch_built": torch.__version__}
    BUILD_FILE.update(source_digest=source_digest(), cuda_choice=why_cuda)
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
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", f"--threads={nvcc_threads}", *(["-lineinfo"] if debug else []),
                *os.environ.get("MEMDEC_FAST_NVCC_FLAGS", "").split()]
        progress(f"memdec_fast: compiling {len(sources)} files with the CUDA kernels ({why_cuda}): CUDA "
                 f"{torch.version.cuda} from {cuda_home}, archs {archs} ({why}), MAX_JOBS={jobs}, "
                 f"NVCC_THREADS={nvcc_threads}; a few minutes on 2 cores")
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


def progress(line: str) -> None:
    """Print a build progress line where the user sees it: on stderr, which pip shows with -v (and in CI logs and
    notebooks, where there is no terminal), and on the terminal directly when there is one, since pip without -v
    hides the build's output."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


def cache_key(ext) -> str:
    """What goes into a built extension: torch, Python, the C++/CUDA sources and setup.py, the compiler commands'
    arguments and the toolkit. Include folders are left out: pip's
    isolated build environment lives in a new temporary folder each time, with the same torch in it."""
    parts = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
        "sources": ext.sources, "macros": ext.define_macros, "args": ext.extra_compile_args,
        "link": ext.extra_link_args, "archs": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "compiled_sources": source_digest(compiled_only=True),
        "cuda_home": os.environ.get("CUDA_HOME") if any(s.endswith(".cu") for s in ext.sources) else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_dir() -> str | None:
    where = os.environ.get("MEMDEC_FAST_BUILD_CACHE", os.path.join(ROOT, "build", "memdec_fast_cache"))
    return None if where in ("", "0") else where


class ProgressBuildExtension(BuildExtension):
    """BuildExtension that reports its progress (ninja's [done/total] steps, and a line a minute on stderr while it
    compiles) and reuses a cached build when nothing that goes into one changed.

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

    def run(self):
        super().run()
        # beside the extension, in the wheel (or in the checkout for an in-place build)
        folder = os.path.dirname(self.get_ext_fullpath("memdec_fast._C"))
        with open(os.path.join(folder, "_build.json"), "w") as fh:
            json.dump(BUILD_FILE, fh, sort_keys=True)

    def build_extensions(self):
        where = cache_dir()
        cached = {e.name: os.path.join(where, cache_key(e), os.path.basename(self.get_ext_fullpath(e.name)))
                  for e in self.extensions} if where else {}
        if cached and all(os.path.isfile(p) for p in cached.values()):
            for e in self.extensions:
                os.makedirs(os.path.dirname(self.get_ext_fullpath(e.name)), exist_ok=True)
                shutil.copyfile(cached[e.name], self.get_ext_fullpath(e.name))
                os.utime(os.path.dirname(cached[e.name]))  # most recently used
            progress(f"memdec_fast: reusing the extension built before with the same sources, torch and options "
                     f"({os.path.dirname(next(iter(cached.values())))}; MEMDEC_FAST_BUILD_CACHE=0 compiles anew)")
            return
        self._compile_with_progress()
        for e in self.extensions if cached else []:
            self._store(self.get_ext_fullpath(e.name), cached[e.name])

    @staticmethod
    def _store(built: str, entry: str) -> None:
        """Copy a built extension into the cache, keeping the newest CACHE_KEEP entries."""
        try:
            folder = os.path.dirname(entry)
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(built, entry + ".tmp")
            os.replace(entry + ".tmp", entry)
            root = os.path.dirname(folder)
            entries = sorted((os.path.join(root, d) for d in os.listdir(root)), key=os.path.getmtime, reverse=True)
            for old in entries[CACHE_KEEP:]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:  # a cache that cannot be written costs the next build time, not this one
            progress(f"memdec_fast: could not cache the build in {entry}: {err}")

    def _compile_with_progress(self):
        read_fd, write_fd = os.pipe()
        saved = os.dup(1)
        os.dup2(write_fd, 1)  # ninja writes its status lines to our stdout
        os.close(write_fd)
        start = time.monotonic()
        state = {"done": 0, "total": sum(len(e.sources) for e in self.extensions)}
        finished = threading.Event()

        def relay():
            with os.fdopen(read_fd, "rb") as pipe:
                for raw in pipe:
                    os.write(saved, raw)
                    m = re.match(rb"\[(\d+)/(\d+)\]", raw)
                    if m:
                        state["done"], state["total"] = int(m[1]), int(m[2])
                        progress(f"memdec_fast: compiled {state['done']}/{state['total']} "
                                 f"({time.monotonic() - start:.0f} s)")

        def heartbeat():
            # a compile can run minutes without a line of output: say it is alive, where logs show it
            every = float(os.environ.get("MEMDEC_FAST_PROGRESS_SECONDS", "60"))
            while not finished.wait(every):
                progress(f"memdec_fast: still compiling: {state['done']}/{state['total']} files done, "
                         f"{time.monotonic() - start:.0f} s so far")

        reader = threading.Thread(target=relay, daemon=True)
        beat = threading.Thread(target=heartbeat, daemon=True)
        reader.start()
        beat.start()
        try:
            super().build_extensions()
        finally:
            finished.set()
            sys.stdout.flush()
            os.dup2(saved, 1)  # closes the pipe's last write end: the reader sees EOF
            reader.join(timeout=10)
            os.close(saved)
        progress(f"memdec_fast: extension built in {time.monotonic() - start:.0f} s")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": ProgressBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
