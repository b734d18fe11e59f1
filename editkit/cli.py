"""Command line: ``editkit figures`` regenerates every figure; ``editkit run NOTEBOOK``
runs one notebook with other parameters into a run folder ``runs/NAME-KEY/`` (executed copy
and figures); ``editkit report RUN`` turns a run into one HTML page; ``editkit world build`` retrains the embedded
world models; ``editkit methods`` lists the editing methods and their settings (from a
preset with ``--preset``), as the runners would build them.

``figures`` executes each parameterized notebook in ``notebooks/`` with papermill
(their defaults, or tiny parameters with ``--quick``), writes the executed copies
to ``<runs>/notebooks/`` and the figures to ``figures/`` (the only command that writes
there; ``run`` writes into its own run folder), prints one line per notebook
(start, finish, elapsed) under an overall progress bar, and exits non-zero naming
every notebook that failed. Relative folders are relative to the repository.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("editkit")

#: Notebooks in the order ``figures`` runs them.
NOTEBOOKS = ["world.ipynb", "quickstart.ipynb", "layer_sweep.ipynb", "batch_editing.ipynb",
             "sequential_batched.ipynb", "explore.ipynb"]

#: Tiny parameters for ``--quick`` (seconds per notebook, on the miniature world).
_MINI = dict(model="world-gpt2-mini", dataset="world:small", corpus="world:small")
QUICK = {
    "world.ipynb": dict(models=["world-gpt2-mini", "world-llama-mini"], dataset="world:small", corpus="world:small",
                        n_facts=6, n_trace=2),
    "quickstart.ipynb": dict(_MINI, n_records=4),
    # the mini models have 2 layers: edit layer 0 (editing the last layer is warned against)
    "layer_sweep.ipynb": dict(_MINI, methods=["ROME", "MEMIT"], n_edits=2, layers=[0], trace=True),
    "batch_editing.ipynb": dict(_MINI, batch_sizes=[2, 4], layers=[0], reg_batch_size=4,
                                regs={"MEMIT": [10.0, 100.0], "EMMET": [0.1, 1.0]}),
    "sequential_batched.ipynb": dict(_MINI, batch_sizes=[2, 4], total_edits=4, layers=[0], compare_batch_sizes=[2],
                                     compare_methods=["MEMIT", "AlphaEdit"], one_at_a_time=["unified-ROME"],
                                     checkpoint_every=2),
    "explore.ipynb": dict(model="world-gpt2-mini", corpus="world:small"),
}


def find_notebooks_dir(start: Path | None = None) -> Path:
    """``notebooks/`` of the repository this package belongs to (else of ``start``/the cwd)."""
    from .notebook import repo_root

    for base in [repo_root(), start or Path.cwd()]:
        if (base / "notebooks").is_dir():
            return base / "notebooks"
    raise FileNotFoundError("no notebooks/ folder found; run `editkit figures` from the repository root "
                            "or pass --notebooks PATH")


def _quiet_kernel_warnings() -> None:
    """The kernel client's notices that are not about the notebook: jupyter_client warns
    that its TCP connection is unencrypted on every kernel start, and the kernel's
    frozen-module debugger note on stderr."""
    warnings.filterwarnings("ignore", message=".*TCP.*")
    warnings.filterwarnings("ignore", message=".*frozen modules.*")
    for name in ("papermill", "papermill.translators", "traitlets", "jupyter_client", "nbclient"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _notebook_parameters(path: Path) -> set[str]:
    from papermill.inspection import inspect_notebook

    return set(inspect_notebook(str(path)))


def run_key(name: str, params: dict) -> str:
    """The key of a notebook run: sha256 of the notebook's name and its parameters (output folders
    left out), so the same run lands in the same run folder and another run in another."""
    import hashlib

    kept = {k: v for k, v in params.items() if k not in ("figures_dir", "runs_dir")}
    return hashlib.sha256(json.dumps({"notebook": name, "parameters": kept}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def _cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and its finished children (the notebook kernels)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _annotate(path: Path, name: str, key: str, log_file: Path, cpu: float | None) -> None:
    """Store what the run was computed from in the executed notebook's metadata (``editkit``):
    run key, the run log (models' fingerprints, records' hashes), versions, CPU time, host."""
    import platform

    from . import runlog

    if not path.is_file():
        return
    nb = json.loads(path.read_text(encoding="utf-8"))
    nb.setdefault("metadata", {})["editkit"] = {
        "notebook": name, "run_key": key, "log": runlog.read(log_file), "versions": runlog.versions(),
        "cpu_seconds": cpu, "host": platform.node()}
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def run_notebooks(names: list[str], notebooks: Path, figures: Path, runs: Path, quick: bool,
                  extra: dict | None = None, timeout: int | None = None, progress: bool = True,
                  out_dir: Path | None = None, outputs: dict[str, Path] | None = None) -> list[str]:
    """Execute ``names`` with papermill; returns the names that failed. Prints one line
    per notebook when it starts and when it ends (with its elapsed time), under an
    overall progress bar. Each executed copy goes to ``outputs[name]`` if given, else
    ``out_dir/name`` (failed or not: the copy is where the traceback is)."""
    import os

    import papermill as pm
    from tqdm.auto import tqdm

    from .notebook import repo_root

    _quiet_kernel_warnings()
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # the kernel's frozen-modules debugger note
    # the kernels' progress bars as text: a widget bar is saved as its first frame, a frozen "0%"
    if not os.environ.get("EDITKIT_PROGRESS"):
        os.environ["EDITKIT_PROGRESS"] = "text"
    root = repo_root()
    if (root / "editkit" / "__init__.py").exists():  # the kernel imports this checkout's editkit, as the CLI does
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    out_dir = out_dir or runs / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    t_all = time.perf_counter()
    bar = tqdm(total=len(names), desc="notebooks", unit="nb", disable=not progress, file=sys.stdout,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    for k, name in enumerate(names, 1):
        params = dict(QUICK.get(name, {}), quick=True) if quick else {}
        params.update(figures_dir=str(figures.resolve()), runs_dir=str(runs.resolve()))
        params.update(extra or {})
        known = _notebook_parameters(notebooks / name)
        unknown = sorted(set(params) - known)
        params = {k_: v for k_, v in params.items() if k_ in known or k_ in (extra or {})}
        if unknown and set(unknown) - {"figures_dir", "runs_dir", "quick"}:
            log.warning("%s has no parameter(s) %s", name, ", ".join(unknown))
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        bar.write(f"[{k}/{len(names)}] {name}: started {time.strftime('%H:%M:%S')}")
        out = (outputs or {}).get(name, out_dir / name)
        log_file = out.with_name(f".{out.stem}.runlog.jsonl")
        log_file.unlink(missing_ok=True)
        os.environ["EDITKIT_RUN_LOG"] = str(log_file)  # the kernel inherits it (editkit.runlog)
        try:
            pm.execute_notebook(str(notebooks / name), str(out), parameters=params,
                                cwd=str(notebooks), kernel_name="python3", progress_bar=False,
                                execution_timeout=timeout, log_output=False,
                                # the kernel's own log: its per-start "running over TCP without encryption"
                                # warning is about the local kernel transport, not the notebook
                                extra_arguments=["--IPKernelApp.log_level=ERROR"])
            bar.write(f"[{k}/{len(names)}] {name}: finished in {_elapsed(time.perf_counter() - t0)}")
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            bar.write(f"[{k}/{len(names)}] {name}: FAILED after {_elapsed(time.perf_counter() - t0)}: "
                      f"{' | '.join(lines[-2:])}")
            failed.append(name)
        finally:
            os.environ.pop("EDITKIT_RUN_LOG", None)
            cpu1 = _cpu_seconds()
            _annotate(out, name, run_key(name, params), log_file,
                      None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
            log_file.unlink(missing_ok=True)
        bar.update(1)
    bar.close()
    log.info("%d notebook(s) in %s", len(names), _elapsed(time.perf_counter() - t_all))
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


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def parse_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value: a Python literal (``100``, ``None``, ``['ROME', 'MEMIT']``)
    when it parses as one, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="execute every notebook and regenerate figures/")
    fig.add_argument("--quick", action="store_true", help="tiny parameters on the miniature world (seconds)")
    fig.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks")
    fig.add_argument("--notebooks", type=Path, default=None)
    fig.add_argument("--figures", type=Path, default=Path("figures"), help="relative to the repository")
    fig.add_argument("--runs", type=Path, default=Path("runs"), help="relative to the repository")
    fig.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    run = sub.add_parser("run", help="run one notebook with other parameters",
                         description="Run notebooks/NOTEBOOK.ipynb with papermill; the executed copy goes to "
                         "runs/notebooks/NOTEBOOK.ipynb (or --out). Values are Python literals when they parse "
                         "as one: -p n_edits 100 -p methods \"['ROME', 'MEMIT']\" -p model gpt2-xl. "
                         "List a notebook's parameters with --help-notebook.")
    run.add_argument("notebook", help="name in notebooks/ (with or without .ipynb) or a path")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    run.add_argument("--quick", action="store_true", help="start from the notebook's --quick parameters")
    run.add_argument("--out", type=Path, default=None,
                     help="executed notebook (default runs/NAME-KEY/NAME.ipynb, KEY a hash of the parameters)")
    run.add_argument("--figures", type=Path, default=None,
                     help="where its figures go (default: figures/ beside the executed notebook, never the "
                     "repository's figures/ unless asked: --figures figures)")
    run.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    run.add_argument("--help-notebook", action="store_true", help="list the notebook's parameters and exit")
    world = sub.add_parser("world", help="the embedded world: retrain its models from the code",
                           description="Retrain the embedded world models into the user cache ($EDITKIT_CACHE/world) "
                           "and report whether the weights equal the ones shipped in the package. "
                           "Load a rebuild with ek.load_model(<printed directory>).")
    world.add_argument("action", choices=["build"])
    world.add_argument("--models", nargs="+", default=["world-gpt2", "world-llama"])
    world.add_argument("--force", action="store_true", help="retrain even when the cache has a build")
    world.add_argument("--ship", action="store_true",
                       help="maintainers: copy the builds into editkit/world/models (then commit them)")
    report = sub.add_parser("report", help="one self-contained HTML page of a run",
                            description="Write RUN/report.html: the executed notebook with its figures embedded, "
                            "its parameters, run key, records' hash, model fingerprint, package versions and CPU "
                            "time. RUN is a run folder of `editkit run` or an executed .ipynb.")
    report.add_argument("run", type=Path)
    report.add_argument("--out", type=Path, default=None, help="the HTML file (default RUN/report.html)")
    methods = sub.add_parser("methods", help="list the editing methods and their settings")
    methods.add_argument("--preset", default=None, help="show the settings this preset gives each method")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _quiet_kernel_warnings()

    if args.command == "world":
        from .world import WORLD_MODELS, build_world, ship_world

        bad = [m for m in args.models if m not in WORLD_MODELS]
        if bad:
            parser.error(f"unknown world model(s) {', '.join(bad)}; valid names: {', '.join(sorted(WORLD_MODELS))}")
        built = ship_world(args.models) if args.ship else build_world(args.models, force=args.force)
        for name, path in built.items():
            print(f"{name}\t{path}")
        return 0

    if args.command == "methods":
        if args.preset is not None:
            from .editors.presets import _read_preset

            try:
                _read_preset(args.preset)
            except (KeyError, ValueError, OSError) as exc:  # no such preset, or a file that is not a preset
                parser.error(f"--preset {args.preset}: {exc.args[0] if exc.args else exc}")
        print(describe_methods(args.preset))
        return 0

    if args.command == "report":
        from .report import write_report

        try:
            path = write_report(args.run, args.out)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
        print(f"editkit report: {path}")
        return 0

    from .notebook import resolve_dir

    if args.command == "run":
        return _run_one(parser, args)

    if args.notebooks is not None and not args.notebooks.is_dir():
        parser.error(f"--notebooks {args.notebooks}: no such folder")

    notebooks = args.notebooks or find_notebooks_dir()
    if args.quick and args.figures == Path("figures"):
        args.figures = args.runs / "quick-figures"  # quick figures never overwrite the real ones
    args.figures, args.runs = resolve_dir(args.figures), resolve_dir(args.runs)
    names = args.only or [n for n in NOTEBOOKS if (notebooks / n).exists()]
    names = [n if n.endswith(".ipynb") else f"{n}.ipynb" for n in names]
    unknown = [n for n in names if not (notebooks / n).exists()]
    if unknown:
        parser.error(f"no such notebook(s) in {notebooks}: {', '.join(unknown)}")
    if not names:
        parser.error(f"no notebooks to run in {notebooks} (expected {', '.join(NOTEBOOKS)})")
    failed = run_notebooks(names, notebooks, args.figures, args.runs, args.quick, timeout=args.timeout)
    if failed:
        print(f"editkit figures: {len(failed)} notebook(s) failed: {', '.join(failed)} "
              f"(executed copies with the error in {args.runs / 'notebooks'})", file=sys.stderr)
        return 1
    print(f"editkit figures: {len(names)} notebook(s) ran; figures in {args.figures}")
    return 0


def _run_one(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .notebook import resolve_dir

    path = Path(args.notebook)
    if not path.suffix:
        path = path.with_suffix(".ipynb")
    if not path.exists():
        path = find_notebooks_dir() / path.name
    if not path.exists():
        parser.error(f"no notebook {args.notebook!r}; choose one of {', '.join(n[:-6] for n in NOTEBOOKS)}")
    known = _notebook_parameters(path)
    if args.help_notebook:
        from papermill.inspection import inspect_notebook

        print(f"Parameters of {path.name} (pass with -p NAME VALUE):")
        for name, p in inspect_notebook(str(path)).items():
            print(f"  {name}: {p['inferred_type_name']} = {p['default']}" + (f"  # {p['help']}" if p["help"] else ""))
        return 0
    params = {name: parse_value(value) for name, value in args.parameter}
    unknown = sorted(set(params) - known)
    if unknown:
        parser.error(f"{path.name} has no parameter(s) {', '.join(unknown)}; it has: {', '.join(sorted(known))}")
    quick = dict(QUICK.get(path.name, {}), quick=True) if args.quick else {}
    runs = resolve_dir("runs")
    extra = {**quick, **params}
    # the run folder: the executed copy, its figures (and report.html, from `editkit report`)
    out = args.out or runs / f"{path.stem}-{run_key(path.name, extra)}" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = resolve_dir(args.figures) if args.figures is not None else out.parent / "figures"
    failed = run_notebooks([path.name], path.parent, figures, runs, quick=False, extra=extra, timeout=args.timeout,
                           outputs={path.name: out})
    print(f"editkit run: {path.name} {'FAILED' if failed else 'ran'}; executed copy in {out}",
          file=sys.stderr if failed else sys.stdout)
    if not failed:
        print(f"  figures in {figures}; a report to share: editkit report {out.parent}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
