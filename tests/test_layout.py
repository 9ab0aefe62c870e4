"""The package's shape holds: importing it (or running --help) loads no torch, and the product
never imports the harness (demo, launchers, interop, fidelity): the installed command
(`blackbox_proxy/__main__.py`) joins the product's commands and the harness's, above both."""

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
    for module in ("blackbox_proxy.apps.cli", "blackbox_proxy"):  # the product's commands; the installed one
        done = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['blackbox-proxy', '--help'];\n"
                               f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
                               "except SystemExit:\n    pass\nassert 'torch' not in sys.modules"],
                              capture_output=True, text=True, cwd=PACKAGE.parent)
        assert done.returncode == 0, done.stderr
        assert "generate" in done.stdout and "serve" in done.stdout
    assert "demo" in done.stdout and "compare" in done.stdout


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
        if rel.parts[0] == "harness" or rel.as_posix() == "__main__.py":  # the command joins both
            continue
        found = _harness_imports(path)
        assert not found, f"{rel} imports the harness at lines {[line for line, _ in found]}"


# Each part of the package, lowest first; a module imports only from its own part or a lower one.
LAYERS = [
    {"errors", "types", "_constants", "_logging", "_lazy", "backoff"},
    {"request", "maths", "tokens"},
    {"hosts", "local", "rendering", "runs"},
    {"decoding"},
    {"tuner", "whitebox"},
    {"evaluation"},
    {"apps"},
    {"harness"},
    {"__main__", "__init__"},
]


def _part(name: str) -> str:
    return name.split(".")[0].removesuffix(".py")


def test_lower_layers_never_import_upper_ones():
    """The import graph runs one way: the maths and values at the bottom, then hosts and the small
    models, decoding, the tuners, evaluation, the front ends, the harness, the command on top."""
    level = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        mine = level[_part(rel.parts[0])]
        depth = len(rel.parts) - 1  # how many dots reach the package from this module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level <= depth:  # a sibling within the same part
                    continue
                target = (node.module or "").split(".")[0] or node.names[0].name
                if level.get(target, 0) > mine:
                    wrong.append(f"{rel}:{node.lineno} imports {target} (layer {level[target]} above {mine})")
    assert not wrong, wrong
