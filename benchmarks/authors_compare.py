"""ΔW of editkit beside the authors' own code: same model, same C0, same keys and prefixes.

The authors' repositories are public; give local copies (this script never downloads):

    git clone https://github.com/scalable-model-editing/rebuilding-rome /tmp/rebuilding-rome
    git clone https://github.com/scalable-model-editing/unified-model-editing /tmp/unified
    git -C /tmp/unified checkout cf1907f          # the commit the Llama-3 batch-editing study ran
    OMP_NUM_THREADS=1 python benchmarks/authors_compare.py \
        --rebuilding-rome /tmp/rebuilding-rome --unified /tmp/unified [--n 8] [--batch 16] [--sequential 16]

Which code each editkit method is compared with (all under protocol "reference"):

========================  ===============================================================
editkit                   the authors' code
========================  ===============================================================
``ROME``                  rebuilding-rome ``rome/`` with ``enable_prompt_keys`` (the original ROME)
``r-ROME``                rebuilding-rome ``rome/`` with its defaults (random-prefix keys: r-ROME)
``unified-ROME``          unified-model-editing ``unified_editing`` with ``alg_name="ROME"``
``MEMIT``, ``EMMET``      unified-model-editing ``unified_editing`` with that ``alg_name``
========================  ===============================================================

The authors' files are not modified: they are copied to a temporary directory where the
run-time patches in :data:`PATCHES` are applied (listed there, all about running on a CPU),
and their caches are filled with editkit's inputs so that both sides start from the same
numbers: the context templates (editkit's sampled prefixes), C0 (editkit's, with the
preset's relative ridge added, rounded to float32 as the authors store it) or, for
rebuilding-rome, C0's inverse — in float32 as their code computes it (``--c0-inverse
float32``, the default) or in float64 and then stored in float32 (``float64``).

Reported per method: ‖ΔW_editkit − ΔW_authors‖ / ‖ΔW_authors‖ for ``--n`` single edits into
the unedited model (min, median, max), for one batch of ``--batch`` facts (MEMIT, EMMET),
and after ``--sequential`` edits applied one after another (ROME, r-ROME; the accumulated
W − W0). Output: ``benchmarks/authors_compare.json`` (summaries) and a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import editkit as ek
from editkit.solver import ridge

#: Text substitutions made in the temporary copy of the authors' code (file glob, old, new, why).
PATCHES: list[tuple[str, str, str, str]] = [
    ("**/*.py", '"cuda"', '"cpu"', "device strings are hard-coded to CUDA; this runs on a CPU"),
    ("**/*.py", ".cuda()", ".cpu()", "the same, as a method call"),
    ("unified_editing/compute_z.py", "cur_out[0][", "cur_out[",
     "transformers 5 returns a GPT-2 block's output as a tensor, not as a tuple (δ is added to the block output)"),
    ("unified_editing/compute_z.py", ".output[0][", ".output[", "the same, where the loss layer's output is read"),
]
#: The authors' top-level packages (both repositories use the same names: purged between the two).
PACKAGES = ("rome", "util", "unified_editing", "dsets", "experiments")


@contextlib.contextmanager
def authors_code(src: Path) -> Iterator[Path]:
    """A patched temporary copy of ``src`` on ``sys.path`` (and the working directory, which
    their ``util/globals.py`` reads ``globals.yml`` from); removed with its modules on exit."""
    if not (src / "rome").is_dir() or not (src / "globals.yml").is_file():
        raise SystemExit(f"{src}: not a copy of the authors' repository (no rome/ or globals.yml)")
    tmp = Path(tempfile.mkdtemp(prefix="authors-"))
    dst = tmp / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "data", "*.ipynb", "notebooks", "baselines"))
    for pattern, old, new, _ in PATCHES:
        for f in dst.glob(pattern):
            text = f.read_text(errors="replace")
            if old in text:
                f.write_text(text.replace(old, new))
    cwd = os.getcwd()
    sys.path.insert(0, str(dst))
    os.chdir(dst)
    try:
        yield dst
    finally:
        os.chdir(cwd)
        sys.path.remove(str(dst))
        for name in list(sys.modules):
            if name.split(".")[0] in PACKAGES:
                del sys.modules[name]
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet(fn, *args, **kw):
    """Call the authors' function without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def _request(r: ek.EditRequest, i: int) -> dict:
    return {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new}, "case_id": i}


def _modules(lm) -> dict[str, str]:
    return dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                ln_f_module="transformer.ln_f", lm_head_module="transformer.wte")


def _value_hparams(ed: ek.Editor, lm) -> dict[str, Any]:
    v = ed.values
    return dict(layers=list(ed.layers), fact_token="subject_last", v_num_grad_steps=v.v_steps, v_lr=v.v_lr,
                v_loss_layer=lm.n_layers - 1, v_weight_decay=v.v_weight_decay, clamp_norm_factor=v.clamp_norm_factor,
                kl_factor=v.kl_factor, mom2_adjustment=True, mom2_dataset="editkit", mom2_n_samples=0,
                mom2_dtype="float32", **_modules(lm))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _conv1d(delta: torch.Tensor) -> torch.Tensor:
    """The authors' ΔW of a GPT-2 Conv1D weight (d_in × d_out) as editkit's d_out × d_in."""
    return delta.T


# --- one side each -------------------------------------------------------------------

def rebuilding_rome(src: Path, lm, editor: ek.Editor, requests: list[ek.EditRequest], C: torch.Tensor,
                    inverse: str, original: bool, sequential: bool) -> list[torch.Tensor]:
    """rebuilding-rome's ΔW per request (each into the unedited model), or the accumulated
    W − W0 after all of them in order (``sequential``). ``original``: its original-ROME mode."""
    layer = editor.layers[0]
    with authors_code(src):
        import rome.compute_u as cu
        import rome.rome_main as rm

        rm.CONTEXT_TEMPLATES_CACHE = ["{}", *[p + "{}" for p in editor.context(lm)[1:]]]
        name = f"transformer.h.{layer}.mlp.c_proj"
        inv = torch.inverse(C.float()) if inverse == "float32" else torch.inverse(C.double()).float()
        cu.inv_mom2_cache[(lm.model.config._name_or_path.replace("/", "_"), name)] = inv
        hp = rm.ROMEHyperParams(**_value_hparams(editor, lm), context_template_length_params=[[5, 10], [10, 10]],
                                enable_prompt_keys=original, enable_random_prefix_keys=not original,
                                original_implementation=True)
        W = lm.weight(layer)
        W0 = W.detach().clone()
        out = []
        try:
            for i, r in enumerate(requests):
                (u, v), = _quiet(rm.execute_rome, lm.model, lm.tokenizer, _request(r, i), hp).values()
                d = _conv1d(u.unsqueeze(1) @ v.unsqueeze(0))
                if sequential:
                    with torch.no_grad():
                        W.copy_(W + d)
                else:
                    out.append(d.detach().clone())
            if sequential:
                out.append((W.detach() - W0).clone())
        finally:
            with torch.no_grad():
                W.copy_(W0)
    return out


def unified(src: Path, lm, editor: ek.Editor, alg: str, groups: list[list[ek.EditRequest]],
            C: torch.Tensor) -> list[torch.Tensor]:
    """unified-model-editing's ΔW of each group of requests, each into the unedited model."""
    with authors_code(src):
        import unified_editing.unified_main as um
        from unified_editing.memit_hparams import UNIFIEDHyperParams

        um.CONTEXT_TEMPLATES_CACHE = [["{}"], [p + "{}" for p in editor.context(lm)[1:]]]
        model_name = lm.model.config._name_or_path.replace("/", "_")
        for layer in editor.layers:
            name = f"transformer.h.{layer}.mlp.c_proj"
            um.COV_CACHE[(model_name, name)] = C.float().cpu()
            um.COV_CACHE[(model_name, name, "preserved_keys")] = None
        hp = UNIFIEDHyperParams(**_value_hparams(editor, lm), layer_selection="all",
                                mom2_update_weight=getattr(editor, "mom2_update_weight", editor.reg)
                                if alg != "ROME" else 1, calculate_objective_value=False, update_norm_lambda=0,
                                emmet_lambda=editor.reg if alg == "EMMET" else 0.0)
        out = []
        for j, group in enumerate(groups):
            deltas = _quiet(um.execute_memit, alg, lm.model, lm.tokenizer,
                            [_request(r, j * 1000 + i) for i, r in enumerate(group)], hp)
            (adj_k, resid, *_), = deltas.values()
            out.append(_conv1d(adj_k.double() @ resid.double().T).float())
    return out


def editkit_side(lm, editor: ek.Editor, groups: list[list[ek.EditRequest]], C: torch.Tensor,
                 sequential: bool = False) -> list[torch.Tensor]:
    layer = editor.layers[0]
    stats = {layer: C.float().double()}
    if sequential:
        reqs = [r for g in groups for r in g]
        with editor.applied(lm, reqs, stats=stats, progress=False) as edit:
            return [edit.deltas[layer]]
    out = []
    for g in groups:
        with editor.applied(lm, g, stats=stats, progress=False) as edit:
            out.append(edit.deltas[layer])
    return out


def self_spread(lm, editor: ek.Editor, reqs: list[ek.EditRequest], C: torch.Tensor, base: torch.Tensor,
                method: str) -> list[dict]:
    """editkit's sequential chain against itself: run again (same process, same settings), with
    two CPU threads instead of one, and with C0 perturbed by about 0.1% (``(I + εS) C0 (I + εS)ᵀ``,
    ε = 1e-3, S a seeded symmetric matrix of unit-variance entries scaled by 1/√d, so C0 stays
    positive definite — an entry-wise perturbation of that size makes the world's C0, condition
    number 5·10⁵, indefinite): how much a chain's W − W0 moves under rounding-size changes."""
    rows, what = [], f"{len(reqs)} sequential edits (W - W0), editkit vs editkit"
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    S = torch.randn(C.shape, generator=g, dtype=torch.float64)
    A = torch.eye(C.shape[0], dtype=torch.float64) + 1e-3 * (S + S.T) / (2 * C.shape[0]) ** 0.5
    C_perturbed = (A @ C.double() @ A.T).float()
    runs = {"run again": (1, C), "2 threads": (2, C), "C0 x (1 + 0.1% noise)": (threads, C_perturbed)}
    for name, (n_threads, C_run) in runs.items():
        torch.set_num_threads(n_threads)
        lm.cache.pop("_values_memo", None)  # recompute every δ (a memo would hide the rounding)
        try:
            other = editkit_side(lm, editor, [reqs], C_run, sequential=True)[0]
        finally:
            torch.set_num_threads(threads)
        rows.append(dict(method=method, what=f"{what}: {name}", c0_inverse="-", **_summary([_rel(other, base)])))
    return rows


# --- the comparison ------------------------------------------------------------------

def _summary(d: list[float]) -> dict[str, float]:
    return {"min": min(d), "median": statistics.median(d), "max": max(d), "n": len(d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuilding-rome", type=Path, help="local copy of scalable-model-editing/rebuilding-rome")
    ap.add_argument("--unified", type=Path, help="local copy of scalable-model-editing/unified-model-editing "
                                                  "(at cf1907f)")
    ap.add_argument("--model", default="world-gpt2")
    ap.add_argument("--n", type=int, default=8, help="single edits per method")
    ap.add_argument("--batch", type=int, default=16, help="one batch of this many facts (MEMIT, EMMET; 0: none)")
    ap.add_argument("--sequential", type=int, default=0, help="a chain of this many edits (ROME, r-ROME; 0: none)")
    ap.add_argument("--c0-inverse", choices=["float32", "float64", "both"], default="both",
                    help="how rebuilding-rome's C0⁻¹ is computed (its code: float32)")
    ap.add_argument("--methods", nargs="+", default=["ROME", "r-ROME", "unified-ROME", "MEMIT", "EMMET"])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("authors_compare.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = ek.load_model(args.model)
    preset = ek.preset_for(args.model)
    records = ek.load_counterfact("world", n=max(args.n, args.batch, args.sequential), seed=0, unique_subjects=True)
    reqs = [r.request for r in records]
    singles = [[r] for r in reqs[: args.n]]
    inverses = ["float32", "float64"] if args.c0_inverse == "both" else [args.c0_inverse]
    rows = []
    for method in args.methods:
        base = ek.make_editor(method, preset=preset)
        # The preset's relative ridge goes into C itself, which both sides are given.
        editor = ek.make_editor(base, c0_ridge=0.0)
        layer = editor.layers[0]
        C = ridge(base.second_moment(lm, layer, progress=False).double(), base.c0_ridge).float()
        t0 = time.perf_counter()
        if method in ("ROME", "r-ROME"):
            if args.rebuilding_rome is None:
                continue
            mine = editkit_side(lm, editor, singles, C)
            for inverse in inverses:
                theirs = rebuilding_rome(args.rebuilding_rome, lm, editor, reqs[: args.n], C, inverse,
                                         original=method == "ROME", sequential=False)
                rows.append(dict(method=method, what=f"{args.n} single edits", c0_inverse=inverse,
                                 **_summary([_rel(a, b) for a, b in zip(mine, theirs)])))
            if args.sequential:
                mine = editkit_side(lm, editor, [reqs[: args.sequential]], C, sequential=True)
                rows += self_spread(lm, editor, reqs[: args.sequential], C, mine[0], method)
                for inverse in inverses:
                    theirs = rebuilding_rome(args.rebuilding_rome, lm, editor, reqs[: args.sequential], C, inverse,
                                             original=method == "ROME", sequential=True)
                    rows.append(dict(method=method, what=f"{args.sequential} sequential edits (W - W0)",
                                     c0_inverse=inverse, **_summary([_rel(mine[0], theirs[0])])))
        else:
            if args.unified is None:
                continue
            alg = "ROME" if method == "unified-ROME" else method
            mine, theirs = editkit_side(lm, editor, singles, C), unified(args.unified, lm, editor, alg, singles, C)
            rows.append(dict(method=method, what=f"{args.n} single edits", c0_inverse="float64",
                             **_summary([_rel(a, b) for a, b in zip(mine, theirs)])))
            if args.batch and method in ("MEMIT", "EMMET"):
                group = [reqs[: args.batch]]
                mine, theirs = editkit_side(lm, editor, group, C), unified(args.unified, lm, editor, alg, group, C)
                rows.append(dict(method=method, what=f"one batch of {args.batch}", c0_inverse="float64",
                                 **_summary([_rel(mine[0], theirs[0])])))
        print(f"{method}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for r in rows:
            if r["method"] == method:
                print(json.dumps(r), flush=True)
    meta = {"model": args.model, "preset": preset, "torch": torch.__version__, "editkit": ek.__version__,
            "threads": torch.get_num_threads(), "patches": [p[3] + f": {p[1]} -> {p[2]}" for p in PATCHES]}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print("| method | edits | C0⁻¹ (rebuilding-rome) | rel. ΔW distance (min – max) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['what']} | {r['c0_inverse']} | {r['min']:.2g} – {r['max']:.2g} |")


if __name__ == "__main__":
    main()
