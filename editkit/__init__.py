"""editkit: locate-and-edit model editing (ROME, MEMIT, EMMET) for causal language models.

    import editkit as ek
    lm = ek.load_model("world-gpt2")
    req = ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="English")
    with ek.ROME.preset("world-gpt2").applied(lm, [req]) as edit:
        ...
"""
import logging as _logging

from ._version import __version__
from .data import CounterFactRecord, DatasetUnavailableError, ZsreRecord, load_counterfact, load_zsre
from .data.corpus import CorpusUnavailableError
from .editors import (EMMET, MEMIT, METHODS, ROME, RROME, AlphaEdit, UnifiedROME, Edit, EditError, Editor, available_presets, make_editor,
                      EditWarning, summarized_edit_warnings,
                      preset_for, register)
from .generation import generate
from .saved import SavedEdit, load_edit
from .hparams import HparamsError, load_hparams, read_hparams
from .keys import compute_keys, context_prefixes, hidden_at_subject
from .protocols import PROTOCOLS, Conventions
from .metrics import evaluate, summarize
from .models import (ADAPTERS, Adapter, LanguageModel, ModelSpec, ModelUnavailableError, StaleStatisticsWarning,
                     UnknownArchitectureError, load_model)
from .requests import EditRequest, RequestError
from .solver import SingularSystemError, solve
from .stats import second_moment
from .values import ValueConfig, optimize_values

#: What ``import editkit as ek`` promises.
__all__ = [
    # models and requests
    "load_model", "LanguageModel", "ModelSpec", "Adapter", "ADAPTERS", "ModelUnavailableError",
    "UnknownArchitectureError", "EditRequest", "RequestError", "StaleStatisticsWarning", "EditWarning",
    # editing
    "Editor", "ROME", "RROME", "UnifiedROME", "MEMIT", "EMMET", "METHODS", "register", "make_editor", "summarized_edit_warnings", "Edit", "EditError",
    "available_presets", "preset_for", "PROTOCOLS", "Conventions", "load_hparams", "read_hparams", "HparamsError",
    "load_edit", "SavedEdit", "generate",
    # the steps of an edit
    "second_moment", "CorpusUnavailableError", "compute_keys", "context_prefixes", "hidden_at_subject",
    "ValueConfig", "optimize_values", "solve", "SingularSystemError",
    # data and scores
    "load_counterfact", "load_zsre", "CounterFactRecord", "ZsreRecord", "DatasetUnavailableError",
    "evaluate", "summarize", "heldout_texts",
]
# Every submodule is reached as ek.<name>: ek.studies (ek.experiments, its first name), ek.runstore, ek.plots,
# ek.widgets, ek.tracing, ek.world, ek.metrics, ek.corpora, ek.data, ek.cluster, ek.paths, ek.keys (the module;
# its function is ek.compute_keys)... Those not imported above are imported on first use: plots and widgets
# pull in matplotlib/ipywidgets, which a headless editing job does not need.


def __getattr__(name):
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    if name == "heldout_texts":
        from .studies import heldout_texts

        return heldout_texts
    raise AttributeError(f"module 'editkit' has no attribute {name!r}")

from . import registrations as _registrations  # noqa: E402,F401  (the world, the zoo, saved edits)

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
