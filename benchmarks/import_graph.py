"""Import graph of the ``conceptexpress`` package, read from the source (nothing is imported): JSON on stdout.

    python benchmarks/import_graph.py [--src src/conceptexpress] [--edges] [--skip conceptexpress.toy]

Counts: modules, import cycles (strongly connected components of more than one module, over every import,
top-level or inside a function), the largest cycle, imports inside functions (all, and those of the package
itself), and library modules (outside ``conceptexpress.cli`` and ``__main__`` entry points) that import argparse
or the shell.
``tests/test_import_graph.py`` asserts on the same figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = "conceptexpress"
SHELL = f"{PACKAGE}.cli"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: Path) -> dict:
    """Per module: its imports as (target, in_function, line)."""
    modules: dict[str, dict] = {}
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        modules[mod] = {"path": path, "is_pkg": path.name == "__init__.py", "imports": []}
    for mod, info in modules.items():
        tree = ast.parse(info["path"].read_text(), str(info["path"]))
        in_func: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        in_func.add(id(sub))
        type_checking: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for sub in ast.walk(node):
                    type_checking.add(id(sub))
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, info["is_pkg"], node)
                targets = [base]
                # `from . import x` / `from .pkg import sub`: the submodule is imported too
                targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            for t in targets:
                info["imports"].append((t, id(node) in in_func, node.lineno))
    return modules


def _internal(target: str, modules: dict) -> str | None:
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def report(root: Path, *, with_edges: bool = False, skip: tuple[str, ...] = ()) -> dict:
    """The figures of the module docstring; modules starting with a prefix of ``skip`` are left out."""
    modules = scan(root)
    modules = {m: i for m, i in modules.items() if not m.startswith(skip)} if skip else modules
    graph: dict[str, set[str]] = {m: set() for m in modules}
    in_function_all = in_function_pkg = 0
    shell_from_library: list[str] = []
    for mod, info in modules.items():
        for target, in_func, line in info["imports"]:
            internal = _internal(target, modules) if target.startswith(PACKAGE) else None
            if in_func and (internal is None or target == internal or target.rpartition(".")[0] != internal):
                # count each import statement target once (submodule aliases of `from . import x` excepted)
                in_function_all += 1
                in_function_pkg += internal is not None
            if internal and internal != mod and not mod.startswith(internal + "."):
                graph[mod].add(internal)
            is_shell = target == "argparse" or target == SHELL or target.startswith(SHELL + ".")
            # `__main__` modules are entry points (`python -m …`), shells themselves
            if is_shell and not (mod == SHELL or mod.startswith(SHELL + ".") or mod.endswith(".__main__")):
                shell_from_library.append(f"{mod}:{line} imports {target}")
    # a package's parents are imported before it: edges to the parents are implicit, not listed
    cyc = cycles(graph)
    result = {
        "modules": len(modules),
        "cycles": len(cyc),
        "largest_cycle": max((len(c) for c in cyc), default=0),
        "cycle_members": cyc,
        "in_function_imports": in_function_all,
        "in_function_imports_of_package": in_function_pkg,
        "shell_imports_from_library": shell_from_library,
    }
    if with_edges:
        result["edges"] = {m: sorted(t) for m, t in graph.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent.parent / "src" / PACKAGE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=here, help="the package folder")
    parser.add_argument("--edges", action="store_true", help="also list each module's imports of the package")
    parser.add_argument("--skip", action="append", default=[], metavar="PREFIX",
                        help="leave out modules whose name starts with PREFIX (e.g. conceptexpress.toy)")
    args = parser.parse_args(argv)
    json.dump(report(args.src, with_edges=args.edges, skip=tuple(args.skip)), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
