"""Every runtime dependency declared in pyproject.toml is imported by cascade/ (scripts/dependencies.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dependencies.py"


def _script():
    spec = importlib.util.spec_from_file_location("dependencies_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_runtime_dependency_is_imported_by_the_package(capsys):
    deps = _script()
    rows = {r["dependency"]: r for r in deps.report()}
    assert {"jittor", "numpy", "scipy", "scikit-learn", "pandas", "pillow"} <= set(rows)
    assert [d for d, r in rows.items() if not r["files"]] == []
    assert rows["scikit-learn"]["modules"] == ["sklearn"] and rows["pillow"]["modules"] == ["PIL"]
    assert "cascade/evaluate.py" in rows["pandas"]["files"]
    assert deps.main([]) == 0
    assert "NOT IMPORTED" not in capsys.readouterr().out
