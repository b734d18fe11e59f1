"""Study 2, batch editing: independent batches of every size over the same facts."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Sequence

import pandas as pd

from ..cluster import Unit, run_units
from ..editors import Editor
from ..models import LanguageModel
from ..runstore import RunStore, records_digest, unit_float
from . import common
from .common import _identity, _positive, _records, _study_editors, _total_norm, _with_converged, perplexity


def batch_sweep(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("MEMIT", "EMMET"),
                layer: int | Sequence[int] | None = None, batch_sizes: Sequence[int] = (16, 64, 256), *,
                n_facts: int | None = None,
                preset: str | None = None, regs: dict[str, Sequence[float]] | None = None,
                editor_kwargs: dict | None = None, eval_batch_size: int = 64,
                heldout: Sequence[str] | None = None, heldout_batches: int = 4,
                run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                progress: bool = True, cluster: Any = None) -> pd.DataFrame:
    """Every batch size scored over the same ``n_facts`` facts (default: the largest
    batch size): ``n_facts / b`` independent batches of ``b``, each edited into the
    *unedited* model, scored, and restored exactly. So a small batch size rests on as
    many facts as a large one and the bands compare like with like (one batch of 4
    would score 4 facts). ``regs`` optionally sweeps λ
    (``{"MEMIT": [1e3, 1e4], "EMMET": [0.01, 0.1]}``); the value is in column ``reg``,
    the batch's index in ``batch``. Each batch is one unit of the run store, so an
    interrupted sweep resumes batch by batch. ``cluster`` computes the batches on its
    workers (see :func:`layer_sweep`). ``layer`` is one layer or several (MEMIT's paper edits
    five); None: the preset's layers (without a preset, ``layer`` is required).

    ``heldout`` texts (:func:`heldout_texts`) add the general-ability probe: their
    perplexity with the batch applied, in column ``perplexity`` (the unedited model's in the
    ``pre`` rows), measured for the first ``heldout_batches`` batches of every batch size (a
    perplexity pass costs about as much as scoring a batch of 64, and 512 single edits move it
    by less than its own rounding); the other batches' rows hold NaN."""
    batch_sizes = list(batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes is empty; give at least one batch size, e.g. batch_sizes=[16, 64]")
    _positive(eval_batch_size=eval_batch_size, **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
    if len(set(batch_sizes)) < len(batch_sizes):
        raise ValueError(f"batch_sizes={batch_sizes} has duplicates")
    n = int(n_facts) if n_facts is not None else max(batch_sizes)
    bad = [bs for bs in batch_sizes if n % bs]
    if bad:
        raise ValueError(f"n_facts={n} is not a multiple of batch size(s) {bad}: every batch size is scored over "
                         f"the same facts as n_facts / b whole batches; pick n_facts a multiple of "
                         f"{math.lcm(*batch_sizes)}")
    recs = _records(records, n)
    kw = editor_kwargs or {}
    grid = []
    for base in _study_editors(lm, methods, layer, preset, kw, "batch_sweep").values():
        values = [float(v) for v in ((regs or {}).get(base.method) or [base.reg])]
        if len(set(values)) < len(values):
            raise ValueError(f"regs[{base.method!r}]={values} has duplicates")
        grid += [(base.method, reg, bs, dataclasses.replace(base, reg=reg)) for reg in values for bs in batch_sizes]
    layer = list(layer) if layer is not None and not isinstance(layer, int) else layer
    params = dict(**_identity(lm, recs), layer=layer, batch_sizes=batch_sizes, n_facts=n, preset=preset,
                  eval_batch_size=eval_batch_size, grid=[(m, reg, bs, ed) for m, reg, bs, ed in grid])
    if heldout is not None:
        heldout = list(heldout)
        if not heldout:
            raise ValueError("heldout is empty; pass heldout texts (e.g. experiments.heldout_texts(...)) or None")
        _positive(heldout_batches=heldout_batches)
        params.update(heldout=records_digest(heldout), heldout_batches=heldout_batches)  # in the run key
    store = RunStore.open("batch_sweep", params, run_dir, root)

    def probe(i: int) -> list[str] | None:  # None: no perplexity column; []: the column, NaN here
        return None if heldout is None else heldout if i < heldout_batches else []

    units = [Unit("pre", _batch_pre, (recs, eval_batch_size, heldout), dict(phase="pre"))]
    units += [Unit(f"{m}-reg{unit_float(reg)}-bs{bs:06d}-b{i:06d}", _batch_post,
                   (ed, m, reg, bs, ed.layers, recs[i * bs:(i + 1) * bs], eval_batch_size, i, probe(i)),
                   dict(method=m, reg=reg, batch_size=bs, batch=i))
              for m, reg, bs, ed in grid for i in range(n // bs)]
    run_units(store, lm, units, cluster, desc="batch sweep", progress=progress)
    return store.load()


def _batch_pre(lm: LanguageModel, store: RunStore, recs: list, eval_batch_size: int,
               heldout: Sequence[str] | None = None, *, on_output: Callable | None = None) -> pd.DataFrame:
    ppl = {} if heldout is None else dict(perplexity=perplexity(lm, heldout))
    return common._evaluate(lm, recs, eval_batch_size, phase="pre", method="none", batch_size=0, reg=0.0, **ppl)


def _batch_post(lm: LanguageModel, store: RunStore, ed: Editor, m: str, reg: float, bs: int, layers: list[int],
                part: list, eval_batch_size: int, batch: int = 0, heldout: Sequence[str] | None = None, *,
                on_output: Callable | None = None) -> pd.DataFrame:
    """One batch edited into the unedited model, scored (and the held-out text's perplexity
    measured, when given), and restored."""
    t0 = time.perf_counter()
    with ed.applied(lm, part, progress=False) as edit:
        t_edit = time.perf_counter() - t0
        ppl = {} if heldout is None else dict(perplexity=perplexity(lm, heldout) if heldout else float("nan"))
        frame = common._evaluate(lm, part, eval_batch_size, phase="post", method=m, batch_size=bs, batch=batch,
                                 reg=reg, delta_norm=_total_norm([edit.norms[l]["delta_norm"] for l in layers]),
                                 edit_seconds=t_edit, **ppl)
        return _with_converged(frame, part, edit)
