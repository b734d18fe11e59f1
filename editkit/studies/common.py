"""What the three studies share: argument checks, the run key's identity of model and records,
scoring a unit (:func:`_evaluate`, the one place rows are computed), held-out text and perplexity."""
from __future__ import annotations

import logging
import math
import numbers
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch

from ..editors import Editor, make_editor
from ..models import LanguageModel, in_eval_mode
from ..paths import local_counterfact
from ..runstore import records_digest

log = logging.getLogger("editkit.studies")



def _method_name(method: str | Editor) -> str:
    return method.method if isinstance(method, Editor) else str(method)


def _records(records: Sequence[Any], n: int | None) -> list[Any]:
    records = list(records)
    if n is not None and n > len(records):
        raise ValueError(f"asked for {n} edits but only {len(records)} records were given")
    return records[:n] if n is not None else records


def _positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")


def _identity(lm: LanguageModel, recs: Sequence[Any]) -> dict:
    """What a run's rows are computed *from*: the model's name and a fingerprint of
    all its weights, and the records' content (their case_ids are kept for humans).
    Part of every run key, so other weights or other targets never reuse old rows."""
    return dict(model=lm.name, model_fingerprint=lm.fingerprint(), records=records_digest(recs),
                cases=[getattr(r, "case_id", i) for i, r in enumerate(recs)])


def _with_converged(frame: pd.DataFrame, records: Sequence[Any], edit: Any) -> pd.DataFrame:
    """Add ``converged``: whether the value optimization of each row's own request
    reached its stopping criterion (``Edit.diagnostics["converged"]``)."""
    flags = edit.diagnostics.get("converged") or [edit.converged] * len(records)
    ids = [getattr(r, "case_id", i) for i, r in enumerate(records)]
    if len(set(ids)) == len(ids) and len(flags) == len(ids):
        frame["converged"] = frame.case_id.map(dict(zip(ids, flags))).astype(bool)
    else:  # case_ids repeat: the batch's flag for every row
        frame["converged"] = edit.converged
    return frame


def _check_layers(lm: LanguageModel, layers: Sequence[int], what: str = "layers", shown: Any = None) -> None:
    """Refuse layers the model does not have before any work starts (a sweep over
    ``range(8)`` on a 4-layer model would otherwise fail minutes in, at layer 4)."""
    bad = [l for l in layers if not isinstance(l, numbers.Integral) or isinstance(l, bool) or not 0 <= l < lm.n_layers]
    if bad:
        shown = shown if shown is not None else list(layers) if what == "layers" else layers[0]
        raise ValueError(f"{what}={shown!r}: {lm.name} has {lm.n_layers} layers "
                         f"(0..{lm.n_layers - 1}); {bad} out of range. Pass e.g. layers=range({lm.n_layers}).")


def _study_editors(lm: LanguageModel, methods: Sequence[Any], layer: Any, preset: str | None, kw: dict,
                   study: str) -> dict[str, Editor]:
    """Each method's editor for a study at ``layer`` (one layer, or several as MEMIT spreads an
    edit), else at the layers the preset or ``editor_kwargs`` name. There is no default layer: a
    study without either would edit a layer nobody chose."""
    kw = dict(kw)
    if "layers" in kw:  # editor_kwargs may name them too
        if layer is not None:
            raise ValueError(f"layer={layer!r} and editor_kwargs['layers'] both name the layers to edit; give one")
        layer = kw.pop("layers")
    if layer is None and preset is None and "layer" not in kw:
        raise ValueError(f"layer: {study} needs the layer(s) to edit: pass layer=8 (or several, layer=[4, 5, 6]), "
                         "or a preset that names them (preset='world-gpt2')")
    if layer is not None:
        layers = [layer] if isinstance(layer, numbers.Integral) else list(layer)
        if not layers:
            raise ValueError(f"layer={layer!r}: give a layer number or a non-empty list of them")
        _check_layers(lm, layers, "layer", shown=layer if isinstance(layer, numbers.Integral) else layers)
    editors = {_method_name(m): make_editor(m, layer if layer is None or isinstance(layer, numbers.Integral)
                                            else list(layer), preset, **kw) for m in methods}
    _check_layers(lm, sorted({l for e in editors.values() for l in e.layers}))
    return editors


def _total_norm(norms: Sequence[float]) -> float:
    """The norm over several edited layers (sqrt of the sum of squares); one layer's own value as is."""
    return float(norms[0]) if len(norms) == 1 else math.sqrt(sum(float(x) ** 2 for x in norms))


def _evaluate(lm, records, eval_batch_size, /, **cols) -> pd.DataFrame:
    from ..metrics import evaluate

    frame = evaluate(lm, records, batch_size=eval_batch_size, progress=False)
    for k, v in cols.items():
        frame[k] = v
    return frame


def heldout_texts(source: str = "world", n: int = 200, seed: int = 0,
                  exclude: Sequence[Any] | None = None) -> list[str]:
    """Held-out text for the perplexity probe of sequential editing.

    * the embedded world (``"world[:size]"``): its held-out split;
    * a local CounterFact file (or ``"counterfact-text:<source>"``, or ``"counterfact"`` when
      ``EDITKIT_DATA`` names the local copy of it), the offline case of a
      real model: the true sentences of the file's *eval* half
      (:func:`editkit.corpora.counterfact_texts`), which an offline C0 never reads, minus the
      ``exclude`` records (pass the records being edited) and any sentence naming one of
      their subjects, so the probe reads real English that neither C0 nor an edit touched;
    * anything else: ``n`` documents of wikitext-103's test split (Hub), as the study does.
    """
    import random

    from ..corpora import counterfact_texts
    from ..data.corpus import HubCorpus, iter_corpus

    source = str(source)
    kind, _, rest = source.partition(":")
    if source.startswith("world"):
        from ..world import world_corpus

        texts = list(world_corpus("heldout", size=rest or "default"))
    elif kind == "counterfact-text" or Path(source).is_file() or (source == "counterfact" and local_counterfact()):
        cf = (rest or "counterfact") if kind == "counterfact-text" else source
        texts = list(counterfact_texts(cf, exclude=exclude, split="eval", seed=seed))
        if not texts:
            raise ValueError(f"heldout_texts({source!r}): no sentence of the file's eval half is left once the "
                             f"{len(exclude or ())} excluded records are dropped; edit fewer records or pass "
                             "heldout texts of your own")
        if len(texts) < n:
            log.warning("heldout_texts(%r): only %d held-out sentences (asked for %d)", source, len(texts), n)
    else:
        texts = list(iter_corpus(HubCorpus("wikitext", "wikitext-103-raw-v1", "test"), n * 5))
    random.Random(seed).shuffle(texts)
    return texts[:n]


@in_eval_mode
@torch.no_grad()
def perplexity(lm: LanguageModel, texts: Sequence[str], batch_size: int = 16, max_length: int = 256) -> float:
    """Token-level perplexity of ``texts`` (the general-ability probe of sequential editing)."""
    nll, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                           max_length=min(max_length, lm.max_positions or max_length)).to(lm.device)
        logits = lm.model(**enc).logits[:, :-1].float()
        tgt, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
        lp = logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
        nll -= lp[mask].sum().item()
        count += int(mask.sum())
    return float(torch.tensor(nll / max(count, 1)).exp())


@contextmanager
def _written_by_editkit(lm: LanguageModel, layers: int | Sequence[int]) -> Iterator[None]:
    """On exit, record the edited weights (put back by the runner) as editkit's own writes, so
    the statistics cached on the model (the unedited model's) stay valid."""
    try:
        yield
    finally:
        lm.weights_written({lm.weight_name(l) for l in ([layers] if isinstance(layers, int) else layers)})


@contextmanager
def _restored_state(editor: Editor, lm: LanguageModel) -> Iterator[dict[str, torch.Tensor]]:
    """The method's state besides the weights (AlphaEdit's K_p K_pᵀ) as the sequence found
    it, put back when the sequence ends: like the weights, the model leaves a run as it came."""
    state = editor.sequential_state(lm)
    try:
        yield state
    finally:
        editor.load_sequential_state(lm, state)
