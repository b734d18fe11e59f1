"""Name registries: how a lower layer dispatches a name that a higher layer defines.

``load_model("world-gpt2")`` and ``load_model("smollm2-135m")`` (models),
``load_counterfact("world")`` (data) and ``corpus="world"`` (C0's text) name things that
the embedded world and the real-model zoo provide, and those sit above the layers that
read the names (the world trains its models with editkit's own metrics). So each lower
layer owns a :class:`Registry` and never imports the providers; :mod:`editkit.registrations`
fills the registries in when ``editkit`` is imported, which happens before any of its
modules runs. A new source of models, datasets or corpora registers the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Registry:
    """Providers of named things, each with the test that says which names are its own."""

    what: str  # "model", "CounterFact source", "corpus": for messages
    entries: list[tuple[str, Callable[[str], bool], Callable[..., Any]]] = field(default_factory=list)

    def register(self, label: str, matches: Callable[[str], bool], provider: Callable[..., Any]) -> None:
        """Let ``provider`` handle the names for which ``matches(name)`` is true (a later
        registration under the same ``label`` replaces the earlier one)."""
        self.entries = [e for e in self.entries if e[0] != label] + [(label, matches, provider)]

    def find(self, name: str) -> Callable[..., Any] | None:
        """The provider of ``name``, or None when no registered source claims it."""
        for _, matches, provider in self.entries:
            if matches(name):
                return provider
        return None

    def labels(self) -> list[str]:
        return [label for label, _, _ in self.entries]
