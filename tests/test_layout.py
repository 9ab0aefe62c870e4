"""The package's shape holds: importing it (or running --help) loads no torch, and the product
never imports the harness (demo, task, launchers, interop, fidelity) except where the CLI's
`demo` and `compare` commands load it on demand."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "blackbox_proxy"


def test_import_and_help_load_no_torch():
    code = ("import sys, blackbox_proxy; from blackbox_proxy.apps import cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch loaded'; "
            "blackbox_proxy.GenerationResult; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
    done = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['blackbox-proxy', '--help'];\n"
                           "try:\n    runpy.run_module('blackbox_proxy.apps.cli', run_name='__main__')\n"
                           "except SystemExit:\n    pass\nassert 'torch' not in sys.modules"],
                          capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "serve" in done.stdout


def _harness_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of the harness package in ``path``."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            names = [(node.module or "")] + [a.name for a in node.names]
            names = [f"{'.' * node.level}{n}" for n in names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        if any("harness" in n for n in names):
            found.append((node.lineno, id(node) in module_level))
    return found


def test_the_product_does_not_import_the_harness():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "harness":
            continue
        found = _harness_imports(path)
        # the demo and compare commands, and eval's built-in arithmetic task: inside their functions
        if rel.as_posix() in ("apps/cli.py", "evaluation/tasks.py"):
            assert all(not top for _, top in found), found
            continue
        assert not found, f"{rel} imports the harness at lines {[line for line, _ in found]}"
