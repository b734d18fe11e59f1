"""The README and the docs/ pages run as written.

Every ```python block is executed, in order, in one namespace per page (later blocks use
what earlier ones on the same page defined), on the shipped embedded world. A block that
needs a GPU, the network, a cluster or long CPU says so in an HTML comment right above it,
``<!-- readme-test: skip (reason) -->``, and is reported as skipped with that reason.
Every ``make TARGET`` a page mentions must be a Makefile target, every ``editkit
SUBCOMMAND`` a CLI subcommand, and every relative link must point at a file that exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*\n)?```python\n(?P<code>.*?)```",
                   re.S)
LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path) -> list[tuple[int, str, str | None]]:
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group("code"), m.group("reason")) for m in BLOCK.finditer(text)]


ALL_BLOCKS = [(_name(p), *b) for p in PAGES for b in blocks(p)]


def test_the_readme_has_runnable_python_blocks():
    runnable = [b for b in blocks(ROOT / "README.md") if b[2] is None]
    assert len(runnable) >= 1
    assert len([b for b in ALL_BLOCKS if b[3] is None]) >= 3


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150, "the README is a front page; put details in a docs/ page"
    linked = {m.group("target") for m in LINK.finditer(readme)}
    missing = [_name(p) for p in PAGES[1:] if _name(p) not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_point_at_files_that_exist(page):
    broken = [m.group("target") for m in LINK.finditer(page.read_text())
              if not (page.parent / m.group("target")).exists()]
    assert not broken, f"{_name(page)}: links to missing files {broken}"


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory, monkeypatch_module):
    """One namespace per page; runs/ of the pages' runners goes to a temp folder."""
    monkeypatch_module.chdir(tmp_path_factory.mktemp("readme"))
    return {}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("page,line,code,reason", ALL_BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in ALL_BLOCKS])
def test_doc_block_runs_as_written(page, line, code, reason, namespaces):
    if reason is not None:
        pytest.skip(f"{page} line {line}: {reason}")
    import matplotlib.pyplot as plt
    import torch

    torch.manual_seed(0)
    namespace = namespaces.setdefault(page, {"__name__": "__readme__"})
    exec(compile(code, f"{page}:{line}", "exec"), namespace)
    plt.close("all")


def test_make_targets_and_cli_commands_in_the_docs_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    text = "\n".join(p.read_text() for p in PAGES)
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", text))
    assert used and used <= targets, used - targets
    from editkit import cli

    # in inline code (`editkit figures`) or a command line (.venv/bin/editkit run ...), not prose
    commands = set(re.findall(r"`(?:\.venv/bin/)?editkit ([a-z]+)", text))
    commands |= set(re.findall(r"^\.venv/bin/editkit ([a-z]+)", text, re.M))
    assert commands and commands <= {"figures", "run", "world", "methods", "report"}, commands
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
