"""Build and run the CUDA kernels' source on the CPU (the driver under the shim), one call per child process.

Environment:
  CUDACPU_CSRC       the csrc/ folder to compile (default: this checkout's); mutate.py points it at mutated copies
  CUDACPU_SANITIZE   "thread" or "address" (ASan + UBSan): build and run the driver under that sanitizer
  CUDACPU_TIMEOUT    seconds a block may make no progress before the shim aborts (default 120)
  CUDACPU_CACHE      a folder for compiled drivers, kept across runs (default: the pytest session's tmp folder)
  CXX                the C++ compiler (default g++)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
DRIVER = HERE / "driver.cpp"
CSRC = Path(os.environ.get("CUDACPU_CSRC", HERE.parents[1] / "csrc"))
SANITIZE = os.environ.get("CUDACPU_SANITIZE", "")

KERNELS = {"joint": 0, "target": 1, "sample": 2, "sample_v2": 3}
SAMPLERS = ("sample", "sample_v2")  # v1 (kernels/sample.cuh) and v2 (kernels/sample_split.cuh): the same outputs
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PARAM_NAMES = ("lmbda", "knn_temp", "base_temp", "temperature", "top_k", "top_p", "min_p")  # the table's columns
SENTINEL = 0x5A  # the driver's fill byte of outputs

SANITIZER_FLAGS = {
    "": ["-O1"],
    "thread": ["-O1", "-fsanitize=thread"],
    "address": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0",
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:exitcode=67",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def compiler() -> str | None:
    """The C++ compiler to use, or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build_driver(out_dir: Path, sanitize: str = SANITIZE, csrc: Path = CSRC, source: Path = DRIVER) -> Path:
    """Compile driver.cpp (or `source`) against `csrc` under the shim; the binary is named by a digest of sources
    and flags, so that a folder kept across runs (CUDACPU_CACHE) is a cache.

    Example
    -------
    >>> driver = build_driver(Path("/tmp/cudacpu"))  # doctest: +SKIP
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    flags = ["-std=c++20", "-g", "-pthread", "-fdata-sections", *SANITIZER_FLAGS[sanitize]]
    sources = sorted([source, SHIM / "shared.ld", *SHIM.rglob("*.h"), *SHIM.rglob("*.cuh"), *csrc.rglob("*.h"),
                      *csrc.rglob("*.cuh")])
    digest = hashlib.sha256(" ".join([cxx, *flags, str(csrc)]).encode())
    for path in sources:
        digest.update(path.read_bytes())
    exe = out_dir / f"{source.stem}-{sanitize or 'plain'}-{digest.hexdigest()[:12]}"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".tmp{os.getpid()}")
    cmd = [cxx, *flags, f"-I{SHIM}", f"-I{csrc}", str(source), "-o", str(tmp), f"-Wl,-T,{SHIM / 'shared.ld'}"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the driver failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    tmp.rename(exe)
    return exe


@dataclasses.dataclass
class Case:
    """One kernel call. Logits are [B, V] views whose rows may be strided (unit stride along V)."""

    kernel: str
    base: torch.Tensor
    mem: torch.Tensor
    params: dict = dataclasses.field(default_factory=dict)  # scalars, by PARAM_NAMES
    table: torch.Tensor | None = None  # [B, 7] float32
    targets: torch.Tensor | None = None  # [B] int64
    seed: int = 0
    offset: int = 0
    captured: bool = False  # the Philox state behind pointers, with this intra-graph offset
    offset_intragraph: int = 0
    max_blocks: int = 264  # sample_v2 splits a row over blocks while rows x chunks <= this (2 x an H100's SMs)

    def scalar(self, name: str) -> float:
        defaults = {"lmbda": 0.25, "knn_temp": 1.0, "base_temp": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "min_p": 0.0}
        return float(self.params.get(name, defaults[name]))

    def row_params(self) -> dict[str, torch.Tensor]:
        """Each parameter per row, float64 [B]: the table's column, or the scalar."""
        rows = self.base.shape[0]
        if self.table is not None:
            return {n: self.table[:, i].double() for i, n in enumerate(PARAM_NAMES)}
        return {n: torch.full((rows,), self.scalar(n), dtype=torch.float64) for n in PARAM_NAMES}


def _span_bytes(t: torch.Tensor) -> bytes:
    """The elements a [B, V] view spans from its first element, as the kernel may read them."""
    rows, vocab = t.shape
    assert t.stride(1) == 1
    flat = torch.as_strided(t, ((rows - 1) * t.stride(0) + vocab,), (1,))
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def write_case(case: Case, path: Path) -> None:
    rows, vocab = case.base.shape
    head = struct.pack(
        "<8s10q7d3Q", b"MDFCASE2", KERNELS[case.kernel], DTYPES[case.base.dtype], DTYPES[case.mem.dtype], rows, vocab,
        case.base.stride(0), case.mem.stride(0), case.table is not None, case.captured, case.max_blocks,
        *(case.scalar(n) for n in PARAM_NAMES), case.seed, case.offset, case.offset_intragraph,
    )
    parts = [head, _span_bytes(case.base), _span_bytes(case.mem)]
    if case.table is not None:
        parts.append(case.table.float().contiguous().numpy().tobytes())
    if case.kernel == "target":
        parts.append(case.targets.long().contiguous().numpy().tobytes())
    path.write_bytes(b"".join(parts))


FAILURE = re.compile(r"cudacpu: |WARNING: ThreadSanitizer|ERROR: AddressSanitizer|runtime error: ")


def _clip(text: str, head: int = 6000, tail: int = 2000) -> str:
    """The start of a report (where a sanitizer names the racing or overflowing line) and its end."""
    return text if len(text) <= head + tail else f"{text[:head]}\n[...]\n{text[-tail:]}"


class KernelFailed(AssertionError):
    """The child running the kernel aborted (shim check), hung, or a sanitizer reported."""


def run_case(driver: Path, case: Case, work: Path, timeout: float = 600) -> dict[str, torch.Tensor]:
    """Run one kernel call in a child process; its outputs by name.

    Returns
    -------
    joint: {"logprobs": [B, V]}; target: {"joint", "base", "mem": [B]}; sample: {"tokens": int64 [B],
    "logprobs": [B]}, all float32 but the tokens.
    """
    work.mkdir(parents=True, exist_ok=True)
    n = len(list(work.glob("case*.bin")))
    case_path, out_path = work / f"case{n}.bin", work / f"out{n}.bin"
    write_case(case, case_path)
    env = {**os.environ, **SANITIZER_ENV}
    try:
        proc = subprocess.run([str(driver), str(case_path), str(out_path)], check=False, capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise KernelFailed(f"{case.kernel}: no result after {timeout} s; rerun: {driver} {case_path} {out_path}") from e
    if proc.returncode != 0 or "runtime error" in proc.stderr or "WARNING: ThreadSanitizer" in proc.stderr:
        headline = next((line for line in proc.stderr.splitlines() if FAILURE.search(line)), "")
        raise KernelFailed(f"{case.kernel}: {headline}\nthe driver failed (exit {proc.returncode}); rerun: {driver} "
                           f"{case_path} {out_path}\n{_clip(proc.stderr)}")
    raw = out_path.read_bytes()
    rows, vocab = case.base.shape
    if case.kernel == "joint":
        shapes = {"logprobs": (torch.float32, rows * vocab)}
    elif case.kernel == "target":
        shapes = {name: (torch.float32, rows) for name in ("joint", "base", "mem")}
    else:
        shapes = {"tokens": (torch.int64, rows), "logprobs": (torch.float32, rows)}
    out, pos = {}, 0
    for name, (dtype, count) in shapes.items():
        size = count * dtype.itemsize
        chunk = raw[pos:pos + size]
        pos += size
        t = torch.frombuffer(bytearray(chunk), dtype=dtype)
        unwritten = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(-1, dtype.itemsize).eq(SENTINEL)
        if bool(unwritten.all(-1).any()):
            raise AssertionError(f"{case.kernel}: output {name} has elements the kernel never wrote")
        out[name] = t.reshape(rows, vocab) if case.kernel == "joint" else t
    assert pos == len(raw), "the driver wrote more than expected"
    return out
