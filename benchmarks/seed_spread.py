#!/usr/bin/env python
"""How much do the world's conclusions depend on the training seed of its model?

    python benchmarks/seed_spread.py                  # seeds 0 1 2 (0 is the shipped world-gpt2)
    python benchmarks/seed_spread.py --seeds 0 1 2 3

world-gpt2 is retrained with each training seed (same world, same settings, only
``TrainConfig.seed`` differs; ``editkit world build`` semantics: one thread, deterministic
algorithms, cached under ``$EDITKIT_CACHE/world``), and the headline measurements of the
figures are repeated on each model with the ``world-gpt2`` preset and the default
(reference) protocol:

- pre-edit accuracy and causal tracing (the layer whose MLP restores most of P(true));
- the layer sweep: single ROME and MEMIT edits of 60 facts at layers 0-2, best layer by S;
- the batch curve: MEMIT at the preset's layer, 256 facts as independent batches of 16, 64, 256;
- sequential editing: MEMIT in batches of 16 up to 256 edits, S of all 256 facts at the end.

Every study runs through the run store (``runs/seed-spread/``), so an interrupted run
resumes. Output: ``benchmarks/seed_spread.json`` (per seed, plus mean, sd, min, max of
every number) and the markdown table the README shows (``--markdown``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "seed_spread.json"
log = logging.getLogger("editkit.seed_spread")

LAYERS = [0, 1, 2]
N_LAYER_SWEEP = 60
BATCH_SIZES = [16, 64, 256]
N_FACTS = 256
SEQ_BATCH = 16


def model_for_seed(seed: int):
    """world-gpt2 trained with training seed ``seed`` (0: the shipped checkpoint)."""
    import editkit as ek
    from editkit.world import WORLD_MODELS, world_model_path

    if seed == 0:
        return ek.load_model("world-gpt2", device="cpu")
    size, cfg = WORLD_MODELS["world-gpt2"]
    path = world_model_path("world-gpt2", train_cfg=dataclasses.replace(cfg, seed=seed), shipped=False)
    return ek.load_model(path, device="cpu")


def _s(frame, **where) -> dict:
    """ES/PS/NS/S (percent) of the rows matching ``where``."""
    import editkit as ek

    for k, v in where.items():
        frame = frame[frame[k] == v]
    t = ek.summarize(frame, n_boot=0)["value"]
    return {m: round(100 * float(t[m]), 1) for m in ("ES", "PS", "NS", "S")}


def measure(seed: int, root: Path) -> dict:
    import editkit as ek
    from editkit import experiments

    t0 = time.perf_counter()
    lm = model_for_seed(seed)
    out: dict = {"seed": seed, "model_sha256": lm.fingerprint()[:16]}
    preset = "world-gpt2"
    records = ek.load_counterfact("world", n=N_FACTS, seed=0, unique_subjects=True)
    run_root = root / f"seed{seed}"

    sweep = experiments.layer_sweep(lm, records[:N_LAYER_SWEEP], ["ROME", "MEMIT"], LAYERS, N_LAYER_SWEEP,
                                    preset=preset, trace=True, root=run_root)
    pre = sweep[sweep.phase == "pre"]
    # top-1 of the true object on the rewrite prompts of the unedited model
    out["pre_accuracy"] = round(float(pre[pre.kind == "rewrite"].top1_true.astype(float).mean()), 3)
    tr = sweep[(sweep.phase == "trace") & (sweep.position == "subject_last")].set_index("layer")["indirect_effect"]
    out["trace_peak_layer"], out["trace_peak"] = int(tr.idxmax()), round(float(tr.max()), 3)
    for m in ("ROME", "MEMIT"):
        per = {l: _s(sweep, phase="post", method=m, layer=l) for l in LAYERS}
        out[f"layer_{m}_S"] = {str(l): per[l]["S"] for l in LAYERS}
        out[f"best_layer_{m}"] = max(LAYERS, key=lambda l: per[l]["S"])

    layer = ek.MEMIT.preset(preset).layers[-1]
    batch = experiments.batch_sweep(lm, records, ["MEMIT"], layer, BATCH_SIZES, preset=preset, root=run_root)
    for b in BATCH_SIZES:
        out[f"batch{b}"] = _s(batch, phase="post", method="MEMIT", batch_size=b)

    heldout = ek.heldout_texts("world", n=200, seed=0)
    seq = experiments.sequential_batched(lm, records, ["MEMIT"], layer, [SEQ_BATCH], N_FACTS, heldout=heldout,
                                         preset=preset, root=run_root)
    allp = seq[(seq.phase == "all") & (seq.method == "MEMIT")]
    last = allp["edits_so_far"].max() if "edits_so_far" in allp.columns else None
    out[f"seq{SEQ_BATCH}_after{N_FACTS}"] = _s(allp[allp.edits_so_far == last] if last is not None else allp)
    probe = seq[seq.phase == "probe"].sort_values("edits_so_far")
    if "perplexity" in probe.columns and len(probe):
        out["seq_ppl_pre"] = round(float(probe[probe.method == "none"]["perplexity"].iloc[0]), 2)
        out["seq_ppl_after"] = round(float(probe[probe.method == "MEMIT"]["perplexity"].iloc[-1]), 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    f = {}
    for k, v in d.items():
        if isinstance(v, dict):
            f.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "seconds"):
            f[prefix + k] = v
    return f


def spread(per_seed: list[dict]) -> dict:
    flats = [_flat(r) for r in per_seed]
    keys = [k for k in flats[0] if all(k in f for f in flats)]
    return {k: {"mean": round(statistics.fmean(f[k] for f in flats), 3),
                "sd": round(statistics.stdev([f[k] for f in flats]), 3) if len(flats) > 1 else 0.0,
                "min": min(f[k] for f in flats), "max": max(f[k] for f in flats)} for k in keys}


ROWS = [("pre-edit accuracy", "pre_accuracy"), ("causal tracing: peak layer (MLP, subject's last token)", "trace_peak_layer"),
        ("causal tracing: indirect effect at the peak (subject's last token)", "trace_peak"),
        ("best layer, ROME (by S)", "best_layer_ROME"), ("best layer, MEMIT (by S)", "best_layer_MEMIT"),
        ("ROME S at layer 0 / 1 / 2", "layer_ROME_S.{}"), ("MEMIT S at layer 0 / 1 / 2", "layer_MEMIT_S.{}"),
        *[(f"MEMIT batch of {b}: ES / PS / NS / S", f"batch{b}.{{}}") for b in BATCH_SIZES],
        (f"sequential MEMIT, batches of {SEQ_BATCH}, all {N_FACTS} facts: ES / PS / NS / S",
         f"seq{SEQ_BATCH}_after{N_FACTS}.{{}}"),
        ("held-out perplexity before / after the sequence", None)]


def markdown(res: dict) -> str:
    seeds = res["per_seed"]
    head = "| measurement | " + " | ".join(f"seed {r['seed']}" for r in seeds) + " | spread (max − min) |"
    lines = [head, "| --- |" + " --- |" * (len(seeds) + 1)]

    def cell(r: dict, key: str) -> str:
        f = _flat(r)
        if "{}" not in key:
            return str(f.get(key, "—"))
        subs = ["0", "1", "2"] if key.startswith("layer_") else ["ES", "PS", "NS", "S"]
        return " / ".join(str(f.get(key.format(s), "—")) for s in subs)

    def rng(key: str) -> str:
        sp = res["spread"]
        if "{}" not in key:
            return f"{sp[key]['max'] - sp[key]['min']:.3g}" if key in sp else "—"
        subs = ["0", "1", "2"] if key.startswith("layer_") else ["ES", "PS", "NS", "S"]
        return " / ".join(f"{sp[key.format(s)]['max'] - sp[key.format(s)]['min']:.3g}" if key.format(s) in sp else "—"
                          for s in subs)

    for label, key in ROWS:
        if key is None:
            cells = [f"{r.get('seq_ppl_pre', '—')} / {r.get('seq_ppl_after', '—')}" for r in seeds]
            lines.append(f"| {label} | " + " | ".join(cells) + " | — |")
            continue
        lines.append(f"| {label} | " + " | ".join(cell(r, key) for r in seeds) + f" | {rng(key)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=HERE.parent / "runs" / "seed-spread")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--markdown", action="store_true", help="print the README table of --out and exit")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.markdown:
        print(markdown(json.loads(a.out.read_text())))
        return 0
    import torch

    torch.manual_seed(0)
    done = {r["seed"]: r for r in (json.loads(a.out.read_text())["per_seed"] if a.out.exists() else [])}
    for seed in a.seeds:
        if seed in done:
            log.info("seed %d: already measured", seed)
            continue
        log.info("seed %d: start", seed)
        done[seed] = measure(seed, a.root)
        log.info("seed %d: %s", seed, done[seed])
        per = [done[s] for s in sorted(done)]
        a.out.write_text(json.dumps({"per_seed": per, "spread": spread(per),
                                     "settings": {"layers": LAYERS, "n_layer_sweep": N_LAYER_SWEEP,
                                                  "batch_sizes": BATCH_SIZES, "n_facts": N_FACTS,
                                                  "seq_batch": SEQ_BATCH, "preset": "world-gpt2",
                                                  "threads": torch.get_num_threads()}}, indent=1) + "\n")
    print(markdown(json.loads(a.out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
