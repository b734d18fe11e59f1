"""Command line: ``editkit figures`` regenerates every figure; ``editkit world build``
builds the embedded world models; ``editkit methods`` lists the editing methods and
their settings (from a preset with ``--preset``), as the runners would build them.

``figures`` executes each parameterized notebook in ``notebooks/`` with papermill
(their defaults, or tiny parameters with ``--quick``), writes the executed copies
to ``<runs>/notebooks/`` and the figures to ``figures/``, and exits non-zero
naming every notebook that failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("editkit")

#: Notebooks in the order ``figures`` runs them (the world notebook first: it builds the models).
NOTEBOOKS = ["world.ipynb", "quickstart.ipynb", "layer_sweep.ipynb", "batch_editing.ipynb",
             "sequential_batched.ipynb", "explore.ipynb"]

#: Tiny parameters for ``--quick`` (seconds per notebook, on the miniature world).
_MINI = dict(model="world-gpt2-mini", dataset="world:small", corpus="world:small")
QUICK = {
    "world.ipynb": dict(models=["world-gpt2-mini", "world-llama-mini"], dataset="world:small", corpus="world:small",
                        n_facts=6, n_trace=2),
    "quickstart.ipynb": dict(_MINI, n_records=4),
    "layer_sweep.ipynb": dict(_MINI, methods=["ROME", "MEMIT"], n_edits=2, layers=[0, 1], trace=True),
    "batch_editing.ipynb": dict(_MINI, batch_sizes=[2, 4], layer=1, reg_batch_size=4,
                                regs={"MEMIT": [10.0, 100.0], "EMMET": [0.1, 1.0]}),
    "sequential_batched.ipynb": dict(_MINI, batch_sizes=[2, 4], total_edits=4, layer=1, compare_batch_sizes=[2],
                                     compare_methods=["MEMIT", "AlphaEdit"], one_at_a_time=["r-ROME"],
                                     checkpoint_every=2),
    "explore.ipynb": dict(model="world-gpt2-mini", corpus="world:small"),
}


def find_notebooks_dir(start: Path | None = None) -> Path:
    """``notebooks/`` of the repository (cwd or the package's checkout)."""
    for base in [start or Path.cwd(), Path(__file__).resolve().parents[1]]:
        if (base / "notebooks").is_dir():
            return base / "notebooks"
    raise FileNotFoundError("no notebooks/ folder found; run `editkit figures` from the repository root "
                            "or pass --notebooks PATH")


def run_notebooks(names: list[str], notebooks: Path, figures: Path, runs: Path, quick: bool,
                  extra: dict | None = None, timeout: int | None = None) -> list[str]:
    """Execute ``names`` with papermill; returns the names that failed."""
    import papermill as pm

    out_dir = runs / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        params = dict(QUICK.get(name, {})) if quick else {}
        params.update(figures_dir=str(figures.resolve()), runs_dir=str(runs.resolve()))
        params.update(extra or {})
        t0 = time.perf_counter()
        log.info("running %s with %s", name, params)
        try:
            pm.execute_notebook(str(notebooks / name), str(out_dir / name), parameters=params,
                                cwd=str(notebooks), kernel_name="python3", progress_bar=False,
                                execution_timeout=timeout)
            log.info("%s finished in %.0f s", name, time.perf_counter() - t0)
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
            log.error("%s FAILED after %.0f s: %s", name, time.perf_counter() - t0, str(exc).splitlines()[0:3])
            failed.append(name)
    return failed


def describe_methods(preset: str | None = None) -> str:
    """One line per registered method: its constraint, aliases and (with ``preset``) settings."""
    from .editors import METHODS, make_editor

    lines = []
    for name, cls in METHODS.items():
        aliases = ", ".join(f"{a}={f}" for a, f in cls.aliases.items()) or "-"
        line = f"{name:8s} constraint={cls.constraint}  aliases: {aliases}"
        if preset is not None:
            try:
                editor = make_editor(name, preset=preset)
                line += "\n    " + json.dumps({k: v for k, v in editor.to_dict().items() if k != "method"})
            except KeyError as exc:
                line += f"\n    (not in preset {preset!r}: {exc})"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="execute every notebook and regenerate figures/")
    fig.add_argument("--quick", action="store_true", help="tiny parameters on the miniature world (seconds)")
    fig.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks")
    fig.add_argument("--notebooks", type=Path, default=None)
    fig.add_argument("--figures", type=Path, default=Path("figures"))
    fig.add_argument("--runs", type=Path, default=Path("runs"))
    fig.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    world = sub.add_parser("world", help="the embedded world")
    world.add_argument("action", choices=["build"])
    world.add_argument("--models", nargs="+", default=["world-gpt2", "world-llama"])
    methods = sub.add_parser("methods", help="list the editing methods and their settings")
    methods.add_argument("--preset", default=None, help="show the settings this preset gives each method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.command == "world":
        from .world import WORLD_MODELS, build_world

        bad = [m for m in args.models if m not in WORLD_MODELS]
        if bad:
            parser.error(f"unknown world model(s) {', '.join(bad)}; valid names: {', '.join(sorted(WORLD_MODELS))}")
        for path in build_world(args.models, progress=True):
            print(path)
        return 0

    if args.command == "methods":
        print(describe_methods(args.preset))
        return 0

    if args.notebooks is not None and not args.notebooks.is_dir():
        parser.error(f"--notebooks {args.notebooks}: no such folder")
    notebooks = args.notebooks or find_notebooks_dir()
    names = args.only or [n for n in NOTEBOOKS if (notebooks / n).exists()]
    unknown = [n for n in names if not (notebooks / n).exists()]
    if unknown:
        parser.error(f"no such notebook(s) in {notebooks}: {', '.join(unknown)}")
    if not names:
        parser.error(f"no notebooks to run in {notebooks} (expected {', '.join(NOTEBOOKS)})")
    if args.quick and args.figures == Path("figures"):
        args.figures = args.runs / "quick-figures"  # quick figures never overwrite the real ones
    failed = run_notebooks(names, notebooks, args.figures, args.runs, args.quick, timeout=args.timeout)
    if failed:
        print(f"editkit figures: {len(failed)} notebook(s) failed: {', '.join(failed)} "
              f"(executed copies with the error in {args.runs / 'notebooks'})", file=sys.stderr)
        return 1
    print(f"editkit figures: {len(names)} notebook(s) ran; figures in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
