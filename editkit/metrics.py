"""CounterFact and zsRE scores, exactly as defined in ``docs/metrics.md``.

:func:`evaluate` scores a model on records and returns one tidy row per record ×
prompt kind × prompt; :func:`summarize` turns such rows (from any number of
calls, methods, layers...) into ES/PS/NS/S and friends with bootstrap intervals.
There is no separate "baseline" code path: the pre-edit baseline *is*
``evaluate`` on the unedited model, and the experiment runners tag its rows with
``phase="pre"``.

Likelihoods are computed with teacher forcing on ``prompt + " " + target``; the
target's tokens are every token that its text *with its leading space* contributes
(:func:`editkit.requests.with_target`, located from the fast tokenizer's offsets), so
BOS tokens, SentencePiece's "▁" (glued or alone before digits) and GPT-2's glued or
lone "Ġ" are all handled without slicing a fixed number of tokens off. Every (prompt, target) pair of every record is scored in right-padded,
length-sorted batches in one pass.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .generation import generate  # the one generation loop (left-padded batches, seeded)
from .models import LanguageModel, in_eval_mode
from .progress import tqdm
from .requests import EditRequest, RequestError, tokenize_spans, with_target

log = logging.getLogger(__name__)

__all__ = ["evaluate", "summarize", "score_targets", "TargetScores", "token_logprobs", "edit_success",
           "generation_metrics", "ngram_entropy", "KINDS", "FRAME_COLUMNS", "METRICS"]

#: Prompt kinds :func:`evaluate` scores, in row order.
KINDS = ("rewrite", "paraphrase", "neighborhood")

#: Columns of :func:`evaluate`'s frame, in order (generation rows add ``generated``,
#: ``entropy`` and ``reference_score`` and leave the likelihood columns empty).
FRAME_COLUMNS = ("dataset", "case_id", "subject", "relation_id", "kind", "prompt_index", "prompt", "target_new",
                 "target_true", "nll_new", "nll_true", "p_new", "p_true", "success", "top1_new", "top1_true",
                 "acc_new", "acc_true", "n_tokens_new", "n_tokens_true")

#: Metric names of :func:`summarize`, in output order.
METRICS = ("ES", "EM", "PS", "PM", "NS", "NM", "S", "ES_top1", "PS_top1", "NS_top1", "S_top1", "ES_acc", "PS_acc",
           "NS_acc", "GE", "RS")


# --------------------------------------------------------------------------- likelihoods

@dataclass
class TargetScores:
    """Per (prompt, target) pair: mean NLL over the target tokens, whether every target
    token is the argmax (top-1), the fraction that are (token accuracy), and the count."""

    nll: np.ndarray
    top1: np.ndarray
    acc: np.ndarray
    n_tokens: np.ndarray


def token_logprobs(logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                   ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log P(ids[i])`` read at ``logits[rows[i], pos[i]]`` (the position that predicts
    token ``i``), and whether it is the argmax there. The one scorer of target tokens
    (evaluate, the widgets, the world report, causal tracing): the log-softmax runs in
    float32 at those positions only."""
    picked = logits[rows, pos].float()  # (tokens, vocab)
    return picked.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1), picked.argmax(-1) == ids


def edit_success(nll_new: np.ndarray, nll_true: np.ndarray, neighborhood: np.ndarray | bool) -> np.ndarray:
    """The one success rule (metrics.md): on rewrite and paraphrase prompts the new object
    is more likely than the true one; on neighborhood prompts the true one stays more likely."""
    return np.where(neighborhood, nll_true < nll_new, nll_new < nll_true)


def _pair_text(prompt: str, target: str) -> tuple[str, tuple[int, int]]:
    return with_target(prompt, target)


@in_eval_mode
@torch.no_grad()
def score_targets(lm: LanguageModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                  progress: bool = True) -> TargetScores:
    """Teacher-forced scores of ``target`` after ``prompt`` for every pair.

    Duplicate pairs are scored once; texts are sorted by token length so batches
    carry little padding; log-softmax runs in float32 only at the positions that
    predict target tokens (a 128k-token vocabulary never materializes for the
    whole batch). Results come back in the order of ``pairs``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    unique = list(dict.fromkeys((str(p), str(t)) for p, t in pairs))
    texts_spans = [_pair_text(p, t) for p, t in unique]
    for (p, t), (text, _) in zip(unique, texts_spans):
        if not t.strip():
            raise RequestError(f"empty target for prompt {p!r}; every target must be a non-empty string")
    tok = lm.tokenizer
    lengths = [len(ids) for ids in tok([t for t, _ in texts_spans])["input_ids"]] if unique else []
    order = sorted(range(len(unique)), key=lambda i: (lengths[i], i))
    nll = np.full(len(unique), np.nan)
    top1 = np.zeros(len(unique), dtype=bool)
    acc = np.full(len(unique), np.nan)
    count = np.zeros(len(unique), dtype=int)
    device = lm.device
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="scoring", unit="batch", disable=not progress or not batches):
        batch = tokenize_spans(tok, [texts_spans[i][0] for i in idx], [[texts_spans[i][1]] for i in idx],
                               max_positions=lm.max_positions)
        logits = lm.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        rows, pos, tgt = [], [], []
        for b, spans in enumerate(batch.spans):
            toks = spans[0]
            if toks[0] < 1:
                raise RequestError(f"target of {texts_spans[idx[b]][0]!r} starts at the first token; "
                                   "the prompt must contribute at least one token before it")
            rows += [b] * len(toks)
            pos += [t - 1 for t in toks]
            tgt += batch.input_ids[b, toks].tolist()
        lp, hit = token_logprobs(logits, *(torch.tensor(x, device=logits.device) for x in (rows, pos, tgt)))
        logp, hit = lp.double().cpu().numpy(), hit.cpu().numpy()
        start = 0
        for b, spans in enumerate(batch.spans):
            m = len(spans[0])
            i = idx[b]
            nll[i] = -logp[start:start + m].mean()
            top1[i] = bool(hit[start:start + m].all())
            acc[i] = hit[start:start + m].mean()
            count[i] = m
            start += m
    where = {pair: i for i, pair in enumerate(unique)}
    sel = np.array([where[(str(p), str(t))] for p, t in pairs], dtype=int)
    return TargetScores(nll[sel], top1[sel], acc[sel], count[sel])


# --------------------------------------------------------------------------- records

def _as_record(x: Any, i: int) -> Any:
    """Anything with the record scoring interface: CounterFact/zsRE records, their
    dicts, or a bare :class:`EditRequest` (rewrite prompt only)."""
    from .data import CounterFactRecord, ZsreRecord

    if isinstance(x, EditRequest):
        if x.target_true is None:
            raise RequestError(f"request #{i} has no target_true; scoring compares target_new with target_true")
        return CounterFactRecord(case_id=x.case_id if x.case_id is not None else i, subject=x.subject,
                                 prompt=x.prompt, target_new=x.target_new, target_true=x.target_true)
    if isinstance(x, Mapping):
        return ZsreRecord.from_dict(x, case_id=i) if "src" in x and "alt" in x else CounterFactRecord.from_dict(x, i)
    if hasattr(x, "request") and hasattr(x, "paraphrase_prompts"):
        return x
    raise TypeError(f"record #{i} is a {type(x).__name__}; pass CounterFactRecord / ZsreRecord objects (e.g. from "
                    "ek.load_counterfact), their dicts, or EditRequests with target_true")


def _neighborhood_target(record: Any, j: int) -> str:
    get = getattr(record, "neighborhood_target", None)
    if get is not None:
        return get(j)
    targets = getattr(record, "neighborhood_targets", None)
    return targets[j] if targets else record.request.target_true


def _prompt_rows(record: Any, index: int, kinds: Sequence[str]) -> list[dict]:
    from .data import ZsreRecord

    req = record.request
    base = {"dataset": record.dataset if isinstance(record, ZsreRecord) else "counterfact",
            "case_id": record.case_id if getattr(record, "case_id", None) is not None else index,
            "subject": req.subject, "relation_id": getattr(record, "relation_id", None)}
    rows = []
    for kind in kinds:
        if kind == "rewrite":
            items = [(req.text, req.target_true)]
        elif kind == "paraphrase":
            items = [(p, req.target_true) for p in record.paraphrase_prompts]
        else:
            items = [(p, _neighborhood_target(record, j)) for j, p in enumerate(record.neighborhood_prompts)]
        for j, (prompt, true) in enumerate(items):
            rows.append({**base, "kind": kind, "prompt_index": j, "prompt": prompt, "target_new": req.target_new,
                         "target_true": true})
    return rows


def evaluate(lm: LanguageModel, records: Iterable[Any], *, batch_size: int = 64,
             kinds: Sequence[str] = KINDS, generation: bool = False, progress: bool = True,
             generation_kwargs: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Score ``records`` on the model as it is now; one row per record × kind × prompt.

    Call it on the unedited model for the pre-edit baseline and again inside an
    edit for the post-edit scores: the same function, the same rows.

    Columns (:data:`FRAME_COLUMNS`): ``dataset`` ("counterfact", or "zsre-rome" /
    "zsre-mend" naming the zsRE definition, see :mod:`editkit.data.zsre`),
    ``case_id``, ``subject``, ``relation_id``, ``kind`` ("rewrite", "paraphrase",
    "neighborhood"), ``prompt_index``, ``prompt`` (filled in), ``target_new``
    (``o*``), ``target_true`` (``o^c`` of *this* prompt: a neighborhood prompt's own
    true object when the record gives one, e.g. EasyEdit's
    ``locality_ground_truth`` or zsRE's ``loc_ans``), ``nll_new``/``nll_true``
    (mean NLL per target token), ``p_new``/``p_true`` (``exp(-nll)``, the
    per-token geometric-mean probability), ``success`` (rewrite/paraphrase:
    ``nll_new < nll_true``; neighborhood: ``nll_true < nll_new``), ``top1_new`` /
    ``top1_true`` (every target token is the argmax under teacher forcing),
    ``acc_new``/``acc_true`` (fraction of target tokens that are the argmax:
    MEMIT's zsRE token accuracy) and ``n_tokens_new``/``n_tokens_true``.

    For zsRE records the rewrite prompt is ``src`` and the paraphrase ``rephrase``;
    under the ROME/MEMIT definition target_new = ``answers[0]`` with no target_true
    (the ``*_true`` columns and ``success`` of those rows are empty: zsRE is scored by
    top-1 / token accuracy) and the neighborhood prompt is ``loc + "?"``; under
    MEND's, target_new = ``alt`` against ``answers[0]`` and the neighborhood prompt is
    ``loc``. Either way the neighborhood's true object is ``loc_ans``.

    ``generation=True`` adds rows of kind ``"generation"`` (see
    :func:`generation_metrics`; ``generation_kwargs`` go there).
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds={bad} are not scored; choose from {KINDS}")
    recs = [_as_record(r, i) for i, r in enumerate(records)]
    rows = [row for i, r in enumerate(recs) for row in _prompt_rows(r, i, kinds)]
    frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS[:9]))
    pairs = [(r["prompt"], r["target_new"]) for r in rows] + [(r["prompt"], r["target_true"]) for r in rows]
    # A target may be absent (ROME/MEMIT's zsRE has no counterfactual true object): its scores are NaN.
    present = [i for i, (_, t) in enumerate(pairs) if t is not None]
    got = score_targets(lm, [pairs[i] for i in present], batch_size=batch_size, progress=progress)
    scores = TargetScores(np.full(len(pairs), np.nan), np.zeros(len(pairs), dtype=bool), np.full(len(pairs), np.nan),
                          np.zeros(len(pairs), dtype=int))
    for name in ("nll", "top1", "acc", "n_tokens"):
        getattr(scores, name)[present] = getattr(got, name)
    n = len(rows)
    frame["nll_new"], frame["nll_true"] = scores.nll[:n], scores.nll[n:]
    frame["p_new"], frame["p_true"] = np.exp(-scores.nll[:n]), np.exp(-scores.nll[n:])
    neighborhood = (frame["kind"] == "neighborhood").to_numpy()
    success = edit_success(scores.nll[:n], scores.nll[n:], neighborhood)
    missing = np.isnan(scores.nll[:n]) | np.isnan(scores.nll[n:])
    frame["success"] = pd.array(np.where(missing, None, success), dtype="boolean") if missing.any() else success
    frame["top1_new"], frame["top1_true"] = scores.top1[:n], scores.top1[n:]
    frame["acc_new"], frame["acc_true"] = scores.acc[:n], scores.acc[n:]
    frame["n_tokens_new"], frame["n_tokens_true"] = scores.n_tokens[:n], scores.n_tokens[n:]
    if generation:
        gen = generation_metrics(lm, recs, progress=progress, **dict(generation_kwargs or {}))
        frame = pd.concat([frame, gen], ignore_index=True) if len(gen) else frame
    return frame


# --------------------------------------------------------------------------- generation

_WORD = re.compile(r"\w+|[^\w\s]")
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Generation entropy ``Σ w_n H_n`` in bits of the word n-gram frequency
    distributions (``docs/metrics.md``: ``(2/3)·H₂ + (4/3)·H₃``).

    ROME's code takes the arithmetic *mean* of the two weighted terms, i.e. half of
    this value; divide by 2 to compare with numbers reported by ROME/MEMIT. Words
    are split with a regex (word characters / single punctuation marks) rather
    than NLTK, which differs only on contractions.
    """
    words = _WORD.findall(text)
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if not grams:
            continue
        f = np.array(list(grams.values()), dtype=float)
        f /= f.sum()
        total += w * float(-(f * np.log2(f)).sum())
    return total


@dataclass
class _Tfidf:
    """The release's TF-IDF model (``tfidf_vocab.json`` + ``idf.npy``), applied like
    scikit-learn's ``TfidfVectorizer`` (lowercase, raw counts × idf, L2 norm)."""

    vocab: dict[str, int]
    idf: np.ndarray

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocab[w] for w in _TFIDF_TOKEN.findall(text.lower()) if w in self.vocab)
        v = {i: c * float(self.idf[i]) for i, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {i: x / norm for i, x in v.items()}

    def similarity(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return float(sum(x * vb.get(i, 0.0) for i, x in va.items()))


def _reference_files(snippets: str | os.PathLike | None, idf: str | os.PathLike | None,
                     vocab: str | os.PathLike | None) -> tuple[dict, _Tfidf] | None:
    """The snippets and TF-IDF model, or None (logged) when a file is absent."""
    from .data import data_cache_dir

    root = data_cache_dir()
    paths = {"snippets": Path(snippets) if snippets else root / "attribute_snippets.json",
             "idf": Path(idf) if idf else root / "idf.npy",
             "vocab": Path(vocab) if vocab else root / "tfidf_vocab.json"}
    missing = [f"{k} ({p})" for k, p in paths.items() if not p.is_file()]
    if missing:
        log.info("reference score (RS) skipped: missing %s; pass snippets=, idf=, vocab= paths of the ROME release "
                 "files attribute_snippets.json, idf.npy, tfidf_vocab.json", ", ".join(missing))
        return None
    by_relation: dict = {}
    for el in json.loads(paths["snippets"].read_text()):
        by_relation.setdefault(el["relation_id"], {}).setdefault(el["target_id"], []).extend(el["samples"])
    return by_relation, _Tfidf(json.loads(paths["vocab"].read_text()), np.load(paths["idf"]))


@in_eval_mode
@torch.no_grad()
def generation_metrics(lm: LanguageModel, records: Sequence[Any], *, max_new_tokens: int = 100, sample: bool = True,
                       top_k: int = 5, seed: int = 0, batch_size: int = 16, snippets: str | os.PathLike | None = None,
                       idf: str | os.PathLike | None = None, vocab: str | os.PathLike | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Fluency (generation entropy) and consistency (reference score) rows, kind
    ``"generation"``, one per record × generation prompt.

    Text is generated from each generation prompt (top-k sampling as in ROME, or
    greedy with ``sample=False``) under a fixed ``seed`` without touching the
    global RNG; ``generated`` holds prompt + continuation, on which ``entropy`` is
    computed. ``reference_score`` is the TF-IDF cosine between the record's
    concatenated generations and the reference snippets about subjects whose
    object (for this relation) is ``target_new``; it needs the ROME release's
    ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json`` (arguments,
    or found in ``$EDITKIT_CACHE/data``) and the records' ``relation_id`` and
    ``target_new_id``; without them it is NaN and a note is logged.
    """
    recs = [_as_record(r, i) for i, r in enumerate(records)]
    items = [(i, j, p) for i, r in enumerate(recs) for j, p in enumerate(getattr(r, "generation_prompts", []) or [])]
    cols = ["dataset", "case_id", "subject", "relation_id", "kind", "prompt_index", "prompt", "target_new",
            "target_true", "generated", "entropy", "reference_score"]
    if not items:
        log.info("no generation prompts in these records; generation metrics skipped")
        return pd.DataFrame(columns=cols)
    prompts = [p for _, _, p in items]
    conts = generate(lm, prompts, max_new_tokens, sample=sample, top_k=top_k, seed=seed, batch_size=batch_size,
                     progress=progress)
    texts = [p + c for p, c in zip(prompts, conts)]
    ref = _reference_files(snippets, idf, vocab)
    per_record: dict[int, list[str]] = {}
    for (i, _, _), t in zip(items, texts):
        per_record.setdefault(i, []).append(t)
    rs: dict[int, float] = {}
    if ref is not None:
        by_relation, tfidf = ref
        for i, gens in per_record.items():
            r = recs[i]
            refs = by_relation.get(getattr(r, "relation_id", None), {}).get(getattr(r, "target_new_id", None), [])
            if refs:
                rs[i] = tfidf.similarity(" ".join(gens), " ".join(s["text"] for s in refs))
    rows = []
    for (i, j, p), t in zip(items, texts):
        r = recs[i]
        rows.append({"dataset": "counterfact", "case_id": r.case_id if r.case_id is not None else i,
                     "subject": r.subject, "relation_id": getattr(r, "relation_id", None), "kind": "generation",
                     "prompt_index": j, "prompt": p, "target_new": r.request.target_new,
                     "target_true": r.request.target_true, "generated": t, "entropy": ngram_entropy(t),
                     "reference_score": rs.get(i, np.nan)})
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- summaries

def _hmean(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Harmonic mean, 0 when any term is 0 (as its limit), NaN when any is NaN."""
    a, b, c = (np.asarray(x, dtype=float) for x in (a, b, c))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = 3.0 / (1.0 / a + 1.0 / b + 1.0 / c)
    zero = (a == 0) | (b == 0) | (c == 0)
    return np.where(np.isnan(a) | np.isnan(b) | np.isnan(c), np.nan, np.where(zero, 0.0, h))


def _per_row_values(frame: pd.DataFrame) -> pd.DataFrame:
    """Each metric's per-prompt contribution (NaN where the row does not count)."""
    kind = frame["kind"]
    num = lambda c: pd.to_numeric(frame[c], errors="coerce") if c in frame else pd.Series(np.nan, frame.index)  # noqa: E731

    def flag(c: str) -> pd.Series:
        """A boolean column as 0/1 (also after a CSV round trip, where it may be text)."""
        if c not in frame:
            return pd.Series(np.nan, frame.index)
        col = frame[c]
        if col.dtype == object:
            col = col.map(lambda x: {"true": 1.0, "false": 0.0}.get(str(x).lower(), np.nan))
        return col.astype(float)

    v: dict[str, pd.Series] = {}
    for name, k in (("E", "rewrite"), ("P", "paraphrase")):
        m = kind == k
        v[f"{name}S"] = flag("success").where(m)
        v[f"{name}M"] = (num("p_new") - num("p_true")).where(m)
        v[f"{name}S_top1"] = flag("top1_new").where(m)
        v[f"{name}S_acc"] = num("acc_new").where(m)
    m = kind == "neighborhood"
    v["NS"] = flag("success").where(m)
    v["NM"] = (num("p_true") - num("p_new")).where(m)
    v["NS_top1"] = flag("top1_true").where(m)
    v["NS_acc"] = num("acc_true").where(m)
    m = kind == "generation"
    v["GE"] = num("entropy").where(m)
    v["RS"] = num("reference_score").where(m)
    return pd.DataFrame(v, index=frame.index)


def _boot_means(mat: np.ndarray, n_boot: int, seed: int, chunk: int = 250) -> np.ndarray:
    """Bootstrap means (n_boot × metrics) of a records × metrics matrix with NaNs,
    resampling records; one resample serves every metric (so S's interval comes
    from the same resamples as ES, PS and NS)."""
    r = mat.shape[0]
    rng = np.random.default_rng(seed)
    present = (~np.isnan(mat)).astype(float)
    filled = np.nan_to_num(mat)
    out = []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(r, np.full(r, 1.0 / r), size=min(chunk, n_boot - start)).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append((counts @ filled) / (counts @ present))
    return np.concatenate(out) if out else np.empty((0, mat.shape[1]))


def _summarize_group(per_record: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    cols = list(per_record.columns)
    mat = per_record.to_numpy(dtype=float)
    counts = (~np.isnan(mat)).sum(0)
    value = np.array([np.nanmean(mat[:, j]) if counts[j] else np.nan for j in range(len(cols))])
    boot = _boot_means(mat, n_boot, seed) if n_boot > 0 and len(mat) else np.empty((0, len(cols)))
    res = {c: (value[j], boot[:, j], int(counts[j])) for j, c in enumerate(cols)}
    for s, parts in (("S", ("ES", "PS", "NS")), ("S_top1", ("ES_top1", "PS_top1", "NS_top1"))):
        vals = [res[p] for p in parts]
        res[s] = (float(_hmean(*[x[0] for x in vals])), _hmean(*[x[1] for x in vals]), min(x[2] for x in vals))
    rows = []
    for name in METRICS:
        val, samples, n = res[name]
        if n == 0:
            continue
        samples = samples[~np.isnan(samples)] if len(samples) else samples
        lo, hi = (np.percentile(samples, [2.5, 97.5]) if len(samples) else (np.nan, np.nan))
        rows.append({"metric": name, "value": float(val), "ci_low": float(lo), "ci_high": float(hi), "n": n})
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high", "n"])


def summarize(frame: pd.DataFrame, n_boot: int = 1000, seed: int = 0, by: Sequence[str] | str | None = None
              ) -> pd.DataFrame:
    """Scores of an :func:`evaluate` frame (or several concatenated).

    Each metric is averaged first over a record's prompts, then over records (a
    record is a ``case_id`` of a ``dataset`` within a group); its 95% interval is the percentile
    bootstrap over records with ``n_boot`` resamples (``seed`` fixed). ``n`` is the
    number of records the metric averages over. Metrics (:data:`METRICS`, those
    without any rows are left out):

    - ``ES``/``PS``/``NS``: success fractions; ``EM``/``PM``: mean
      ``p_new − p_true`` on rewrite/paraphrase prompts; ``NM``: mean
      ``p_true − p_new`` on neighborhood prompts; ``S``: harmonic mean of ES, PS,
      NS (its interval from the same resamples);
    - ``ES_top1``/``PS_top1``/``NS_top1``/``S_top1``: top-1 accuracy of
      target_new (rewrite, paraphrase) and of the true object (neighborhood): the
      zsRE efficacy / paraphrase / specificity; ``*_acc``: token-level accuracy
      (MEMIT's zsRE tables);
    - ``GE``, ``RS``: generation entropy and reference score, when generated.

    Without ``by``: a frame indexed by metric with columns value, ci_low, ci_high,
    n. With ``by`` (e.g. ``["method", "layer"]``): a long frame with the ``by``
    columns then metric, value, ci_low, ci_high, n, one block per group.
    Values are fractions (magnitudes in [-1, 1]).
    """
    by = [by] if isinstance(by, str) else list(by or [])
    missing = [c for c in ["kind", "case_id", *by] if c not in frame.columns]
    if missing:
        raise KeyError(f"frame lacks column(s) {missing}; pass a frame from ek.evaluate (and by= columns it has)")
    rows = frame[frame["kind"].isin([*KINDS, "generation"])]
    values = _per_row_values(rows)
    # A record is a case_id *within its dataset*: CounterFact and zsRE (or two zsRE definitions) share case_ids.
    record = (["dataset"] if "dataset" in rows.columns and "dataset" not in by else []) + ["case_id"]
    keys = [rows[c] for c in by] + [rows[c] for c in record]
    per_record = values.groupby(keys, dropna=False, sort=False).mean()
    if not by:
        out = _summarize_group(per_record, n_boot, seed)
        return out.set_index("metric")
    parts = []
    for group, block in per_record.groupby(level=list(range(len(by))), dropna=False, sort=True):
        group = group if isinstance(group, tuple) else (group,)
        s = _summarize_group(block, n_boot, seed)
        for c, g in reversed(list(zip(by, group))):
            s.insert(0, c, g)
        parts.append(s)
    if not parts:
        return pd.DataFrame(columns=[*by, "metric", "value", "ci_low", "ci_high", "n"])
    return pd.concat(parts, ignore_index=True)
