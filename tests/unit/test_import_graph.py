"""No import cycles inside timelit/, counting the imports that hide one: those inside functions and under
`if TYPE_CHECKING:` (issue 19, item 5).

A cycle that only a function-local import keeps from failing still ties two modules into one: neither can be read,
tested or moved without the other. The graph is read from the source with `ast`, so it sees every import whether or
not it would run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import timelit

PACKAGE = Path(timelit.__file__).parent


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module of the package at `root` -> the modules of that package it imports anywhere in its source."""
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .y import z
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from timelit.data.synth import draw` imports the submodule; `from timelit.merging import merge`
                # imports the package.
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_timelit_takes_part_in_an_import_cycle():
    graph = import_graph()
    described = [
        " <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c) for c in cycles(graph)
    ]
    assert not described, "import cycles in timelit/:\n  " + "\n  ".join(described)


def test_the_graph_sees_imports_inside_functions_and_under_type_checking(tmp_path):
    package = tmp_path / "timelit"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from timelit.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from timelit import c\n"
    )
    (package / "c.py").write_text("from .a import f\n")
    graph = import_graph(package)
    assert graph["timelit.a"] == {"timelit.sub.b"}
    assert graph["timelit.sub.b"] == {"timelit.c"}
    assert graph["timelit.c"] == {"timelit.a"}
    assert cycles(graph) == [["timelit.a", "timelit.c", "timelit.sub.b"]]
