"""Every command and snippet in README.md runs as written (hub names mapped to the embedded demo pair).

A fenced block preceded by ``<!-- readme-test: skip: REASON -->`` is not run here (it needs downloads, a GPU,
or a server that runs until stopped; the reason says where it is run instead). In a bash block, ``memdec-fast``
commands run; the set-up commands of the Quick start (``pip install``, ``bash tests/run.sh``) are what CI
itself runs. Any other line in a block that is not skipped fails this test, so nothing is left unrun by accident.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memdec_fast

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = Path(memdec_fast.__file__).parent / "data" / "demo"
# what a user downloads -> what stands in for it here
STAND_INS = {
    "Clover-Hill/MemoryDecoder-gpt2-small": DEMO / "memory",
    "gpt2-xl": DEMO / "base",
    "gpt2-large": DEMO / "base",
    "gpt2": DEMO / "base",
    "wikitext-103-test.txt": DEMO / "domain_heldout.txt",
}
RUN_BY_CI = ("pip install", "bash tests/run.sh", "pytest ")


def fenced_blocks() -> list[tuple[str, str, int, str | None]]:
    """(language, code, line number, skip reason or None) of every bash and python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(2), m.group(3), text[: m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"(?:<!-- readme-test: skip: ([^>]+)-->\s*\n)?```(bash|python)\n(.*?)```", text,
                                 re.DOTALL)]


def blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block that is not marked skip."""
    return [(lang, code, line) for lang, code, line, skip in fenced_blocks() if skip is None]


def _stand_in(code: str, python: bool) -> str:
    """Hub names and downloaded files replaced by the demo pair: quoted names in Python, whole words in shell."""
    for name, path in STAND_INS.items():  # longest names first, so that gpt2-xl is not read as gpt2
        if python:
            code = code.replace(f'"{name}"', f'"{path}"')
        else:
            code = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", str(path), code)
    return code


def commands() -> list[tuple[int, str]]:
    out = []
    for lang, code, line in blocks():
        if lang != "bash":
            continue
        for i, raw in enumerate(code.replace("\\\n", " ").splitlines()):
            cmd = re.split(r"\s{2,}#|^#", raw)[0].strip()
            for part in (p.strip() for p in cmd.split("&&")):
                if not part or part.startswith(RUN_BY_CI):
                    continue
                assert part.startswith("memdec-fast "), f"README line {line + i}: {part!r} is neither run nor skipped"
                if part not in (c for _, c in out):
                    out.append((line + i, part))
    return out


def snippets() -> list[tuple[int, str]]:
    return [(line, code) for lang, code, line in blocks() if lang == "python"]


def test_the_readme_has_commands_and_snippets_to_run():
    assert len(commands()) >= 8 and len(snippets()) >= 3


@pytest.mark.parametrize("line, command", commands(), ids=lambda v: str(v)[:60])
def test_readme_command(line, command):
    argv = shlex.split(_stand_in(command, python=False))
    exe = shutil.which("memdec-fast")
    main = "import sys; from memdec_fast.cli import main; sys.exit(main())"
    argv = [exe, *argv[1:]] if exe else [sys.executable, "-c", main, *argv[1:]]
    # from the checkout, as the README's reader runs them (paths in them are relative to it)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=README.parent, check=False)
    assert r.returncode == 0, f"README line {line}: {command}\n{r.stderr[-2000:]}"


@pytest.mark.parametrize("line, code", snippets(), ids=lambda v: str(v)[:40])
def test_readme_snippet(line, code, tmp_path):
    code = _stand_in(textwrap.dedent(code), python=True)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       check=False)
    assert r.returncode == 0, f"README snippet at line {line}\n{r.stderr[-2000:]}"
