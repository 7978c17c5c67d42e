"""Imports run one way: `runtime` may import `export`, never the reverse, not even inside a
function (DESIGN.md). Read from the source, so a lazy import in a function body counts too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an `import` / `from ... import` anywhere in the file names, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package folder
                found.append((node.lineno, "tmkt.export." + (node.module or "")))
            else:
                found.append((node.lineno, node.module or ""))
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def is_runtime(module: str) -> bool:
    return module in ("tmkt.runtime", "runtime") or module.startswith(("tmkt.runtime.", "runtime."))


@pytest.mark.parametrize("path", sorted((ROOT / "export").glob("*.py")), ids=lambda p: p.name)
def test_export_never_imports_runtime(path):
    bad = [f"{path.name}:{line} imports {module}" for line, module in imported_modules(path) if is_runtime(module)]
    assert not bad, bad


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "lazy.py"
    src.write_text("def f():\n    from tmkt.runtime.loihi_sim import evaluate_netx\n    import runtime\n")
    assert [m for _, m in imported_modules(src) if is_runtime(m)] == [
        "tmkt.runtime.loihi_sim", "tmkt.runtime.loihi_sim.evaluate_netx", "runtime"]
