"""Imports follow the layer table of ``docs/architecture.md``: lower ranks only, and no module imports a CLI module.

Every module under ``src/distill`` is parsed with ``ast`` (imports inside functions and ``TYPE_CHECKING`` blocks
count: they are dependencies too). The checker is also fed the edges that broke the map before it was enforced,
to show it catches each of them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import distill

SRC = Path(distill.__file__).resolve().parent  # src/distill
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`(distill(?:\.\w+)?)`\s*\|")


def layer_table(text: str) -> dict[str, int]:
    """``{top-level module: rank}`` from the markdown table rows ``| rank | `distill.x` | ...``."""
    table: dict[str, int] = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rank, module = int(match[1]), match[2]
            assert module not in table, f"{module} has two rows in docs/architecture.md"
            table[module] = rank
    return table


@dataclass(frozen=True)
class Edge:
    """``importer`` (a module) imports ``imported`` (a module, or a name a module defines), at ``where``."""

    importer: str
    imported: str
    where: str = ""


def module_name(path: Path, root: Path) -> str:
    """``distill.cache.writer`` for ``root/cache/writer.py``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, root: Path) -> list[Edge]:
    """Every ``distill`` import in a module's source, resolved to absolute names (relative imports included).

    ``from distill.x import y`` gives ``distill.x.y`` when ``y`` is a submodule of ``distill.x``, else
    ``distill.x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [_submodule_or_module(base, alias.name, root) for alias in node.names]
        else:
            continue
        edges += [Edge(module, t, f"line {node.lineno}") for t in targets if t.split(".")[0] == "distill"]
    return list(dict.fromkeys(edges))  # `from x import a, b` is one edge


def _submodule_or_module(base: str, name: str, root: Path) -> str:
    relative = Path(*base.split(".")[1:], name)
    if (root / relative).is_dir() or (root / relative).with_suffix(".py").is_file():
        return f"{base}.{name}"
    return base


def tree_edges(root: Path) -> list[Edge]:
    """The import edges of every module under ``root`` (a ``distill`` package folder)."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        edges += imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", root)
    return edges


def layer_of(module: str, table: dict[str, int]) -> str | None:
    """The table row a module belongs to (``distill.x`` for ``distill.x.y``), or ``None`` when it has none."""
    parts = module.split(".")
    row = ".".join(parts[:2])
    return row if row in table else None


def is_cli_module(module: str) -> bool:
    """``distill.cli`` and every ``distill.<package>.cli``."""
    return module == "distill.cli" or module.endswith(".cli")


def violations(edges: list[Edge], table: dict[str, int]) -> list[str]:
    """What is wrong with ``edges`` under ``table``: one line per bad edge (empty when all is well)."""
    problems = []
    for edge in edges:
        if edge.importer == "distill" or edge.imported == "distill":
            continue  # the root package: a lazy facade any module may read (see docs/architecture.md)
        source, target = layer_of(edge.importer, table), layer_of(edge.imported, table)
        if source is None or target is None:
            unknown = edge.importer if source is None else edge.imported
            problems.append(f"{unknown} has no row in docs/architecture.md's layer table ({edge})")
        elif is_cli_module(edge.imported) and edge.imported != edge.importer:
            problems.append(f"{edge.importer} imports the CLI module {edge.imported} ({edge.where})")
        elif source != target and table[target] >= table[source]:
            problems.append(
                f"{edge.importer} (rank {table[source]}, {source}) imports {edge.imported} (rank {table[target]}, "
                f"{target}) ({edge.where}): a module may import only lower ranks"
            )
    return problems


TABLE = layer_table(DOC.read_text(encoding="utf-8"))


def test_the_table_is_a_total_order_over_every_module() -> None:
    assert len(set(TABLE.values())) == len(TABLE), "two rows share a rank"
    tops = {".".join(module_name(path, SRC).split(".")[:2]) for path in SRC.rglob("*.py")} - {"distill"}
    missing = sorted(tops - set(TABLE))
    assert not missing, f"modules without a row in docs/architecture.md: {missing}"


def test_no_import_goes_against_the_table() -> None:
    edges = tree_edges(SRC)
    assert len(edges) > 100  # the parser found the package's imports at all
    assert violations(edges, TABLE) == []


# The three edges that broke the map before this test existed, as the old code spelled them.
OLD_VIOLATIONS = {
    "cached teacher reads the cache job": ("distill.teachers.cached", "from distill.cache.reader import CacheReader"),
    "evaluation imports a CLI module": ("distill.evaluation.tasks", "from distill.generation.cli import CODE_STOP"),
    "a CLI module imports another": ("distill.generation.cli", "from distill.cache.cli import server_teacher"),
}


@pytest.mark.parametrize("case", sorted(OLD_VIOLATIONS))
def test_the_checker_catches_each_old_violation(case: str, tmp_path: Path) -> None:
    """Written into a copy of the tree's layout, each old import is reported; the fixed tree has none."""
    importer, statement = OLD_VIOLATIONS[case]
    root = tmp_path / "distill"
    for path in SRC.rglob("*.py"):  # the same modules (for submodule resolution), empty
        (root / path.relative_to(SRC)).parent.mkdir(parents=True, exist_ok=True)
        (root / path.relative_to(SRC)).write_text("")
    (root / "cache" / "reader.py").write_text("")  # where the cache's reader used to live
    target = root / Path(*importer.split(".")[1:]).with_suffix(".py")
    target.write_text(statement + "\n")
    problems = violations(tree_edges(root), TABLE)
    assert len(problems) == 1 and problems[0].startswith(importer), problems


def test_the_cache_cycle_is_one_way_now() -> None:
    """The cache job may run teachers; the teachers read the format below both, never the job."""
    assert violations([Edge("distill.cache.writer", "distill.teachers.model")], TABLE) == []
    assert violations([Edge("distill.teachers.cached", "distill.formats.reader")], TABLE) == []
    assert violations([Edge("distill.teachers.cached", "distill.cache")], TABLE)
    assert violations([Edge("distill.formats.reader", "distill.teachers")], TABLE)


def test_unknown_modules_and_relative_imports_are_resolved() -> None:
    (problem,) = violations([Edge("distill.newthing.core", "distill.losses")], TABLE)
    assert problem.startswith("distill.newthing.core has no row in docs/architecture.md's layer table")
    edges = imports_of(
        "from ..losses import Objective\nfrom . import encoding\n", "distill.formats.reader", False, SRC
    )
    assert [e.imported for e in edges] == ["distill.losses", "distill.formats.encoding"]
    assert violations(edges, TABLE) == []
    lazy = imports_of("def f():\n    from distill.trainer import Trainer\n", "distill.teachers.x", False, SRC)
    assert violations(lazy, TABLE)  # an import inside a function is a dependency too
