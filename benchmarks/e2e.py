"""End to end: a 256-fact MEMIT batch edit and its evaluation, per stage."""
from __future__ import annotations

from benchmarks.common import Context, have_metrics, median, scores_of, seed_all, timed
from benchmarks.precompute import _editor_C0


def bench_e2e(ctx: Context) -> None:
    import editkit as ek

    s, lm, ed = ctx.settings, ctx.lm, ctx.editor
    recs = ctx.records[: s.e2e_facts]
    stats, infos, t_stats = _editor_C0(ctx)
    runs = []
    for rep in range(s.e2e_repeats):
        seed_all(s.seed)
        dt_edit, edit = timed(lambda: ed.apply(lm, recs, stats=stats, progress=False))
        try:
            dt_eval, frame = (timed(lambda: ek.evaluate(lm, recs, batch_size=s.score_batch_size, progress=False))
                              if have_metrics() else (None, None))
        finally:
            edit.undo()
        runs.append({"edit_s": dt_edit, "values_s": edit.timings.get("values"), "solve_s": edit.timings.get("solve"),
                     "eval_s": dt_eval, "scores": scores_of(ek.summarize(frame)) if frame is not None else {}})
    pick = lambda k: median([r[k] for r in runs]) if runs[0][k] is not None else None  # noqa: E731
    ours = {"stats_s": t_stats, "values_s": pick("values_s"), "solve_s": pick("solve_s"), "edit_s": pick("edit_s"),
            "eval_s": pick("eval_s"), "stats_tokens": {l: i.n_tokens for l, i in infos.items()},
            **runs[-1]["scores"]}
    ours["total_s"] = sum(v for k, v in ours.items() if k in ("stats_s", "edit_s", "eval_s") and v is not None)
    ctx.add(f"end-to-end MEMIT {len(recs)} facts", "e2e",
            {"facts": len(recs), "layers": ed.edit_layers, "method": ed.method, "v_steps": ed.values.v_steps,
             "stop_nll": ed.values.stop_nll, "n_samples": ed.n_samples, "model": lm.name},
            ours, None, None, "s", s.e2e_repeats,
            notes="stats = ek.second_moment(cache=False) with the editor's corpus settings, once, timed outside apply "
                  "(passed as stats=); values/solve from edit.timings; edit = whole apply; eval = ek.evaluate of "
                  "the edited facts" + ("" if have_metrics() else "; scores skipped: editkit.metrics not available"))
