#!/usr/bin/env python
"""Small, resumable studies on a real packaged LM (``smollm2-135m``, ``gemma-3-270m``) with real
CounterFact records, offline: what the presets in ``editkit/presets/<model>.json`` rest on.

    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage trace --data counterfact.json
    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage c0 --layer 4
    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage sweep --layers 2 4 8 12
    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage batch --layer 8 --n-batch 512
    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage sequential --layer 8 --n-seq 512
    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage pack-values --layer 8
    .venv/bin/python benchmarks/real_model.py --model smollm2-135m --stage batch --device cuda --no-figures

Stages (each writes under ``runs/real-<model>/`` and skips what is already there, so an
interrupted run continues where it stopped):

* ``trace``: causal tracing (``tracing.layer_importance``, MLP sites restored in windows of ``--trace-window``
  layers as ROME's paper does, ``--trace-samples`` noise samples) on
  the first ``--n-trace`` eval-half records the model knows (P(true) ≥ 0.1 on the rewrite prompt); the indirect effect per layer at the subject's last token
  and at the prompt's last token, over all records and over the ones the model knows
  (clean P(true object) ≥ 0.1).
* ``c0``: the minimal-precomputation question for the offline corpora: C0 at ``--layer`` from
  4×, 1×, 10× d_in token keys of ``counterfact-text`` and 1× of ``model-text``, each followed by
  ROME single edits on ``--n-c0`` eval records: ES, PS, NS and the mean relative distance of
  each update from the first (4×, the sweep's) one. (Sampling the model is ~100× slower per token than
  reading CounterFact sentences on a CPU, so the model-text point is a small one.)
* ``sweep``: ``experiments.layer_sweep`` (``--sweep-methods``, default ROME and MEMIT with the model's
  preset, single edits into the unedited model) over ``--layers`` on ``--n-sweep`` eval records,
  ES/PS/NS/S with bootstrap 95% intervals per (method, layer).
* ``sequential``: sequential-batched editing at the study's ratio: ``--n-seq`` facts applied to one
  model as batches of ``--seq-memit`` (MEMIT), ``--seq-emmet`` (EMMET) and ``--seq-alphaedit``
  (AlphaEdit) sizes; every edited fact scored at the checkpoints, held-out perplexity and
  ‖Ŵ − W₀‖ after every batch.

* ``batch``: the batch-editing study at the study's ratio of edits to MLP width
  (``experiments.batch_sweep``; ``--n-batch`` facts, ``--batch-sizes``, MEMIT and EMMET with the
  model's preset, held-out perplexity, then λ over ``--regs`` at the largest batch); its summary is
  also written to ``benchmarks/real/<model>-batch-L<layer>-n<n>.json`` and its figures to ``figures/``.
  δ are kept on disk as they finish; ``pack-values`` packs them into
  ``benchmarks/real/<model>-values-L<layer>.safetensors`` (no prompt text), which the next start
  unpacks, so a run cut off by the end of a session resumes anywhere without re-optimizing.

Every stage keeps its tidy frames in ``runs/real-<model>/frames/<stage>-….csv.gz`` and, when they
are there, reads them instead of computing: a stage run on an accelerator with ``--device cuda
--no-figures`` (where the plotting stack may be missing) is summarized and drawn here by running
the same command with its frames copied in. ``--device`` names where the model runs (default
``cpu``).

Records: ``--data`` (default: ``$EDITKIT_DATA``, a local CounterFact file), shuffled
with seed 0, eval half only (``editkit.corpora.scoring_records``); the C0 corpus reads only
the other half. Results and wall-clock seconds go to ``runs/real-<model>/summary-<stage>.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import editkit as ek
from editkit import corpora, experiments, tracing

log = logging.getLogger("editkit.real")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-easyedit-1000.json"  # the project's machines


def default_data() -> str | None:
    """``--data`` when not given: ``$EDITKIT_DATA`` (a local CounterFact file, as everywhere in
    editkit), else the reference copy of the project's build machines, else none."""
    import os

    return os.environ.get("EDITKIT_DATA") or (str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else None)


def eval_records(data: str, n: int) -> list:
    return corpora.scoring_records(ek.load_counterfact(data, seed=0))[:n]


def editor(layer: int, corpus: str, max_tokens: int, v_steps: int) -> ek.ROME:
    """ROME as the issue's first real-model trial ran it: 2 context prefixes, a relative ridge for dead units."""
    return ek.ROME(layer=layer, corpus=corpus, n_samples=None, max_tokens=max_tokens, n_prefixes=2,
                   c0_ridge=1e-6, values=ek.ValueConfig(v_steps=v_steps))


def known_records(lm, data: str, n: int, pool: int = 150, threshold: float = 0.1) -> list:
    """The first ``n`` eval-half records whose true object the model predicts with per-token
    probability ≥ ``threshold`` on the rewrite prompt (tracing needs facts the model knows:
    on SmolLM2 most CounterFact facts have P(true) ~ 1e-4, where every indirect effect is 0)."""
    import dataclasses

    cands = eval_records(data, pool)
    bare = [dataclasses.replace(r, paraphrase_prompts=[], neighborhood_prompts=[], neighborhood_targets=None)
            for r in cands]
    frame = ek.evaluate(lm, bare, progress=False)
    p_true = frame[frame["kind"] == "rewrite"].set_index("case_id")["p_true"]
    known = [r for r in cands if p_true.get(r.case_id, 0.0) >= threshold]
    log.info("%d of %d eval records known (P(true) >= %.2f)", len(known), len(cands), threshold)
    return known[:n]


def stage_trace(lm, args, out: Path) -> dict:
    recs = known_records(lm, args.data, args.n_trace)
    import pandas as pd

    t = time.time()
    parts = []
    for i, rec in enumerate(recs):  # one file per record: an interrupted trace keeps what it finished
        f = out / f"trace-known-s{args.trace_samples}-w{args.trace_window}-{i:03d}-case{rec.case_id}.csv"
        if not f.exists():
            part = tracing.layer_importance(lm, [rec], "mlp", samples=args.trace_samples, window=args.trace_window,
                                            seed=i, per_record=True)
            part["record"] = i
            part.to_csv(f, index=False)
        parts.append(pd.read_csv(f))
    frame = pd.concat(parts, ignore_index=True)
    frame.to_csv(out / f"trace-per-record-w{args.trace_window}.csv", index=False)
    known = frame[frame["clean"] >= 0.1]
    summary = {"seconds": time.time() - t, "n_records": len(recs), "n_known": int(known["record"].nunique())}
    for name, f in (("all", frame), ("known", known)):
        g = f.groupby(["position", "layer"])["indirect_effect"].mean().unstack(0)
        summary[name] = {pos: [round(float(v), 4) for v in g[pos]] for pos in g.columns}
        summary[f"best_layer_subject_last_{name}"] = int(g["subject_last"].idxmax()) if len(g) else None
    return summary


def _scores(lm, recs, ed) -> tuple[dict, list[torch.Tensor]]:
    frames, deltas = [], []
    for r in recs:
        with ed.applied(lm, [r.request], progress=False) as edit:
            frames.append(ek.evaluate(lm, [r], progress=False))
            deltas.append(edit.deltas[ed.layer].detach().float().cpu().clone())
    import pandas as pd

    s = ek.summarize(pd.concat(frames, ignore_index=True))
    return {k: round(float(s.loc[k, "value"]), 4) for k in ("ES", "PS", "NS", "S") if k in s.index}, deltas


def stage_c0(lm, args, out: Path) -> dict:
    recs = eval_records(args.data, args.n_c0)
    d_in = lm.d_in(args.layer)
    settings = [("counterfact-text", 4), ("counterfact-text", 1), ("counterfact-text", 10), ("model-text", 1)]
    res, ref = {}, None
    for kind, mult in settings:
        key = f"{kind}-{mult}x"
        f = out / f"c0-{key}.json"
        corpus = kind if kind == "model-text" else f"{kind}:{args.data}"
        ed = editor(args.layer, corpus, mult * d_in, args.v_steps)
        t = time.time()
        C0, info = ek.second_moment(lm, args.layer, corpus, None, max_tokens=mult * d_in, return_info=True)
        c0_s = time.time() - t
        t = time.time()
        scores, deltas = _scores(lm, recs, ed)
        row = {"corpus": corpus, "tokens": info.n_tokens, "d_in": d_in, "cond": info.condition_number,
               "c0_seconds": c0_s, "edit_seconds": time.time() - t, **scores}
        if ref is None:
            ref = deltas
        row["rel_dist_to_first"] = round(float(sum((a - b).norm() / b.norm() for a, b in zip(deltas, ref)) / len(ref)), 4)
        if not f.exists():
            f.write_text(json.dumps(row, indent=1))
        res[key] = json.loads(f.read_text())
        log.info("%s: %s", key, res[key])
    return res


def _frame(out: Path, name: str, compute) -> "pd.DataFrame":
    """The stage's tidy frame: read from ``out/frames/<name>.csv.gz`` when a run (here or on an
    accelerator) already finished it, else computed and written there."""
    import pandas as pd

    f = out / "frames" / f"{name}.csv.gz"
    if f.is_file():
        log.info("frame %s read from %s (not recomputed)", name, f)
        return pd.read_csv(f)
    frame = compute()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.tmp")
    frame.to_csv(tmp, index=False, compression="gzip")
    tmp.replace(f)
    return frame


def _timed(out: Path, name: str, compute) -> tuple["pd.DataFrame", dict]:
    """:func:`_frame`, with the seconds and the device of the run that computed it kept beside
    it (``frames/<name>.json``), so a summary drawn elsewhere reports the run's real cost."""
    meta_f = out / "frames" / f"{name}.json"

    def run():
        t = time.time()
        frame = compute()
        meta = {"seconds": round(time.time() - t, 1), "device": _device_name(), "threads": torch.get_num_threads()}
        meta_f.parent.mkdir(parents=True, exist_ok=True)
        meta_f.write_text(json.dumps(meta))
        return frame

    frame = _frame(out, name, run)
    return frame, (json.loads(meta_f.read_text()) if meta_f.is_file() else {})


def _device_name() -> str:
    import platform

    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"{platform.processor() or platform.machine()} CPU"


DEVICE = torch.device("cpu")  # set by main() from --device


def _save_figure(fig, name: str) -> None:
    from editkit import plots

    plots.save(fig, name, ROOT / "figures")


def stage_sweep(lm, args, out: Path) -> dict:
    """Single edits into the unedited model at every ``--layers`` layer, ``--sweep-methods`` with
    the model's preset (C0 from the file's corpus half), ``--n-sweep`` facts, with intervals."""
    recs = eval_records(args.data, args.n_sweep)
    corpus = f"counterfact-text:{args.data}"
    methods, layers = list(args.sweep_methods), list(args.layers)
    name = f"sweep-{'-'.join(methods)}-L{'-'.join(map(str, layers))}-n{len(recs)}"
    frame, meta = _timed(out, name, lambda: experiments.layer_sweep(
        lm, recs, methods, layers=layers, n_edits=len(recs), preset=args.model, editor_kwargs={"corpus": corpus},
        chunk=args.sweep_chunk, root=out, progress=True))
    post = frame[frame["phase"] == "post"]
    summary = {"n_records": len(recs), "layers": layers, "methods": methods, "run": meta,
               "case_ids": [r.case_id for r in recs],
               "unedited": _scores_by(frame[frame["phase"] == "pre"].assign(g=0), ["g"])[0],
               "scores": _scores_by(post, ["method", "layer"])}
    # Every layer against the preset's, the same facts paired: what separates layers when the
    # unpaired intervals (each as wide as the spread between facts) all overlap.
    summary["paired_vs_preset_layer"] = _paired_vs_preset_layer(post, args.model)
    summary["per_case"] = _per_case(post, ["method", "layer"], summary["case_ids"])
    if args.figures:
        from editkit import plots

        kw = dict(methods=methods, layers=layers, protocol="reference", dataset="counterfact", n=len(recs))
        fig = plots.layer_sweep(frame, title=f"Layer sweep, {args.model}, {len(recs)} real CounterFact facts",
                                caption=plots.caption(args.model, **kw))
        _save_figure(fig, plots.figure_name("layer_sweep", args.model, **kw))
    return summary


def stage_sequential(lm, args, out: Path) -> dict:
    """Sequential-batched editing at the study's ratio of edits to MLP width: ``--n-seq`` facts
    applied to one model as batches of each size (MEMIT ``--seq-memit``, EMMET ``--seq-emmet``,
    AlphaEdit ``--seq-alphaedit``), the model's preset at ``--layer``; every fact edited so far
    scored at the checkpoints; perplexity and ‖Ŵ − W₀‖ after every batch."""
    import pandas as pd

    recs = eval_records(args.data, args.n_seq)
    if len(recs) < args.n_seq:
        raise SystemExit(f"--data {args.data} has only {len(recs)} eval-half records; --n-seq {args.n_seq}")
    corpus = f"counterfact-text:{args.data}"
    heldout = experiments.heldout_texts(args.data, n=200, seed=0, exclude=recs)
    n, L = args.n_seq, args.layer
    plan = [(m, sizes) for m, sizes in (("MEMIT", args.seq_memit), ("EMMET", args.seq_emmet),
                                         ("AlphaEdit", args.seq_alphaedit)) if sizes]
    frames, metas = [], {}
    for m, sizes in plan:
        name = f"sequential-{m}-L{L}-n{n}-b{'-'.join(map(str, sizes))}"
        f, metas[m] = _timed(out, name, lambda m=m, sizes=sizes: experiments.sequential_batched(
            lm, recs, [m], L, sizes, total_edits=n, heldout=heldout, preset=args.model,
            editor_kwargs={"corpus": corpus}, root=out, progress=True))
        frames.append(f if not frames else f[f["method"] != "none"])
    frame = pd.concat(frames, ignore_index=True)
    final = frame[(frame["phase"] == "all") & (frame["edits_so_far"] == n)]
    probes = frame[(frame["phase"] == "probe") & (frame["method"] != "none")]
    last = probes.sort_values("edits_so_far").groupby(["method", "batch_size"]).tail(1).set_index(
        ["method", "batch_size"])
    rows = _scores_by(final, ["method", "batch_size"])
    for row in rows:
        e = last.loc[(row["method"], row["batch_size"])]
        row.update(update_norm=round(float(e["update_norm"]), 3), perplexity=round(float(e["perplexity"]), 3),
                   batches=n // int(row["batch_size"]))
    base = frame[(frame["phase"] == "probe") & (frame["method"] == "none")]
    checkpoints = _scores_by(frame[frame["phase"] == "all"], ["method", "batch_size", "edits_so_far"])
    summary = {"n_records": n, "layer": L, "plan": dict(plan), "runs": metas, "case_ids": [r.case_id for r in recs],
               "unedited": {**_scores_by(frame[frame["phase"] == "pre"].assign(g=0), ["g"])[0],
                            "perplexity": float(base["perplexity"].iloc[0])},
               "final": rows, "checkpoints": checkpoints,
               "paired_vs_one_batch": {f"{m} {n // b}x{b} minus 1x{n}": _paired(final[(final.method == m) & (final.batch_size == b)],
                                                                                 final[(final.method == m) & (final.batch_size == n)])
                                       for m, sizes in plan if n in sizes for b in sizes if b != n}}
    if args.figures:
        from editkit import plots

        for m, sizes in plan:
            kw = dict(layers=L, batch_sizes=sizes, protocol="reference", dataset="counterfact", n=n)
            cap = plots.caption(args.model, **{k: kw[k] for k in ("layers", "protocol", "dataset", "n")})
            for kind, fig in (("sequential_all", plots.sequential(frame, m, phase="all", caption=cap)),
                              ("sequential_batch", plots.sequential(frame, m, phase="batch", caption=cap)),
                              ("sequential_drift", plots.sequential_probes(frame, m, caption=cap))):
                _save_figure(fig, plots.figure_name(kind, args.model, methods=m, **kw))
        if len(plan) > 1:
            kw = dict(layers=L, protocol="reference", dataset="counterfact", n=n)
            for bs in sorted(set(plan[0][1]) & set(b for _, sz in plan[1:] for b in sz)):
                ms = [m for m, sz in plan if bs in sz]
                fig = plots.sequential_methods(frame, batch_size=bs, caption=plots.caption(args.model, **kw))
                _save_figure(fig, plots.figure_name("sequential_methods", args.model, methods=ms,
                                                          batch_sizes=bs, **kw))
    return summary


def _paired(a: "pd.DataFrame", b: "pd.DataFrame", n_boot: int = 2000, seed: int = 0) -> dict:
    """a − b in percent points, for ES, PS, NS and S, with a paired bootstrap 95% interval: the
    same facts scored two ways are resampled together (fact by fact), which separates two
    settings that unpaired intervals, each as wide as the spread between facts, cannot."""
    import numpy as np

    def per_fact(f):
        return f.groupby(["case_id", "kind"])["success"].mean().unstack("kind")

    A, B = per_fact(a), per_fact(b)
    ids = sorted(set(A.index) & set(B.index))
    cols = {"ES": "rewrite", "PS": "paraphrase", "NS": "neighborhood"}
    xa = np.stack([A.loc[ids, c].to_numpy(float) for c in cols.values()])
    xb = np.stack([B.loc[ids, c].to_numpy(float) for c in cols.values()])
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(len(ids))[None], rng.integers(0, len(ids), (n_boot, len(ids)))])

    def scores(x):
        m = x[:, idx].mean(axis=2)  # (3, 1 + n_boot)
        return np.vstack([m, 3 / (1 / np.maximum(m, 1e-12)).sum(axis=0)])

    d = 100 * (scores(xa) - scores(xb))
    out = {}
    for k, row in zip([*cols, "S"], d):
        lo, hi = np.percentile(row[1:], [2.5, 97.5])
        out[k] = [round(float(row[0]), 2), round(float(lo), 2), round(float(hi), 2)]
    out["n"] = len(ids)
    return out


def _paired_vs_preset_layer(post: "pd.DataFrame", model: str) -> dict:
    """Per method of a layer sweep: every other layer minus the layer the model's preset edits
    (its last, for multi-layer methods), paired over the same facts (:func:`_paired`)."""
    out = {}
    for m, rows in post.groupby("method", sort=True):
        at = int(ek.make_editor(m, None, model).layers[-1])
        layers = sorted(int(l) for l in rows["layer"].unique())
        if at in layers:
            out[m] = {"preset_layer": at, "minus_preset": {
                l: _paired(rows[rows.layer == l], rows[rows.layer == at]) for l in layers if l != at}}
    return out


def _per_case(post: "pd.DataFrame", by: list[str], case_ids: list) -> list[dict]:
    """Each fact's success per metric kind (ES/PS/NS, mean over its prompts), per group, in the
    order of ``case_ids``: what a later reader needs to pair groups over the same facts again."""
    import numpy as np
    import pandas as pd

    rows = []
    for key, g in post.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        m = g.groupby(["case_id", "kind"])["success"].mean().unstack("kind").reindex(case_ids)
        rows.append({**{b: (int(k) if isinstance(k, (int, np.integer)) else k) for b, k in zip(by, key)},
                     **{kind: [None if pd.isna(x) else round(float(x), 4) for x in m[kind]] for kind in m.columns}})
    return rows


def _scores_by(frame, by: list[str]) -> list[dict]:
    """ES/PS/NS/S with bootstrap 95% intervals (over records), per group, in percent."""
    s = ek.summarize(frame, by=by)
    s = s[s["metric"].isin(["ES", "PS", "NS", "S", "EM", "NM"])]
    rows = []
    for key, g in s.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in zip(by, key)}
        for _, m in g.iterrows():
            row[m["metric"]] = [round(100 * float(m[c]), 2) for c in ("value", "ci_low", "ci_high")]
        row["n"] = int(g["n"].max())
        rows.append(row)
    return rows


def values_pack(model: str, layer: int) -> Path:
    return ROOT / "benchmarks" / "real" / f"{model}-values-L{layer}.safetensors"


def unpack_values(pack: Path, folder: Path) -> int:
    """Seed the on-disk values memo from a committed pack (the δ of a study run in an earlier
    session, on another machine): one file per request, as ``values.memoized_values`` reads them
    (each checked against its key's sha256 when used, so a stale pack is only ever ignored)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not pack.is_file():
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with safe_open(str(pack), "pt") as f:
        meta = f.metadata() or {}
        for name, sha in meta.items():
            dest = folder / f"{name}.safetensors"
            if not dest.exists():
                save_file({fld: f.get_tensor(f"{name}/{fld}") for fld in ("delta", "h", "nll_init", "nll_final", "steps")},
                          str(dest), metadata={"key_sha256": sha})
                n += 1
    return n


def pack_values(folder: Path, pack: Path) -> int:
    """Every finished δ of ``folder`` in one file (no prompt text: requests are named by their
    key's sha256), committed so that the next session never optimizes them again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            sha = (f.metadata() or {}).get("key_sha256")
            if not sha:
                continue
            meta[path.stem] = sha
            for k in f.keys():
                tensors[f"{path.stem}/{k}"] = f.get_tensor(k)
    if meta:
        save_file(tensors, str(pack), metadata=meta)
    return len(meta)


def stage_batch(lm, args, out: Path) -> dict:
    """The batch study at the study's ratio of edits to MLP width: ``--n-batch`` eval-half facts
    as n/b independent batches of b (``--batch-sizes``), MEMIT and EMMET with the model's preset at
    ``--layer``, held-out perplexity (true sentences of the file's eval half, none of an edited
    record), then λ swept at the largest batch (``--regs``). δ are optimized once per fact and
    kept on disk (``EDITKIT_VALUES_DIR``, default ``runs/real-<model>/values``), so a cut-off run
    resumes without optimizing a fact twice; each batch is a run-store unit."""
    import os

    import pandas as pd

    os.environ.setdefault("EDITKIT_VALUES_DIR", str(out / "values"))
    folder = Path(os.environ["EDITKIT_VALUES_DIR"])
    log.info("values memo %s: %d requests from the committed pack", folder,
             unpack_values(values_pack(args.model, args.layer), folder))
    recs = eval_records(args.data, args.n_batch)
    if len(recs) < args.n_batch:
        raise SystemExit(f"--data {args.data} has only {len(recs)} eval-half records; --n-batch {args.n_batch}")
    corpus = f"counterfact-text:{args.data}"
    heldout = experiments.heldout_texts(args.data, n=200, seed=0, exclude=recs)
    kw = dict(preset=args.model, editor_kwargs={"corpus": corpus}, heldout=heldout, root=out, progress=True)
    sizes = sorted(args.batch_sizes, reverse=True)  # the largest first: all δ in padded chunks, then reused
    n, L = args.n_batch, args.layer
    tag = f"L{L}-n{n}"
    frame, meta_batch = _timed(out, f"batch-{tag}-b{'-'.join(map(str, sorted(sizes)))}", lambda: experiments.batch_sweep(
        lm, recs, ["MEMIT", "EMMET"], L, sizes, n_facts=n, heldout_batches=4, **kw))
    big = max(sizes)
    lam, meta_lam = _timed(out, f"lambda-{tag}-b{big}-reg{'-'.join(f'{r:g}' for r in args.regs)}",
                           lambda: experiments.batch_sweep(lm, recs, ["MEMIT", "EMMET"], L, [big], n_facts=n,
                                                           regs={"MEMIT": args.regs, "EMMET": args.regs},
                                                           heldout_batches=1, **kw))
    if args.figures:
        from editkit import plots

        fkw = dict(methods=["MEMIT", "EMMET"], layers=L, protocol="reference", dataset="counterfact", n=n)
        cap = plots.caption(args.model, **{k: fkw[k] for k in ("layers", "protocol", "dataset", "n")})
        fig = plots.batch_sweep(frame, title=f"Batch editing, {args.model}, {n} real CounterFact facts "
                                             f"({n / lm.d_in(L):.2f} of the MLP width)", caption=cap)
        _save_figure(fig, plots.figure_name("batch_editing", args.model, batch_sizes=sorted(sizes), **fkw))
        fig = plots.reg_sweep(lam, title=f"Effect of λ at a batch of {big}, {args.model}", caption=cap)
        _save_figure(fig, plots.figure_name("batch_editing_lambda", args.model, batch_sizes=big, **fkw))

    def table(f: pd.DataFrame) -> list[dict]:
        post = f[f.phase == "post"]
        scores = _scores_by(post, ["method", "reg", "batch_size"])
        extra = post.groupby(["method", "reg", "batch_size"]).agg(
            delta_norm=("delta_norm", "mean"), perplexity=("perplexity", "mean"), edit_seconds=("edit_seconds", "sum"),
            batches=("batch", "nunique"))
        for row in scores:
            e = extra.loc[(row["method"], row["reg"], row["batch_size"])]
            row.update({k: round(float(e[k]), 3) for k in ("delta_norm", "perplexity", "edit_seconds")},
                       batches=int(e["batches"]))
        return scores

    pre = frame[frame.phase == "pre"]
    post = frame[frame.phase == "post"]
    per_case = (frame[frame.phase == "post"].groupby(["method", "reg", "batch_size", "case_id", "kind"])["success"]
                .mean().unstack("kind").round(4).reset_index()) if "success" in frame.columns else None
    summary = {"n_records": n, "layer": L, "batch_sizes": sorted(sizes), "regs": args.regs,
               "case_ids": [r.case_id for r in recs], "run_batch": meta_batch, "run_lambda": meta_lam,
               "unedited": {**_scores_by(pre.assign(g=0), ["g"])[0], "perplexity": float(pre["perplexity"].iloc[0])},
               "batch": table(frame), "lambda": table(lam),
               "paired_b16_minus_b512": {m: _paired(post[(post.method == m) & (post.batch_size == 16)],
                                                    post[(post.method == m) & (post.batch_size == big)])
                                         for m in ("MEMIT", "EMMET") if 16 in sizes},
               "paired_EMMET_minus_MEMIT": {int(b): _paired(post[(post.method == "EMMET") & (post.batch_size == b)],
                                                            post[(post.method == "MEMIT") & (post.batch_size == b)])
                                            for b in sizes}}
    if per_case is not None:
        (out / f"per-case-batch-{tag}.csv").write_text(per_case.to_csv(index=False))
    return summary


def shareable_args(args: argparse.Namespace) -> dict:
    """The run's arguments as a committed summary records them: the data file by its name only
    (its directory is this machine's business, and a summary travels to colleagues)."""
    out = dict(vars(args))
    if out.get("data"):
        out["data"] = Path(out["data"]).name
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stage", choices=["trace", "c0", "sweep", "batch", "sequential", "pack-values"], required=True)
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, mps")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the stage's figures into figures/ (--no-figures where matplotlib/seaborn are missing)")
    p.add_argument("--data", default=default_data(),
                   help="a local CounterFact JSON (official, multi-counterfact or EasyEdit layout); default $EDITKIT_DATA")
    p.add_argument("--layer", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 12])
    p.add_argument("--n-trace", type=int, default=8)
    p.add_argument("--trace-samples", type=int, default=3)
    p.add_argument("--trace-window", type=int, default=10,
                   help="MLP layers restored together around each layer (ROME's tracing: 10; 1 restores a single "
                        "layer, which in a 30-layer model moves P(true) by < 0.01 anywhere but layer 0)")
    p.add_argument("--n-c0", type=int, default=5)
    p.add_argument("--n-sweep", type=int, default=20)
    p.add_argument("--sweep-methods", nargs="+", default=["ROME", "MEMIT"])
    p.add_argument("--sweep-chunk", type=int, default=16, help="facts per run-store unit of the sweep")
    p.add_argument("--v-steps", type=int, default=20)
    p.add_argument("--n-batch", type=int, default=512, help="facts of the batch stage (512 = 1/3 of SmolLM2's MLP width)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    p.add_argument("--regs", type=float, nargs="+", default=[1.0, 10.0, 1e2, 1e3, 1e4, 1e5])
    p.add_argument("--n-seq", type=int, default=512, help="facts of the sequential stage")
    p.add_argument("--seq-memit", type=int, nargs="*", default=[16, 64, 256, 512])
    p.add_argument("--seq-emmet", type=int, nargs="*", default=[64, 512])
    p.add_argument("--seq-alphaedit", type=int, nargs="*", default=[64])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.stage != "pack-values" and not args.data:
        p.error("no CounterFact file: pass --data FILE or set EDITKIT_DATA=FILE (the official counterfact.json "
                "or an EasyEdit-layout file of yours)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = ROOT / "runs" / f"real-{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "pack-values":  # no model needed: the finished δ of the batch stage, for the next session
        import os

        folder = Path(os.environ.get("EDITKIT_VALUES_DIR") or out / "values")
        n = pack_values(folder, values_pack(args.model, args.layer))
        log.info("packed %d requests' values into %s", n, values_pack(args.model, args.layer))
        return
    t = time.time()
    global DEVICE
    DEVICE = torch.device(args.device)
    lm = ek.load_model(args.model, device=args.device)
    load_s = time.time() - t
    stages = {"trace": stage_trace, "c0": stage_c0, "sweep": stage_sweep, "batch": stage_batch,
              "sequential": stage_sequential}
    summary = stages[args.stage](lm, args, out)
    summary = {"model": args.model, "stage": args.stage, "load_seconds": load_s, "threads": args.threads,
               "args": shareable_args(args), "result": summary}
    (out / f"summary-{args.stage}.json").write_text(json.dumps(summary, indent=1))
    committed = {"batch": f"batch-L{args.layer}-n{args.n_batch}", "sequential": f"sequential-L{args.layer}-n{args.n_seq}",
                 "sweep": f"sweep-n{args.n_sweep}"}
    if args.stage in committed:  # the committed copy (scores, intervals, norms, timings; no record text)
        dest = ROOT / "benchmarks" / "real" / f"{args.model}-{committed[args.stage]}.json"
        dest.write_text(json.dumps(summary, indent=1))
    log.info("%s", json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
