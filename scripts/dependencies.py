"""List each runtime dependency of pyproject.toml and the files of cascade/ that import it.

Usage: python scripts/dependencies.py [--json]

The imports are read from the source with ``ast`` (nothing is imported), so a module that loads Jittor counts
like any other. The exit status is 1 when a dependency is imported nowhere: it should then be used where it
serves or removed (docs/dependencies.md says which library does what).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def runtime_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Distribution names of ``[project] dependencies`` (versions and markers dropped)."""
    with pyproject.open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0] for d in deps]


def import_names(dist: str) -> list[str]:
    """Top-level module names a distribution provides: from the installed metadata where it is installed, else
    the distribution's name (``tomli`` on Python 3.11+, where it is not installed)."""
    found = sorted(m for m, dists in metadata.packages_distributions().items()
                   if any(d.lower() == dist.lower() for d in dists) and not m.startswith("_"))
    return found or [dist.replace("-", "_")]


def imported_modules(package: Path = ROOT / "cascade") -> dict[str, set[str]]:
    """{top-level module name: files of ``package`` that import it}."""
    out: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                out.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    return out


def report() -> list[dict]:
    used = imported_modules()
    rows = []
    for dist in runtime_dependencies():
        modules = import_names(dist)
        files = sorted({f for m in modules for f in used.get(m, ())})
        rows.append({"dependency": dist, "modules": modules, "files": files})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    args = parser.parse_args(argv)
    rows = report()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            where = ", ".join(r["files"]) if r["files"] else "NOT IMPORTED"
            print(f"{r['dependency']:<16} ({'/'.join(r['modules'])}): {where}")
    unused = [r["dependency"] for r in rows if not r["files"]]
    if unused:
        print(f"unused runtime dependencies: {', '.join(unused)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
