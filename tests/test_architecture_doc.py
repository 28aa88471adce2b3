"""``docs/architecture.rst`` stays true: it names every module of ``curvops/`` and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_architecture_map_names_every_module_and_only_existing_ones():
    text = (ROOT / "docs" / "architecture.rst").read_text()
    named = set(re.findall(r"``(curvops/[\w/]+\.py)``", text))
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "curvops").rglob("*.py")}
    assert not modules - named, f"modules missing from docs/architecture.rst: {sorted(modules - named)}"
    assert not named - modules, (
        f"docs/architecture.rst names modules that do not exist: {sorted(named - modules)}"
    )


def test_no_module_is_over_500_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "curvops").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, f"modules over 500 lines: {long}"
