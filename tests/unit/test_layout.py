"""Who may import whom (DESIGN.md section 3, issue 10): no import circles between modules, `infra/`
imports nothing of `patching/` or `lab/`, only `patching/cli/` imports `lab/`, `patching/` never
imports Pulumi. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("infra", "patching", "lab")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "vendor" in path.relative_to(ROOT).parts:  # the lab's simulated vendor tools run on the hosts
                continue
            found[_module_name(path)] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `path` imports, resolved to the longest known module name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pulumi":
            out.add("pulumi")
        if isinstance(node, ast.Import) and any(a.name.split(".")[0].startswith("pulumi") for a in node.names):
            out.add("pulumi")
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def test_no_import_circles():
    graph = _graph()
    modules = _modules()
    # a package's __init__ is not a dependency of its modules: importing a.b runs a/__init__.py, not the reverse
    edges = {m: {d for d in deps if d in modules and not (_is_package(d, modules) and m.startswith(d + "."))}
             for m, deps in graph.items()}
    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                circles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_layers():
    graph = _graph()
    assert len(graph) > 40  # the walk found the code
    wrong = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if module.startswith("infra") and dep.split(".")[0] in ("patching", "lab"):
                wrong.append(f"{module} imports {dep}: infra/ never imports patching/ or lab/")
            if module.startswith("infra.model") and dep == "pulumi":
                wrong.append(f"{module} imports Pulumi: infra/model/ is the Pulumi-free fleet model")
            if module.startswith("patching") and dep == "pulumi":
                wrong.append(f"{module} imports Pulumi: patching/ never does")
            if module.startswith("patching") and not module.startswith("patching.cli") and dep.startswith("lab"):
                wrong.append(f"{module} imports {dep}: only patching/cli/ imports lab/")
            if module.startswith("lab") and dep.startswith("patching"):
                wrong.append(f"{module} imports {dep}: lab/ simulates hardware and knows nothing of patching/")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_circle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n")
    assert _imports(a, {"a", "b"}) == {"b"} and _imports(b, {"a", "b"}) == {"a"}
