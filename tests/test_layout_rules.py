"""The package's layout rules: one concept per module, so no module grows past 400 lines, and every
module opens with a docstring that says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import datumflow

PACKAGE = Path(datumflow.__file__).parent
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def name(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def test_the_package_is_where_the_rules_look() -> None:
    # A walk over the wrong directory would find nothing and pass.
    assert len(modules()) > 50


def test_no_module_is_over_400_lines() -> None:
    offenders = {}
    for path in modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            offenders[name(path)] = lines
    assert not offenders, (
        f"modules over {MAX_LINES} lines: {offenders}; split each by concept into modules"
        " of its own, each opening with a docstring that says what it owns"
    )


def test_every_module_says_what_it_owns() -> None:
    missing = []
    for path in modules():
        text = path.read_text(encoding="utf-8")
        # An empty package __init__ only marks a directory as a package: it owns nothing.
        if text.strip() and not ast.get_docstring(ast.parse(text)):
            missing.append(name(path))
    assert not missing, f"modules without a docstring saying what they own: {missing}"
