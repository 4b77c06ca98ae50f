"""The package's shape, checked: the import graph is a tree of stages, and no room grows unreadable.

Imports inside functions count too: a lazy import is still a dependency, and a circle through one
breaks as soon as someone moves it to the top of the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tl_embed"
MAX_LINES = 400
# what each stage may import from the others: data flows embedding -> heads, search -> audit -> serve -> cli
ALLOWED = {
    "embedding": set(),
    "heads": {"embedding"},
    "search": {"embedding"},
    "audit": {"embedding", "heads", "search"},
    "serve": {"embedding", "heads", "search", "audit"},
    "cli": {"embedding", "heads", "search", "audit", "serve"},
}


def _modules() -> dict[str, tuple[Path, list[str]]]:
    """Dotted module name -> (file, the package its relative imports start from)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1]
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        found[".".join(parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, package) in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join((package[:len(package) - node.level + 1] if node.level else [])
                                + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert cycles(import_graph()) == []


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_stages_import_only_upstream():
    wrong = []
    for module, targets in import_graph().items():
        stage = _stage(module)
        for target in targets:
            other = _stage(target)
            if stage and other and other != stage and other not in ALLOWED[stage]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def _tensorflow_imports(tree: ast.Module) -> list[ast.AST]:
    """Import statements of tensorflow/keras, and calls of tf_quiet's importers."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            names = ["keras"] if node.func.id in ("import_tensorflow", "import_keras") else []
        else:
            continue
        if any(n.split(".")[0] in ("tensorflow", "keras") for n in names):
            found.append(node)
    return found


def test_tensorflow_only_where_models_are_built_and_never_on_import():
    """TensorFlow is for building or converting a Keras model (embedding, heads); importing any module of
    ours never imports it, so search, serve and the CLI's light commands start without it."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "tf_quiet.py":
            continue
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        stage = path.relative_to(PACKAGE).parts[0]
        for node in _tensorflow_imports(tree):
            if id(node) in top_level or stage not in ("embedding", "heads"):
                wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert wrong == []


def test_long_modules_say_why():
    """A module over MAX_LINES lines states, in its docstring, why it is one room (a line starting 'Size:')."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > MAX_LINES and not any(line.startswith("Size:") for line in doc.splitlines()):
            long.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
    assert long == []
