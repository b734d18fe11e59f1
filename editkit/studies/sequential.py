"""Study 3, sequential-batched editing: batches applied one after another to the same model,
resumable after every batch."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from ..cluster import Unit, run_units
from ..editors import Editor
from ..hooks import restored_weights
from ..models import LanguageModel
from ..runstore import RunStore
from . import common
from .common import (_identity, _positive, _records, _restored_state, _study_editors, _total_norm, _with_converged,
                     _written_by_editkit, perplexity)

log = logging.getLogger("editkit.studies")


def sequential_batched(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("MEMIT", "EMMET"),
                       layer: int | Sequence[int] | None = None, batch_sizes: Sequence[int] = (1, 16, 64, 256),
                       total_edits: int = 256, *,
                       checkpoints: Sequence[int] | None = None, heldout: Sequence[str] | None = None,
                       preset: str | None = None, editor_kwargs: dict | None = None, eval_batch_size: int = 64,
                       run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                       progress: bool = True, cluster: Any = None) -> pd.DataFrame:
    """Batches applied one after another to the *same* model (``total_edits`` facts
    as ``total_edits / batch_size`` batches). After each batch: that batch's scores
    (``phase="batch"``), the update norms and held-out perplexity (``phase="probe"``);
    at ``checkpoints`` (numbers of edits so far; default powers of 4 and the end)
    the scores of every fact edited so far (``phase="all"``, forgetting).

    The accumulated weight change is saved after every batch, so an interrupted run
    resumes from its last finished batch. The model is restored exactly at the end.
    A sequence is serial by nature; ``cluster`` runs the independent sequences (method ×
    batch size) on its workers (see :func:`layer_sweep`). ``layer`` is one layer or several
    (norms then over all of them); None: the preset's layers (without a preset, ``layer`` is
    required).
    """
    recs = _records(records, total_edits)
    batch_sizes = list(batch_sizes)
    _positive(total_edits=total_edits, eval_batch_size=eval_batch_size,
              **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
    for bs in batch_sizes:
        if total_edits % bs:
            raise ValueError(f"total_edits={total_edits} is not a multiple of batch size {bs}")
    if checkpoints is None:
        checkpoints = sorted({4 ** k for k in range(12) if 4 ** k <= total_edits} | {total_edits})
    kw = editor_kwargs or {}
    editors = _study_editors(lm, methods, layer, preset, kw, "sequential_batched")
    layer = list(layer) if layer is not None and not isinstance(layer, int) else layer
    edited = sorted({l for e in editors.values() for l in e.layers})
    params = dict(**_identity(lm, recs), layer=layer, batch_sizes=batch_sizes, total_edits=total_edits,
                  checkpoints=list(checkpoints), preset=preset, editors=editors, eval_batch_size=eval_batch_size,
                  heldout=hashlib.sha256("\x00".join(heldout or []).encode()).hexdigest())
    store = RunStore.open("sequential_batched", params, run_dir, root)
    units = [Unit("pre", _sequence_pre, (recs, edited, heldout, eval_batch_size), dict(phase="pre"))]
    units += [Unit(f"seq-{m}-bs{bs:06d}", _sequence, (e, m, bs, e.layers, recs, list(checkpoints), heldout,
                                                      eval_batch_size, progress and cluster is None),
                   dict(method=m, batch_size=bs), outputs=tuple(_seq_unit(m, bs, b) for b in range(total_edits // bs)))
              for m, e in editors.items() for bs in batch_sizes]
    run_units(store, lm, units, cluster, desc="sequential-batched", progress=progress)
    return store.load()


def _seq_unit(m: str, bs: int, b: int) -> str:
    return f"{m}-bs{bs:06d}-b{b:06d}"


def _sequence_pre(lm: LanguageModel, store: RunStore, recs: list, layers: int | list[int],
                  heldout: Sequence[str] | None, eval_batch_size: int, *,
                  on_output: Callable | None = None) -> pd.DataFrame:
    pre = common._evaluate(lm, recs, eval_batch_size, phase="pre", method="none", batch_size=0, batch=-1, edits_so_far=0)
    layers = [layers] if isinstance(layers, int) else layers
    probe = dict(phase="probe", method="none", batch_size=0, batch=-1, edits_so_far=0, update_norm=0.0,
                 weight_norm=_total_norm([lm.weight(l).detach().double().norm().item() for l in layers]))
    if heldout:
        probe["perplexity"] = perplexity(lm, heldout)
    return pd.concat([pre, pd.DataFrame([probe])], ignore_index=True)


def _sequence(lm: LanguageModel, store: RunStore, editor: Editor, m: str, bs: int, layers: int | list[int], recs: list,
              checkpoints: list[int], heldout: Sequence[str] | None, eval_batch_size: int, progress: bool, *,
              on_output: Callable | None = None) -> None:
    """One sequence (method × batch size): its batches applied one after another, each
    batch's unit written as it finishes, and the accumulated weight saved after it, so
    an interrupted sequence resumes after its last finished batch (here or elsewhere)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    modules = {l: lm.edit_module(l) for l in layers}
    # saved states name one layer's weight "weight" (as before several layers could be edited)
    names = {layers[0]: "weight"} if len(layers) == 1 else {l: f"weight.{l}" for l in layers}
    n_batches = len(recs) // bs
    state_name = f"state-{m}-bs{bs:06d}"
    tick = on_output or (lambda: None)
    with _written_by_editkit(lm, layers), restored_weights(list(modules.values())), \
            _restored_state(editor, lm) as start_state:
        W0 = {l: lm.weight(l).detach().to(torch.float64, copy=True) for l in layers}
        for l in layers:
            editor.second_moment(lm, l, progress)  # C0 of the unedited model, before any state is loaded
        editor.context(lm)  # and its context prefixes (sampled from the unedited model, as in an unbroken run)
        start = 0
        saved = store.load_state(state_name)
        if saved is not None:
            tensors, meta = saved
            start = int(meta["next_batch"])
            broken = [b for b in range(start) if not store.is_done(_seq_unit(m, bs, b))]
            if broken:  # an earlier batch's file is gone or corrupt: only a full rerun can redo it
                log.warning("%s bs=%d: unit(s) %s of %s are missing or corrupt; restarting the sequence",
                            m, bs, [_seq_unit(m, bs, b) for b in broken[:3]], store.path)
                start = 0
            else:
                with torch.no_grad():
                    for l, module in modules.items():
                        module.weight.copy_(tensors.pop(names[l]).to(module.weight))
                lm.weights_written({lm.weight_name(l) for l in layers})  # editkit's own write: the statistics stay
                editor.load_sequential_state(lm, tensors)  # e.g. AlphaEdit's K_p K_pᵀ
                log.info("%s bs=%d: resuming after batch %d", m, bs, start)
        if start == 0:
            editor.load_sequential_state(lm, start_state)
        for _ in range(start):
            tick()
        converged: dict = {}  # case_id -> converged, for the rows of every fact edited so far
        for b in range(start):
            old = store.read(_seq_unit(m, bs, b))
            if "converged" in old:
                rows = old[old.phase == "batch"]
                converged.update(zip(rows.case_id, rows.converged))
        for b in range(start, n_batches):
            part = recs[b * bs:(b + 1) * bs]
            done_edits = (b + 1) * bs
            cols = dict(method=m, batch_size=bs, batch=b, edits_so_far=done_edits)
            t0 = time.perf_counter()
            edit = editor.apply(lm, part, progress=False)
            t_edit = time.perf_counter() - t0
            edit.commit()  # kept applied: the sequence continues on this model
            frames = [_with_converged(common._evaluate(lm, part, eval_batch_size, phase="batch", **cols), part, edit)]
            converged.update(zip(frames[0].case_id, frames[0].converged))
            if done_edits in checkpoints:
                everything = common._evaluate(lm, recs[:done_edits], eval_batch_size, phase="all", **cols)
                everything["converged"] = everything.case_id.map(converged)
                frames.append(everything)
            W = {l: lm.weight(l).detach().double() for l in layers}
            probe = dict(phase="probe", **cols, converged=edit.converged,
                         update_norm=_total_norm([(W[l] - W0[l]).norm().item() for l in layers]),
                         weight_norm=_total_norm([W[l].norm().item() for l in layers]),
                         batch_delta_norm=_total_norm([edit.norms[l]["delta_norm"] for l in layers]),
                         edit_seconds=t_edit)
            if heldout:
                probe["perplexity"] = perplexity(lm, heldout)
            frames.append(pd.DataFrame([probe]))
            # Unit, then state: a crash in between redoes batch b from the state before it
            # and atomically overwrites the same unit file, so no row is lost or duplicated.
            # The state holds the weights and whatever else the method's next batch reads
            # (AlphaEdit: the earlier keys K_p K_pᵀ), so a resumed run continues exactly.
            store.write(_seq_unit(m, bs, b), pd.concat(frames, ignore_index=True))
            weights = {names[l]: module.weight.detach() for l, module in modules.items()}
            store.save_state(state_name, {**weights, **editor.sequential_state(lm)}, {"next_batch": b + 1})
            tick()
