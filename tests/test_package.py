"""The package surface: lazily exported names stay what they are, however and how often they are reached."""

from __future__ import annotations

import importlib.util
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
