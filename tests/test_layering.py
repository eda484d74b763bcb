"""The layering is the architecture (docs/architecture.md): each rule below is checked
on the import statements of every module under src/bract, so an arrow that points
back up fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bract"


def _imports() -> dict[str, set[str]]:
    """module path (relative, posix) -> the absolute module names it imports."""
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        package = ["bract", *path.relative_to(SRC).parent.parts]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    names.add(".".join([*base, *([node.module] if node.module else [])]))
                elif node.module:
                    names.add(node.module)
        out[rel] = names
    return out


IMPORTS = _imports()


def _offenders(where: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{mod} imports {name}" for mod, names in IMPORTS.items()
                  if mod.startswith(where) for name in names
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_the_scan_sees_the_package() -> None:
    assert "flower/server.py" in IMPORTS and "flwr.serverapp" in IMPORTS["flower/app.py"]


def test_only_flower_imports_flwr() -> None:
    bad = sorted(f"{mod} imports {n}" for mod, names in IMPORTS.items()
                 if not mod.startswith("flower/")
                 for n in names if n == "flwr" or n.startswith("flwr."))
    assert bad == []


@pytest.mark.parametrize(("package", "forbidden"), [
    ("secagg/", ("flwr", "torch", "opacus", "bract.flower", "bract.audit", "bract.privacy",
                 "bract.records", "bract.cli")),
    ("privacy/", ("flwr", "bract.flower", "bract.audit", "bract.records", "bract.cli")),
    ("records/", ("flwr", "torch", "bract.flower", "bract.audit", "bract.cli")),
])
def test_the_pure_libraries_never_import_upwards(package: str, forbidden: tuple[str, ...]
                                                 ) -> None:
    assert _offenders(package, forbidden) == []


def test_audit_is_a_leaf_that_only_the_command_line_imports() -> None:
    """Auditors check what a federation recorded; nothing a federation runs depends on
    the auditing code (``cli.py`` composes the ``bract audit`` subcommands)."""
    bad = sorted(f"{mod} imports {n}" for mod, names in IMPORTS.items()
                 if not mod.startswith("audit/") and mod != "cli.py"
                 for n in names if n == "bract.audit" or n.startswith("bract.audit."))
    assert bad == []
    assert _offenders("audit/", ("flwr", "bract.flower")) == []
