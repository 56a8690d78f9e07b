"""The package's architecture, checked: imports run one way through the layers, with no cycle.

    bindings -> ops -> models -> experiment -> cli

A module may import its own layer and the layers to its left. Function-level imports count
too. The one allowed cycle is the documented `VDProjForCausalLM.from_gpt_neox` delegate
(models/gpt_neox.py calls into models/convert.py, which builds the model).
"""
import ast
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "vdproj_ext"
LAYERS = ("bindings", "ops", "models", "experiment", "cli")
# The thin `python -m vdproj_ext.train` / `.generate` / `.study` entry points belong to the CLI
# layer.
SHIMS = {"vdproj_ext.train": "cli", "vdproj_ext.generate": "cli", "vdproj_ext.study": "cli"}
ALLOWED_CYCLE_EDGES = {("vdproj_ext.models.gpt_neox", "vdproj_ext.models.convert")}
MAX_FUNCTION_LINES = 60
MAX_MODEL_CLASS_LINES = 250


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict:
    return {module_name(p): p for p in PKG_DIR.rglob("*.py")}


def imported_modules(name: str, path: Path, known: set) -> set:
    """Every vdproj_ext module `name` imports, at any depth of the file (function-level too)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> str:
    if name in SHIMS:
        return SHIMS[name]
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "facade" if name == "vdproj_ext" else "private"


def import_graph() -> dict:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    stray = sorted(m for m in graph if layer_of(m) == "private" and not m.startswith("vdproj_ext._"))
    assert not stray, f"modules outside the layer folders: {stray}"


def test_imports_run_one_way():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    wrong = []
    for src, targets in import_graph().items():
        src_layer = layer_of(src)
        for dst in targets:
            dst_layer = layer_of(dst)
            if src_layer == "facade":
                ok = dst_layer in ("bindings", "ops", "models")  # the public API only
            elif dst_layer == "facade":
                ok = False  # inside the package, import the layer itself, not the facade
            elif src_layer in rank and dst_layer in rank:
                ok = rank[dst_layer] <= rank[src_layer]
            else:
                ok = True
            if not ok:
                wrong.append(f"{src} ({src_layer}) imports {dst} ({dst_layer})")
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if (node, nxt) in ALLOWED_CYCLE_EDGES:
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_allowed_cycle_is_the_documented_delegate():
    graph = import_graph()
    for src, dst in ALLOWED_CYCLE_EDGES:
        assert src in graph and dst in graph, (src, dst)


def long_functions(path: Path, limit: int):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                yield f"{path.relative_to(PKG_DIR.parent)}:{node.lineno} {node.name} ({length} lines)"


def test_no_long_functions():
    found = [f for p in sorted(PKG_DIR.rglob("*.py")) for f in long_functions(p, MAX_FUNCTION_LINES)]
    assert not found, "\n".join(found)


def test_model_class_reads_at_one_sitting():
    path = PKG_DIR / "models" / "gpt_neox.py"
    if not path.exists():
        pytest.fail("vdproj_ext/models/gpt_neox.py is missing")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VDProjForCausalLM")
    assert cls.end_lineno - cls.lineno + 1 <= MAX_MODEL_CLASS_LINES
