#!/usr/bin/env python3
"""The import rules of gradlens, checked statically: ``python scripts/check_imports.py``.

1. No import cycle among gradlens's modules (imports under ``if TYPE_CHECKING:`` included: a
   type-only cycle is still two modules that cannot be understood apart).
2. No module imports from a layer above its own. The layers, top first:

       cli → integrations → report → compare, sweep → diagnostics, sources → config
           → grads, engine, losses, advantages → containers, results, errors and the other
             leaf modules

   Modules of one layer may import each other (without a cycle). The root package
   ``gradlens`` (its ``__init__``, the public facade) is outside the layers: importing it is
   allowed everywhere and it may import anything.
3. No function-level import of a gradlens module outside ``gradlens/cli/`` (where lazy imports
   keep ``--help`` fast). Function-level imports of other packages (transformers,
   matplotlib, safetensors) are allowed.

Exit status 1 and one line per violation when a rule is broken; 0 and a summary otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "gradlens"
# Top layer first; a module belongs to the first layer one of whose prefixes it starts with.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("gradlens.cli", "gradlens.__main__")),
    ("integrations", ("gradlens.integrations",)),
    ("report", ("gradlens.report",)),
    ("commands", ("gradlens.api", "gradlens.compare", "gradlens.sweep", "gradlens.trace")),
    ("data", ("gradlens.diagnostics", "gradlens.sources")),
    ("config", ("gradlens.config",)),
    ("maths", ("gradlens.grads", "gradlens.engine", "gradlens.losses", "gradlens.advantages")),
    (
        "base",
        (
            "gradlens.containers",
            "gradlens.results",
            "gradlens.errors",
            "gradlens.logits",
            "gradlens.summation",
            "gradlens.vector_math",
            "gradlens.files",
            "gradlens.progress",
            "gradlens.batchfile",
            "gradlens.metric_names",
            "gradlens.validation",
            "gradlens.memory",
            "gradlens.run_files",
        ),
    ),
]
LAZY_ALLOWED = ("gradlens.cli", "gradlens.__main__")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def targets(current: str, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The gradlens modules an import statement refers to."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = current.split(".")
            if mods[current].name != "__init__.py":
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and (name == PACKAGE or name.startswith(PACKAGE + ".")) and name != current:
            found.append(name)
    return sorted(set(found))


def layer(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def check(root: Path) -> list[str]:
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_functions = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in targets(module, node, mods):
                if target == PACKAGE or module.startswith(target + "."):
                    continue  # the root facade, or a module's own parent package
                edges[module].add(target)
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                if id(node) in in_functions and not module.startswith(LAZY_ALLOWED):
                    problems.append(f"{where}: function-level import of {target}")
                mine, theirs = layer(module), layer(target)
                if mine is not None and theirs is not None and theirs < mine:
                    problems.append(
                        f"{where}: {module} ({LAYERS[mine][0]}) imports {target}, "
                        f"a layer above ({LAYERS[theirs][0]})"
                    )
        if module != PACKAGE and layer(module) is None:
            problems.append(f"{path.relative_to(root.parent)}: {module} is in no layer")
    for component in cycles(edges):
        problems.append("import cycle: " + " → ".join(component))
    return problems


def main() -> int:
    root = Path(__file__).resolve().parents[1] / PACKAGE
    problems = check(root)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} import rule violation(s)")
        return 1
    print(f"imports: no cycle, no upward import, no function-level import ({len(LAYERS)} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
