"""The package's shape: every module imports, no import cycles, and the
agent store's disk layout is spelled in one module (store/layout.py)."""

import ast
import re
import importlib
from pathlib import Path

import mlx_agentcache

PACKAGE = Path(mlx_agentcache.__file__).parent
LAYOUT = PACKAGE / "store" / "layout.py"


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports, at the top or inside functions."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from pkg import name`: the module itself, else its package
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_imports():
    for name in modules():
        if not name.endswith("__main__"):  # runs the CLI
            importlib.import_module(name)


def test_no_import_cycles():
    mods = modules()
    # a package's __init__ is imported before any of its modules; edges to it are not cycles of ours
    graph = {n: {t for t in imports(n, p, set(mods)) if not n.startswith(t + ".")} for n, p in mods.items()}
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# File names and folders of the agent store (model folders under <home>/models are models/'s own).
STORE_WORDS = (".safetensors", ".json", ".lock", ".locks", "blocks", ".bad-", ".tmp", ".card", ".archive")


def spelled_paths(path: Path) -> list[str]:
    """String constants (docstrings and messages aside) that name a store file or folder."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if " " in text or text.endswith("config.json"):  # a message to the user; a model folder's file
                continue
            if any(re.search(re.escape(w) + (r"(?![A-Za-z0-9_])" if w[-1].isalnum() else ""), text) for w in STORE_WORDS):
                out.append(text)  # a whole suffix or name: not `.json_schema`
    return out


def test_disk_layout_is_spelled_in_one_module():
    offenders = {}
    for name, path in modules().items():
        # models/ spells model folders (<home>/models/<name>/), benchreport its report folder's
        # files; neither is the cache directory
        if path == LAYOUT or name.startswith("mlx_agentcache.models") or name == "mlx_agentcache.benchreport":
            continue
        found = spelled_paths(path)
        if found:
            offenders[name] = found
    assert offenders == {}
    assert set(spelled_paths(LAYOUT)) >= {".safetensors", ".json", ".locks", "blocks", ".bad-"}
