"""The package surface: lazily exported names stay what they are, however and how often they are reached."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import memdec_fast


def _run(code: str) -> subprocess.CompletedProcess:
    # cwd outside the checkout: `python -c` puts it first on sys.path, and the installed package is under test
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          check=False, cwd=Path(memdec_fast.__file__).parent / "data")


def test_no_lazy_name_is_a_submodule():
    clashes = [n for n in memdec_fast._LAZY if importlib.util.find_spec(f"memdec_fast.{n}") is not None]
    assert clashes == []


def test_lazy_names_survive_their_modules_being_imported():
    # each name in a fresh process: reach it, import every submodule it lives in, reach it again both ways
    for name, module in memdec_fast._LAZY.items():
        r = _run(f"""
            import importlib, types
            import memdec_fast
            first = getattr(memdec_fast, {name!r})
            importlib.import_module({module!r})
            from memdec_fast import {name} as again
            assert again is first is getattr(memdec_fast, {name!r}), (first, again)
            assert not isinstance(first, types.ModuleType), first
        """)
        assert r.returncode == 0, f"{name}: {r.stderr}"


def test_perplexity_called_twice_in_one_process():
    # the README's snippet run twice, as in a notebook; the second time through `from memdec_fast import ...`
    demo = Path(memdec_fast.__file__).parent / "data" / "demo"
    base, memory = str(demo / "base"), str(demo / "memory")
    r = _run(f"""
        import memdec_fast
        text = "Olga Hill lives in Llequa. " * 20
        a = memdec_fast.perplexity({base!r}, {memory!r}, text, lmbda=0.5)
        from memdec_fast import perplexity
        b = perplexity({base!r}, {memory!r}, text, lmbda=0.5)
        assert a == b, (a, b)
        print(a.joint_ppl[0.5])
    """)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) > 1.0


# --- the build: what it says it compiled, what a build without CUDA kernels does with CUDA tensors, its inputs ---

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_cuda_is_what_is_registered():
    import torch

    from memdec_fast import ops

    info = memdec_fast.build_info()
    if not info["compiled"]:
        assert info["cuda"] is False
        return
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("memdec_fast::sample", "CUDA")
    assert info["cuda"] == registered == ops._CUDA_KERNELS, info
    assert bool(info["cuda_archs"]) == info["cuda"], info


def test_cuda_tensor_without_cuda_kernels_warns_once_and_names_the_fix(monkeypatch):
    import types
    import warnings

    import pytest

    from memdec_fast import ops

    if not ops.compiled_available():
        pytest.skip("no compiled extension")
    monkeypatch.setattr(ops, "_CUDA_KERNELS", False)
    monkeypatch.setattr(ops, "_warned_no_cuda", False)
    cuda_like = types.SimpleNamespace(is_cuda=True)  # no GPU here: only .is_cuda is read before the fallback
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops._use_reference(cuda_like) and ops._use_reference(cuda_like)
    assert len(caught) == 1 and "MEMDEC_FAST_CUDA=1 pip install" in str(caught[0].message), caught
    with pytest.raises(RuntimeError, match="MEMDEC_FAST_CUDA=1"):
        ops.sample_rows(cuda_like, cuda_like, cuda_like)


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_test_extras_hold_what_the_tests_import():
    test = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].strip() for r in
            _pyproject()["project"]["optional-dependencies"]["test"]}
    assert {"matplotlib", "pytest", "scipy", "faiss-cpu", "fastapi", "uvicorn", "openai", "httpx"} <= test


def test_build_backend_installs_torch_for_the_build_only_where_none_is_installed(monkeypatch):
    # torch is installed here, so the build needs no torch of its own, unless asked for
    code = "import build_backend as b; print(b.get_requires_for_build_wheel())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                           env={**os.environ, "MEMDEC_FAST_ISOLATED_TORCH": "0"})
    isolated = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                              env={**os.environ, "MEMDEC_FAST_ISOLATED_TORCH": "1"})
    assert "torch" not in plain.stdout and "ninja" in plain.stdout, plain
    assert "torch==" in isolated.stdout, isolated
    build_requires = _pyproject()["build-system"]["requires"]
    assert not any(r.startswith("torch") for r in build_requires), build_requires
