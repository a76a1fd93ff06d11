"""The import rules of ARCHITECTURE.md: no import circles between files or between packages,
packages depend one way (compressors <- evaluators <- hw_models <- search), and imports sit at
the top of their file except a few measured-heavy third-party ones."""

from __future__ import annotations

import ast
from pathlib import Path

import squeezer

ROOT = Path(squeezer.__file__).parent
PACKAGES = ("compressors", "evaluators", "hw_models", "search")
#: Which package may import which (a package always imports its own modules).
ALLOWED = {"compressors": set(), "evaluators": {"compressors"}, "hw_models": {"compressors", "evaluators"},
           "search": {"compressors", "evaluators", "hw_models"}, "": set(PACKAGES)}
#: Third-party modules that may be imported inside a function: each costs 0.5-1.7 s to import
#: (measured on the 2-core CI machine after torch: torchvision 1.7 s, sklearn 1.6 s, scipy.stats
#: 0.9 s, onnx 0.85 s, matplotlib 0.5 s) or is an optional extra (executorch, torchao, ray,
#: optuna_dashboard).
LAZY_OK = ("torchvision", "sklearn", "scipy", "onnx", "matplotlib", "executorch", "torchao", "ray",
           "optuna_dashboard")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["squeezer", *parts])


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")) + [ROOT / "__init__.py"]


def _resolve(mod: str, node: ast.ImportFrom | ast.Import, alias: str | None = None) -> list[str]:
    """Absolute squeezer module names an import statement in module ``mod`` refers to."""
    is_pkg = False
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = mod.split(".")
        pkg = parts if mod in _PACKAGE_MODULES else parts[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
        is_pkg = True
    out = [base]
    for a in node.names:  # `from . import hw_models` imports a module
        cand = f"{base}.{a.name}"
        if cand in _ALL_MODULES:
            out.append(cand)
    return out if is_pkg or base.startswith("squeezer") else out


_ALL_MODULES = {_module_name(p) for p in _files()}
_PACKAGE_MODULES = {_module_name(p) for p in _files() if p.name == "__init__.py"}


def _imports(path: Path) -> list[tuple[ast.stmt, bool, list[str]]]:
    """(statement, at top level?, squeezer modules or third-party names) for every import."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    out = []
    top = {id(n) for n in tree.body}
    type_checking = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            type_checking.update(id(x) for x in ast.walk(n))
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in type_checking:
            out.append((n, id(n) in top, _resolve(mod, n)))
    return out


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for f in _files():
        mod = _module_name(f)
        deps = g.setdefault(mod, set())
        for _, _, targets in _imports(f):
            for t in targets:
                if t in _ALL_MODULES and t != mod:
                    deps.add(t)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else ""


def _imports_of_package_init(mod: str, target: str) -> bool:
    """A module importing its own package's ``__init__`` (``from . import x``) is not a circle."""
    return target == mod.rpartition(".")[0]


def test_no_import_circle_between_files() -> None:
    g = _graph()
    g = {m: {t for t in deps if not _imports_of_package_init(m, t) and t != "squeezer"} for m, deps in g.items()}
    assert _cycles(g) == []


def test_packages_import_one_way() -> None:
    bad = []
    for mod, deps in _graph().items():
        src = _package(mod)
        for t in deps:
            dst = _package(t)
            if dst and dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod} -> {t}")
    assert bad == []


def test_imports_are_at_the_top_of_the_file() -> None:
    inside = []
    for f in _files():
        for node, at_top, targets in _imports(f):
            if at_top:
                continue
            names = [t for t in targets if t]
            if any(t.startswith("squeezer") for t in names) or \
                    not all(t.split(".")[0] in LAZY_OK for t in names):
                inside.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert inside == []


def test_the_checks_see_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
