"""Experiment runners for the three studies, with a resumable on-disk run store.

Each runner returns a tidy long-form DataFrame (one row per record × prompt kind ×
prompt, as :func:`editkit.metrics.evaluate` gives, plus the experiment's own
columns) and writes it *incrementally*: every finished unit of work (a chunk of
single edits at one layer, one batch, one sequential step) is written atomically
to its own file in the run directory. Re-running the same call finds the files,
skips those units and never duplicates or loses rows. The run directory is keyed
by the parameters, so a changed parameter never mixes into an old run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .editors import METHODS, Editor, make_editor
from .hooks import restored_weights
from .models import LanguageModel

log = logging.getLogger(__name__)

__all__ = ["RunStore", "layer_sweep", "batch_sweep", "sequential_batched", "load_run", "make_editor", "perplexity",
           "heldout_texts"]

# --- run store --------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(x.to_dict() if hasattr(x, "to_dict") else dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


@dataclass
class RunStore:
    """A run directory: ``params.json`` plus one CSV per finished unit."""

    path: Path

    @classmethod
    def open(cls, kind: str, params: dict, run_dir: str | os.PathLike | None = None,
             root: str | os.PathLike = "runs") -> "RunStore":
        params = _jsonable(params)
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(run_dir) if run_dir is not None else Path(root) / f"{kind}-{digest}"
        (path / "units").mkdir(parents=True, exist_ok=True)
        meta = {"kind": kind, "key": digest, "params": params, "editkit_version": __version__,
                "torch_version": torch.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        pfile = path / "params.json"
        if pfile.exists():
            old = json.loads(pfile.read_text())
            if old.get("key") != digest:
                raise ValueError(f"run directory {path} holds a run with other parameters (key {old.get('key')} "
                                 f"≠ {digest}); pass another run_dir or omit it to get one keyed by the parameters")
        else:
            _atomic_write_text(pfile, json.dumps(meta, indent=2))
        log.info("run %s: %s", kind, path)
        return cls(path)

    def _file(self, unit: str) -> Path:
        return self.path / "units" / f"{unit}.csv"

    def has(self, unit: str) -> bool:
        return self._file(unit).exists()

    def write(self, unit: str, frame: pd.DataFrame) -> None:
        f = self._file(unit)
        tmp = f.with_suffix(".tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, f)  # atomic: a unit is either complete or absent

    def read(self, unit: str) -> pd.DataFrame:
        return pd.read_csv(self._file(unit))

    def load(self) -> pd.DataFrame:
        files = sorted((self.path / "units").glob("*.csv"))
        if not files:
            return pd.DataFrame()
        return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)

    def save_state(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save_file

        f = self.path / f"{name}.safetensors"
        tmp = f.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"meta": json.dumps(meta)})
        os.replace(tmp, f)

    def load_state(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors import safe_open

        f = self.path / f"{name}.safetensors"
        if not f.exists():
            return None
        with safe_open(str(f), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}, json.loads(h.metadata()["meta"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every row a run directory holds (finished units only), with its parameters in ``.attrs``."""
    store = RunStore(Path(run_dir))
    frame = store.load()
    pfile = Path(run_dir) / "params.json"
    if pfile.exists():
        frame.attrs["run"] = json.loads(pfile.read_text())
    return frame


# --- helpers ----------------------------------------------------------------

def _method_name(method: str | Editor) -> str:
    return method.method if isinstance(method, Editor) else str(method)


def _records(records: Sequence[Any], n: int | None) -> list[Any]:
    records = list(records)
    if n is not None and n > len(records):
        raise ValueError(f"asked for {n} edits but only {len(records)} records were given")
    return records[:n] if n is not None else records


def _evaluate(lm, records, eval_batch_size, /, **cols) -> pd.DataFrame:
    from .metrics import evaluate

    frame = evaluate(lm, records, batch_size=eval_batch_size, progress=False)
    for k, v in cols.items():
        frame[k] = v
    return frame


def heldout_texts(source: str = "world", n: int = 200, seed: int = 0) -> list[str]:
    """Held-out text for the perplexity probe: the world's held-out split for the
    embedded world, else ``n`` documents of wikitext-103's test split (Hub)."""
    import random

    from .stats import HubCorpus, iter_corpus

    if str(source).startswith("world"):
        from .world import world_corpus

        texts = list(world_corpus("heldout", size=str(source).partition(":")[2] or "default"))
    else:
        texts = list(iter_corpus(HubCorpus("wikitext", "wikitext-103-raw-v1", "test"), n * 5))
    random.Random(seed).shuffle(texts)
    return texts[:n]


@torch.no_grad()
def perplexity(lm: LanguageModel, texts: Sequence[str], batch_size: int = 16, max_length: int = 256) -> float:
    """Token-level perplexity of ``texts`` (the general-ability probe of sequential editing)."""
    nll, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                           max_length=max_length).to(lm.device)
        logits = lm.model(**enc).logits[:, :-1].float()
        tgt, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
        lp = logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
        nll -= lp[mask].sum().item()
        count += int(mask.sum())
    return float(torch.tensor(nll / max(count, 1)).exp())


# --- study 1: layer sweep ----------------------------------------------------

def layer_sweep(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("ROME", "MEMIT"),
                layers: Iterable[int] | None = None, n_edits: int | None = 100, *, preset: str | None = None,
                editor_kwargs: dict | None = None, chunk: int = 25, eval_batch_size: int = 64,
                trace: bool = False, run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                progress: bool = True) -> pd.DataFrame:
    """Each fact edited into the *unedited* model alone, scored, and restored exactly;
    for every layer and every method. Rows carry ``method``, ``layer``, ``phase``
    (``"pre"`` for the unedited baseline, ``"post"`` after the edit). With ``trace``,
    causal-tracing importance per layer is added as ``phase="trace"`` rows."""
    recs = _records(records, n_edits)
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    kw = editor_kwargs or {}
    editors = {(_method_name(m), l): make_editor(m, l, preset, **kw) for m in methods for l in layers}
    params = dict(model=lm.name, methods=[_method_name(m) for m in methods], layers=layers, n_edits=len(recs),
                  cases=[getattr(r, "case_id", i) for i, r in enumerate(recs)], preset=preset,
                  editors={f"{m}-L{l}": e for (m, l), e in editors.items()}, trace=trace)
    store = RunStore.open("layer_sweep", params, run_dir, root)
    units = [("pre", None, None, i) for i in range(0, len(recs), chunk)]
    units += [("post", m, l, i) for (m, l) in editors for i in range(0, len(recs), chunk)]
    for phase, m, l, i in tqdm(units, desc="layer sweep", unit="unit", disable=not progress):
        name = f"pre-{i:06d}" if phase == "pre" else f"{m}-L{l:03d}-{i:06d}"
        if store.has(name):
            continue
        part = recs[i:i + chunk]
        if phase == "pre":
            frame = _evaluate(lm, part, eval_batch_size, phase="pre", method="none", layer=-1)
        else:
            editor = editors[(m, l)]
            frames = []
            for r in part:
                with editor.applied(lm, [r], progress=False) as edit:
                    frames.append(_evaluate(lm, [r], eval_batch_size, phase="post", method=m, layer=l,
                                            delta_norm=edit.norms[l]["delta_norm"]))
            frame = pd.concat(frames, ignore_index=True)
        store.write(name, frame)
    if trace and not store.has("trace"):
        from .tracing import layer_importance

        imp = layer_importance(lm, recs[: min(len(recs), 50)], progress=False)
        imp["phase"] = "trace"
        store.write("trace", imp)
    return store.load()


# --- study 2: batch editing ----------------------------------------------------

def batch_sweep(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("MEMIT", "EMMET"),
                layer: int = 1, batch_sizes: Sequence[int] = (16, 64, 256), *, preset: str | None = None,
                regs: dict[str, Sequence[float]] | None = None, editor_kwargs: dict | None = None,
                eval_batch_size: int = 64, run_dir: str | os.PathLike | None = None,
                root: str | os.PathLike = "runs", progress: bool = True) -> pd.DataFrame:
    """One batch of each size edited into the unedited model and scored (the first
    ``batch_size`` records, so batches are nested). ``regs`` optionally sweeps λ
    (``{"MEMIT": [1e3, 1e4], "EMMET": [0.01, 0.1]}``); the value is in column ``reg``."""
    recs = _records(records, max(batch_sizes))
    kw = editor_kwargs or {}
    grid = []
    for m in methods:
        base = make_editor(m, layer, preset, **kw)
        for reg in (regs or {}).get(base.method) or [base.reg]:
            grid += [(base.method, reg, bs, dataclasses.replace(base, reg=reg)) for bs in batch_sizes]
    params = dict(model=lm.name, layer=layer, batch_sizes=list(batch_sizes), preset=preset,
                  cases=[getattr(r, "case_id", i) for i, r in enumerate(recs)],
                  grid=[(m, reg, bs, ed) for m, reg, bs, ed in grid])
    store = RunStore.open("batch_sweep", params, run_dir, root)
    if not store.has("pre"):
        store.write("pre", _evaluate(lm, recs, eval_batch_size, phase="pre", method="none", batch_size=0, reg=0.0))
    for m, reg, bs, ed in tqdm(grid, desc="batch sweep", unit="batch", disable=not progress):
        name = f"{m}-reg{reg:g}-bs{bs:06d}"
        if store.has(name):
            continue
        part = recs[:bs]
        t0 = time.perf_counter()
        with ed.applied(lm, part, progress=False) as edit:
            t_edit = time.perf_counter() - t0
            frame = _evaluate(lm, part, eval_batch_size, phase="post", method=m, batch_size=bs, reg=reg,
                              delta_norm=edit.norms[layer]["delta_norm"], edit_seconds=t_edit)
        store.write(name, frame)
    return store.load()


# --- study 3: sequential-batched editing ------------------------------------

def sequential_batched(lm: LanguageModel, records: Sequence[Any], methods: Sequence[str | Editor] = ("MEMIT", "EMMET"),
                       layer: int = 1, batch_sizes: Sequence[int] = (1, 16, 64, 256), total_edits: int = 256, *,
                       checkpoints: Sequence[int] | None = None, heldout: Sequence[str] | None = None,
                       preset: str | None = None, editor_kwargs: dict | None = None, eval_batch_size: int = 64,
                       run_dir: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
                       progress: bool = True) -> pd.DataFrame:
    """Batches applied one after another to the *same* model (``total_edits`` facts
    as ``total_edits / batch_size`` batches). After each batch: that batch's scores
    (``phase="batch"``), the update norms and held-out perplexity (``phase="probe"``);
    at ``checkpoints`` (numbers of edits so far; default powers of 4 and the end)
    the scores of every fact edited so far (``phase="all"``, forgetting).

    The accumulated weight change is saved after every batch, so an interrupted run
    resumes from its last finished batch. The model is restored exactly at the end.
    """
    recs = _records(records, total_edits)
    for bs in batch_sizes:
        if total_edits % bs:
            raise ValueError(f"total_edits={total_edits} is not a multiple of batch size {bs}")
    if checkpoints is None:
        checkpoints = sorted({4 ** k for k in range(12) if 4 ** k <= total_edits} | {total_edits})
    kw = editor_kwargs or {}
    editors = {_method_name(m): make_editor(m, layer, preset, **kw) for m in methods}
    params = dict(model=lm.name, layer=layer, batch_sizes=list(batch_sizes), total_edits=total_edits,
                  checkpoints=list(checkpoints), preset=preset, editors=editors,
                  cases=[getattr(r, "case_id", i) for i, r in enumerate(recs)],
                  heldout=hashlib.sha256("\x00".join(heldout or []).encode()).hexdigest()[:12])
    store = RunStore.open("sequential_batched", params, run_dir, root)
    module = lm.edit_module(layer)
    if not store.has("pre"):
        pre = _evaluate(lm, recs, eval_batch_size, phase="pre", method="none", batch_size=0, batch=-1, edits_so_far=0)
        W = lm.weight(layer).detach().double()
        probe = dict(phase="probe", method="none", batch_size=0, batch=-1, edits_so_far=0, update_norm=0.0,
                     weight_norm=W.norm().item())
        if heldout:
            probe["perplexity"] = perplexity(lm, heldout)
        store.write("pre", pd.concat([pre, pd.DataFrame([probe])], ignore_index=True))
    total_steps = sum(total_edits // bs for bs in batch_sizes) * len(editors)
    bar = tqdm(total=total_steps, desc="sequential-batched", unit="batch", disable=not progress)
    for m, editor in editors.items():
        for bs in batch_sizes:
            n_batches = total_edits // bs
            state_name = f"state-{m}-bs{bs:06d}"
            with restored_weights([module]):
                W0 = lm.weight(layer).detach().to(torch.float64, copy=True)
                editor.second_moment(lm, layer, progress)  # C0 of the unedited model, before any state is loaded
                start = 0
                saved = store.load_state(state_name)
                if saved is not None:
                    tensors, meta = saved
                    start = meta["next_batch"]
                    with torch.no_grad():
                        module.weight.copy_(tensors["weight"].to(module.weight))
                    log.info("%s bs=%d: resuming after batch %d", m, bs, start)
                bar.update(start)
                for b in range(start, n_batches):
                    part = recs[b * bs:(b + 1) * bs]
                    done = (b + 1) * bs
                    cols = dict(method=m, batch_size=bs, batch=b, edits_so_far=done)
                    t0 = time.perf_counter()
                    edit = editor.apply(lm, part, progress=False)
                    t_edit = time.perf_counter() - t0
                    edit.commit()  # kept applied: the sequence continues on this model
                    frames = [_evaluate(lm, part, eval_batch_size, phase="batch", **cols)]
                    if done in checkpoints:
                        frames.append(_evaluate(lm, recs[:done], eval_batch_size, phase="all", **cols))
                    W = lm.weight(layer).detach().double()
                    probe = dict(phase="probe", **cols, update_norm=(W - W0).norm().item(),
                                 weight_norm=W.norm().item(), batch_delta_norm=edit.norms[layer]["delta_norm"],
                                 edit_seconds=t_edit)
                    if heldout:
                        probe["perplexity"] = perplexity(lm, heldout)
                    frames.append(pd.DataFrame([probe]))
                    # Unit, then state: a crash in between redoes batch b from the state before it
                    # and atomically overwrites the same unit file, so no row is lost or duplicated.
                    store.write(f"{m}-bs{bs:06d}-b{b:06d}", pd.concat(frames, ignore_index=True))
                    store.save_state(state_name, {"weight": module.weight.detach()}, {"next_batch": b + 1})
                    bar.update(1)
    bar.close()
    return store.load()
