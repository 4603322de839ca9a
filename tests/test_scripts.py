"""Every script in scripts/ is an entry point: at most 30 lines, no function or class of its own, one ``main`` of
the package called under ``if __name__ == "__main__"`` (the logic lives in gem3d, where tests import it)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
MAX_LINES = 30


def test_there_are_scripts():
    assert {"demo.py", "enhance_dataset.py", "evaluate.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_is_an_entry_point(script):
    lines = script.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{script.name} has {len(lines)} lines (at most {MAX_LINES})"
    tree = ast.parse(script.read_text())
    defined = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"{script.name} defines {defined}: move them into the gem3d package"
    imported = [node for node in tree.body
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gem3d")]
    assert len(imported) == 1, f"{script.name} imports {[ast.unparse(n) for n in imported]}: one entry point"
    guard = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert guard and imported[0].names[0].name in ast.unparse(guard[0]), script.name
