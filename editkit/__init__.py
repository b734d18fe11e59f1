"""editkit: locate-and-edit model editing (ROME, MEMIT, EMMET) for causal language models.

    import editkit as ek
    lm = ek.load_model("world-gpt2")
    req = ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="English")
    with ek.ROME.preset("world-gpt2").applied(lm, [req]) as edit:
        ...
"""
import logging as _logging

from .editors import EMMET, MEMIT, ROME, Edit, EditError, Editor, available_presets
from .keys import context_prefixes, hidden_at_subject, keys
from .models import ADAPTERS, Adapter, LanguageModel, ModelUnavailableError, UnknownArchitectureError, load_model
from .requests import EditRequest, RequestError
from .solver import SingularSystemError, solve
from .stats import CorpusUnavailableError, second_moment
from .values import ValueConfig, optimize_values

__version__ = "0.1.0"

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
