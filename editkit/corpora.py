"""Real English text for ``C0`` when no Hub corpus is reachable.

``C0 = E[k kᵀ]`` should come from text of the kind the model saw in training; ROME and
MEMIT use Wikipedia (via the Hub). Offline, a real model such as ``smollm2-135m`` still has
two sources of real English within editkit's reach:

* ``"counterfact-text"``: the CounterFact records' own sentences — each rewrite prompt
  completed with its *true* object, the paraphrases (with the same true object), the
  neighbourhood prompts with theirs, and the generation prompts. Only records of the
  *corpus half* of the file are used: a fixed hash of ``case_id`` puts every record in
  ``"corpus"`` or ``"eval"`` (:func:`corpus_split`), and records to be edited and scored
  must be taken from the eval half (:func:`scoring_records`), so C0 never sees a scored
  fact. ``"counterfact-text:<source>"`` reads another file (any ``ek.load_counterfact``
  source; the default is the official ``"counterfact"``, cached after one download).
* ``"model-text"``: text sampled from the model itself, from short generic openers, as the
  ROME/MEMIT papers generate their context prefixes. Deterministic (seeded, greedy-free
  top-k sampling under a forked RNG), produced lazily so ``max_tokens`` stops it early.
* ``"offline-text[:<source>]"``: both, interleaved one text from each.

:func:`counterfact_texts` with an explicit ``exclude=`` list of records (and
:func:`model_texts`) give the same texts as a Python iterable, for ``corpus=`` lists.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import random
from typing import Any, Iterable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = ["OFFLINE_CORPORA", "is_offline_corpus", "corpus_split", "scoring_records", "counterfact_texts",
           "model_texts", "offline_texts", "OPENERS"]

OFFLINE_CORPORA = ("counterfact-text", "model-text", "offline-text")

#: Generic sentence openers for model samples (ROME's prefixes start from a handful like these).
OPENERS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "There", "Many", "One", "According to",
           "During", "Although", "Today")


def is_offline_corpus(corpus: Any) -> bool:
    return isinstance(corpus, str) and corpus.partition(":")[0] in OFFLINE_CORPORA


def corpus_split(case_id: Any) -> str:
    """``"corpus"`` or ``"eval"``: a fixed, seedless half of CounterFact by a hash of ``case_id``.

    Fixed (not seeded) so that every C0 cached on disk and every scored sample agree on which
    records may be read for statistics; a hash (not parity) so both halves cover all relations.
    """
    return "corpus" if hashlib.sha256(f"editkit-c0:{case_id}".encode()).digest()[0] < 128 else "eval"


def scoring_records(records: Iterable[Any]) -> list[Any]:
    """The records of the eval half (the ones an offline-text C0 never reads), order kept."""
    return [r for r in records if corpus_split(r.case_id) == "eval"]


def _record_texts(rec: Any) -> Iterator[str]:
    """A record's sentences with their true objects: real statements, never the counterfactual."""
    yield f"{rec.text} {rec.target_true}"
    for p in rec.paraphrase_prompts:
        yield f"{p} {rec.target_true}"
    for i, p in enumerate(rec.neighborhood_prompts):
        yield f"{p} {rec.neighborhood_target(i)}"
    yield from rec.generation_prompts


def counterfact_texts(source: Any = "counterfact", exclude: Sequence[Any] | None = None, *,
                      split: bool | str = True, seed: int = 0) -> Iterator[str]:
    """Sentences of CounterFact records (see the module doc), records shuffled by ``seed``.

    ``split=True`` (or ``"corpus"``) keeps only the corpus half, ``"eval"`` only the eval half
    (held-out text for a perplexity probe: never in C0), ``False`` every record; ``exclude``
    (records or case ids) drops those records and any text that mentions one of their subjects,
    whatever the split.
    """
    from .data import load_counterfact

    records = load_counterfact(source, skip_invalid=True)
    ex = list(exclude or ())
    ids = {getattr(r, "case_id", r) for r in ex}
    subjects = [r.subject for r in ex if hasattr(r, "subject")]
    half = "corpus" if split is True else split or None
    if half not in (None, "corpus", "eval"):
        raise ValueError(f"split={split!r}: choose True/'corpus' (the C0 half), 'eval' or False (every record)")
    keep = [r for r in records if r.case_id not in ids and (half is None or corpus_split(r.case_id) == half)]
    random.Random(seed).shuffle(keep)
    log.info("counterfact-text: %d of %d records (split=%s, %d excluded)", len(keep), len(records), split, len(ids))
    for rec in keep:
        for t in _record_texts(rec):
            if not any(s in t for s in subjects):
                yield t


@torch.no_grad()
def model_texts(lm: Any, *, seed: int = 0, max_new_tokens: int = 48, batch_size: int = 16, top_k: int = 50,
                openers: Sequence[str] = OPENERS) -> Iterator[str]:
    """Endless text sampled from ``lm``: batches of one opener repeated (no padding needed), cycling openers.

    Sampling runs under a forked RNG seeded per batch, so the texts are reproducible and the
    caller's random state is untouched.
    """
    tok = lm.tokenizer
    for b in itertools.count():
        opener = openers[b % len(openers)]
        enc = tok([opener] * batch_size, return_tensors="pt").to(lm.device)
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + b)
            out = lm.model.generate(**enc, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        yield from tok.batch_decode(out, skip_special_tokens=True)


def offline_texts(name: str, lm: Any) -> Iterator[str]:
    """The texts of an offline corpus name (``"counterfact-text[:src]"``, ``"model-text"``, ``"offline-text[:src]"``)."""
    kind, _, source = name.partition(":")
    if kind not in OFFLINE_CORPORA:
        raise ValueError(f"corpus={name!r} is not an offline corpus; choose from {OFFLINE_CORPORA}")
    if kind == "model-text":
        if source:
            raise ValueError("corpus='model-text' takes no source; use 'offline-text:<source>' to mix in CounterFact")
        return model_texts(lm)
    cf = counterfact_texts(source or "counterfact")
    if kind == "counterfact-text":
        return cf
    return (t for pair in zip(cf, model_texts(lm)) for t in pair)
