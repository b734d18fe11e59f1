"""Experiment runners for the three studies, with a resumable on-disk run store.

Each runner returns a tidy long-form DataFrame (one row per record × prompt kind ×
prompt, as :func:`editkit.metrics.evaluate` gives, plus the experiment's own
columns) and writes it *incrementally*: every finished unit of work (a chunk of
single edits at one layer, one batch, one sequential step) is written atomically
to its own file in the run directory. Re-running the same call finds the files,
skips those units and never duplicates or loses rows. The run directory is keyed
by the parameters, so a changed parameter never mixes into an old run.

One module per study: :mod:`.layer_sweep`, :mod:`.batch_sweep`, :mod:`.sequential`;
what they share in :mod:`.common`; the run store in :mod:`editkit.runstore`.
"""
from ..editors import make_editor
from ..runstore import RunStore, RunStoreError, UnitClaimed, load_run, records_digest, unit_float
from .common import heldout_texts, perplexity
from .layer_sweep import layer_sweep
from .batch_sweep import batch_sweep
from .sequential import sequential_batched

__all__ = ["RunStore", "RunStoreError", "UnitClaimed", "records_digest", "unit_float", "layer_sweep", "batch_sweep",
           "sequential_batched", "load_run", "make_editor", "perplexity", "heldout_texts"]
