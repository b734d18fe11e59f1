#!/usr/bin/env python
"""Where the time of one edit goes: time and FLOPs per part, against this machine's matmul rate.

    python benchmarks/profile_edit.py                       # world-gpt2 and smollm2-135m, MEMIT, 1 fact
    python benchmarks/profile_edit.py --models world-gpt2 --batch 16

One MEMIT edit (the model's preset, protocol "reference", one thread, the value memo
emptied) is run twice: once timed, with hooks that clock each part, and once under
``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of every matmul per
module. Parts:

* **forward below L** — the embedding and the blocks under the edited layer, in the value
  optimization's forwards (δ cannot reach them; the prefix pass included);
* **forward from L** — the edited block and the ones above it, and the final norm;
* **LM head** — the unembedding, at the loss positions only;
* **backward** — ``loss.backward()`` (through the blocks from L up and the head);
* **optimizer** — Adam, the frozen rows put back, the norm clamp;
* **values, rest** — tokenizing, padding, the prefix keys/values, the loss terms;
* **keys** — ``K`` at the edited layer (one forward up to it, per prefix);
* **solve** — the residual ``R`` (one forward up to L) and the solve on the cached factor;
* **C0** and **C0 factor** — computing the second moment from the corpus and its Cholesky
  factor: once per model and layer, amortized over every later edit (listed, not summed).

Times are CPU seconds of this one-thread process (``time.process_time``), so what else runs on
the shared machine does not enter them. Achieved FLOP/s = FLOPs ÷ time per part, as a fraction of the best single-thread float32
matmul rate measured here (square and model-shaped GEMMs). The benchmark prints a table,
writes ``benchmarks/profile.json`` and the plot ``benchmarks/profile.png``, and updates its
section of ``benchmarks/RESULTS.md``. With ``--compare`` it also runs the edit with
``editkit.values.REUSE_LOWER`` off (every block under L recomputed each step, the code before
this profile), to show what that saves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

import editkit as ek
from editkit import values as V
from editkit.editors import base
from editkit.solver import C0Factor

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # measure the checkout this script lives in
    sys.path.insert(0, str(HERE.parent))
from benchmarks.report import update_section  # noqa: E402
from benchmarks.vs_authors import REAL_CORPUS, requests_for  # noqa: E402  (the comparison's records and corpus)

log = logging.getLogger("editkit.profile")
PARTS = ["forward below L", "forward from L", "LM head", "backward", "optimizer", "values, rest", "keys", "solve"]
ONCE = ["C0", "C0 factor"]


# --------------------------------------------------------------------------- the machine

def matmul_rate(threads: int = 1, reps: int = 5) -> dict[str, float]:
    """Best float32 GEMM rate (GFLOP/s) on ``threads`` threads over a few shapes, median of ``reps``."""
    torch.set_num_threads(threads)
    shapes = {"512³": (512, 512, 512), "1024³": (1024, 1024, 1024), "2048³": (2048, 2048, 2048),
              "tokens 256 × 576 × 1536": (256, 576, 1536), "tokens 1024 × 128 × 512": (1024, 128, 512)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        ts = []
        for _ in range(reps):
            t0 = time.process_time()
            a @ b
            ts.append(time.process_time() - t0)
        out[name] = 2 * m * k * n / sorted(ts)[len(ts) // 2] / 1e9
    return out


# --------------------------------------------------------------------------- clocks

class Clock:
    """Seconds per part, from hooks and wrappers that only read the clock (CPU: synchronous)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.process_time()
        try:
            yield
        finally:
            self.s[name] += time.process_time() - t0


@contextlib.contextmanager
def module_clocks(lm: ek.LanguageModel, layer: int, clock: Clock) -> Iterator[None]:
    """Clock the embedding + blocks under L, the blocks from L + final norm, and the unembedding."""
    blocks = list(lm.module(lm.adapter.blocks))
    groups = [(lm.model.get_input_embeddings(), "forward below L"), (lm.module(lm.adapter.final_norm), "forward from L"),
              (lm.model.get_output_embeddings(), "LM head")]
    groups += [(b, "forward below L" if i < layer else "forward from L") for i, b in enumerate(blocks)]
    handles, start = [], {}
    for m, name in groups:
        handles.append(m.register_forward_pre_hook(lambda m, a, _n=name: start.__setitem__(id(m), time.process_time())))
        handles.append(m.register_forward_hook(
            lambda m, a, o, _n=name: clock.s.__setitem__(_n, clock.s[_n] + time.process_time() - start.pop(id(m)))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def wrapped(obj: Any, name: str, around) -> Iterator[None]:
    """Replace ``obj.name`` by ``around(original)`` for the block."""
    saved = getattr(obj, name)
    setattr(obj, name, around(saved))
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _timed(clock: Clock, part: str):
    def around(fn):
        def inner(*a, **k):
            with clock.part(part):
                return fn(*a, **k)
        return inner
    return around


@contextlib.contextmanager
def step_clocks(clock: Clock, editor: ek.Editor, lm: ek.LanguageModel, layer: int) -> Iterator[None]:
    """values (total; inside it the module clocks), backward, optimizer (the rest of ``update``), keys, solve."""
    def values(fn):
        def inner(*a, **k):
            with clock.part("values"), module_clocks(lm, layer, clock):
                return fn(*a, **k)
        return inner

    def update(fn):
        def inner(self, loss):
            t0, b0 = time.process_time(), clock.s["backward"]
            out = fn(self, loss)
            clock.s["optimizer"] += time.process_time() - t0 - (clock.s["backward"] - b0)
            return out
        return inner

    with contextlib.ExitStack() as st:
        st.enter_context(wrapped(V, "optimize_values", values))
        st.enter_context(wrapped(torch.Tensor, "backward", _timed(clock, "backward")))
        st.enter_context(wrapped(V.ValueBatch, "update", update))
        st.enter_context(wrapped(type(editor), "keys", _timed(clock, "keys")))
        st.enter_context(wrapped(type(editor), "solve", _timed(clock, "solve")))
        st.enter_context(wrapped(base, "hidden_at_subject", _timed(clock, "solve")))  # R's forward up to L
        yield


# --------------------------------------------------------------------------- FLOPs

@contextlib.contextmanager
def flop_counts(lm: ek.LanguageModel, layer: int, clock: Clock, editor: ek.Editor) -> Iterator[None]:
    """FLOPs per part: the value optimization's forwards per module group, backward, keys, solve."""
    from torch.utils.flop_counter import FlopCounterMode

    rel = lm.adapter.blocks.split(".", 1)[-1]  # "transformer.h" -> "h" (names are relative to the base model)
    pat = re.compile(rf"^[^.]+\.{re.escape(rel)}\.(\d+)$")

    def count(part_of):
        def around(fn):
            def inner(*a, **k):
                with FlopCounterMode(display=False) as fc:
                    out = fn(*a, **k)
                part_of(fc)
                return out
            return inner
        return around

    def forward_parts(fc):  # the transformer without its head (ValueBatch.forward)
        counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
        below = sum(v for k, v in counts.items() if (m := pat.match(k)) and int(m.group(1)) < layer)
        clock.flops["forward below L"] += below
        clock.flops["forward from L"] += counts.get("Global", 0) - below

    def one(name):
        return lambda fc: clock.flops.__setitem__(name, clock.flops[name] + fc.get_total_flops())

    with contextlib.ExitStack() as st:
        st.enter_context(wrapped(V.ValueBatch, "forward", count(forward_parts)))
        st.enter_context(wrapped(V, "_prefix_kv", count(forward_parts)))  # the positions before the tail, once
        st.enter_context(wrapped(V.ValueBatch, "terms", count(one("LM head"))))  # the unembedding at the loss positions
        st.enter_context(wrapped(torch.Tensor, "backward", count(one("backward"))))
        st.enter_context(wrapped(type(editor), "keys", count(one("keys"))))
        yield


# --------------------------------------------------------------------------- one edit

def editor_for(model: str, method: str) -> ek.Editor:
    over = {} if model.startswith("world") else {"corpus": f"counterfact-text:{REAL_CORPUS}"}
    return ek.make_editor(method, preset=model, **over)


def profile(model: str, method: str, batch: int, reuse_lower: bool = True) -> dict:
    lm = ek.load_model(model, device="cpu")
    ed = editor_for(model, method)
    layer = ed.layers[-1]
    reqs = requests_for(model, batch + 1)
    warm, reqs = reqs[-1], reqs[:-1]
    clock = Clock()
    # C0 and its factor: once per model and layer (cached on disk; timed afresh here).
    with clock.part("C0"):
        C0 = ek.second_moment(lm, layer, ed.corpus if isinstance(ed.corpus, str) else ed.corpus, ed.n_samples,
                              max_tokens=ed.max_tokens, cache=False, progress=False)
    with clock.part("C0 factor"):
        C0Factor.of(C0, ed.c0_ridge, torch.float64, torch.device("cpu"))
    stats = {layer: ed.second_moment(lm, layer, progress=False)}
    ed.apply(lm, [warm], stats=stats, progress=False).undo()  # warm-up: prefixes, the factor of this C0
    V.REUSE_LOWER = reuse_lower
    try:
        lm.cache.pop("_values_memo", None)
        with step_clocks(clock, ed, lm, layer):
            t0 = time.process_time()
            edit = ed.apply(lm, reqs, stats=stats, progress=False)
            total = time.process_time() - t0
        steps = sum(edit.diagnostics["value_steps"])
        edit.undo()
        lm.cache.pop("_values_memo", None)
        with flop_counts(lm, layer, clock, ed):
            ed.apply(lm, reqs, stats=stats, progress=False).undo()
    finally:
        V.REUSE_LOWER = True
    s = clock.s
    inner = sum(s[p] for p in ("forward below L", "forward from L", "LM head", "backward", "optimizer"))
    s["values, rest"] = s["values"] - inner
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {"model": model, "method": method, "batch": batch, "layer": layer, "n_layers": lm.n_layers,
            "params": n_params, "reuse_lower": reuse_lower, "total_s": total, "value_steps": steps,
            "s": {p: s[p] for p in PARTS + ONCE}, "flops": {p: clock.flops.get(p, 0.0) for p in PARTS}}


# --------------------------------------------------------------------------- report

def table(rows: list[dict], peak: float) -> str:
    out = ["| model (edit) | part | CPU s | share | GFLOP | GFLOP/s | of peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tot = sum(r["s"][p] for p in PARTS)
        label = f"{r['model']} ({r['method']}, {r['batch']} fact{'s' if r['batch'] > 1 else ''}, layer {r['layer']} " \
                f"of {r['n_layers']}, {r['value_steps']} value steps{'' if r['reuse_lower'] else ', blocks under L every step'})"
        for p in PARTS + ONCE:
            t, f = r["s"][p], r["flops"].get(p, 0.0)
            rate = f / t / 1e9 if t > 0 and f else None
            out.append(f"| {label} | {p}{' (once per model)' if p in ONCE else ''} | {t:.3f} | "
                       f"{'' if p in ONCE else f'{t / tot:.0%}'} | {f / 1e9:.3f} | "
                       f"{'' if rate is None else f'{rate:.1f}'} | {'' if rate is None else f'{rate / peak:.0%}'} |")
            label = ""
        fl = sum(r["flops"].values())
        out.append(f"| | **one edit** | **{tot:.3f}** | 100% | {fl / 1e9:.3f} | {fl / tot / 1e9:.1f} | {fl / tot / 1e9 / peak:.0%} |")
    return "\n".join(out)


def plot(rows: list[dict], peak: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(PARTS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.7 * len(rows)), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r['model']}\n{r['method']} ×{r['batch']}{'' if r['reuse_lower'] else ' (before)'}" for r in rows]
    for i, r in enumerate(rows):
        left = 0.0
        for p in PARTS:
            t = r["s"][p]
            axes[0].barh(i, t, left=left, color=colors[p], label=p if i == 0 else None)
            left += t
        rates = [(p, r["flops"][p] / r["s"][p] / 1e9) for p in PARTS if r["flops"].get(p) and r["s"][p] > 0]
        for j, (p, g) in enumerate(rates):
            axes[1].barh(i + (j - len(rates) / 2) * 0.15, g, height=0.15, color=colors[p])
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].set_xlabel("CPU seconds (one thread)")
    axes[0].set_title("time of one edit, by part")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].axvline(peak, color="k", ls="--", lw=1)
    axes[1].text(peak, len(rows) - 0.5, f" matmul peak {peak:.0f} GFLOP/s", fontsize=7, va="top")
    axes[1].set_yticks(range(len(rows)), [""] * len(rows))
    axes[1].set_xlabel("achieved GFLOP/s")
    axes[1].set_title("achieved FLOP/s per part (counted matmuls)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["world-gpt2", "smollm2-135m"])
    p.add_argument("--method", default="MEMIT")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compare", action="store_true", help="also profile with REUSE_LOWER off (the code before)")
    p.add_argument("--out", default=str(HERE / "profile.json"))
    p.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md / profile.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rates = matmul_rate(1)
    peak = max(rates.values())
    rows = []
    for m in args.models:
        if args.compare:
            rows.append(profile(m, args.method, args.batch, reuse_lower=False))
        rows.append(profile(m, args.method, args.batch))
    meta = {"matmul_gflops": rates, "peak_gflops": peak, "threads": 1, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "load_average": list(os.getloadavg()),
            "command": "python benchmarks/profile_edit.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(args.out).write_text(json.dumps({"rows": rows, **meta}, indent=1) + "\n")
    tab = table(rows, peak)
    print(tab)
    if not args.no_results:
        plot(rows, peak, HERE / "profile.png")
        update_section(HERE / "RESULTS.md", "profile", section(tab, meta))


def section(tab: str, meta: dict) -> str:
    rates = ", ".join(f"{k} {v:.0f}" for k, v in meta["matmul_gflops"].items())
    return (f"## Profile of one edit\n\nGenerated by `benchmarks/profile_edit.py` ({meta['command']}); raw numbers in "
            f"`profile.json`, plot in `profile.png`. One thread; this machine's float32 matmul rate (GFLOP/s): {rates}; "
            f"peak {meta['peak_gflops']:.0f}. FLOPs are the matmuls counted by torch's FlopCounterMode (attention scores "
            f"are not counted by it on a CPU). Load average at the end: {meta['load_average']}.\n\n{tab}\n\n"
            f"![profile](profile.png)")


if __name__ == "__main__":
    main()
