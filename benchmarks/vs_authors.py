#!/usr/bin/env python
"""editkit beside the study authors' own code, per edit, on the same inputs.

    python benchmarks/vs_authors.py --authors-dir /path/to/unified-model-editing

``--authors-dir`` is a local copy of the batch-editing study's public repository
(github.com/scalable-model-editing/unified-model-editing; editkit's ``protocol="reference"``
matches its ROME/MEMIT/EMMET at commit cf1907f). Nothing of it is copied into editkit:
this script imports it from that directory and runs it beside editkit in one process,
on the same model object, the same requests, the same C0 and the same context prefixes,
one thread each, both with every edit optimizing its values (editkit's value memo is
emptied before every timed edit; the authors' own value cache is not given a file).

Their code is written for one CUDA GPU and reads its statistics and prefixes from its own
pipeline, so a few things are patched at run time (listed in the output's ``patches``):

* the device string ``"cuda"`` they pass to ``.to()``, ``torch.tensor`` and ``torch.zeros``
  becomes the model's device;
* ``layer_stats`` (their C0) returns editkit's C0 of the edited layer, with editkit's
  relative ridge added (the matrix editkit factorizes);
* their context-template caches hold editkit's prefixes (the bare prompt first);
* ``util.nethook.Trace`` shows a transformer block's output as the 1-tuple their code
  indexes (``output[0]``): blocks of transformers >= 5 return the tensor itself;
* their progress ``print`` output is discarded.

Times are CPU seconds of the one-thread process (``time.process_time``): on a shared machine
wall time measures the neighbours as much as the code.
* the module names come from editkit's adapter; for a model with tied embeddings
  (SmolLM2) ``lm_head_module`` names the embedding, the module that owns the tied weight.

Rows (``benchmarks/vs_authors.json``): ``{model, method, batch, editkit_s_per_edit,
authors_s_per_edit, ratio, delta_w_rel_diff, threads}``. ROME rows are single edits into the
unedited model (``batch`` 1, timed over ``--rome-n`` requests); MEMIT and EMMET edit one
batch of ``batch`` requests. ``delta_w_rel_diff`` is ‖ΔW_editkit − ΔW_authors‖ / ‖ΔW_authors‖
(the largest over a ROME row's requests). Both sides run once per row after a warm-up edit
that fills both sides' caches (prefixes, C0 and its factor or inverse), as in a study.

Both sides stop a request's value optimization at the same loss: their code stops at a total
loss below 5e-2, a constant in its ROME and unified ``compute_v``/``compute_z``, so editkit's
editors run here with ``stop_nll = 0.05`` whatever their preset says (world-gpt2's ROME preset
stops at 0.002: compared at its own threshold it takes ~4x the steps and a different δ).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
import io
import itertools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # measure the checkout this script lives in, not another installed editkit
    sys.path.insert(0, str(ROOT))

import editkit as ek  # noqa: E402
from editkit.solver import ridge  # noqa: E402

log = logging.getLogger("editkit.vs_authors")
REAL_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-easyedit-1000.json"
#: C0 of a real model: the preset's offline corpus read from these records (disjoint from REAL_DATA).
REAL_CORPUS = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-easyedit-1000-4999.json"

PATCHES = [
    "device: the string 'cuda' passed to Tensor.to / BatchEncoding.to / torch.tensor / torch.zeros -> the model's device",
    "C0: rome.layer_stats.layer_stats (as imported by rome.compute_u and unified_editing.unified_main) returns "
    "editkit's C0 of the layer plus editkit's relative ridge (c0_ridge * mean(diag C0) * I)",
    "prefixes: rome.rome_main.CONTEXT_TEMPLATES_CACHE and unified_editing.unified_main.CONTEXT_TEMPLATES_CACHE hold "
    "editkit's context prefixes ('{}' first, then '<prefix>{}')",
    "blocks: util.nethook.Trace shows a transformer block's output as the 1-tuple (hidden,) their code indexes "
    "(transformers >= 5 blocks return the tensor itself; older versions returned a tuple)",
    "output: their print() progress goes to a null stream",
    "hparams: module templates from editkit's adapter; lm_head_module names the module owning the unembedding weight "
    "(the input embedding when tied, as in SmolLM2); value settings from editkit's preset",
]


# --------------------------------------------------------------------------- their code, patched

@dataclass
class Authors:
    """The authors' modules, imported from ``root``."""

    root: Path
    unified: Any
    rome_main: Any
    compute_u: Any
    nethook: Any
    unified_hparams: Any
    rome_hparams: Any


def import_authors(root: str | os.PathLike) -> Authors:
    root = Path(root).resolve()
    for sub in ("unified_editing/unified_main.py", "rome/rome_main.py", "globals.yml"):
        if not (root / sub).exists():
            raise SystemExit(f"--authors-dir {root}: no {sub}; point it at a checkout of "
                             "scalable-model-editing/unified-model-editing (commit cf1907f)")
    sys.path.insert(0, str(root))
    cwd = os.getcwd()
    os.chdir(root)  # their util.globals reads globals.yml from the working directory
    try:
        import rome.compute_u as compute_u
        import rome.rome_main as rome_main
        import unified_editing.unified_main as unified
        from rome.rome_hparams import ROMEHyperParams
        from unified_editing.memit_hparams import UNIFIEDHyperParams
        from util import nethook
    finally:
        os.chdir(cwd)
    return Authors(root, unified, rome_main, compute_u, nethook, UNIFIEDHyperParams, ROMEHyperParams)


@contextlib.contextmanager
def cuda_is(device: torch.device) -> Iterator[None]:
    """Map the device string "cuda" their code hard-codes onto ``device``, for the block."""
    from transformers import BatchEncoding

    def fix(a):
        return str(device) if isinstance(a, str) and a.startswith("cuda") else a

    saved = {"to": torch.Tensor.to, "tensor": torch.tensor, "zeros": torch.zeros, "be_to": BatchEncoding.to}

    def to(self, *args, **kw):
        if "device" in kw:
            kw["device"] = fix(kw["device"])
        return saved["to"](self, *(fix(a) for a in args), **kw)

    def with_device(fn):
        def wrapped(*args, **kw):
            if "device" in kw:
                kw["device"] = fix(kw["device"])
            return fn(*args, **kw)
        return wrapped

    def be_to(self, d, *args, **kw):
        return saved["be_to"](self, fix(d), *args, **kw)

    torch.Tensor.to, torch.tensor, torch.zeros, BatchEncoding.to = to, with_device(saved["tensor"]), \
        with_device(saved["zeros"]), be_to
    try:
        yield
    finally:
        torch.Tensor.to, torch.tensor, torch.zeros, BatchEncoding.to = (saved["to"], saved["tensor"], saved["zeros"],
                                                                         saved["be_to"])


class _Moment:
    def __init__(self, C: torch.Tensor) -> None:
        self.C = C

    def moment(self) -> torch.Tensor:
        return self.C.clone()


@contextlib.contextmanager
def blocks_as_tuples(a: Authors, lm: ek.LanguageModel) -> Iterator[None]:
    """Their hooks on a block read and edit ``output[0]``: show them ``(hidden,)`` when a block
    returns the tensor itself, and hand the model the tensor back."""
    Trace = a.nethook.Trace
    blocks = set(map(id, lm.module(lm.adapter.blocks)))
    saved = Trace.__init__

    def init(self, module, layer=None, *args, **kw):
        saved(self, module, layer, *args, **kw)
        target = a.nethook.get_module(module, layer) if layer is not None else module
        if id(target) not in blocks:
            return
        hook = target._forward_hooks[self.registered_hook.id]

        def tupled(m, inputs, output):
            if isinstance(output, torch.Tensor):
                return hook(m, inputs, (output,))[0]
            return hook(m, inputs, output)

        target._forward_hooks[self.registered_hook.id] = tupled

    Trace.__init__ = init
    try:
        yield
    finally:
        Trace.__init__ = saved


@contextlib.contextmanager
def patched(a: Authors, lm: ek.LanguageModel, C0: torch.Tensor, prefixes: Sequence[str]) -> Iterator[None]:
    """The run-time patches of :data:`PATCHES` for one model, C0 and prefix list."""

    saved = (a.compute_u.layer_stats, a.unified.layer_stats)
    a.compute_u.layer_stats = lambda *args, **kw: SimpleNamespace(mom2=_Moment(C0))
    a.unified.layer_stats = lambda *args, **kw: (SimpleNamespace(mom2=_Moment(C0)), None)
    a.compute_u.inv_mom2_cache.clear()
    a.unified.COV_CACHE.clear()
    a.rome_main.CONTEXT_TEMPLATES_CACHE = ["{}"] + [p + "{}" for p in prefixes[1:]]
    a.unified.CONTEXT_TEMPLATES_CACHE = [["{}"], [p + "{}" for p in prefixes[1:]]]
    try:
        with cuda_is(lm.device), blocks_as_tuples(a, lm), contextlib.redirect_stdout(io.StringIO()) as out:
            yield
            out.truncate(0)
    finally:
        a.compute_u.layer_stats, a.unified.layer_stats = saved
        a.rome_main.CONTEXT_TEMPLATES_CACHE = a.unified.CONTEXT_TEMPLATES_CACHE = None


def _param_owner(lm: ek.LanguageModel, weight: torch.Tensor) -> str:
    """The module path under which ``named_parameters`` lists ``weight`` (tied weights are listed once)."""
    for name, p in lm.model.named_parameters():
        if p is weight:
            return name.rsplit(".", 1)[0]
    raise ValueError("the unembedding weight is not a parameter of the model")


def _templates(lm: ek.LanguageModel) -> dict[str, str]:
    ad = lm.adapter
    mlp = ad.edit_module.rsplit(".", 1)[0]
    attn = {"gpt2": "{}.attn", "llama": "{}.self_attn"}.get(ad.family, "{}.self_attn").format(ad.blocks + ".{}")
    return dict(rewrite_module_tmp=ad.edit_module, layer_module_tmp=ad.blocks + ".{}", mlp_module_tmp=mlp,
                attn_module_tmp=attn, ln_f_module=ad.final_norm,
                lm_head_module=_param_owner(lm, lm.model.get_output_embeddings().weight))


def authors_hparams(a: Authors, lm: ek.LanguageModel, editor: ek.Editor) -> Any:
    """Their hyperparameters from an editkit editor (preset)."""
    v = editor.values
    common = dict(layers=list(editor.layers), fact_token="subject_last", v_num_grad_steps=v.v_steps, v_lr=v.v_lr,
                  v_loss_layer=lm.n_layers - 1, v_weight_decay=v.v_weight_decay,
                  clamp_norm_factor=v.clamp_norm_factor, kl_factor=v.kl_factor, mom2_adjustment=True,
                  mom2_dataset="editkit", mom2_n_samples=0, mom2_dtype="float32", **_templates(lm))
    if editor.method == "ROME":
        return a.rome_hparams(**common, context_template_length_params=[[5, 10], [10, 10]], bias_update=False,
                              dynamic=False, dynamic_multiplier=0)
    w = editor.reg if editor.method == "MEMIT" else getattr(editor, "mom2_update_weight", 1.0)
    lam = editor.reg if editor.method == "EMMET" else 0.1
    return a.unified_hparams(**common, layer_selection="all", mom2_update_weight=w, calculate_objective_value=False,
                             update_norm_lambda=0, emmet_lambda=lam)


def as_dict(r: ek.EditRequest, i: int) -> dict:
    return {"case_id": i, "prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
            "target_true": {"str": r.target_true or ""}}


def authors_edit(a: Authors, lm: ek.LanguageModel, method: str, hp: Any, reqs: list[ek.EditRequest],
                 cache: Path | None = None) -> torch.Tensor:
    """ΔW (d_out × d_in, float64) of their edit of ``reqs``; the model's weights are put back. ``cache``:
    their ``cache_template`` (z vectors written there, or read when present)."""
    layer = hp.layers[-1]
    before = lm.weight(layer).detach().clone()
    try:
        if method == "ROME":
            a.rome_main.apply_rome_to_model(lm.model, lm.tokenizer, [as_dict(r, i) for i, r in enumerate(reqs)],
                                            dataclasses.replace(hp))
        else:
            a.unified.apply_unified_to_model(method, lm.model, lm.tokenizer,
                                             [as_dict(r, i) for i, r in enumerate(reqs)], hp,
                                             cache_template=None if cache is None else str(cache))
        return lm.weight(layer).detach().double() - before.double()
    finally:
        with torch.no_grad():
            lm.weight(layer).copy_(before)


#: editkit's value-optimization seconds in the last :func:`editkit_edit`.
_last_values = [0.0]


def editkit_edit(lm: ek.LanguageModel, editor: ek.Editor, reqs: list[ek.EditRequest], C0: torch.Tensor,
                 keep_memo: bool = False) -> torch.Tensor:
    """ΔW of editkit's edit of ``reqs`` (its value memo emptied first unless ``keep_memo``); the edit is undone."""
    if not keep_memo:
        lm.cache.pop("_values_memo", None)
    from editkit import values as V

    real, spent, depth = V.optimize_values, [0.0], [0]

    def clocked(*a, **k):  # editkit's value optimization, clocked (CPU seconds, as timed())
        depth[0] += 1  # a batch over v_batch_size calls it again per chunk: clock the outer call only
        t0 = time.process_time()
        try:
            return real(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                spent[0] += time.process_time() - t0

    V.optimize_values = clocked
    try:
        edit = editor.apply(lm, reqs, stats={editor.layers[-1]: C0}, progress=False)
    finally:
        V.optimize_values = real
    _last_values[0] = spent[0]
    try:
        return edit.deltas[editor.layers[-1]].double()
    finally:
        edit.undo()


def rel_diff(d_ek: torch.Tensor, d_au: torch.Tensor) -> float:
    return float((d_ek - d_au).norm() / d_au.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- the rows

def requests_for(model: str, n: int) -> list[ek.EditRequest]:
    if model.startswith("world"):
        return [r.request for r in ek.load_counterfact("world", n=n, seed=0)]
    from editkit import corpora

    if not REAL_DATA.exists():
        raise SystemExit(f"{model}: the real CounterFact records are not at {REAL_DATA}")
    return [r.request for r in corpora.scoring_records(ek.load_counterfact(str(REAL_DATA), seed=0))[:n]]


def timed(fn):
    """(CPU seconds of this one-thread process, result): what an idle core would take, whatever else
    the shared machine runs meanwhile (wall seconds are logged beside)."""
    t0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    dt = time.process_time() - t0
    log.info("%.2f CPU s, %.2f wall s", dt, time.perf_counter() - w0)
    return dt, out


#: Their stopping rule: a request's value optimization ends once its total loss is below this
#: (fixed in their code, not a hyperparameter).
AUTHORS_STOP_NLL = 5e-2


def editor_for(model: str, method: str, v_steps: int | None) -> ek.Editor:
    """The model's preset editor (its offline corpus read from local records for a real model),
    stopping where their code stops (:data:`AUTHORS_STOP_NLL`)."""
    overrides: dict[str, Any] = {"stop_nll": AUTHORS_STOP_NLL}
    if v_steps:
        overrides["v_steps"] = v_steps
    if not model.startswith("world"):  # the preset's offline corpus, from local records (no download)
        overrides["corpus"] = f"counterfact-text:{REAL_CORPUS}"
    return ek.make_editor(method, preset=model, **overrides)


@dataclass
class Side:
    """One method on one model, ready for both sides: editkit's editor, C0, prefixes, their hparams."""

    method: str
    editor: ek.Editor
    C0: torch.Tensor
    C0_au: torch.Tensor
    prefixes: list[str]
    hp: Any

    @classmethod
    def of(cls, a: Authors, lm: ek.LanguageModel, model: str, method: str, v_steps: int | None) -> "Side":
        ed = editor_for(model, method, v_steps)
        C0 = ed.second_moment(lm, ed.layers[-1], progress=False)
        return cls(method, ed, C0, ridge(C0.double(), ed.c0_ridge).float(), ed.context(lm), authors_hparams(a, lm, ed))


def _row(model: str, method: str, E: int, t_ek: float, t_au: float, n: int, diff: float, threads: int,
         side: Side, **extra: Any) -> dict:
    row = {"model": model, "method": method, "batch": E, "editkit_s_per_edit": t_ek / n,
           "authors_s_per_edit": t_au / n, "ratio": t_au / t_ek, "delta_w_rel_diff": diff, "threads": threads,
           "edits_timed": n, "layer": side.editor.layers[-1], "v_steps": side.editor.values.v_steps, "stop_nll": side.editor.values.stop_nll,
           "prefixes": len(side.prefixes), **extra}
    log.warning("%s %s batch %d: editkit %.3f s/edit, authors %.3f s/edit, ratio %.2f, ‖ΔW diff‖/‖ΔW‖ %.2e",
                model, method, E, row["editkit_s_per_edit"], row["authors_s_per_edit"], row["ratio"], diff)
    return row


def bench_rome(a: Authors, lm: ek.LanguageModel, model: str, reqs: list, warm, n: int, threads: int,
               v_steps: int | None) -> list[dict]:
    """ROME: ``n`` single edits, each into the unedited model, per edit on both sides."""
    side = Side.of(a, lm, model, "ROME", v_steps)
    with patched(a, lm, side.C0_au, side.prefixes):  # warm-up: both sides' caches (prefixes, C0 inverse/factor)
        editkit_edit(lm, side.editor, [warm], side.C0)
        authors_edit(a, lm, "ROME", side.hp, [warm])
    t_ek = t_au = 0.0
    diffs = []
    for r in reqs[:n]:
        dt, d_ek = timed(lambda: editkit_edit(lm, side.editor, [r], side.C0))
        t_ek += dt
        with patched(a, lm, side.C0_au, side.prefixes):
            dt, d_au = timed(lambda: authors_edit(a, lm, "ROME", side.hp, [r]))
        t_au += dt
        diffs.append(rel_diff(d_ek, d_au))
    return [_row(model, "ROME", 1, t_ek, t_au, n, max(diffs), threads, side)]


def bench_batches(a: Authors, lm: ek.LanguageModel, model: str, reqs: list, warm, batches: Sequence[int],
                  threads: int, v_steps: int | None, tmp: Path) -> list[dict]:
    """MEMIT and EMMET on the first ``E`` requests, for each batch size E.

    The two methods optimize the same values (the same code on each side, the same settings), so
    each side optimizes them once per batch: in the MEMIT edit, where their time is measured,
    and the EMMET edit reads them from that side's own cache (editkit's value memo, the authors'
    ``cache_template`` files) and its row adds the values' time to its own."""
    memit, emmet = (Side.of(a, lm, model, m, v_steps) for m in ("MEMIT", "EMMET"))
    assert memit.prefixes == emmet.prefixes and memit.editor.values == emmet.editor.values, "values differ"
    z_time = [0.0]
    real_z = a.unified.compute_z

    def compute_z(*args, **kw):  # their value optimization, clocked (CPU seconds, as timed())
        t0 = time.process_time()
        try:
            return real_z(*args, **kw)
        finally:
            z_time[0] += time.process_time() - t0

    a.unified.compute_z = compute_z
    rows = []
    try:
        with patched(a, lm, memit.C0_au, memit.prefixes):  # warm-up
            editkit_edit(lm, memit.editor, [warm], memit.C0)
            authors_edit(a, lm, "MEMIT", memit.hp, [warm])
        with patched(a, lm, emmet.C0_au, emmet.prefixes):
            editkit_edit(lm, emmet.editor, [warm], emmet.C0)
            authors_edit(a, lm, "EMMET", emmet.hp, [warm])
        for E in batches:
            g = reqs[:E]
            cache = tmp / f"z-{model}-{E}" / "{}-{}-{}.npz"  # their z file per (layer, clamp, case_id)
            # MEMIT: both sides optimize the values.
            dt_ek, d_ek = timed(lambda: editkit_edit(lm, memit.editor, g, memit.C0, keep_memo=True))
            values_ek = _last_values[0]
            z_time[0] = 0.0
            with patched(a, lm, memit.C0_au, memit.prefixes):
                dt_au, d_au = timed(lambda: authors_edit(a, lm, "MEMIT", memit.hp, g, cache))
            values_au = z_time[0]
            rows.append(_row(model, "MEMIT", E, dt_ek, dt_au, E, rel_diff(d_ek, d_au), threads, memit,
                             editkit_values_s=values_ek, authors_values_s=values_au))
            # EMMET: the same values, read back; the rows add their time.
            dt_ek, d_ek = timed(lambda: editkit_edit(lm, emmet.editor, g, emmet.C0, keep_memo=True))
            z_time[0] = 0.0
            with patched(a, lm, emmet.C0_au, emmet.prefixes):
                dt_au, d_au = timed(lambda: authors_edit(a, lm, "EMMET", emmet.hp, g, cache))
            assert z_time[0] == 0.0, "the authors' EMMET optimized its values again"
            rows.append(_row(model, "EMMET", E, dt_ek + values_ek, dt_au + values_au, E, rel_diff(d_ek, d_au),
                             threads, emmet, editkit_values_s=values_ek, authors_values_s=values_au,
                             values_shared_with="MEMIT"))
            lm.cache.pop("_values_memo", None)
    finally:
        a.unified.compute_z = real_z
    return rows


def bench_unit(args: dict) -> list[dict]:
    """One unit of work (``kind`` ROME or batches, on one model), in this process."""
    import tempfile

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args["threads"])
    a = import_authors(args["authors_dir"])
    lm = ek.load_model(args["model"], device="cpu")
    n_req = max([*args["batches"], args["rome_n"]]) + 1
    reqs = requests_for(args["model"], n_req)
    warm, reqs = reqs[-1], reqs[:-1]
    if args["kind"] == "ROME":
        return bench_rome(a, lm, args["model"], reqs, warm, args["rome_n"], args["threads"], args["v_steps"])
    with tempfile.TemporaryDirectory() as tmp:
        return bench_batches(a, lm, args["model"], reqs, warm, args["batches"], args["threads"], args["v_steps"],
                             Path(tmp))


def per_model(values: Sequence[str], model: str) -> int | None:
    """``["8", "smollm2-135m=2"]`` → 2 for smollm2-135m, 8 for the others (None: nothing given)."""
    out = None
    for v in values:
        name, _, n = v.rpartition("=")
        if name in ("", model) and (out is None or name):
            out = int(n)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-dir", required=True, help="local copy of unified-model-editing (commit cf1907f)")
    p.add_argument("--models", nargs="+", default=["world-gpt2", "smollm2-135m"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--rome-n", nargs="+", default=["8"], help="ROME single edits timed: N, or MODEL=N for one model")
    p.add_argument("--no-rome", action="store_true", help="MEMIT and EMMET only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--v-steps", nargs="+", default=[],
                   help="value steps instead of the preset's, on both sides: N, or MODEL=N for one model")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each) running the units: "
                   "ROME per model, each batch size per model; each unit's two sides run in one process")
    p.add_argument("--out", default=str(HERE / "vs_authors.json"))
    p.add_argument("--update", action="store_true", help="keep --out's rows of the models not given in --models "
                   "(and the record of the run that measured them); replace the given models' rows")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    import_authors(args.authors_dir)  # fail early on a wrong directory
    units = []
    for model in args.models:
        base = dict(authors_dir=args.authors_dir, model=model, threads=args.threads,
                    v_steps=per_model(args.v_steps, model), rome_n=int(per_model(args.rome_n, model)))
        for E in sorted(args.batches, reverse=True):  # the longest first
            units.append(dict(base, kind="batches", batches=[E]))
        if not args.no_rome:
            units.append(dict(base, kind="ROME", batches=[]))
    units.sort(key=lambda u: (u["model"].startswith("world"), -max(u["batches"], default=0)))  # the longest first
    t0 = time.time()
    rows: list[dict] = []
    args.kept, args.earlier = [], []
    if args.update and Path(args.out).is_file():
        args.kept = [r for r in json.loads(Path(args.out).read_text()) if r["model"] not in args.models]
        meta_f = Path(args.out).with_suffix(".meta.json")
        if meta_f.is_file():
            old = json.loads(meta_f.read_text())
            # an earlier run stays on record for the models whose rows are kept
            args.earlier = [{**run, "models": [m for m in run["models"] if m not in args.models]}
                            for run in old.get("runs", [_run_record(old)])
                            if set(run["models"]) - set(args.models)]
    if args.jobs <= 1:
        for u in units:
            rows += bench_unit(u)
            _write(args, _sorted(rows), t0, partial=True)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(bench_unit, u) for u in units]):
                rows += fut.result()
                _write(args, _sorted(rows), t0, partial=True)
    _write(args, _sorted(rows), t0, partial=False)


def _sorted(rows: list[dict]) -> list[dict]:
    order = {"ROME": 0, "MEMIT": 1, "EMMET": 2}
    return sorted(rows, key=lambda r: (r["model"] != "world-gpt2", r["model"], order[r["method"]], r["batch"]))


def _run_record(meta: dict) -> dict:
    """One run's record in ``runs`` (a meta file from before ``runs`` existed is one run; its
    models are read from its command line)."""
    rec = {k: meta[k] for k in ("command", "models", "wall_s", "jobs", "machine", "partial") if k in meta}
    if "models" not in rec:
        words = rec.get("command", "").split()
        i = words.index("--models") + 1 if "--models" in words else len(words)
        rec["models"] = list(itertools.takewhile(lambda w: not w.startswith("--"), words[i:])) or \
            ["world-gpt2", "smollm2-135m"]
    return rec


def _write(args, rows: list[dict], t0: float, partial: bool) -> None:
    """The rows to ``--out`` (a JSON list); how they were measured beside it (``*.meta.json``):
    ``runs`` lists every run whose rows the file holds (``--update`` keeps earlier runs' rows)."""
    kept = getattr(args, "kept", [])
    Path(args.out).write_text(json.dumps(_sorted(kept + rows), indent=1) + "\n")
    this = {"command": "python benchmarks/vs_authors.py " + " ".join(args.argv), "models": list(args.models),
            "wall_s": time.time() - t0, "jobs": args.jobs, "partial": partial,
            "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                        "threads": args.threads, "load_average": list(os.getloadavg())}}
    runs = [*getattr(args, "earlier", []), this]
    meta = {"patches": PATCHES, "authors_dir": str(Path(args.authors_dir).resolve()), "runs": runs,
            "partial": partial, **{k: this[k] for k in ("machine", "wall_s", "jobs", "command")}}
    Path(args.out).with_suffix(".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if not partial and Path(args.out).resolve() == (HERE / "vs_authors.json").resolve():
        from benchmarks.report import update_section

        update_section(HERE / "RESULTS.md", "vs-authors", render(_sorted(kept + rows), meta))


def render(rows: list[dict], meta: dict) -> str:
    """The RESULTS.md section: one line per row, the patches, how it was run."""
    runs = meta.get("runs") or [_run_record(meta)]
    how = "; ".join(f"`{r['command']}` (rows of {', '.join(r['models'])}: one run of "
                    f"{r['wall_s'] / 60:.0f} min, load average at its end "
                    f"{[round(x, 1) for x in r['machine']['load_average']]})" for r in runs)
    out = ["## editkit vs the authors' code", "",
           f"Generated by `benchmarks/vs_authors.py`: {how}; "
           f"rows in `vs_authors.json`. Seconds are CPU seconds of the one-thread process (what an idle core "
           f"would take; the machine is shared). One thread each; the same model object, requests, C0 (plus editkit's ridge) and "
           f"context prefixes; protocol \"reference\"; editkit's value memo emptied before every timed edit, so every "
           f"edit optimizes its values on both sides, each request stopping at a total loss below "
           f"{AUTHORS_STOP_NLL:g} (their code's fixed rule). ROME: single edits into the unedited model. Machine: "
           f"{meta['machine']['cpu']}, torch {meta['machine']['torch']} (shared machine: the ratios are measured side "
           f"by side, each row's two sides back to back).", "",
           "| model | method | batch | value steps | editkit s/edit | authors s/edit | ratio | ‖ΔW_ek − ΔW_au‖/‖ΔW_au‖ |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['batch']}{' (%d singles)' % r['edits_timed'] if r['method'] == 'ROME' else ''} "
                   f"| {r['v_steps']} | {r['editkit_s_per_edit']:.3g} | {r['authors_s_per_edit']:.3g} | "
                   f"**{r['ratio']:.2f}×** | {r['delta_w_rel_diff']:.1e} |")
    out += ["", "Patches applied to the authors' code at run time (nothing of it is copied into editkit):", ""]
    out += [f"* {p}" for p in meta["patches"]]
    return "\n".join(out)


if __name__ == "__main__":
    main()
