"""The package's own import graph stays visible and acyclic.

Built from the source with ``ast``: every ``import`` of an ``openrlhf_search`` module, at module level and inside
functions (``if TYPE_CHECKING:`` blocks aside). A cycle fails the test, and so does an own-module import inside a
function unless the imported module is heavy (it imports torch, ray, vllm, deepspeed, openrlhf, megatron, faiss,
peft, sentence-transformers or transformers at module level, directly or through its own module-level imports): lazy
imports are for heavy optional dependencies, not for hiding this package's graph.

``TEMPORARY_*`` below list what other work in progress still has; they only shrink.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "openrlhf_search"
HEAVY = {"torch", "ray", "vllm", "deepspeed", "openrlhf", "megatron", "mbridge", "faiss", "peft",
         "sentence_transformers", "transformers", "transformer_engine", "flash_attn"}  # fmt: skip
"""Optional or heavy third-party packages: an own module importing one of them at module level may be imported
lazily."""

TEMPORARY_CYCLES: set[frozenset[str]] = set()
"""Cycles that work in progress still has (empty: add one only while it is being removed)."""

TEMPORARY_LAZY: set[str] = set()
"""Modules that still import light own modules inside functions (empty: add one only while it is being hoisted)."""


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / PKG).rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _targets(importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    mod = node.module or ""
    if node.level:
        base = importer.split(".")
        if MODULES[importer].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]


def import_edges() -> dict[str, list[tuple[str, bool, int]]]:
    """``module -> [(imported module, inside a function, line)]`` for every module of the package."""
    edges: dict[str, list[tuple[str, bool, int]]] = {}
    for name, path in MODULES.items():
        found: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, in_function: bool, name: str = name, found: list = found) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found += [(t, inner, child.lineno) for t in _targets(name, child)]
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
        edges[name] = found
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def _own(target: str) -> bool:
    return target in MODULES


def own_graph(edges) -> dict[str, set[str]]:
    return {m: {t for t, _, _ in e if _own(t) and t != m} for m, e in edges.items()}


def heavy_modules(edges) -> set[str]:
    """Own modules that import a heavy package at module level, directly or through own module-level imports."""
    heavy = {m for m, e in edges.items() if any(t.split(".")[0] in HEAVY for t, lazy, _ in e if not lazy)}
    changed = True
    while changed:
        changed = False
        for m, e in edges.items():
            if m not in heavy and any(t in heavy for t, lazy, _ in e if not lazy):
                heavy.add(m)
                changed = True
    return heavy


def test_the_graph_sees_function_level_imports():
    """A planted function-level own import is found (the graph would otherwise miss the hidden edges)."""
    tree = ast.parse("def f():\n    from openrlhf_search.registry import Registry\n")
    node = tree.body[0].body[0]
    assert _targets("openrlhf_search.config.loader", node) == ["openrlhf_search.registry"]
    rel = ast.parse("from .loader import ConfigError\n").body[0]
    assert _targets("openrlhf_search.config", rel) == ["openrlhf_search.config.loader"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_no_import_cycles():
    found = _cycles(own_graph(import_edges()))
    assert not TEMPORARY_CYCLES - set(found), f"gone, remove from TEMPORARY_CYCLES: {TEMPORARY_CYCLES - set(found)}"
    cycles = [c for c in found if c not in TEMPORARY_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_own_imports_inside_functions_only_for_heavy_modules():
    edges = import_edges()
    heavy = heavy_modules(edges)
    bad = defaultdict(list)
    still = set()
    for m, e in edges.items():
        for target, lazy, line in e:
            if lazy and _own(target) and target not in heavy:
                if m in TEMPORARY_LAZY:
                    still.add(m)
                else:
                    bad[m].append(f"{target} (line {line})")
    assert not TEMPORARY_LAZY - still, f"hoisted, remove from TEMPORARY_LAZY: {sorted(TEMPORARY_LAZY - still)}"
    assert not bad, ("own-module imports inside functions (hoist them to module level; only modules that import a "
                     "heavy dependency may be imported lazily): "
                     + "; ".join(f"{m}: {', '.join(v)}" for m, v in sorted(bad.items())))  # fmt: skip


def test_the_config_package_is_a_leaf():
    """``openrlhf_search.config`` imports no schema: only the registry (and the standard library, yaml)."""
    edges = import_edges()
    for m, e in edges.items():
        if m == "openrlhf_search.config" or m.startswith("openrlhf_search.config."):
            own = {t for t, _, _ in e if _own(t) and not t.startswith("openrlhf_search.config")}
            assert own <= {"openrlhf_search.registry"}, (m, own)


LIGHT = ("openrlhf_search.cli", "openrlhf_search.rollout", "openrlhf_search.retrieval",
         "openrlhf_search.integrations.openrlhf.cpu_shim", "openrlhf_search.gpu_check",
         "openrlhf_search.trainer.config", "openrlhf_search.algorithms.config")  # fmt: skip
"""Modules that must import without torch: the CLI dispatcher (``--help``, ``config``), the rollout and retrieval
packages (their engines and indexes import their backends when they run), the OpenRLHF CPU shim (``sitecustomize``
loads it in every process), the GPU check (its ``--install-wheels`` step runs before the rows) and the config tree
with the ``algorithm`` section its owner declares (``openrlhf-search config``, the GPU check read it)."""


def test_light_modules_import_no_torch():
    """Module-level own imports must not drag torch into the light modules (the import graph alone cannot see it)."""
    import subprocess
    import sys

    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "    assert 'torch' not in sys.modules, m")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *LIGHT], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
