"""The minimal-precomputation curve: C0 from 1x, 2x, 4x, 10x d_in token keys and from the full
corpus, then a MEMIT batch edit and its scores."""
from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import METRICS, Context, have_metrics, log, scores_of, seed_all, timed


# --------------------------------------------------------------------------- precompute curve, e2e

def _C0(ctx: Context, n_samples: int | None, max_tokens: int | None = None,
        corpus: Any = None) -> tuple[dict[int, torch.Tensor], dict[int, Any], float]:
    """C0 per edited layer (``ek.second_moment``, no disk cache), timed; computed once per setting.

    ``corpus=None`` is the benchmark's corpus (the preloaded list)."""
    from editkit import second_moment
    from editkit.stats import corpus_name

    if corpus is None and n_samples is not None and n_samples >= len(ctx.corpus):
        n_samples = None  # the whole preloaded corpus either way: share the computation
    corpus = ctx.corpus if corpus is None else corpus
    key = ("C0", corpus_name(corpus) if not isinstance(corpus, list) else id(corpus), n_samples, max_tokens)
    if key not in ctx.cache:
        C0s, infos = {}, {}
        t0 = time.perf_counter()
        for layer in ctx.editor.edit_layers:
            C0s[layer], infos[layer] = second_moment(ctx.lm, layer, corpus, n_samples, max_tokens=max_tokens,
                                                     cache=False, progress=False, return_info=True)
        ctx.cache[key] = (C0s, infos, time.perf_counter() - t0)
    return ctx.cache[key]


def _editor_C0(ctx: Context) -> tuple[dict[int, torch.Tensor], dict[int, Any], float]:
    """C0 as the editor would compute it (its corpus, n_samples, max_tokens)."""
    ed = ctx.editor
    same = not isinstance(ed.corpus, str) or ed.corpus == ctx.settings.corpus
    return _C0(ctx, ed.n_samples, ed.max_tokens, None if same else ed.corpus)


def _edit_and_score(ctx: Context, recs, stats) -> tuple[dict, Any, float, float]:
    import editkit as ek

    dt_edit, edit = timed(lambda: ctx.editor.apply(ctx.lm, recs, stats=stats, progress=False))
    try:
        dt_eval, frame = timed(lambda: ek.evaluate(ctx.lm, recs, batch_size=ctx.settings.score_batch_size,
                                                   progress=False))
    finally:
        edit.undo()
    return scores_of(ek.summarize(frame)), edit, dt_edit, dt_eval


def bench_precompute(ctx: Context) -> None:
    import editkit as ek

    s, lm, ed = ctx.settings, ctx.lm, ctx.editor
    if not have_metrics():
        ctx.skip("precompute", "precompute", "ek.evaluate / ek.summarize not available yet (editkit.metrics)")
        return
    recs = ctx.records[: s.precompute_facts]

    def edit_scores(stats: dict, label: str) -> tuple[dict, str | None]:
        seed_all(s.seed)
        try:
            return _edit_and_score(ctx, recs, stats)[0], None
        except (ek.SingularSystemError, ek.EditError) as exc:  # a C0 from too few keys can be singular
            log.warning("C0 from %s: the edit failed: %s", label, exc)
            return {m: None for m in METRICS}, f"{type(exc).__name__}: {exc}"

    full, full_info, full_s = _C0(ctx, None)  # the whole corpus
    full_scores, full_error = edit_scores(full, "the full corpus")
    full_tokens = {l: i.n_tokens for l, i in full_info.items()}
    baseline = {"tokens": full_tokens, **full_scores}
    d_in = lm.d_in(ed.edit_layers[0])
    for mult in s.precompute_multiples:
        stats, infos, stats_s = _C0(ctx, None, max_tokens=mult * d_in)
        sc, error = edit_scores(stats, f"{mult}× d_in")
        S, S_full = sc.get("S"), full_scores.get("S")
        ctx.add(f"precompute {mult}x d_in", "precompute",
                {"multiple": mult, "max_tokens": mult * d_in, "facts": len(recs), "layers": ed.edit_layers,
                 "method": ed.method, "model": lm.name},
                {"tokens": {l: i.n_tokens for l, i in infos.items()},
                 "condition_number": {l: i.condition_number for l, i in infos.items()}, "stats_s": stats_s, **sc,
                 **({"error": error} if error else {})},
                baseline, (S / S_full) if S is not None and S_full else None, "S", 1,
                ratio_means="S with C0 from this many keys ÷ S with the full-corpus C0",
                notes="baseline = the same edit with C0 from the full corpus; scores of the edited facts right after "
                      "the edit (ek.summarize)")
    ctx.add("precompute full corpus", "precompute",
            {"multiple": None, "max_tokens": None, "n_samples": None, "facts": len(recs),
             "layers": ed.edit_layers, "method": ed.method, "model": lm.name, "corpus": s.corpus},
            {"tokens": full_tokens, "condition_number": {l: i.condition_number for l, i in full_info.items()},
             "stats_s": full_s, **full_scores, **({"error": full_error} if full_error else {})},
            None, None, "S", 1, notes="the reference point of the curve: C0 from every text of the corpus")
