"""The README's code runs as written.

Every ```python block is executed, in order, in one namespace (later blocks use what
earlier ones defined), on the shipped embedded world. A block that needs a GPU or the
network says so in an HTML comment right above it, ``<!-- readme-test: skip (reason) -->``,
and is reported as skipped with that reason. Every ``make TARGET`` the README mentions
must be a Makefile target, and every ``editkit SUBCOMMAND`` a CLI subcommand.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*\n)?```python\n(?P<code>.*?)```",
                   re.S)


def blocks() -> list[tuple[int, str, str | None]]:
    return [(README[:m.start()].count("\n") + 1, m.group("code"), m.group("reason")) for m in BLOCK.finditer(README)]


def test_the_readme_has_runnable_python_blocks():
    runnable = [b for b in blocks() if b[2] is None]
    assert len(runnable) >= 2


@pytest.fixture(scope="module")
def namespace(tmp_path_factory, monkeypatch_module):
    """One namespace for all blocks; runs/ of the README's runners goes to a temp folder."""
    monkeypatch_module.chdir(tmp_path_factory.mktemp("readme"))
    return {"__name__": "__readme__"}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("line,code,reason", blocks(), ids=[f"line{b[0]}" for b in blocks()])
def test_readme_block_runs_as_written(line, code, reason, namespace):
    if reason is not None:
        pytest.skip(f"README line {line}: {reason}")
    import matplotlib.pyplot as plt
    import torch

    torch.manual_seed(0)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    plt.close("all")


def test_make_targets_and_cli_commands_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", README))
    assert used and used <= targets, used - targets
    from editkit import cli

    # in inline code (`editkit figures`) or a command line (.venv/bin/editkit run ...), not prose
    commands = set(re.findall(r"`(?:\.venv/bin/)?editkit ([a-z]+)", README))
    commands |= set(re.findall(r"^\.venv/bin/editkit ([a-z]+)", README, re.M))
    assert commands and commands <= {"figures", "run", "world", "methods"}, commands
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
