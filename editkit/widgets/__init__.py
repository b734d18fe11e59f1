"""Interactive explorers for Jupyter: poke a model or a run without writing a loop.

Both explorers are thin layers over the public API (``EditRequest``, the editors,
``Edit.undo``, the experiment runners' frames and ``editkit.plots``): everything
they show can be reproduced in three lines of code, and every handler is a plain
method (``on_edit``, ``on_undo``, ``redraw``) so tests and scripts can drive them
without a browser.

Figures are rendered to PNG into an ``ipywidgets.Image`` rather than through
pyplot's global figure registry, so redrawing never leaks figures, needs no
``%matplotlib`` magic, and renders the same in JupyterLab, classic notebooks and
headless papermill runs.

One module per explorer (:mod:`.edit_explorer`, :mod:`.results_explorer`), the model
probes they show (:mod:`.probes`) and their shared HTML helpers (:mod:`.common`).
"""
from .probes import greedy_continuation, next_token_topk, target_nll
from .edit_explorer import AppliedEdit, EditExplorer, Snapshot, _scores, parse_layers
from .results_explorer import ResultsExplorer, _line_figure, load_results

__all__ = [
    "EditExplorer",
    "ResultsExplorer",
    "AppliedEdit",
    "Snapshot",
    "parse_layers",
    "greedy_continuation",
    "next_token_topk",
    "target_nll",
    "load_results",
]
