"""Single-edit scores of a world preset under its own protocol, on independent samples of facts.

The world presets' value settings (``editkit/presets/world-*.json``) are chosen so that the
quick start's single edits succeed on the world models as they do on the study's models
(ROME: ES ≥ .98, PS ≥ .85, NS ≥ .95). This script measures that: each of ``--n`` world facts
(one sample per ``--seeds`` entry) is edited alone into the unedited model, scored, and
restored; the value settings can be overridden (``--set v_lr=1.0 --set v_steps=100``) to
compare candidates. Summaries only (no per-fact rows) are added to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/world_presets.py --model world-gpt2 --method ROME \
        --seeds 0 1 --n 200 [--set clamp_norm_factor=12]

All δ of a sample are optimized in one batched call first (requests are independent: each
δ is the one the edit alone would compute, see ``values.memoized_values``), then the edits
read them from the memo.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

import editkit as ek
from editkit.protocols import conventions
from editkit.values import memoized_values

log = logging.getLogger("world_presets")


def _parse(settings: list[str]) -> dict:
    out = {}
    for s in settings:
        k, _, v = s.partition("=")
        if not _:
            raise SystemExit(f"--set {s!r}: give name=value")
        out[k] = json.loads(v)
    return out


def editor_settings(editor) -> dict:
    """What decides a single edit's scores here: layers, protocol and the value settings."""
    values = {k: v for k, v in dataclasses.asdict(editor.values).items() if k not in ("conventions", "site",
                                                                                       "v_batch_size", "cache_prefix")}
    return {"layers": list(editor.layers), "protocol": str(editor.protocol), "values": values}


def measure(lm, method: str, preset: str, overrides: dict, n: int, seed: int) -> dict:
    """ES/PS/NS (and convergence) of ``n`` single edits of sample ``seed``."""
    editor = ek.make_editor(method, preset=preset, **overrides)
    records = ek.load_counterfact("world", n=n, seed=seed, unique_subjects=True)
    layer = editor.layers[0]
    t0 = time.perf_counter()
    # Prime the value memo exactly as the editor asks for values (same prefixes, config, site).
    site = conventions(editor.protocol).rome_site if editor.rome_conventions else "block"
    cfg = dataclasses.replace(editor.values, conventions=editor.protocol, site=site)
    memoized_values(lm, [r.request for r in records], layer, editor.context(lm), cfg, progress=False)
    frames, converged, steps = [], [], []
    for r in records:
        with editor.applied(lm, [r], progress=False) as edit:
            frames.append(ek.evaluate(lm, [r], progress=False))
            converged.append(edit.converged)
            steps += edit.diagnostics["value_steps"]
    s = ek.summarize(pd.concat(frames, ignore_index=True), n_boot=0)
    out = {m: round(float(s.loc[m, "value"]), 4) for m in ("ES", "PS", "NS", "S")}
    out["editor"] = editor_settings(editor)
    out.update(n=len(records), seed=seed, not_converged=int(len(converged) - sum(converged)),
               mean_steps=round(sum(steps) / len(steps), 2), seconds=round(time.perf_counter() - t0, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="world-gpt2")
    ap.add_argument("--method", default="ROME")
    ap.add_argument("--preset", default=None, help="default: the model's preset")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--set", action="append", default=[], help="value/editor setting override, name=JSON value")
    ap.add_argument("--label", default=None, help="name of this configuration in the output")
    ap.add_argument("--out", default=str(Path(__file__).with_name("world_presets.json")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    lm = ek.load_model(args.model)
    preset = args.preset or ek.preset_for(args.model)
    overrides = _parse(args.set)
    rows = []
    with ek.summarized_edit_warnings(f"{args.method} on {args.model}"):
        for seed in args.seeds:
            row = dict(model=args.model, method=args.method, preset=preset, label=args.label or "preset",
                       overrides=overrides, **measure(lm, args.method, preset, overrides, args.n, seed))
            print(json.dumps(row), flush=True)
            rows.append(row)
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    data["meta"] = {"torch": torch.__version__, "editkit": ek.__version__, "threads": torch.get_num_threads(),
                    "what": "single edits into the unedited model, scored right after; summaries per sample"}
    data["rows"] = [r for r in data["rows"] if not (r["model"] == args.model and r["method"] == args.method
                                                     and r["label"] == (args.label or "preset")
                                                     and r["seed"] in args.seeds and r["n"] == args.n)] + rows
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
