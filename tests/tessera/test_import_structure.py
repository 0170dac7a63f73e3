"""The apps depend one way: contributions ← evaluation ← routing (an arrow points at what is
imported), and all three may use the multi-LoRA engine, which imports none of them. Read
from the source, function-local imports included, so a lazy import cannot hide an upward
dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_top_packages(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` (migrations aside) → the top-level packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("contributions", {"evaluation", "routing"}),
        ("evaluation", {"routing"}),
        # The engine is a library beneath all three: pure PyTorch, no Django.
        ("multilora", {"django", "rest_framework", "contributions", "evaluation", "routing"}),
    ],
)
def test_an_app_imports_nothing_from_the_apps_above_it(package, forbidden):
    offenders = {
        module: sorted(names & forbidden)
        for module, names in imported_top_packages(package).items()
        if names & forbidden
    }
    assert offenders == {}


def test_contributions_runs_with_neither_evaluation_nor_routing_installed():
    # In a process whose settings install neither app: contributions' models, services,
    # selectors, intake and API import, and nothing of the other apps is loaded.
    code = """
import sys
import django
from django.conf import settings
import tessera.settings as base
values = {k: getattr(base, k) for k in dir(base) if k.isupper()}
values["INSTALLED_APPS"] = [a for a in base.INSTALLED_APPS if a not in ("evaluation", "routing")]
settings.configure(**values)
django.setup()
import contributions.api.views, contributions.selectors, contributions.services
import contributions.intake, contributions.portal.views, contributions.admin
print(sorted({m.split(".")[0] for m in sys.modules} & {"evaluation", "routing"}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
