"""Benchmark 2, scoring: ``ek.evaluate`` batched against one prompt at a time."""
from __future__ import annotations

from benchmarks.common import Context, have_metrics, log, median, nll_columns, timed


# --------------------------------------------------------------------------- 2. scoring

def bench_scoring(ctx: Context) -> None:
    import editkit as ek

    s, lm = ctx.settings, ctx.lm
    if not have_metrics():
        ctx.skip("scoring", "scoring", "ek.evaluate / ek.summarize not available yet (editkit.metrics)")
        return
    recs = ctx.records[: s.n_score]
    sub = recs[: s.score_loop_n]
    ek.evaluate(lm, recs[:2], batch_size=s.score_batch_size, progress=False)  # warm-up
    t_b, t_1 = [], []
    frame_b = frame_1 = None
    for rep in range(s.repeats):
        def run_b():
            return ek.evaluate(lm, recs, batch_size=s.score_batch_size, progress=False)

        def run_1():
            return ek.evaluate(lm, sub, batch_size=1, progress=False)

        order = [("b", run_b), ("1", run_1)] if rep % 2 == 0 else [("1", run_1), ("b", run_b)]
        for side, fn in order:
            dt, out = timed(fn)
            if side == "b":
                t_b.append(dt)
                frame_b = out
            else:
                t_1.append(dt)
                frame_1 = out
    # Identity: the same records scored batched and one prompt at a time.
    frame_bs = ek.evaluate(lm, sub, batch_size=s.score_batch_size, progress=False)
    cols = nll_columns(frame_1)
    diff: float | None = None
    flips: int | None = None
    if len(frame_bs) == len(frame_1):
        a = frame_bs[cols].reset_index(drop=True).to_numpy(dtype=float)
        b = frame_1[cols].reset_index(drop=True).to_numpy(dtype=float)
        diff = float(abs(a - b).max()) if a.size else 0.0
        if "success" in frame_1.columns:
            flips = int((frame_bs["success"].reset_index(drop=True) != frame_1["success"].reset_index(drop=True)).sum())
    else:
        log.error("batched and one-at-a-time frames differ in length (%d vs %d)", len(frame_bs), len(frame_1))
    rate_b, rate_1 = len(recs) / median(t_b), len(sub) / median(t_1)
    ratio = rate_b / rate_1
    note = "" if len(sub) == len(recs) else f"one-at-a-time side timed on the first {len(sub)} of {len(recs)} records " \
                                            "(records/s compared); scores compared on those records"
    ctx.add("scoring", "scoring",
            {"records": len(recs), "loop_records": len(sub), "batch_size": s.score_batch_size,
             "rows": len(frame_b), "nll_columns": cols, "model": lm.name},
            {"records_per_s": rate_b, "s_total": median(t_b), "times": t_b, "max_abs_nll_diff": diff,
             "success_flips": flips},
            {"records_per_s": rate_1, "s_total": median(t_1), "times": t_1},
            ratio, "records/s", s.repeats, ratio_means="batched records/s ÷ one-prompt-at-a-time records/s",
            target="≥10×, identical scores", met=ratio >= 10 and diff is not None and diff <= 1e-4 and not flips,
            notes="; ".join(x for x in [note, f"max |Δ NLL| = {diff} over {cols}; success flags that differ: "
                                              f"{flips}"] if x))
