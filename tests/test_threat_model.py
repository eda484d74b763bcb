"""threat_model/ cannot drift from the code: every test it cites exists.

The threat model is only worth reading if each claim points at a test that
would fail were the mitigation broken. These checks fail when a cited test id
names a file or function that does not exist, when a threat row cites no test,
or when a cross-reference names a threat that is not in the table.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THREAT_DIR = ROOT / "threat_model"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)`")
THREAT_ROW = re.compile(r"^\|\s*(T\d{2})\s*\|")


def _documents() -> list[Path]:
    docs = sorted(THREAT_DIR.glob("*.md"))
    assert docs, f"no threat model documents in {THREAT_DIR}"
    return docs


@cache
def _test_names(path: Path) -> frozenset[str]:
    """``name`` for module-level test functions and ``Class::name`` for methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    return frozenset(n for n in names if n.split("::")[-1].startswith("test"))


def _cited_ids() -> list[tuple[str, str, str]]:
    return [
        (doc.name, m.group(1), m.group(2))
        for doc in _documents()
        for m in TEST_ID.finditer(doc.read_text(encoding="utf-8"))
    ]


def _threat_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for doc in _documents():
        for line in doc.read_text(encoding="utf-8").splitlines():
            m = THREAT_ROW.match(line)
            if m:
                assert m.group(1) not in rows, f"threat id {m.group(1)} appears twice"
                rows[m.group(1)] = line
    return rows


def test_the_threat_model_cites_tests() -> None:
    assert len(_cited_ids()) >= 20


@pytest.mark.parametrize(
    ("doc", "path", "name"), _cited_ids(), ids=lambda v: str(v).replace("tests/", "")
)
def test_every_cited_test_exists(doc: str, path: str, name: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"{doc} cites {path}::{name}, but {path} does not exist"
    assert name in _test_names(file), (
        f"{doc} cites {path}::{name}, but {path} defines no test called {name}"
    )


def test_every_threat_is_backed_by_a_test() -> None:
    rows = _threat_rows()
    assert rows, "the threats table has no rows"
    unbacked = [tid for tid, line in rows.items() if not TEST_ID.search(line)]
    assert not unbacked, f"threats without a test id: {unbacked}"


def test_cross_references_name_existing_threats() -> None:
    rows = _threat_rows()
    for doc in _documents():
        for line in doc.read_text(encoding="utf-8").splitlines():
            if THREAT_ROW.match(line):
                continue
            for tid in re.findall(r"\bT\d{2}\b", line):
                assert tid in rows, f"{doc.name} refers to {tid}, which is not in the table"


def test_the_checker_catches_a_missing_test() -> None:
    """The existence check is not vacuous: a made-up id is not found."""
    file = ROOT / "tests/secagg/test_attacks.py"
    assert "test_a_server_swaps_a_public_key" in _test_names(file)
    assert "test_a_server_swaps_a_public_key_and_wins" not in _test_names(file)
