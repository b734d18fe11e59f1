"""Numbers a refactor must not change, captured to files and compared bit for bit.

    python benchmarks/fingerprint.py capture OUT_DIR     # with the code to fingerprint importable
    python benchmarks/fingerprint.py compare OLD_DIR NEW_DIR

``capture`` records, with whatever ``editkit`` is imported (put a checkout first on
PYTHONPATH to fingerprint it): C0, edit deltas and value targets of ROME/MEMIT/EMMET on
tiny models of five architectures; optimize_values' δ, h, NLLs, steps and loss history
under settings that freeze and re-pad; and, on the miniature world (gpt2 and llama),
edit deltas, ``evaluate`` frames, the three runners' frames (timing columns dropped),
causal traces, layer importance and the world's fact accuracy. ``compare`` lists every
tensor and frame that differs (exit status 1 if any). Only public API that has been
stable across versions is used, so an old checkout can be captured with this script.
Takes a few minutes on a CPU; the miniature world models are built on first use.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REQS = [("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
        ("{} plays the", "Toko Yasuda", "guitar", "piano"),
        ("{} was developed by", "Apple A5", "Google", "Apple"),
        ("{} was born in", "Kaiser Chiefs", "Paris", "Berlin")]


def _values(T: dict, name: str, v) -> None:
    for f in ("delta", "h", "nll_init", "nll_final", "steps"):
        T[f"{name}/{f}"] = getattr(v, f)
    T[f"{name}/history"] = torch.tensor(v.history, dtype=torch.float64)


def capture_tiny(T: dict) -> None:
    import editkit as ek
    from editkit.testing import TINY_TEXT, tiny_lm

    reqs = [ek.EditRequest(*r) for r in REQS]
    fast = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4)
    vc = ek.ValueConfig(v_steps=6, v_lr=0.5)
    for arch in ("gpt2", "llama", "gpt_neox", "gptj", "qwen2"):
        lm = tiny_lm(arch, n_layer=4)
        C0 = {l: ek.second_moment(lm, l, TINY_TEXT, n_samples=None, cache=False, progress=False) for l in range(4)}
        T.update({f"{arch}/C0/{l}": c for l, c in C0.items()})
        editors = {"ROME": ek.ROME(layer=1, values=vc, **fast),
                   "MEMIT": ek.MEMIT(layers=[1, 2], mom2_update_weight=100.0, values=vc, **fast),
                   "EMMET": ek.EMMET(layers=[1, 2], lambda_e=0.1, values=vc, **fast)}
        for name, ed in editors.items():
            edit = ed.apply(lm, reqs[:3], stats=C0, progress=False)
            T.update({f"{arch}/{name}/delta/{l}": d for l, d in edit.deltas.items()})
            T[f"{arch}/{name}/targets"] = edit.targets
            edit.undo()
        prefixes = ek.context_prefixes(lm, 2, 4, 0)
        nll = sorted(ek.optimize_values(lm, reqs, 1, prefixes, ek.ValueConfig(v_steps=1)).nll_init.tolist())
        for j, stop in enumerate([(a + b) / 2 for a, b in zip(nll, nll[1:])] + [nll[-1] + 1, 0.05]):
            for cache in (True, False):  # freezes j of 4 requests at the start: every re-pad path
                cfg = ek.ValueConfig(v_steps=8, v_lr=0.5, stop_nll=stop, cache_prefix=cache)
                _values(T, f"{arch}/values/stop{j}/cache{int(cache)}", ek.optimize_values(lm, reqs, 1, prefixes, cfg))
        cfg = ek.ValueConfig(v_steps=5, v_batch_size=2, kl_factor=0.5, v_weight_decay=0.1, clamp_norm_factor=0.5)
        _values(T, f"{arch}/values/chunked", ek.optimize_values(lm, reqs, 2, prefixes, cfg))


def capture_world(T: dict, out: Path, quick: bool) -> None:
    import editkit as ek
    from editkit import experiments, tracing

    tmp = tempfile.mkdtemp()
    for model, preset in [("world-gpt2-mini", "world-gpt2")] + ([] if quick else [("world-llama-mini", "world-llama")]):
        lm = ek.load_model(model, device="cpu")
        recs = ek.load_counterfact("world:small", n=12, seed=0)
        kw = dict(corpus="world:small", n_samples=200, v_steps=10)
        for name, n in (("ROME", 1), ("MEMIT", 4), ("EMMET", 4)):
            ed = getattr(ek, name).preset(preset, **kw)
            with ed.applied(lm, recs[:n], progress=False) as edit:
                T.update({f"{model}/{name}/delta/{l}": d for l, d in edit.deltas.items()})
                ek.evaluate(lm, recs, progress=False).to_csv(out / f"{model}-{name}-eval.csv", index=False)
        ek.evaluate(lm, recs, progress=False).to_csv(out / f"{model}-pre-eval.csv", index=False)
        memit = ek.MEMIT.preset(preset, corpus="world:small")
        prefixes = ek.context_prefixes(lm, memit.n_prefixes, memit.prefix_len, memit.seed)
        for steps, stop in ((30, 0.05), (12, 3.0)):
            cfg = ek.ValueConfig(**{**vars(memit.values), "v_steps": steps, "stop_nll": stop})
            _values(T, f"{model}/values/s{steps}/stop{stop}",
                    ek.optimize_values(lm, [r.request for r in recs], 0, prefixes, cfg))
        frames = {
            "layer_sweep": experiments.layer_sweep(lm, recs, ["ROME", "MEMIT"], layers=[0, 1], n_edits=2, preset=preset,
                                                   editor_kwargs=kw, root=tmp, progress=False),
            "batch_sweep": experiments.batch_sweep(lm, recs, ["MEMIT", "EMMET"], layer=0, batch_sizes=[2, 4],
                                                   preset=preset, regs={"MEMIT": [10.0, 100.0], "EMMET": [0.1, 1.0]},
                                                   editor_kwargs=kw, root=tmp, progress=False),
            "sequential": experiments.sequential_batched(lm, recs, ["MEMIT", "EMMET"], layer=0, batch_sizes=[1, 2],
                                                         total_edits=4, preset=preset, editor_kwargs=kw, root=tmp,
                                                         heldout=experiments.heldout_texts("world:small", n=8),
                                                         progress=False),
            "importance": tracing.layer_importance(lm, recs[:4], samples=3, per_record=True, progress=False),
        }
        r = recs[0].request
        for kind in ("mlp", "block", "attn"):
            frames[f"trace-{kind}"] = tracing.causal_trace(lm, r.prompt, r.subject, r.target_true, kind=kind, samples=3)
        for name, f in frames.items():
            f = f.drop(columns=[c for c in f.columns if "seconds" in c or c.startswith("time_")])
            f.to_csv(out / f"{model}-{name}.csv", index=False)
        raw = json.loads((ek.world.world_model_path(model) / "counterfact.json").read_text())[:60]
        acc = {w: ek.world.fact_accuracy(lm.model, lm.tokenizer, raw, which=w) for w in ("rewrite", "paraphrase")}
        (out / f"{model}-accuracy.json").write_text(json.dumps(acc))


def capture(out: Path, quick: bool) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    T: dict[str, torch.Tensor] = {}
    capture_tiny(T)
    capture_world(T, out, quick)
    save_file({k: v.contiguous() for k, v in T.items()}, str(out / "tensors.safetensors"))
    print(f"{len(T)} tensors and {len(list(out.glob('*.csv')))} frames in {out}")


def compare(a: Path, b: Path) -> int:
    import pandas as pd
    from safetensors.torch import load_file

    A, B = load_file(str(a / "tensors.safetensors")), load_file(str(b / "tensors.safetensors"))
    bad = [k for k in sorted(A.keys() | B.keys()) if k not in A or k not in B or not torch.equal(A[k], B[k])]
    for k in bad:
        print("tensor differs or is missing:", k)
    files = sorted({p.name for p in a.glob("*.csv")} | {p.name for p in b.glob("*.csv")})
    for name in files:
        try:
            pd.testing.assert_frame_equal(pd.read_csv(a / name), pd.read_csv(b / name), check_exact=True)
        except (AssertionError, FileNotFoundError) as exc:
            bad.append(name)
            print("frame differs:", name, str(exc).splitlines()[:3])
    for p in sorted(a.glob("*.json")):
        if not (b / p.name).exists() or json.loads(p.read_text()) != json.loads((b / p.name).read_text()):
            bad.append(p.name)
            print("differs:", p.name, p.read_text(), (b / p.name).read_text() if (b / p.name).exists() else "missing")
    print(f"{len(A)} tensors, {len(files)} frames compared: {len(bad)} differ")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("out", type=Path)
    cap.add_argument("--quick", action="store_true", help="skip the llama miniature world")
    cmp = sub.add_parser("compare")
    cmp.add_argument("old", type=Path)
    cmp.add_argument("new", type=Path)
    args = parser.parse_args()
    if args.command == "capture":
        capture(args.out, args.quick)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
