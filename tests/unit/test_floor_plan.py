"""The floor plan of docs/ARCHITECTURE.md as far as reading files can check it; the import
layers themselves are import-linter's contracts in pyproject.toml (`make lint`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("components", "program", "stacks", "scripts", "policy", "tests")
TEST_LAYERS = ("unit", "program", "artifacts", "system")


def python_files() -> list[Path]:
    files = [ROOT / "__main__.py"]
    for d in CODE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return files


def test_no_code_edits_sys_path() -> None:
    """Tools run as `python -m scripts.<tool>`; the venv's .pth finds the checkout."""
    edits = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in {"insert", "append", "extend"}
                and ast.unparse(node.value) == "sys.path"
            ):
                edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert edits == []


def test_no_import_waits_behind_other_code() -> None:
    late = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in python_files()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"noqa: *E402", line)
    ]
    assert late == []


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support/, so every test module stands alone."""
    layers = "|".join((*TEST_LAYERS, "infra"))
    pattern = re.compile(rf"^(from|import) tests\.({layers})\.test_\w+", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert offenders == []


def test_renderers_live_apart_from_resources() -> None:
    """components/ holds ComponentResources; the pure renderers sit in components/render/."""
    for path in (ROOT / "components").glob("*.py"):
        if path.name == "__init__.py":
            continue
        assert "pulumi.ComponentResource" in path.read_text(), f"{path.name} is not a component"


def test_a_file_that_says_it_runs_by_path_is_executable() -> None:
    """A shebang promises `scripts/x.sh` works as written; without the mode bit it fails."""
    shebang_without_mode = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "scripts").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
        if p.read_bytes().startswith(b"#!") and not p.stat().st_mode & 0o111
    ]
    assert shebang_without_mode == []


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ +(.+?) *$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_citation_of_docs_reference_resolves() -> None:
    """Comments cite facts as docs/reference/<file>.md#<heading>; each must exist."""
    cited = re.compile(r"(?<![\w/.])docs/reference/([\w-]+\.md)(?:#([\w-]+))?")
    texts = [p.read_text() for p in python_files()]
    texts += [p.read_text() for p in (ROOT / "docs").rglob("*.md")]
    missing = set()
    for text in texts:
        for name, anchor in cited.findall(text):
            target = ROOT / "docs" / "reference" / name
            if not target.is_file() or (anchor and anchor not in _anchors(target.read_text())):
                missing.add(f"{name}#{anchor}")
    assert sorted(missing) == []


def test_no_citation_points_outside_the_repository() -> None:
    outside = re.compile(r"shared/" + r"reference|\N{SECTION SIGN}")  # split: not a hit itself
    offenders = [str(p.relative_to(ROOT)) for p in python_files() if outside.search(p.read_text())]
    assert offenders == []
