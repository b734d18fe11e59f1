"""Study 1, the layer sweep: each fact edited alone into the unedited model, at every layer."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from ..cluster import Unit, run_units
from ..editors import Editor, make_editor
from ..models import LanguageModel
from ..runstore import RunStore
from . import common
from .common import _check_layers, _identity, _method_name, _positive, _records

def layer_sweep(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("ROME", "MEMIT"),
                layers: Iterable[int] | None = None, n_edits: int | None = 100, *, preset: str | None = None,
                editor_kwargs: dict | None = None, chunk: int = 25, eval_batch_size: int = 64,
                trace: bool = False, run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                progress: bool = True, cluster: Any = None) -> pd.DataFrame:
    """Each fact edited into the *unedited* model alone, scored, and restored exactly;
    for every layer and every method. Rows carry ``method``, ``layer``, ``phase``
    (``"pre"`` for the unedited baseline, ``"post"`` after the edit). With ``trace``,
    causal-tracing importance per layer is added as ``phase="trace"`` rows.

    ``cluster`` (an :class:`editkit.cluster.Ray`, or ``"local:2"``, ``"ray://head:10001"``)
    computes the (layer, chunk) units on its workers, into the same run store."""
    recs = _records(records, n_edits)
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers is empty: give the layers to sweep, e.g. layers=[0, 1, 2], or None for all")
    _positive(chunk=chunk, eval_batch_size=eval_batch_size)
    _check_layers(lm, layers)
    kw = editor_kwargs or {}
    editors = {(_method_name(m), l): make_editor(m, l, preset, **kw) for m in methods for l in layers}
    params = dict(**_identity(lm, recs), methods=[_method_name(m) for m in methods], layers=layers,
                  n_edits=len(recs), preset=preset, editors={f"{m}-L{l}": e for (m, l), e in editors.items()},
                  trace=trace, chunk=chunk, eval_batch_size=eval_batch_size)
    store = RunStore.open("layer_sweep", params, run_dir, root)

    starts = range(0, len(recs), chunk)
    units = [Unit(f"pre-{i:06d}", _layer_pre, (recs[i:i + chunk], eval_batch_size),
                  dict(phase="pre", records=f"{i}-{min(i + chunk, len(recs)) - 1}")) for i in starts]
    units += [Unit(f"{m}-L{l:03d}-{i:06d}", _layer_post, (editors[(m, l)], m, l, recs[i:i + chunk], eval_batch_size),
                   dict(method=m, layer=l, records=f"{i}-{min(i + chunk, len(recs)) - 1}"), group=("layer", l))
              for (m, l) in editors for i in starts]
    if trace:
        units.append(Unit("trace", _layer_trace, (recs[: min(len(recs), 50)],), dict(phase="trace")))
    run_units(store, lm, units, cluster, desc="layer sweep", progress=progress)
    return store.load()


# The units of each study are module-level functions ``f(lm, store, *args)`` so that the
# same code runs in this process or on a cluster worker (which has its own copy of lm).

def _layer_pre(lm: LanguageModel, store: RunStore, recs: list, eval_batch_size: int, *,
               on_output: Callable | None = None) -> pd.DataFrame:
    return common._evaluate(lm, recs, eval_batch_size, phase="pre", method="none", layer=-1)


def _layer_post(lm: LanguageModel, store: RunStore, editor: Editor, m: str, l: int, recs: list,
                eval_batch_size: int, *, on_output: Callable | None = None) -> pd.DataFrame:
    frames = []
    editor.prefetch_values(lm, recs)  # every fact's δ in padded batches, not one optimization per fact
    for r in recs:
        with editor.applied(lm, [r], progress=False) as edit:
            frames.append(common._evaluate(lm, [r], eval_batch_size, phase="post", method=m, layer=l,
                                    delta_norm=edit.norms[l]["delta_norm"], converged=edit.converged))
    return pd.concat(frames, ignore_index=True)


def _layer_trace(lm: LanguageModel, store: RunStore, recs: list, *,
                 on_output: Callable | None = None) -> pd.DataFrame:
    from ..tracing import layer_importance

    imp = layer_importance(lm, recs, progress=False)
    imp["phase"] = "trace"
    return imp
