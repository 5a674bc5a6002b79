"""Structure figures of a checkout: import cycles between parts, long files, task-name literals outside their
task's own files, and the test count — the before/after table of the contracts issue.

A *part* is a top-level module or subpackage of ``vision_peft`` (``vision_peft.tasks``, ``vision_peft.config`` …)
or ``app``. Cycles are counted on the part graph (an edge when any module of one part imports any module of the
other, lazy imports inside functions included) as strongly connected components of more than one part.

Usage: ``python bench/structure_report.py [--repo DIR] [--json OUT]``. Reads files only; imports grimp (a
dependency of import-linter) to build the graph, and nothing of the package it measures.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

SOURCE_DIRS = ("vision_peft", "app")
LONG = 500


def parts_graph(repo: Path) -> dict[str, set[str]]:
    """Part → parts it imports, from grimp's module graph of ``vision_peft`` and ``app``."""
    import grimp

    sys.path.insert(0, str(repo))
    try:
        graph = grimp.build_graph("vision_peft", "app", cache_dir=None)
    finally:
        sys.path.pop(0)

    def part(module: str) -> str:
        bits = module.split(".")
        return ".".join(bits[:2]) if bits[0] == "vision_peft" and len(bits) > 1 else bits[0]

    edges: dict[str, set[str]] = {}
    for mod in graph.modules:
        src = part(mod)
        edges.setdefault(src, set())
        for dst_mod in graph.find_modules_directly_imported_by(mod):
            dst = part(dst_mod)
            if dst != src:
                edges[src].add(dst)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def long_files(repo: Path) -> list[tuple[str, int]]:
    rows = []
    for d in SOURCE_DIRS:
        for f in sorted((repo / d).rglob("*.py")):
            n = len(f.read_text().splitlines())
            if n > LONG:
                rows.append((str(f.relative_to(repo)), n))
    return rows


def task_names(repo: Path) -> list[str]:
    """Registered task names, read from the ``TASKS.register("name"`` / ``@TASKS.register(`` lines."""
    names = set()
    for f in (repo / "vision_peft" / "tasks").rglob("*.py"):
        names.update(re.findall(r"TASKS\.register\(\s*[\"']([\w-]+)[\"']", f.read_text()))
    return sorted(names)


def own_files(repo: Path, name: str) -> set[Path]:
    """A task's own files: its torch half and its numpy half (and files named after it in those folders)."""
    out = set()
    for folder in ("vision_peft/tasks", "vision_peft/runtimes"):
        out.update((repo / folder).glob(f"{name}*.py"))
    return out


def literal_sites(repo: Path, names: list[str], dirs: tuple[str, ...] = ("vision_peft", "app", "bench")) -> dict:
    """String constants equal to a task name, outside that task's own files (docstrings excluded)."""
    counts: dict[str, int] = {}
    mine = {n: own_files(repo, n) for n in names}
    for d in dirs:
        for f in sorted((repo / d).rglob("*.py")):
            try:
                tree = ast.parse(f.read_text())
            except SyntaxError:
                continue
            doc_ids = set()
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                    first = node.body[0]
                    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                        doc_ids.add(id(first.value))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in doc_ids:
                    if node.value in mine and f not in mine[node.value]:
                        key = str(f.relative_to(repo))
                        counts[key] = counts.get(key, 0) + 1
    return counts


def test_count(repo: Path) -> int:
    """Test functions (a parametrized test counts once; pytest's collected count is reported separately)."""
    n = 0
    for f in (repo / "tests").rglob("test_*.py"):
        n += len(re.findall(r"^\s*def test_", f.read_text(), flags=re.M))
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=".", help="checkout to measure")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    repo = Path(args.repo).resolve()
    edges = parts_graph(repo)
    cyc = cycles(edges)
    longs = long_files(repo)
    names = task_names(repo)
    lit = literal_sites(repo, names)
    core = {k: v for k, v in lit.items() if not k.startswith("bench/") or k == "bench/load_test.py"}
    report = {
        "repo": str(repo),
        "parts": len(edges),
        "cycles": cyc,
        "parts_in_cycles": sum(len(c) for c in cyc),
        "files_over_500": longs,
        "tasks": names,
        "task_name_literals_outside_own_files": sum(core.values()),
        "literal_sites": core,
        "task_name_literals_in_task_specific_benches": sum(v for k, v in lit.items() if k not in core),
        "test_functions": test_count(repo),
    }
    print(f"parts: {report['parts']}; cycles: {len(cyc)} ({report['parts_in_cycles']} parts)")
    for c in cyc:
        print("  cycle:", " ↔ ".join(c))
    print(f"files over {LONG} lines: {len(longs)}")
    for f, n in longs:
        print(f"  {f}: {n}")
    print(f"task-name literals outside their task's files (vision_peft, app, bench/load_test.py): {sum(core.values())}")
    for f, n in sorted(core.items()):
        print(f"  {f}: {n}")
    print(f"test functions: {report['test_functions']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
