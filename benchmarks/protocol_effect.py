"""The effect of each protocol convention on the world model (the protocol table in docs/protocols.md).

For MEMIT and EMMET (one batch of 16 facts) and ROME (the same 16 facts, each edited
alone into the unedited model), edits with protocol="reference", with "editkit", and
with the reference where exactly one convention is switched to editkit's. Reports the
relative difference of ΔW to the reference's, ‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ (ROME: over
the 16 stacked updates), and ES/PS/NS of the edited facts.

    OMP_NUM_THREADS=1 python benchmarks/protocol_effect.py [--model world-gpt2] [--n 16]

Writes benchmarks/protocol_effect.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

import editkit as ek
from editkit.protocols import PROTOCOLS

log = logging.getLogger("protocol_effect")

#: Conventions that differ between the protocols, with the methods they touch.
SWITCHES = {
    "key_mean": ("MEMIT", "EMMET"), "decay": ("ROME", "MEMIT", "EMMET"), "kl": ("ROME", "MEMIT", "EMMET"),
    "kl_token": ("ROME", "MEMIT", "EMMET"), "stop": ("ROME", "MEMIT", "EMMET"),
    "updates": ("ROME", "MEMIT", "EMMET"), "rome_site": ("ROME",), "rome_denominator": ("ROME",),
    "prefixes": ("ROME", "MEMIT", "EMMET"),
}


def _variants(method: str) -> dict[str, object]:
    ref, mine = PROTOCOLS["reference"], PROTOCOLS["editkit"]
    out: dict[str, object] = {"reference": "reference", "editkit": "editkit",
                              # editkit's conventions with the reference's prefixes: the gap that is not prefixes
                              "editkit, reference prefixes": dataclasses.replace(
                                  mine, prefixes=ref.prefixes, rome_prefixes=ref.rome_prefixes)}
    for name, methods in SWITCHES.items():
        if method not in methods:
            continue
        if name == "prefixes":
            out["prefixes"] = dataclasses.replace(ref, prefixes=mine.prefixes, rome_prefixes=mine.rome_prefixes)
        else:
            out[name] = dataclasses.replace(ref, **{name: getattr(mine, name)})
    return out


def _edit(editor, lm, records, single: bool, C0) -> tuple[torch.Tensor, dict]:
    """ΔW (stacked over single edits) and ES/PS/NS of ``records`` right after their edit."""
    layer = editor.layers[0]
    frames, deltas = [], []
    groups = [[r] for r in records] if single else [records]
    for group in groups:
        with editor.applied(lm, group, stats={layer: C0}, progress=False) as edit:
            deltas.append(edit.deltas[layer].double())
            frames.append(ek.evaluate(lm, group, progress=False))
    import pandas as pd

    s = ek.summarize(pd.concat(frames, ignore_index=True), n_boot=0)
    return torch.stack(deltas), {m: float(s.loc[m, "value"]) for m in ("ES", "PS", "NS")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world-gpt2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).with_name("protocol_effect.json")))
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = ek.load_model(args.model)
    preset = ek.preset_for(args.model) or "world-gpt2"
    records = ek.load_counterfact("world", n=args.n, seed=0, unique_subjects=True)
    rows = []
    for method in ("ROME", "MEMIT", "EMMET"):
        base = ek.make_editor(method, preset=preset)
        C0 = base.second_moment(lm, base.layers[0], progress=False)
        ref_delta = None
        for name, protocol in _variants(method).items():
            t0 = time.perf_counter()
            editor = dataclasses.replace(base, protocol=protocol)
            delta, scores = _edit(editor, lm, records, method == "ROME", C0)
            if ref_delta is None:
                ref_delta = delta
            rel = ((delta - ref_delta).norm() / ref_delta.norm()).item()
            rows.append({"method": method, "variant": name, "dW_rel_diff": rel, **scores,
                         "seconds": time.perf_counter() - t0})
            log.warning("%s %-16s ΔW rel %.3g  ES %.3f PS %.3f NS %.3f", method, name, rel, *scores.values())
    meta = {"model": args.model, "preset": preset, "n_records": len(records), "batch": args.n,
            "torch": torch.__version__, "editkit": ek.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"| method | variant | ΔW rel. diff. to reference | ES | PS | NS |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['variant']} | {r['dW_rel_diff']:.3g} | {r['ES']:.3f} | {r['PS']:.3f} | {r['NS']:.3f} |")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    main()
