"""The layering of the parts, checked on their source: parsed with `ast`, no import is executed.

- a sans-I/O module imports no event loop, socket or Redis library, not even through another
  tickwire module it imports;
- `tickwire.core` imports no wing, and nothing below the top floor imports `tickwire.cli`;
- `tickwire.server` and `tickwire.feeds` don't import each other, the clients don't import the
  server;
- nothing imports a folder by its bare name (`import server`, `from feeds import …`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Sans-I/O modules (files under ROOT): bytes, events and a `now` in, bytes and events out.
SANS_IO_MODULES: tuple[str, ...] = (
    "server/session.py",
    "server/hub.py",
    "server/outbox.py",
    "server/batch.py",
    "server/frames.py",
    "server/messages.py",
    "server/follower.py",
    "server/stored.py",
    "server/projection.py",
    "server/throttle.py",
    "feeds/trade_bars.py",
    "clients/session.py",
    "clients/messages.py",
)

# What a sans-I/O module may not import: these and their submodules, and tickwire.core.redis_*.
IO_LIBRARIES: tuple[str, ...] = ("asyncio", "redis", "websockets", "hiredis", "uvloop")
IO_TICKWIRE_PREFIX = "tickwire.core.redis_"

# Imports that break the rule today, each to be removed: (file, imported module). An entry that
# no longer matches an import fails `test_sans_io_allowances_still_match`: then delete it.
SANS_IO_ALLOWANCES: frozenset[tuple[str, str]] = frozenset(set())

# Folder → import name, as pyproject's [tool.setuptools.package-dir] maps them.
PACKAGE_DIRS: dict[str, str] = {
    "tickwire": "tickwire",
    "server": "tickwire.server",
    "feeds": "tickwire.feeds",
    "clients": "tickwire.clients",
    "bench": "tickwire.bench",
}
WINGS: tuple[str, ...] = (
    "tickwire.server",
    "tickwire.feeds",
    "tickwire.clients",
    "tickwire.bench",
)
TOP_FLOOR: tuple[str, ...] = ("tickwire.cli", "tickwire.demo")
CORE = "tickwire.core"

# Pairs (importer, imported) of parts that must not depend on each other.
FORBIDDEN_BETWEEN_WINGS: tuple[tuple[str, str], ...] = (
    ("tickwire.server", "tickwire.feeds"),
    ("tickwire.feeds", "tickwire.server"),
    ("tickwire.clients", "tickwire.server"),
)

# Folders that must never be imported by their bare name; other places that hold Python code.
BARE_NAMES: frozenset[str] = frozenset({"server", "feeds", "clients", "bench"})
OTHER_DIRS: tuple[str, ...] = ("tests",)


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is written and how."""

    file: str  # relative to ROOT
    line: int
    target: str  # the absolute module name, as precise as the source allows
    source: str  # the statement as written, for the message
    bare_top: str | None  # first name of an absolute import, for the bare-name rule

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.source}"


def _python_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*.py")):
        if not any(part.startswith(".") or part == "__pycache__" for part in path.parts):
            yield path


def module_name(path: Path) -> str | None:
    """The import name of a file under a package folder, or None outside them."""
    rel = path.relative_to(ROOT)
    package = PACKAGE_DIRS.get(rel.parts[0])
    if package is None:
        return None
    parts = [package, *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    """Every module of the package folders, by import name."""
    modules: dict[str, Path] = {}
    for folder in PACKAGE_DIRS:
        for path in _python_files(ROOT / folder):
            name = module_name(path)
            assert name is not None
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in a file (also inside functions and `if TYPE_CHECKING:`), resolved."""
    rel = path.relative_to(ROOT).as_posix()
    name = module_name(path)
    package = (name if path.stem == "__init__" else name.rpartition(".")[0]) if name else None
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(
                    Import(
                        rel,
                        node.lineno,
                        alias.name,
                        f"import {alias.name}",
                        alias.name.partition(".")[0],
                    )
                )
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(alias.name for alias in node.names)
            source = f"from {'.' * node.level}{node.module or ''} import {names}"
            if node.level == 0:
                assert node.module is not None
                base: str | None = node.module
            elif package is None:
                base = None  # a relative import outside the packages (tests): not ours to resolve
            else:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base is None:
                continue
            bare = base.partition(".")[0] if node.level == 0 else None
            for alias in node.names:
                # `from tickwire.server import hub` imports the module tickwire.server.hub;
                # `from tickwire.clients import connect` uses the package tickwire.clients.
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else base
                found.append(Import(rel, node.lineno, target, source, bare))
    return found


def within(name: str, parts: Iterable[str]) -> bool:
    """Whether module `name` is one of `parts` or inside one of them."""
    return any(name == part or name.startswith(part + ".") for part in parts)


def is_io(target: str) -> bool:
    return within(target, IO_LIBRARIES) or target.startswith(IO_TICKWIRE_PREFIX)


class Graph:
    """The imports of every package module, with the sans-I/O allowances left out."""

    def __init__(self) -> None:
        self.modules = package_files()
        self.imports: dict[str, list[Import]] = {
            name: imports_of(path, self.modules) for name, path in self.modules.items()
        }

    def file_of(self, name: str) -> str:
        return self.modules[name].relative_to(ROOT).as_posix()

    def io_chain(self, name: str, seen: set[str]) -> list[Import] | None:
        """A chain of imports from module `name` to an I/O library, or None."""
        seen.add(name)
        for imp in self.imports[name]:
            if (imp.file, imp.target) in SANS_IO_ALLOWANCES:
                continue
            if is_io(imp.target):
                return [imp]
            if imp.target in self.modules and imp.target not in seen:
                rest = self.io_chain(imp.target, seen)
                if rest is not None:
                    return [imp, *rest]
        return None


def _report(offences: list[str], rule: str) -> str:
    return f"{rule}:\n  " + "\n  ".join(offences)


def test_sans_io_modules_exist() -> None:
    missing = [rel for rel in SANS_IO_MODULES if not (ROOT / rel).is_file()]
    assert not missing, f"SANS_IO_MODULES names files that don't exist: {missing}"


def test_sans_io_modules_import_no_io() -> None:
    graph = Graph()
    offences: list[str] = []
    for rel in SANS_IO_MODULES:
        name = module_name(ROOT / rel)
        assert name is not None
        chain = graph.io_chain(name, set())
        if chain is not None:
            offences.append(" → ".join(imp.where() for imp in chain))
    assert not offences, _report(
        offences, "a sans-I/O module imports asyncio/redis/websockets/hiredis/uvloop/core.redis_*"
    )


def test_sans_io_allowances_still_match() -> None:
    graph = Graph()
    written = {(imp.file, imp.target) for imps in graph.imports.values() for imp in imps}
    stale = sorted(SANS_IO_ALLOWANCES - written)
    assert not stale, f"these imports are gone: delete them from SANS_IO_ALLOWANCES: {stale}"


def test_core_imports_no_wing_and_nothing_imports_the_top_floor() -> None:
    graph = Graph()
    offences: list[str] = []
    for name, imports in graph.imports.items():
        for imp in imports:
            if within(name, [CORE]) and within(imp.target, WINGS):
                offences.append(f"{imp.where()}  (tickwire.core imports a wing)")
            elif not within(name, TOP_FLOOR) and within(imp.target, TOP_FLOOR):
                offences.append(f"{imp.where()}  (only the command line imports the top floor)")
    assert not offences, _report(offences, "imports that point up")


def test_wings_do_not_import_each_other() -> None:
    graph = Graph()
    offences: list[str] = []
    for name, imports in graph.imports.items():
        for importer, imported in FORBIDDEN_BETWEEN_WINGS:
            if within(name, [importer]):
                offences.extend(
                    f"{imp.where()}  ({importer} imports {imported})"
                    for imp in imports
                    if within(imp.target, [imported])
                )
    assert not offences, _report(offences, "imports across wings that must stay apart")


def test_no_bare_folder_imports() -> None:
    modules = package_files()
    files = [*modules.values()]
    for folder in OTHER_DIRS:
        files.extend(_python_files(ROOT / folder))
    offences = [
        f"{imp.where()}  (use tickwire.{imp.bare_top})"
        for path in files
        for imp in imports_of(path, modules)
        if imp.bare_top in BARE_NAMES
    ]
    assert not offences, _report(offences, "bare imports of a folder name")
