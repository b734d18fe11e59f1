#!/usr/bin/env python
"""editkit benchmarks: editing, scoring and covariance throughput, measured side by side.

    python benchmarks/run.py            # full run on the embedded world model (make bench)
    python benchmarks/run.py --quick    # tiny model, seconds (make bench QUICK=1)

Every measurement runs editkit and a naive baseline *in the same process*, one after
the other (alternating which side goes first), and reports the median of
``--repeats`` runs of each side:

1. values      batched ``optimize_values`` over E requests vs. the same objective
               optimized request by request as the reference implementations do it
               (whole model + LM head on every position each step; the ratio) and vs.
               editkit's optimizer called one request at a time (batching alone);
               same steps (``stop_nll=0`` so every side runs every step): seconds per
               edit, and max |Δδ| between the sides.
2. scoring     ``ek.evaluate`` batched vs. ``batch_size=1`` (one prompt at a time):
               records per second, and the max difference of the NLL columns.
3. covariance  ``ek.second_moment`` (streaming, d_in × d_in float64 accumulator) vs.
               keeping every key and computing K Kᵀ at the end: tokens per second and
               peak memory, each in a fresh subprocess, for several corpus sizes.
   precompute  C0 from 1×, 2×, 4×, 10× d_in token keys and from the full corpus →
               MEMIT batch edit → ES/PS/NS/S (the minimal-precomputation curve).
4. end-to-end  a 256-fact MEMIT batch edit plus its evaluation, per stage.

Outputs: ``results.json`` (a list of entries: name, section, params, ours, baseline,
ratio, unit, repeats, machine, ...), a markdown table (``RESULTS.md``) and, for a
full run, the Performance page (``docs/performance.md``) between ``<!-- bench:start -->`` and
``<!-- bench:end -->``. Quick mode writes under ``benchmarks/.cache/`` and leaves
that page alone unless asked.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("editkit.bench")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # measure the checkout this script lives in, not another installed editkit
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:  # paper.py beside this script
    sys.path.insert(0, str(HERE))
from paper import _reset_peak  # noqa: E402  (one copy of the peak-RSS reset, shared with the paper section)
#: The page whose marked sections a full run rewrites (the README is a front page that links to it).
PERFORMANCE_PAGE = ROOT / "docs" / "performance.md"
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
SECTIONS = ("values", "scoring", "covariance", "precompute", "e2e", "paper")
#: Sections that bring their own model (the world / tiny model is not loaded for them alone).
OWN_MODEL = ("paper",)
METRICS = ("ES", "PS", "NS", "S")


# --------------------------------------------------------------------------- settings

@dataclass
class Settings:
    """Everything that sizes a run. ``full()`` and ``quick()`` are the two presets."""

    mode: str
    model: str  # "world-gpt2", "world-llama", any load_model name, or "tiny-<arch>" (editkit.testing.tiny_lm)
    corpus: str  # "world" or "tiny" (editkit.testing.TINY_TEXT)
    repeats: int
    v_steps: int
    value_sizes: list[int]
    value_loop_cap: int  # the per-request loop runs on at most this many requests (per-edit time reported)
    n_score: int
    score_loop_n: int  # one-prompt-at-a-time side runs on the first this-many records
    score_batch_size: int
    cov_samples: list[int]  # corpus texts per covariance measurement
    precompute_multiples: list[int]
    precompute_facts: int
    e2e_facts: int
    e2e_repeats: int = 1
    paper_steps: list[str] | None = None  # benchmarks/paper.py plan steps to run (default all)
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def full(cls, **kw: Any) -> "Settings":
        return cls(**{**dict(mode="full", model="world-gpt2", corpus="world", repeats=3, v_steps=10,
                             value_sizes=[1, 16, 64, 256], value_loop_cap=64, n_score=1000, score_loop_n=250,
                             score_batch_size=64, cov_samples=[250, 1000, 4000], precompute_multiples=[1, 2, 4, 10],
                             precompute_facts=64, e2e_facts=256), **kw})

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        return cls(**{**dict(mode="quick", model="tiny-gpt2", corpus="tiny", repeats=1, v_steps=3,
                             value_sizes=[1, 4, 8], value_loop_cap=4, n_score=8, score_loop_n=4, score_batch_size=16,
                             cov_samples=[40, 160], precompute_multiples=[1, 2, 4, 10], precompute_facts=4,
                             e2e_facts=8), **kw})


# --------------------------------------------------------------------------- machine, timing

def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": device,
    }
    try:
        import transformers

        import editkit

        info["transformers"] = transformers.__version__
        info["editkit"] = editkit.__version__
    except Exception:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except Exception:
        info["git"] = None
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, with CUDA synchronized on both ends."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- model, corpus, records

def load_lm(spec: str, device: str):
    """``tiny-<arch>`` → a tiny random model from editkit.testing; anything else → ek.load_model."""
    import editkit as ek

    if spec.startswith("tiny-"):
        from editkit.testing import tiny_lm

        lm = tiny_lm(spec[len("tiny-"):], n_layer=3, d=32)
        lm.model.to(device)
        return lm
    return ek.load_model(spec, device=device)


def load_corpus(spec: str) -> list[str]:
    """The C0 corpus as a list of texts (loaded once, so memory baselines include it)."""
    if spec == "tiny":
        from editkit.testing import TINY_TEXT

        return list(TINY_TEXT)
    if spec == "world":
        from editkit.world import world_corpus

        return world_corpus("train")
    from editkit.stats import iter_corpus

    return list(iter_corpus(spec, None))


def _tiny_records(n: int) -> list[dict]:
    """CounterFact-schema records over the tiny models' vocabulary (subjects repeat past 10)."""
    from editkit.testing import _NAMES, _OBJS

    prompts = ["The mother tongue of {} is", "{} is a citizen of", "{} plays the", "{} was born in"]
    out = []
    for i in range(n):
        s, other = _NAMES[i % len(_NAMES)], _NAMES[(i + 3) % len(_NAMES)]
        p = prompts[(i // len(_NAMES)) % len(prompts)]
        true, new = _OBJS[i % 4], _OBJS[(i + 1) % 4]
        out.append({"case_id": i, "requested_rewrite": {"prompt": p, "relation_id": f"P{i % 4}", "subject": s,
                                                        "target_new": {"str": new}, "target_true": {"str": true}},
                    "paraphrase_prompts": [f"Here is a fact. {p.format(s)}", f"{s} is known; {p.format(s)}"],
                    "neighborhood_prompts": [p.format(other), p.format(_NAMES[(i + 5) % len(_NAMES)])],
                    "attribute_prompts": [], "generation_prompts": [f"{s} was born in"]})
    return out


@dataclass
class _Rec:
    """A stand-in record (only ``.request``) for when ek.load_counterfact is not available."""

    request: Any


def load_records(settings: Settings, n: int) -> list[Any]:
    """``n`` records with ``.request``: the world's CounterFact (seeded, distinct subjects first),
    or synthetic ones for the tiny models."""
    import editkit as ek

    if settings.corpus == "tiny":
        dicts = _tiny_records(n)
        if hasattr(ek, "load_counterfact"):
            return list(ek.load_counterfact(dicts))
        return [_Rec(ek.EditRequest(d["requested_rewrite"]["prompt"], d["requested_rewrite"]["subject"],
                                    d["requested_rewrite"]["target_new"]["str"],
                                    d["requested_rewrite"]["target_true"]["str"], case_id=d["case_id"]))
                for d in dicts]
    if not hasattr(ek, "load_counterfact"):
        raise RuntimeError("ek.load_counterfact is not available yet; run with --quick")
    return list(ek.load_counterfact(settings.corpus, n=n, seed=settings.seed))


def make_editor(lm, settings: Settings):
    """MEMIT from the model's preset when there is one, else a small documented fallback."""
    import editkit as ek
    from editkit.editors import preset_for

    if settings.corpus == "tiny":
        from editkit.testing import TINY_TEXT

        return ek.MEMIT(layers=[1], corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4,
                        mom2_update_weight=100.0, seed=settings.seed,
                        values=ek.ValueConfig(v_steps=max(settings.v_steps, 6)))
    name = preset_for(lm.name)
    if name is not None:
        return ek.MEMIT.preset(name, seed=settings.seed)
    log.warning("no preset for %s; using MEMIT(layers=[1], corpus=%r)", lm.name, settings.corpus)
    return ek.MEMIT(layers=[1], corpus=settings.corpus, n_samples=None, seed=settings.seed)


def have_metrics() -> bool:
    import editkit as ek

    return hasattr(ek, "evaluate") and hasattr(ek, "summarize")


def scores_of(summary: Any) -> dict[str, float | None]:
    """ES/PS/NS/S values from ``ek.summarize``'s frame (metric as index or as a column)."""
    import pandas as pd

    df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame(summary)
    if "metric" in df.columns:
        df = df.set_index("metric")
    out: dict[str, float | None] = {}
    for m in METRICS:
        try:
            v = df.loc[m, "value"]
            v = v.iloc[0] if hasattr(v, "iloc") else v
            out[m] = float(v)
        except (KeyError, TypeError, ValueError):
            out[m] = None
    return out


def nll_columns(frame: Any) -> list[str]:
    cols = [c for c in frame.columns if "nll" in str(c).lower()]
    return cols or [c for c in frame.columns if str(frame[c].dtype).startswith("float")]


# --------------------------------------------------------------------------- entries

@dataclass
class Context:
    settings: Settings
    lm: Any
    editor: Any
    records: list[Any]
    corpus: list[str]
    entries: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def add(self, name: str, section: str, params: dict, ours: dict, baseline: dict | None, ratio: float | None,
            unit: str, repeats: int, *, ratio_means: str = "", target: str | None = None, met: bool | None = None,
            notes: str = "") -> dict:
        e = {"name": name, "section": section, "params": params, "ours": ours, "baseline": baseline,
             "ratio": None if ratio is None or not math.isfinite(ratio) else round(ratio, 4), "ratio_means": ratio_means,
             "unit": unit, "repeats": repeats, "target": target, "met": met, "notes": notes}
        self.entries.append(e)
        log.info("%s: ours=%s baseline=%s ratio=%s", name, ours, baseline, e["ratio"])
        return e

    def skip(self, name: str, section: str, reason: str, params: dict | None = None) -> None:
        log.warning("%s skipped: %s", name, reason)
        self.entries.append({"name": name, "section": section, "params": params or {}, "ours": None,
                             "baseline": None, "ratio": None, "ratio_means": "", "unit": None, "repeats": 0,
                             "target": None, "met": None, "notes": "", "skipped": reason})


# --------------------------------------------------------------------------- 1. values

def _padded_tokens(lm, reqs, prefixes, essence: str) -> tuple[int, int] | None:
    """(real, padded) tokens of one forward of optimize_values over ``reqs`` (its batch layout)."""
    try:
        from editkit.values import _build

        batch = _build(lm, reqs, prefixes, essence)[0]
        return int(batch.attention_mask.sum()), int(batch.attention_mask.numel())
    except Exception:  # a private helper; the figure is informative only
        return None


def reference_protocol_values(lm, request, layer: int, prefixes: Sequence[str], cfg) -> torch.Tensor:
    """Baseline: the value optimization as the reference implementations run it, re-derived
    here from the objective: one request at a time, and every step a forward of the whole
    model with its LM head on every position of every prompt and a log-softmax over all of
    it (no cached prefix, no gathering of the few positions the loss reads). Same prompts,
    loss, Adam steps and clamp as ``optimize_values``; no early stop (the benchmark sets
    ``stop_nll=0``). Returns δ, shape (d,)."""
    from editkit.hooks import add_at_positions, capture_output, no_param_grads
    from editkit.values import _build

    batch, _, targets = _build(lm, [request], prefixes, cfg.essence_template)
    t_row, t_pos, t_ids, ess_rows, ess_pos = (t.to(lm.device) for t in targets)
    ids, am = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
    cols = torch.tensor([s[0][-1] for s in batch.spans], device=lm.device)
    rows = torch.arange(len(cols), device=lm.device)
    n_tok = torch.zeros(len(prefixes), device=lm.device).index_add(0, t_row, torch.ones(len(t_row), device=lm.device))

    def log_probs():
        return lm.model(input_ids=ids, attention_mask=am).logits.float().log_softmax(-1)

    with torch.no_grad(), capture_output(lm.block(layer)) as seen:
        lp0 = log_probs()
    h = seen[0][0, cols[0]].float()
    logp0 = lp0[ess_rows, ess_pos]
    delta = torch.zeros(lm.d_out(layer), device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    with no_param_grads(lm.model), add_at_positions(lm.edit_module(layer), rows, cols,
                                                    lambda: delta.expand(len(rows), -1)):
        for _ in range(cfg.v_steps):
            lp = log_probs()
            nll = (torch.zeros_like(n_tok).index_add(0, t_row, -lp[t_row, t_pos, t_ids]) / n_tok).mean()
            kl = (logp0.exp() * (logp0 - lp[ess_rows, ess_pos])).sum()
            loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * delta.norm() ** 2 / h.norm() ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = cfg.clamp_norm_factor * h.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return delta.detach()


def bench_values(ctx: Context) -> None:
    """Batched values vs (a) the reference protocol request by request — the baseline the
    ratio is over — and (b) editkit's own optimizer called one request at a time (so the
    table also shows what batching alone buys, apart from the cached prefix and the gathered
    LM head that (a) lacks)."""
    from editkit import context_prefixes, optimize_values

    s, lm, ed = ctx.settings, ctx.lm, ctx.editor
    layer = ed.edit_layers[-1]
    prefixes = context_prefixes(lm, ed.n_prefixes, ed.prefix_len, ed.seed)
    cfg = dataclasses.replace(ed.values, v_steps=s.v_steps, stop_nll=0.0)
    reqs = [r.request for r in ctx.records[: max(s.value_sizes)]]
    optimize_values(lm, reqs[:2], layer, prefixes, dataclasses.replace(cfg, v_steps=1))  # warm-up
    reference_protocol_values(lm, reqs[0], layer, prefixes, dataclasses.replace(cfg, v_steps=1))
    for E in s.value_sizes:
        if E > len(reqs):
            ctx.skip(f"values E={E}", "values", f"only {len(reqs)} records")
            continue
        n_loop = min(E, s.value_loop_cap)
        times: dict[str, list[float]] = {"b": [], "l": [], "r": []}
        out: dict[str, Any] = {}
        sides = {"b": lambda: optimize_values(lm, reqs[:E], layer, prefixes, cfg),
                 "l": lambda: [optimize_values(lm, [r], layer, prefixes, cfg) for r in reqs[:n_loop]],
                 "r": lambda: [reference_protocol_values(lm, r, layer, prefixes, cfg) for r in reqs[:n_loop]]}
        for rep in range(s.repeats):
            order = ["b", "l", "r"] if rep % 2 == 0 else ["r", "l", "b"]
            for side in order:
                seed_all(s.seed)
                dt, out[side] = timed(sides[side])
                times[side].append(dt)
        d_b = out["b"].delta[:n_loop].cpu()
        d_l = torch.cat([v.delta for v in out["l"]]).cpu()
        d_r = torch.stack(out["r"]).cpu()
        diff, diff_l = (d_b - d_r).abs().max().item(), (d_b - d_l).abs().max().item()
        scale = d_b.abs().max().item()
        per_b, per_l, per_r = median(times["b"]) / E, median(times["l"]) / n_loop, median(times["r"]) / n_loop
        tok_b = _padded_tokens(lm, reqs[:E], prefixes, cfg.essence_template)
        ratio = per_r / per_b
        note = "" if n_loop == E else f"the loops ran on the first {n_loop} of the {E} requests; per-edit time and δ " \
                                      f"differences are over those {n_loop}"
        ctx.add(f"values E={E}", "values",
                {"E": E, "loop_requests": n_loop, "v_steps": s.v_steps, "stop_nll": 0.0, "layer": layer,
                 "prompts_per_request": len(prefixes), "model": lm.name},
                {"s_per_edit": per_b, "s_total": median(times["b"]), "times": times["b"],
                 "nll_final_mean": float(out["b"].nll_final[:n_loop].mean())},
                {"s_per_edit": per_r, "s_total": median(times["r"]), "times": times["r"],
                 "protocol": "reference: one request at a time, full forward + LM head on every position",
                 "editkit_loop": {"s_per_edit": per_l, "s_total": median(times["l"]), "times": times["l"],
                                  "speedup_of_batched": per_l / per_b, "max_abs_delta_diff": diff_l,
                                  "nll_final_mean": float(torch.stack([v.nll_final for v in out["l"]]).mean())}},
                ratio, "s/edit", s.repeats, ratio_means="reference-protocol loop s/edit ÷ batched s/edit (speed-up)",
                # No speed target on a CPU: the batched side is bound by arithmetic and a lone request only
                # pays the call overhead, so the ratio is reported per width (here and in the paper section);
                # the GPU ratio, where one request leaves the device idle, is not measured.
                target="max‖Δδ‖ ≤ 1e-4", met=diff_l <= 1e-4,
                notes="; ".join(x for x in [note, f"max|δ_batched − δ_one at a time| = {diff_l:.2e} (same code, so this "
                                                  f"checks batching); max|δ_batched − δ_reference| = {diff:.2e}, float "
                                                  f"rounding of the full LM head grown by Adam's normalized steps "
                                                  f"(max|δ| = {scale:.3g})"] if x))
        ctx.entries[-1]["ours"].update(max_abs_delta_diff=diff_l, max_abs_delta_diff_reference=diff,
                                       max_abs_delta=scale,
                                       tokens_per_step=tok_b and {"real": tok_b[0], "padded": tok_b[1]})


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


# --------------------------------------------------------------------------- 3. covariance

def _seq_len(lm) -> int:
    return min(getattr(lm.tokenizer, "model_max_length", 1024) or 1024, 1024)


@torch.no_grad()
def keep_all_keys_second_moment(lm, layer: int, texts: Sequence[str], batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """The naive baseline: keep every token key (N × d_in, float64), then ``Kᵀ K / N``.

    Same texts, batches, truncation and float64 precision as ``ek.second_moment``;
    memory grows with the number of tokens."""
    from editkit.hooks import capture_input

    module, seq_len = lm.edit_module(layer), _seq_len(lm)
    texts = [t for t in texts if t and t.strip()]
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=seq_len)
        with capture_input(module) as seen:
            lm.model(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device))
        mask = enc["attention_mask"].bool().to(seen[0].device)
        chunks.append(seen[0][mask].to(torch.float64))
    K = torch.cat(chunks)
    del chunks
    return (K.T @ K / len(K)).cpu(), len(K)


def _rss_kb(field_name: str) -> int:
    m = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def cov_worker(args: dict) -> dict:
    """One covariance measurement in a fresh process: tokens/s and peak memory over the
    process's memory just before the call (model and corpus already loaded, warmed up)."""
    from editkit import second_moment

    torch.set_num_threads(args.get("threads") or torch.get_num_threads())
    lm = load_lm(args["model"], args["device"])
    texts = [t for t in load_corpus(args["corpus"]) if t and t.strip()][: args["n_samples"]]
    layer, side = args["layer"], args["side"]

    def run(tx):
        if side == "ours":
            C, info = second_moment(lm, layer, tx, None, cache=False, progress=False, return_info=True)
            return C, info.n_tokens
        return keep_all_keys_second_moment(lm, layer, tx)

    run(texts[:16])  # warm-up (allocator, kernels)
    times, peaks, cuda_peaks, n_tok = [], [], [], 0
    for _ in range(args["repeats"]):
        gc.collect()
        cuda = args["device"].startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        rss0 = _rss_kb("VmRSS")
        exact = _reset_peak()
        dt, (C, n_tok) = timed(lambda: run(texts))
        peak = _rss_kb("VmHWM") if exact else max(_rss_kb("VmHWM"), _rss_kb("VmRSS"))
        times.append(dt)
        peaks.append((peak - rss0) / 1024)
        if cuda:
            cuda_peaks.append((torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20)
        del C
    out = {"side": side, "n_samples": len(texts), "tokens": n_tok, "s": median(times), "times": times,
           "tokens_per_s": n_tok / median(times), "peak_rss_delta_mb": max(peaks),
           "rss_peak_exact": exact, "d_in": lm.d_in(layer)}
    if cuda_peaks:
        out["peak_cuda_alloc_mb"] = max(cuda_peaks)
    return out


def _spawn_worker(args: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"covariance worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_covariance(ctx: Context) -> None:
    from editkit import second_moment

    s, lm, ed = ctx.settings, ctx.lm, ctx.editor
    layer = ed.edit_layers[0]
    d_in = lm.d_in(layer)
    # Same C0 from both sides (checked in this process on the smallest size).
    small = ctx.corpus[: s.cov_samples[0]]
    C_ours = second_moment(lm, layer, small, None, cache=False, progress=False)
    C_naive, _ = keep_all_keys_second_moment(lm, layer, small)
    c_diff = (C_ours - C_naive).abs().max().item()
    rows, naive_rows = [], []
    for n in s.cov_samples:
        res = {}
        for side in ("ours", "naive"):
            res[side] = _spawn_worker({"model": s.model, "corpus": s.corpus, "n_samples": n, "layer": layer,
                                       "side": side, "device": s.device, "repeats": s.repeats,
                                       "threads": torch.get_num_threads()})
        o, b = res["ours"], res["naive"]
        rows.append(o)
        naive_rows.append(b)
        mem_ratio = b["peak_rss_delta_mb"] / max(o["peak_rss_delta_mb"], 1e-9)
        ctx.add(f"covariance n={n}", "covariance",
                {"n_samples": o["n_samples"], "tokens": o["tokens"], "layer": layer, "d_in": d_in,
                 "accumulator_mb": d_in * d_in * 8 / 2 ** 20, "model": lm.name, "corpus": s.corpus},
                {k: o[k] for k in o if k not in ("side",)},
                {k: b[k] for k in b if k not in ("side",)},
                mem_ratio, "MB peak RSS", s.repeats, ratio_means="keep-all-keys peak MB ÷ streaming peak MB",
                target="memory O(d_in²), independent of samples",
                notes=("each side in a fresh subprocess; peak = kernel peak RSS (VmHWM, reset just before the call) "
                       "minus RSS just before the call, with model and corpus loaded and a warm-up done; "
                       f"baseline keeps all N × d_in float64 keys; max|C0_ours − C0_naive| = {c_diff:.1e} "
                       f"on {s.cov_samples[0]} texts"))
    peaks = [r["peak_rss_delta_mb"] for r in rows]
    naive = [r["peak_rss_delta_mb"] for r in naive_rows]
    toks = [r["tokens"] for r in rows]
    span = max(toks[-1] - toks[0], 1)
    bound = 4 * d_in * d_in * 8 / 2 ** 20 + 64.0  # a few d_in² float64 buffers + allocator/activation slack
    ctx.add("covariance memory vs samples", "covariance",
            {"n_samples": s.cov_samples, "tokens": toks, "d_in": d_in, "layer": layer, "bound_mb": bound},
            {"peak_rss_delta_mb": peaks, "kb_per_extra_token": (peaks[-1] - peaks[0]) * 1024 / span,
             "tokens_per_s": [r["tokens_per_s"] for r in rows]},
            {"peak_rss_delta_mb": naive, "kb_per_extra_token": (naive[-1] - naive[0]) * 1024 / span,
             "tokens_per_s": [r["tokens_per_s"] for r in naive_rows]},
            naive[-1] / max(peaks[-1], 1e-9), "MB", s.repeats,
            ratio_means=f"keep-all-keys peak ÷ streaming peak at {toks[-1]} tokens",
            target="memory O(d_in²), independent of samples",
            met=max(peaks) <= bound,
            notes=(f"'met' = streaming peak ≤ 4·d_in²·8 bytes + 64 MB = {bound:.1f} MB at every size; keys alone "
                   f"would take d_in·8 = {d_in * 8 / 1024:.1f} KB per token. Sub-MB figures are at the resolution "
                   "of RSS (pages, allocator reuse)"))


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


def bench_paper(ctx: Context) -> None:
    """Llama-3-8B widths (benchmarks/paper.py): C0 streaming, values, cached-factor vs direct solves, e2e."""
    sys.path.insert(0, str(HERE))
    from paper import PaperSettings
    from paper import bench_paper as run_paper

    ps = PaperSettings.quick() if ctx.settings.mode == "quick" else PaperSettings()
    ps.seed = ctx.settings.seed
    ps.threads = torch.get_num_threads()
    ps.steps = ctx.settings.paper_steps
    if os.environ.get("EDITKIT_BENCH_DIRECT_MAX_E"):  # cap the direct solves at the largest width (short runs)
        ps.direct_max_E = int(os.environ["EDITKIT_BENCH_DIRECT_MAX_E"])
    run_paper(ps, ctx.add)


BENCHES: dict[str, Callable[[Context], None]] = {"values": bench_values, "scoring": bench_scoring,
                                                  "covariance": bench_covariance, "precompute": bench_precompute,
                                                  "e2e": bench_e2e, "paper": bench_paper}


# --------------------------------------------------------------------------- outputs

def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 1e-3:
            return f"{x:.1e}"
        return f"{x:.{digits}g}"
    return str(x)


def _scores_str(d: dict) -> str:
    return "/".join(_fmt(d.get(m), 3) for m in METRICS)


def markdown_table(entries: list[dict], machine: dict) -> str:
    """The short results table (also pasted into the README)."""
    lines = ["| Benchmark | editkit | baseline | ratio | check |", "| --- | --- | --- | --- | --- |"]
    for e in entries:
        if e.get("skipped"):
            lines.append(f"| {e['name']} | skipped: {e['skipped']} | | | |")
            continue
        o, b, sec = e["ours"], e["baseline"] or {}, e["section"]
        ratio = f"{e['ratio']:.3g}×" if e["ratio"] is not None else "–"
        met = {True: " ✓", False: " ✗", None: ""}[e.get("met")]
        if e.get("target") and e.get("met") is not None:
            met = f"; target {e['target']}{met}"
        if sec == "values":
            p = e["params"]
            own = b.get("editkit_loop", {})
            loop = (f"reference protocol {_fmt(b['s_per_edit'])} s/edit; editkit one at a time "
                    f"{_fmt(own.get('s_per_edit'))} s/edit ({_fmt(own.get('speedup_of_batched'))}×)"
                    + (f" ({p['loop_requests']} req.)" if p["loop_requests"] != p["E"] else ""))
            ref = o.get("max_abs_delta_diff_reference")
            dd = _fmt(o["max_abs_delta_diff"]) + (f" (vs reference {_fmt(ref)})" if ref is not None else "")
            lines.append(f"| δ optimization, E={p['E']}, {p['v_steps']} steps | batched {_fmt(o['s_per_edit'])} s/edit "
                         f"| {loop} | {ratio} | max‖Δδ‖ {dd}{met} |")
        elif sec == "scoring":
            p = e["params"]
            lines.append(f"| scoring, {p['records']} records | batched {_fmt(o['records_per_s'])} rec/s "
                         f"| 1 prompt at a time {_fmt(b['records_per_s'])} rec/s | {ratio} "
                         f"| max‖ΔNLL‖ {_fmt(o['max_abs_nll_diff'])}{met} |")
        elif sec == "covariance" and "tokens_per_s" in o and not isinstance(o["tokens_per_s"], list):
            lines.append(f"| C0, {e['params']['tokens']:,} tokens | streaming {_fmt(o['tokens_per_s'])} tok/s, "
                         f"{_fmt(o['peak_rss_delta_mb'])} MB | keep all keys {_fmt(b['tokens_per_s'])} tok/s, "
                         f"{_fmt(b['peak_rss_delta_mb'])} MB | {ratio} memory | |")
        elif sec == "covariance":
            peaks = " → ".join(_fmt(x) for x in o["peak_rss_delta_mb"])
            naive = " → ".join(_fmt(x) for x in b["peak_rss_delta_mb"])
            lines.append(f"| C0 peak memory, {e['params']['tokens'][0]:,} → {e['params']['tokens'][-1]:,} tokens "
                         f"(d_in={e['params']['d_in']}) | streaming {peaks} MB | keep all keys {naive} MB | {ratio} "
                         f"| {met.lstrip('; ')} |")
        elif sec == "precompute":
            toks = o["tokens"]
            tok = _fmt(float(next(iter(toks.values())))) if isinstance(toks, dict) and toks else "–"
            label = (f"{e['params']['multiple']}× d_in" if e["params"].get("multiple") else "full corpus")
            base = f"full corpus {_scores_str(b)}" if b else ""
            ours = "edit failed: singular system" if o.get("error") else _scores_str(o)
            lines.append(f"| C0 from {label} ({tok} tok), {e['params']['facts']} facts, ES/PS/NS/S "
                         f"| {ours} | {base} | {ratio} | |")
        elif sec == "e2e":
            stages = ", ".join(f"{k[:-2]} {_fmt(o.get(k))} s" for k in ("stats_s", "values_s", "solve_s", "eval_s"))
            lines.append(f"| {e['name']}, ES/PS/NS/S | {stages}; {_scores_str(o)} | | | |")
        elif sec.startswith("paper"):
            lines.append(_paper_row(e, o, b, ratio, met))
    m = machine
    lines.append("")
    lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} "
                 f"({m.get('torch_threads')} threads), device {m.get('device')}"
                 + (f" ({m['gpu']})" if m.get("gpu") else "")
                 + f"; load average {m.get('load_start')} → {m.get('load_end')}. "
                 f"Medians of {entries[0]['repeats'] if entries else '?'} repeats; both sides of each ratio measured in "
                 f"the same run. Mode: {m.get('mode')}, {m.get('date')}. Regenerate with `make bench`.")
    return "\n".join(lines)


def _mb(x: Any) -> str:
    return "–" if x is None else (f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MB")


def _paper_row(e: dict, o: dict, b: dict, ratio: str, met: str) -> str:
    """One table row for the paper-dimension entries (benchmarks/paper.py)."""
    p, sec = e["params"], e["section"]
    if sec == "paper solve" and not p.get("E"):
        return (f"| C0 Cholesky factor, d_in={p['d_in']:,}, {p['dtype']} (once per layer) | {_fmt(o['s'])} s, "
                f"peak {_mb(o['peak_rss_mb'])} | | | |")
    if sec == "paper solve":
        rel = o.get("rel_delta_diff")
        base = f"direct {_fmt(b['s'])} s, peak {_mb(b['peak_rss_mb'])}" if b else "direct: not run"
        return (f"| {p['method']} Δ, d_in={p['d_in']:,}, E={p['E']} | cached factor {_fmt(o['s'])} s, "
                f"peak {_mb(o['peak_rss_mb'])} | {base} | {ratio} | "
                f"{'‖ΔΔ‖/‖Δ‖ ' + _fmt(rel) if rel is not None else ''}{met} |")
    if sec == "paper C0":
        return (f"| C0 streaming, d_in={p['d_in']:,}, {p['dtype']}, {p['tokens']:,} tokens | stop at the layer "
                f"{_fmt(o['tokens_per_s'])} tok/s, peak {_mb(o['peak_rss_mb'])} | whole model "
                f"{_fmt(b['tokens_per_s'])} tok/s, peak {_mb(b['peak_rss_mb'])} | {ratio} | |")
    if sec == "paper values":
        layers = f", {p['n_layer']} layers" if p.get("n_layer") else ""
        return (f"| δ optimization, d_in={p['d_in']:,}{layers}, {p['dtype']}, E={p['E']}, {p['v_steps']} steps | batched "
                f"{_fmt(o['s_per_edit'])} s/edit, +{_mb(o['peak_rss_delta_mb'])} | one at a time "
                f"{_fmt(b['s_per_edit'])} s/edit ({b['requests']} req.) | {ratio} | max‖Δδ‖ "
                f"{_fmt(o['max_abs_delta_diff'])} |")
    if sec == "paper e2e":
        stages = ", ".join(f"{k[:-2]} {_fmt(o.get(k))} s" for k in ("factor_s", "values_s", "solve_s"))
        return (f"| MEMIT edit of {p['E']} facts, d_in={p['d_in']:,}, {p['dtype']} | {stages}; whole edit "
                f"{_fmt(o['s'])} s, +{_mb(o['peak_rss_delta_mb'])} | | | |")
    return f"| {e['name']} | {str(o.get('error', ''))[:120].replace('|', '/')} | | | |"


PAPER_START, PAPER_END = "<!-- paper:start -->", "<!-- paper:end -->"


def render_paper(entries: list[dict], figure: Path = HERE / "paper.png") -> str | None:
    """The Performance page's paper-dimension block: the 14 336-wide rows, the figure, the slopes, the memory budget."""
    paper = [e for e in entries if e["section"].startswith("paper")]
    if not paper:
        return None
    sys.path.insert(0, str(HERE))
    from paper import budget_markdown, memory_budget, plot_paper, slopes

    big = max((e["params"].get("d_in") or 0) for e in paper)
    order = {"paper solve": 0, "paper C0": 1, "paper values": 2, "paper e2e": 3}
    rows = sorted([e for e in paper if e["params"].get("d_in") == big or e["section"] == "paper failed"],
                  key=lambda e: (order.get(e["section"], 9), {"MEMIT": 0, "EMMET": 1}.get(e["params"].get("method"), 2),
                                 e["params"].get("dtype") or "", e["params"].get("n_layer") or 0, e["params"].get("E") or 0))
    table = markdown_table(rows, paper[0]["machine"]).split("\n\nMachine:")[0]
    fig = plot_paper(paper, figure)
    sl = slopes(paper)
    lines = [table, ""]
    if fig:
        lines += [f"![solve time and memory vs E and width](../benchmarks/{fig.name})", ""]  # from docs/
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    if sl["vs_E"]:
        lines.append("Slopes (log-log least squares; time ∝ E^slope at d_in = "
                     f"{big:,}; cached factor over E ≥ 256, direct over E ≥ 16): " + "; ".join(f"{k} {fmt(v['time'])}" for k, v in sl["vs_E"].items()) + ".")
    if sl["vs_width"]:
        lines.append("Slopes against d_in (time ∝ d_in^slope, solve memory ∝ d_in^slope, over "
                     f"{', '.join(str(w) for w in next(iter(sl['vs_width'].values()))['d_in'])}): "
                     + "; ".join(f"{k}: time {fmt(v['time'])}, memory {fmt(v['peak_rss'])}"
                                 for k, v in sl["vs_width"].items()) + ".")
    try:
        budget = memory_budget(paper)
        (HERE / "memory_budget.json").write_text(json.dumps(budget, indent=1, default=str) + "\n")
        lines += ["", budget_markdown(budget)]
    except KeyError as exc:
        lines += ["", f"Memory budget: not computed ({exc})."]
    m = paper[0]["machine"]
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} ({m.get('torch_threads')} "
              f"threads), load average {m.get('load_start')} → {m.get('load_end')}; {m.get('date')}. All rows and "
              "the other widths: benchmarks/RESULTS.md. Regenerate with `.venv/bin/python benchmarks/run.py --only paper --merge`."]
    return "\n".join(lines)


def update_readme(table: str, readme: Path = PERFORMANCE_PAGE, start: str = README_START,
                  end: str = README_END) -> bool:
    """Rewrite only the text between ``start`` and ``end`` in ``readme``. Returns
    whether the file changed; raises ValueError when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ValueError(f"{readme}: markers {start!r} … {end!r} not found")
    new = text[: i + len(start)] + "\n" + table.strip() + "\n" + text[j:]
    if new == text:
        return False
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)
    return True


def _section_group(section: str) -> str:
    """The --only name a section belongs to ("paper solve" → "paper")."""
    return section.split(" ")[0]


def write_outputs(entries: list[dict], machine: dict, out: Path, md: Path) -> str:
    for e in entries:
        e.setdefault("machine", machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    table = markdown_table(entries, machine)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(f"# editkit benchmarks ({machine.get('mode')})\n\nGenerated by `benchmarks/run.py`; the raw "
                  f"figures are in `{out.name}`.\n\n{table}\n")
    return table


# --------------------------------------------------------------------------- main

def _write_readme(tiny: list[dict], entries: list[dict], readme: bool) -> None:
    """docs/performance.md: the tiny/world table between the bench markers, the paper block between the paper markers."""
    paper = render_paper(entries)
    if not readme:
        return
    if tiny:
        changed = update_readme(markdown_table(tiny, tiny[0]["machine"]))
        log.info("docs/performance.md: Performance table %s", "updated" if changed else "unchanged")
    if paper:
        changed = update_readme(paper, start=PAPER_START, end=PAPER_END)
        log.info("docs/performance.md: paper-dimension section %s", "updated" if changed else "unchanged")


def run(settings: Settings, sections: Sequence[str] = SECTIONS) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    seed_all(settings.seed)
    machine = machine_info(settings.device)
    machine.update(mode=settings.mode, load_start=load_average(),
                   date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    log.info("machine: %s", machine)
    if all(name in OWN_MODEL for name in sections):
        ctx = Context(settings, None, None, [], [])
    else:
        lm = load_lm(settings.model, settings.device)
        n_rec = max([settings.n_score, settings.e2e_facts, settings.precompute_facts, max(settings.value_sizes)])
        ctx = Context(settings, lm, make_editor(lm, settings), load_records(settings, n_rec),
                      load_corpus(settings.corpus))
    for name in tqdm(list(sections), desc="benchmarks"):
        t0 = time.perf_counter()
        BENCHES[name](ctx)
        log.info("section %s took %.1f s", name, time.perf_counter() - t0)
    machine["load_end"] = load_average()
    machine["settings"] = dataclasses.asdict(settings)
    return ctx.entries, machine


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, a few records: seconds (for tests)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results.json; quick: "
                                             "benchmarks/.cache/results-quick.json)")
    ap.add_argument("--md", type=Path, help="markdown table (default next to --out: RESULTS.md / RESULTS-quick.md)")
    ap.add_argument("--readme", dest="readme", action="store_true", default=None,
                    help="update docs/performance.md (default: on for a full run, off for --quick)")
    ap.add_argument("--no-readme", dest="readme", action="store_false")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--merge", action="store_true",
                    help="keep the entries already in --out that this run does not produce again (by name)")
    ap.add_argument("--paper-steps", nargs="+", help="paper section: only the steps whose name starts with these "
                                                     "(e.g. 'solve MEMIT 14336', 'values', 'e2e')")
    ap.add_argument("--model", help="model to benchmark (default world-gpt2; quick: tiny-gpt2)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite RESULTS.md, the sections of docs/performance.md and the figure from --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if (a.verbose or not a.worker) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # Quick mode uses one thread: on a shared 2-core machine, OpenMP threads that wait on
    # each other make tiny kernels up to 50× slower and the timings meaningless.
    threads = a.threads or (1 if a.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if a.worker:
        args = json.loads(a.worker)
        if "paper" in args:
            sys.path.insert(0, str(HERE))
            from paper import WORKERS

            print(json.dumps(WORKERS[args.pop("paper")](args)))
        else:
            print(json.dumps(cov_worker(args)))
        return 0
    over: dict[str, Any] = {"seed": a.seed, "device": a.device, "paper_steps": a.paper_steps}
    if a.model:
        over["model"] = a.model
        if a.model.startswith("tiny-"):
            over["corpus"] = "tiny"
    if a.repeats:
        over["repeats"] = over["e2e_repeats"] = a.repeats
    settings = Settings.quick(**over) if a.quick else Settings.full(**over)
    load = load_average()
    if not a.quick and load and load[0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %s on %s cores: other processes compete for the CPU and the timings will be "
                    "noisy (consider --threads 1, or rerun on a quiet machine)", load, os.cpu_count())
    out = a.out or (HERE / ".cache" / "results-quick.json" if a.quick else HERE / "results.json")
    md = a.md or out.with_name("RESULTS-quick.md" if a.quick else "RESULTS.md")
    if a.render:
        entries = json.loads(out.read_text())
        table = write_outputs(entries, entries[0]["machine"], out, md)
        _write_readme([e for e in entries if not e["section"].startswith("paper")], entries, a.readme is not False)
        return 0
    sections = a.only or SECTIONS
    entries, machine = run(settings, sections)
    for e in entries:
        e["machine"] = machine
    if a.merge and out.exists():
        new = {e["name"] for e in entries}
        kept = [e for e in json.loads(out.read_text()) if e["name"] not in new
                and (a.paper_steps or _section_group(e["section"]) not in sections)]
        entries = kept + entries
        machine = kept[0]["machine"] if kept else machine
    table = write_outputs(entries, machine, out, md)
    print(table)
    if a.readme if a.readme is not None else not a.quick:
        _write_readme([e for e in entries if not e["section"].startswith("paper")], entries, True)
    log.info("wrote %s and %s", out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
