"""The documentation's commands stay true: every ``blackbox-proxy`` command line in README.md,
CONTRIBUTING.md and docs/ names a command and flags that exist (a renamed flag fails here), and
every Python block compiles and imports only names the package has.

Commands are parsed by the real CLI (click), not run: their paths and servers are the reader's.
A value click cannot check here (a path that does not exist on this machine, a missing required
option of a shortened example) is not a failure; an unknown command or flag is."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from blackbox_proxy.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(kind: str) -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
            if (kind == "python") == (lang == "python"):
                out.append((f"{page.relative_to(ROOT)}", body))
    return out


def command_lines() -> list[tuple[str, str]]:
    """``(page, command)`` for each ``blackbox-proxy`` invocation in a shell or output block, its
    continuation lines joined, from the command name to the end (or a pipe, redirect or ``&``)."""
    out = []
    for page, body in blocks("shell"):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.removeprefix("$ ").strip()
            at = line.find("blackbox-proxy ")
            if at < 0 or line.startswith("#") or "pip install" in line[:at]:
                continue
            command = line[at:]
            command = re.split(r"\s(?:\||&&|;|&|>|2>)(?:\s|$)", command)[0]
            out.append((page, command))
    return out


def test_the_docs_show_commands_and_python():
    assert len(command_lines()) >= 20 and len(blocks("python")) >= 3


@pytest.mark.parametrize("page,command", command_lines(), ids=lambda value: value[:60])
def test_every_documented_command_parses(page, command):
    text = re.sub(r"\[[^\]]*\]", "", command).replace("$'", "'")  # [optional] parts; bash's $'...' quotes
    args = shlex.split(text)[1:]
    if not args or args[0].startswith("-"):
        return  # `blackbox-proxy --help` and the like
    try:
        ctx = main.make_context("blackbox-proxy", list(args), resilient_parsing=True)
        name, cmd, rest = main.resolve_command(ctx, list(args))
    except click.UsageError as exc:
        pytest.fail(f"{page}: {command!r}: {exc}")
    if "--help" in rest or "-h" in rest:
        return
    try:
        cmd.make_context(name, rest, parent=ctx)
    except (click.NoSuchOption, click.BadOptionUsage) as exc:
        pytest.fail(f"{page}: {command!r}: {exc.format_message()}")
    except click.UsageError:
        pass  # a value this machine cannot check (a path, a server) or an option the example leaves out


@pytest.mark.parametrize("page,code", blocks("python"), ids=lambda value: value[:40])
def test_every_documented_python_block_compiles_and_imports_what_exists(page, code):
    if code.lstrip().startswith(">>>"):
        return
    tree = ast.parse(code, filename=page)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blackbox_proxy"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module} has no {alias.name}"
