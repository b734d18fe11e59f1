"""editkit: locate-and-edit model editing (ROME, MEMIT, EMMET) for causal language models."""
from .models import Adapter, LanguageModel, load_model
from .requests import EditRequest, RequestError

__version__ = "0.1.0"
