"""The package's shape: no import cycles, no import running back up the layers, one runtime.

Read from the source (every ``import`` and ``from ... import``, module-level or not), so that a lazy import
inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import memdec_fast

ROOT = Path(memdec_fast.__file__).parent

# lowest first: a module may import from its own layer and those before it, never from a later one
LAYERS = [
    ["ranges"],
    ["ops"],
    ["models"],
    ["generation", "generation.requests", "generation.outputs", "generation.hf_args", "generation.penalty"],  # types
    ["engine"],
    ["generation.sessions", "generation.generator", "eval"],
    ["cli.args"],  # the flags the command line, the server and training share
    ["train", "vllm", "server"],
    ["cli", ""],  # "": the package's own __init__ (lazy exports of everything)
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports() -> dict[str, set[str]]:
    """memdec_fast module -> the memdec_fast modules it imports (names relative to the package)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memdec_fast"):
                base = node.module.removeprefix("memdec_fast").lstrip(".")
                names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                # `from memdec_fast import ops` imports the submodule; a lazy export comes from the package itself
                lazy = [n for n in names if n not in modules and n != "_C"]  # _C: the compiled extension
                targets = names + [base] if base or lazy else names
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("memdec_fast").lstrip(".") for a in node.names
                           if a.name.startswith("memdec_fast")]
            found |= {t for t in targets if t in modules}
        graph[name] = found - {name}
    return graph


def layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            matches = module == prefix or (prefix and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module}: in no layer; add it to LAYERS"
    return best[0]


def test_no_import_runs_back_up_the_layers():
    graph = imports()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if layer(t) > layer(m) and not (m == "" or m.endswith("__init__")))
    # a package's __init__ re-exporting its own submodules is not an upward import
    upward = [u for u in upward if not u.split(" -> ")[1].startswith(u.split(" -> ")[0] + ".")]
    assert not upward, upward


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if t.startswith(m + ".") or m.startswith(t + ".") and t in ("", *graph):
                continue  # a package and its own submodules
            assert state.get(t) != 1, " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_engine_does_not_import_the_generator():
    graph = imports()
    for m, targets in graph.items():
        if m.startswith("engine"):
            assert not {t for t in targets if t.startswith(("generation.generator", "generation.sessions"))}, m


def test_one_decode_step():
    """One capture-with-fallback routine and one bucket function, in the engine's step; the runners keep no
    cache of their own beside the caller's slot caches."""
    sources = {module_name(p): p.read_text() for p in ROOT.rglob("*.py")}
    for needle, home in (("torch.cuda.graph(", "engine.step"), ("def batch_bucket", "engine.step"),
                         ("def length_bucket", "engine.step"), ("torch.cuda.Event()", "models.pair")):
        assert [m for m, text in sources.items() if needle in text] == [home], needle
    assert "setup_caches" not in sources["models.cache"] and "KVCache" not in sources["models.runners"]
