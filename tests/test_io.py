"""cascade.io is a leaf, the package has no import circle, and imports sit at the tops of files.

The import graph is read from the source with ``ast`` (nothing is imported), so these tests see every module,
including those that load Jittor.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade.__main__ import COMMANDS
from cascade.io import atomic_write_text, load_npz_json, raise_many, read_lines, read_npz, save_npz_json

PACKAGE = Path(__file__).resolve().parents[1] / "cascade"

# Imports allowed inside functions: torch (read only for PyTorch checkpoints) and Jittor with the modules that
# import it at their top (it takes seconds and must be configured first by cascade.runtime.jittor).
LAZY_ALLOWED = {"torch", "jittor", "cascade.models.clip", "cascade.models.convnextv2"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Absolute names a node imports (for ``from X import a``: ``X`` and ``X.a``, whichever are modules)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _imports(module: str, path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(names imported at module level, [(line, name)] imported inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, nested = set(), []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = _resolve(module, path, child)
                if in_function:
                    nested.extend((child.lineno, n) for n in names[:1])
                else:
                    top.update(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        top, _ = _imports(name, path)
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in top if m in mods and m != name and m not in parents}
    return graph


def test_io_imports_nothing_from_the_package():
    top, nested = _imports("cascade.io", PACKAGE / "io.py")
    assert not nested
    assert not [m for m in top if m == "cascade" or m.startswith("cascade.")]


def test_the_package_has_no_import_circle():
    graph = _graph()
    assert "cascade.io" in graph and graph["cascade.io"] == set()
    state: dict[str, int] = {}
    cycles = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert cycles == []
    assert "cascade.output" not in graph["cascade.data"] and "cascade.data" not in graph["cascade.output"]


def test_imports_inside_functions_are_only_the_lazy_heavy_ones():
    lazy = []
    for name, path in _modules().items():
        _, nested = _imports(name, path)
        lazy += [f"{path.relative_to(PACKAGE.parent)}:{line}: {m}" for line, m in nested
                 if m.split(".")[0] not in LAZY_ALLOWED and m not in LAZY_ALLOWED]
    assert lazy == []


_LOADED = ("import sys\nfrom cascade.__main__ import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
           "print(' '.join(m for m in sys.modules if m.startswith(('cascade.', 'sklearn'))), file=sys.stderr)")


@pytest.mark.parametrize("argv, loaded, absent", [
    (["--help"], [], ["cascade.pipeline", "cascade.evaluate", "cascade.bench", "cascade.convert", "sklearn"]),
    (["eval", "--help"], ["cascade.evaluate"], ["cascade.pipeline", "cascade.bench", "cascade.router", "sklearn"]),
    (["train", "--help"], ["cascade.pipeline", "sklearn"], []),
    (["test", "--help"], ["cascade.pipeline", "sklearn"], []),     # the second command of its module
])
def test_only_the_module_of_the_command_run_is_imported(argv, loaded, absent):
    """`python -m cascade --help` imports no command's module and eval only its own, so neither waits for
    scikit-learn and the router (about a second); each command's own --help is its full parser."""
    r = subprocess.run([sys.executable, "-c", _LOADED, *argv], capture_output=True, text=True, timeout=120,
                       cwd=PACKAGE.parent)
    modules = set(r.stderr.strip().splitlines()[-1].split())
    assert {m for m in modules for want in loaded if m == want or m.startswith(want + ".")} >= set(loaded)
    assert not [m for m in modules for bad in absent if m == bad or m.startswith(bad + ".")]
    if argv == ["--help"]:
        assert all(line in " ".join(r.stdout.split()) for _, line in COMMANDS.values())
    else:
        assert r.returncode == 0, r.stderr
        assert {"eval": "--allow-missing", "train": "--train-list", "test": "--test-dir"}[argv[0]] in r.stdout


def test_npz_json_round_trip_and_refusals(tmp_path):
    path = save_npz_json(tmp_path / "s.npz", {"w": np.arange(3.0)}, {"k": [1, "a"]})
    arrays, meta = load_npz_json(path)
    assert meta == {"k": [1, "a"]} and np.array_equal(arrays["w"], np.arange(3.0))
    with pytest.raises(ValueError, match="reserved"):
        save_npz_json(tmp_path / "t.npz", {"__meta__": np.ones(1)}, {})
    with pytest.raises(ValueError, match=r"t\.npz: array 'o' has dtype object"):
        save_npz_json(tmp_path / "t.npz", {"o": np.array([{}], dtype=object)}, {})
    assert not (tmp_path / "t.npz").exists()
    np.savez(tmp_path / "plain.npz", w=np.ones(2))
    with pytest.raises(ValueError, match=r"plain\.npz: missing the '__meta__' entry"):
        load_npz_json(tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: not a readable task \(not an \.npz archive: no zip header\)"):
        read_npz(tmp_path / "junk.npz", "task")
    np.save(tmp_path / "bare.npy", np.ones(2))      # numpy would read it as one array, not as an archive
    with pytest.raises(ValueError, match=r"bare\.npy: not a readable task \(not an \.npz archive"):
        read_npz(tmp_path / "bare.npy", "task")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npz: not a readable task \(an empty file\)"):
        read_npz(tmp_path / "empty.npz", "task")
    with pytest.raises(FileNotFoundError, match=r"none\.npz: no such stage file"):
        load_npz_json(tmp_path / "none.npz")
    np.savez(tmp_path / "bad.npz", __meta__=np.array("{not json"))
    with pytest.raises(ValueError, match="corrupt '__meta__' JSON"):
        load_npz_json(tmp_path / "bad.npz")
    assert json.loads(json.dumps(meta)) == meta


class _Problem(ValueError):
    pass


def test_read_lines_and_raise_many_name_the_file_and_every_problem(tmp_path):
    f = tmp_path / "list.txt"
    f.write_bytes("\ufeffa 1\r\n\r\n# note\r\nb 2\r\n".encode())
    assert read_lines(f, "list") == [(1, "a 1"), (4, "b 2")]
    assert read_lines(f, "list", comments=False)[1] == (3, "# note")
    with pytest.raises(_Problem, match=r"nope\.txt: list not found"):
        read_lines(tmp_path / "nope.txt", "list", _Problem)
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"list\.txt: list is not UTF-8 text"):
        read_lines(f, "list")
    raise_many([], "nothing")
    with pytest.raises(_Problem) as err:
        raise_many([f"line {i}" for i in range(25)], "f.txt: bad:", _Problem)
    text = str(err.value)
    assert text.startswith("f.txt: bad:\n  line 0\n") and "line 19" in text and "line 20" not in text
    assert text.endswith("... and 5 more")


def test_a_failed_atomic_write_names_the_file_not_its_temporary(tmp_path):
    (tmp_path / "taken").mkdir()                       # a folder where the file should go: the rename fails
    with pytest.raises(OSError) as err:
        atomic_write_text(tmp_path / "taken", "x")
    assert err.value.filename == str(tmp_path / "taken") and err.value.filename2 is None
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]     # no temporary file left beside it
    assert isinstance(err.value, IsADirectoryError) and err.value.strerror == "is a folder, not a file"
    (tmp_path / "file").write_text("x")                # a file where a folder on the way should be
    with pytest.raises(NotADirectoryError) as err:
        atomic_write_text(tmp_path / "file/sub/out.json", "x")
    assert err.value.filename == str(tmp_path / "file/sub/out.json")
    assert err.value.strerror == f"{tmp_path / 'file'} is a file, not a folder"
    (tmp_path / "dangle").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError) as err:
        atomic_write_text(tmp_path / "dangle/out.json", "x")
    assert err.value.strerror == f"{tmp_path / 'dangle'} is a broken symbolic link, not a folder"
