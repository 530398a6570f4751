"""The layering of the tree: no import cycle inside core, and no method package reaching into another."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, prefix: str) -> set[str]:
    """Every module under `prefix` that a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(prefix))
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_inside_core():
    graph = {_module(p): _imports(p, "core") for p in (ROOT / "core").rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_method_packages_do_not_import_each_other():
    """What two methods share lives in core (docs/architecture.md): a package imports itself, core, and the shared
    modules at the root of its own family folder (speech/features.py for speech/dnkd), never another package."""
    offenders = []
    for family in ("methods", "speech", "unlearning", "privacy"):
        packages = {p.name for p in (ROOT / family).iterdir() if (p / "__init__.py").is_file()}
        for package in sorted(packages):
            own = f"{family}.{package}"
            for path in (ROOT / family / package).rglob("*.py"):
                for other in ("methods", "speech", "unlearning", "privacy"):
                    for dep in _imports(path, other + "."):
                        top = dep.split(".")[1]
                        shared_of_family = other == family and top not in packages
                        if not (dep == own or dep.startswith(own + ".") or shared_of_family):
                            offenders.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not offenders, offenders
