"""editkit's modules import in one direction only: down the layers, never in a circle.

Read from the source with ``ast``: every ``import`` and ``from ... import`` of an editkit
module, at the top of a file or inside a function (a lazy import is still a dependency),
including the package ``__init__`` that importing a submodule runs first. The layers,
lowest first, are those of docs/architecture.md:

    base → data → models → math → world → editors → studies → views → api (the package root)

A module may import its own layer and the layers below it. Dispatch by name that a lower
layer needs (``load_model("world-gpt2")``, ``load_counterfact("world")``, ``corpus="world"``,
``load_model("smollm2-135m")``, ``edit.save``) goes through registries that the higher
layer fills in (see ``editkit/registrations.py``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "editkit"

#: Lowest first. A module's layer is that of its longest listed prefix.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("editkit._version", "editkit.paths", "editkit.hub", "editkit.registry", "editkit.runlog",
             "editkit.progress"),
    "data": ("editkit.requests", "editkit.data", "editkit.corpora"),
    "models": ("editkit.models", "editkit.zoo", "editkit.generation"),
    "math": ("editkit.hooks", "editkit.protocols", "editkit.solver", "editkit.stats", "editkit.keys",
             "editkit.values", "editkit.metrics", "editkit.tracing"),
    "world": ("editkit.world",),
    "editors": ("editkit.editors", "editkit.saved", "editkit.hparams"),
    "studies": ("editkit.runstore", "editkit.cluster", "editkit.studies", "editkit.experiments"),
    "views": ("editkit.plots", "editkit.widgets", "editkit.notebook", "editkit.cli", "editkit.testing",
              "editkit.report"),
    "api": ("editkit", "editkit.registrations"),
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").relative_to(PACKAGE.parent).parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    best = max(((prefix, name) for name, prefixes in LAYERS.items() for prefix in prefixes
                if module == prefix or (prefix != "editkit" and module.startswith(prefix + "."))),
               key=lambda t: len(t[0]), default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")
    return best[1]


def _known(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str) -> dict[str, int]:
    """The editkit modules ``module`` imports (lazily or not) -> the first line that does."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        for t in targets:
            if t == "editkit" or t.startswith("editkit."):
                t = _known(t)
                # importing a.b.c runs a.b's __init__ first (the root's is the api, reached by every import)
                if t != module:
                    out.setdefault(t, node.lineno)
                for m in (t.rsplit(".", i)[0] for i in range(1, t.count("."))):  # its packages, but not our own
                    if m != module and not module.startswith(m + "."):
                        out.setdefault(m, node.lineno)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_import_points_up_a_layer():
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)}) at line {line}"
              for m, targets in GRAPH.items() for t, line in targets.items()
              if ORDER.index(layer_of(t)) > ORDER.index(layer_of(m))]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_lazy_or_not():
    # the root imports its submodules and every submodule's import runs the root first: that
    # edge is Python's, not a dependency, so circles are looked for below the root
    below = {m: {t: l for t, l in ts.items() if t != "editkit"} for m, ts in GRAPH.items() if m != "editkit"}
    cycles = _cycles(below)
    assert not cycles, "import circles:\n" + "\n".join(
        " → ".join(c) + "  (" + "; ".join(f"{a} imports {b} at line {below[a][b]}" for a in c for b in c
                                           if b in below[a]) + ")" for c in cycles)


def test_the_checker_finds_a_circle_and_an_upward_import():
    fake = {"editkit.data": {"editkit.world": 3}, "editkit.world": {"editkit.metrics": 5},
            "editkit.metrics": {"editkit.data": 7}}
    assert _cycles(fake) == [["editkit.data", "editkit.metrics", "editkit.world"]]
    assert ORDER.index(layer_of("editkit.world")) > ORDER.index(layer_of("editkit.data.counterfact"))


@pytest.mark.parametrize("module", ["editkit.models", "editkit.data.counterfact", "editkit.data.corpus"])
def test_the_lower_layers_do_not_know_the_world_or_the_zoo(module):
    assert not {t for t in GRAPH[module] if t.startswith(("editkit.world", "editkit.zoo"))}


def test_a_registered_source_is_what_the_lower_layer_loads(tmp_path):
    """A lower layer finds names only through its registry: a source registered from above
    (as editkit.registrations registers the world and the zoo) is what load_model and
    iter_corpus then use, and the built-in ones stay registered."""
    from editkit.data.corpus import CORPORA, iter_corpus
    from editkit.data.counterfact import COUNTERFACT_SOURCES
    from editkit.models import MODEL_SOURCES, load_model
    import torch

    from editkit.testing import tiny_lm

    assert {"world", "zoo"} <= set(MODEL_SOURCES.labels())
    assert "world" in COUNTERFACT_SOURCES.labels() and "world" in CORPORA.labels()
    small = tiny_lm("gpt2", n_layer=1)
    small.model.save_pretrained(tmp_path / "ckpt")
    small.tokenizer.save_pretrained(tmp_path / "ckpt")
    MODEL_SOURCES.register("test-mine", lambda name: name == "mine-tiny", lambda name: tmp_path / "ckpt")
    CORPORA.register("test-mine", lambda name: name == "mine-text", lambda name: ["one text", "two texts"])
    try:
        lm = load_model("mine-tiny", device="cpu")
        assert lm.name == "mine-tiny" and lm.n_layers == 1
        assert all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), small.model.parameters()))
        assert list(iter_corpus("mine-text", n_samples=5)) == ["one text", "two texts"]
    finally:
        MODEL_SOURCES.entries = [e for e in MODEL_SOURCES.entries if e[0] != "test-mine"]
        CORPORA.entries = [e for e in CORPORA.entries if e[0] != "test-mine"]
