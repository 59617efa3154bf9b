"""cdlib's imports, read from the source with ``ast`` (nothing is imported): no module imports another
in a circle, none imports a layer above its own, none takes another module's ``_private`` name, and
every package says its public names in ``__all__``.

The layers, from the bottom: the shared ``base`` modules; the three wings (``engines``, ``training``,
``grid``), which import only the base; the ``stages``, which may use the wings and each other; the
``report`` side on top. A new module must be placed in :data:`LAYERS` (or a wing's package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cdlib"

BASE = {"cdlib", "cdlib.answer_values", "cdlib.answers", "cdlib.chat_templates", "cdlib.dataset_files",
        "cdlib.dataset_layouts", "cdlib.datasets", "cdlib.latex_verify", "cdlib.notebook", "cdlib.outputs",
        "cdlib.paper", "cdlib.params", "cdlib.progress", "cdlib.prompts", "cdlib.secrets", "cdlib.store",
        "cdlib.tables", "cdlib.tiny", "cdlib.tokenizer", "cdlib.toy", "cdlib.traces"}
STAGES = {"cdlib.compress", "cdlib.evaluate", "cdlib.export", "cdlib.generate", "cdlib.judge", "cdlib.serve",
          "cdlib.trace_import", "cdlib.train", "cdlib.truncate"}
REPORT = {"cdlib.accounting", "cdlib.cost", "cdlib.explore", "cdlib.figures", "cdlib.findings", "cdlib.lab",
          "cdlib.page", "cdlib.report", "cdlib.results", "cdlib.student_runs"}
WINGS = ("cdlib.engines", "cdlib.training", "cdlib.grid")
#: what each layer may import besides itself
LAYERS = {"base": set(), "engines": {"base"}, "training": {"base"}, "grid": {"base"},
          "stages": {"base", "engines", "training", "grid"},
          "report": {"base", "engines", "training", "grid", "stages"}}


def layer(module: str) -> str:
    """The layer of a cdlib module (``cdlib.grid.runner`` -> ``grid``); fails for a module placed nowhere."""
    for wing in WINGS:
        if module == wing or module.startswith(wing + "."):
            return wing.rsplit(".", 1)[1]
    for name, members in (("base", BASE), ("stages", STAGES), ("report", REPORT)):
        if module in members:
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_imports.py (BASE, STAGES or REPORT)")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package below ``root``: dotted name -> file (a package by its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """What module ``name`` imports from the package, anywhere in it (functions included):
    ``(module, name taken from it or None, line)``. ``from a import b`` names module ``a.b`` when that
    is a module, else takes name ``b`` from ``a``; an attribute read off an imported module
    (``a._b``) counts as taking ``_b``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = name.split(".")[0]
    found: list[tuple[str, str | None, int]] = []
    bound: dict[str, str] = {}  # local name -> the package module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == top:
                    found.append((alias.name, None, node.lineno))
                    if alias.asname:
                        bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != top:
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in known:
                    found.append((full, None, node.lineno))
                    bound[alias.asname or alias.name] = full
                else:
                    found.append((source, alias.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((bound[node.value.id], node.attr, node.lineno))
    return found


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (itself left out)."""
    return {m: {target for target, _, _ in imports(m, p, known) if target in known and target != m}
            for m, p in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``edges``: its strongly connected components of more than one module
    (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


KNOWN = modules()


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_walk_sees_a_circle_written_into_a_module(tmp_path):
    """A package whose two modules import each other, one of them from inside a function (where an import
    hides from a quick look) and through a relative import."""
    pkg = tmp_path / "cdlib"
    (pkg / "wing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "wing" / "__init__.py").write_text("from cdlib.wing.low import f\n__all__ = ['f']\n")
    (pkg / "wing" / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (pkg / "wing" / "high.py").write_text("from cdlib.wing import low\n\ndef g():\n    return low._hidden\n")
    known = modules(pkg)
    assert circles(graph(known)) == [["cdlib.wing.high", "cdlib.wing.low"]]
    assert ("cdlib.wing.low", "_hidden", 4) in imports("cdlib.wing.high", known["cdlib.wing.high"], known)


def test_no_import_circle():
    found = circles(graph(KNOWN))
    assert not found, "modules that import each other: " + "; ".join(", ".join(c) for c in found)


def test_no_import_from_a_higher_layer():
    wrong = []
    for m, p in KNOWN.items():
        own = layer(m)
        for target, _, line in imports(m, p, KNOWN):
            if target in KNOWN and layer(target) != own and layer(target) not in LAYERS[own]:
                wrong.append(f"{p.relative_to(ROOT.parent)}:{line}: {m} ({own}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_taken_from_another_module():
    wrong = [f"{p.relative_to(ROOT.parent)}:{line}: {m} takes {name} from {target}"
             for m, p in KNOWN.items() for target, name, line in imports(m, p, KNOWN)
             if name and name.startswith("_") and not name.startswith("__") and target != m]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(m for m, p in KNOWN.items() if p.name == "__init__.py"))
def test_each_package_says_its_public_names(package):
    tree = ast.parse(KNOWN[package].read_text())
    declared = [node for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert declared, f"{package} has no __all__"
    names = ast.literal_eval(declared[0].value)
    bound = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    bound |= {a.asname or a.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
              for a in node.names}
    bound |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert set(names) <= bound, f"{package}.__all__ names what it does not define: {set(names) - bound}"
