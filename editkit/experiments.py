"""The study runners under their first name: ``editkit.experiments`` is :mod:`editkit.studies`
(one module per study) and :mod:`editkit.runstore`, kept so that notebooks, scripts and
``ek.experiments.layer_sweep`` keep working."""
from ._version import __version__  # noqa: F401  (run directories record it)
from .runstore import STORE_FORMAT, RunStore, RunStoreError, UnitClaimed, load_run, records_digest, unit_float  # noqa: F401
from .studies import *  # noqa: F401,F403
from .studies import __all__  # noqa: F401
