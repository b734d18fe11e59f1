"""One call that sets up a parameterized notebook (``notebooks/*.ipynb``).

Every notebook's first code cell (tagged ``parameters``) declares its parameters with
type annotations, which papermill shows with ``papermill --help-notebook``; the next
cell calls :func:`setup` on the notebook's globals::

    nb = ek.notebook.setup(globals())   # check parameters, resolve folders, logging, load the model
    lm, preset, editor_kwargs = nb.lm, nb.preset, nb.editor_kwargs

Why one helper: the notebooks had the same setup cell copied six times, and what a
newcomer trips over lives exactly there — papermill passes ``-p methods "['ROME']"`` as
a *string*, relative output folders landed outside the repository when papermill ran
from another directory, and INFO logs showed up as red stderr boxes in JupyterLab.
"""
from __future__ import annotations

import ast
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["setup", "Setup", "check_parameters", "coerce", "repo_root", "resolve_dir", "configure_logging",
           "ParameterError", "SMOKE_TEST_NOTE"]

log = logging.getLogger(__name__)

#: The note stamped on every figure of a ``quick`` (smoke-test) run.
SMOKE_TEST_NOTE = "QUICK smoke test (tiny parameters, miniature world): checks the pipeline, not a result"


class ParameterError(ValueError):
    """A notebook parameter has a value of the wrong type."""


def repo_root() -> Path:
    """The editkit checkout this package lives in (the folder with ``pyproject.toml`` and
    ``notebooks/``); for an installed package without a checkout, the working directory."""
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file() and (here / "notebooks").is_dir():
        return here
    return Path.cwd()


def resolve_dir(path: str | Path) -> Path:
    """``path`` made absolute: relative paths are taken relative to the repository
    (:func:`repo_root`), not the working directory, so ``figures_dir="figures"`` means
    the repository's ``figures/`` wherever papermill or Jupyter was started."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` of parameter ``name`` checked against annotation ``tp`` (``int``,
    ``float``, ``bool``, ``str``, ``list[...]``, ``dict[...]``, ``Optional[...]``).

    A string where a list, dict, number or bool is expected is read as a Python
    literal, because papermill's ``-p`` passes ``"['ROME', 'MEMIT']"`` as text; a
    value that does not fit raises :class:`ParameterError` naming the parameter."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is __import__("types").UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, a)
            except ParameterError as exc:
                errors.append(str(exc))
        raise ParameterError(errors[0] if len(errors) == 1 else f"parameter {name}={value!r} fits none of "
                             f"{_type_name(tp)}")
    base = origin or tp
    if isinstance(value, str) and base is not str:
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            if base is list and args and args[0] is str and "'" not in value and '"' not in value:
                # ROME,MEMIT or [ROME, MEMIT]: what is left of ['ROME','MEMIT'] after a shell ate the quotes
                value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
            else:
                raise ParameterError(_wrong(name, value, tp)) from None
    if base is bool:
        if not isinstance(value, bool):
            raise ParameterError(_wrong(name, value, tp))
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(_wrong(name, value, tp))
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(_wrong(name, value, tp))
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ParameterError(_wrong(name, value, tp))
        return value
    if base in (list, tuple, typing.Sequence):
        if isinstance(value, range):
            value = list(value)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # -p layers 8 is layers [8]
        if not isinstance(value, (list, tuple)):
            raise ParameterError(_wrong(name, value, tp))
        inner = args[0] if args else Any
        return [coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if base is dict:
        if not isinstance(value, dict):
            raise ParameterError(_wrong(name, value, tp))
        kt, vt = args if args else (Any, Any)
        return {coerce(f"{name} key", k, kt): coerce(f"{name}[{k!r}]", v, vt) for k, v in value.items()}
    return value


def _wrong(name: str, value: Any, tp: Any) -> str:
    hint = ""
    if typing.get_origin(tp) in (list, dict) or tp in (list, dict):
        hint = (f"; from the command line pass a Python literal, e.g. -p {name} \"['ROME', 'MEMIT']\"" if
                (typing.get_origin(tp) or tp) is list else f"; pass a Python dict literal, e.g. -p {name} "
                "\"{'MEMIT': [10.0, 100.0]}\"")
    return f"parameter {name}={value!r} must be {_type_name(tp)}{hint}"


#: Notebook parameters that name editing methods (a name or a list of names).
METHOD_PARAMETERS = ("method", "methods", "compare_methods", "one_at_a_time")


def check_editing_parameters(ns: dict) -> None:
    """The method names, the preset and ``editor_kwargs`` checked against the editors, so a
    typo fails before the model is loaded (minutes on a real model), naming the parameter."""
    from .editors import METHODS, available_presets

    used: list[str] = []
    for key in METHOD_PARAMETERS:
        names = ns.get(key)
        if names is None:
            continue
        names = [names] if isinstance(names, str) else list(names)
        bad = [m for m in names if m not in METHODS]
        if bad:
            raise ParameterError(f"parameter {key}={names!r}: unknown method(s) {bad}; choose from {sorted(METHODS)}")
        used += names
    preset = ns.get("preset")
    if preset is not None and preset not in available_presets() and not (
            str(preset).endswith(".json") and Path(preset).expanduser().is_file()):
        raise ParameterError(f"parameter preset={preset!r}: no such preset; choose from {available_presets()} "
                             "or pass the path of a preset JSON file")
    kwargs = dict(ns.get("editor_kwargs") or {})
    for m in dict.fromkeys(used):
        try:
            METHODS[m].params(kwargs)
        except TypeError as exc:
            raise ParameterError(f"parameter editor_kwargs={kwargs!r}: {exc}") from None


def check_parameters(ns: dict) -> dict:
    """Check (and normalize in place) every annotated parameter in the namespace ``ns``
    (a notebook's ``globals()``) against its annotation; returns the parameters."""
    out = {}
    for name, tp in dict(ns.get("__annotations__", {})).items():
        if name in ns:
            ns[name] = out[name] = coerce(name, ns[name], tp)
    return out


class _PlainFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(levelname)s %(name)s: %(message)s")


def configure_logging(level: str | int = "WARNING") -> None:
    """Log to stdout (rendered as plain output in Jupyter, not as a red stderr box) at
    ``level``; WARNING by default, so a notebook shows warnings and results only."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_editkit_notebook", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_PlainFormatter())
    handler._editkit_notebook = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())


@dataclass
class Setup:
    """What :func:`setup` prepared: the model(s), the preset name and editor settings."""

    lm: Any = None
    lms: dict = field(default_factory=dict)
    preset: str | None = None
    editor_kwargs: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)

    def corpus(self, method: str = "ROME") -> Any:
        """The C0 corpus the editors will use: the ``corpus`` parameter, else the preset's."""
        if "corpus" in self.editor_kwargs:
            return self.editor_kwargs["corpus"]
        if self.preset:
            from .editors import make_editor

            try:
                return getattr(make_editor(method, None, self.preset), "corpus", None)
            except (KeyError, ValueError):
                return None
        return None

    def layers(self, method: str = "MEMIT") -> list[int]:
        """The layers the preset (or ``editor_kwargs``) edits with ``method``; without either,
        a :class:`ParameterError` asking for ``layers`` (no study edits a layer nobody chose)."""
        from .editors import make_editor

        kw = dict(self.editor_kwargs)
        try:
            return list(make_editor(method, kw.pop("layers", None), self.preset, **kw).layers)
        except ValueError as exc:
            if self.preset is not None or "layers" in self.editor_kwargs:
                raise
            raise ParameterError(f"layers: no preset names the layers to edit for this model; pass them, "
                                 f"e.g. -p layers 8 (or -p layers '[4, 5, 6]'), or a preset ({exc})") from None

    def records(self, dataset: str, n: int, seed: int = 0, *, unique_subjects: bool = True,
                method: str = "ROME") -> list:
        """``n`` records of ``dataset`` to edit and score (``ek.load_counterfact``, shuffled by
        ``seed``). When C0 comes from an offline CounterFact corpus (``counterfact-text``,
        ``offline-text``), only the eval half is used (``corpora.scoring_records``): C0 must
        never have read a fact that is edited and scored."""
        from .corpora import is_offline_corpus, scoring_records
        from .data import load_counterfact

        corpus = self.corpus(method)
        if not is_offline_corpus(corpus) or str(corpus).startswith("model-text"):
            recs = load_counterfact(dataset, n=n, seed=seed, unique_subjects=unique_subjects)
        else:
            recs = scoring_records(load_counterfact(dataset, seed=seed, unique_subjects=unique_subjects))
            if len(recs) < n:
                raise ValueError(f"n={n} records asked for, but {dataset!r} has only {len(recs)} in the eval half "
                                 f"that corpus={corpus!r} leaves for scoring; lower the notebook's record count")
            recs = recs[:n]
        _note_records(dataset, recs)
        return recs

    def protocol(self, methods: typing.Sequence[str] = ("ROME",)) -> str | None:
        """The protocol the editors of ``methods`` run under (preset and ``editor_kwargs``
        applied): its name, ``"mixed"`` when they differ, None when none can be built."""
        from .editors import make_editor

        found = set()
        for m in methods:
            try:
                ed = make_editor(m, preset=self.preset, **self.editor_kwargs) if self.preset else \
                    make_editor(m, layers=[0], **self.editor_kwargs)
            except (KeyError, ValueError, TypeError):
                continue
            found.add(ed.protocol if isinstance(ed.protocol, str) else "custom")
        return found.pop() if len(found) == 1 else ("mixed" if found else None)

    def figure(self, kind: str, *, methods: typing.Sequence[str] | None = None, layers: Any = None,
               batch_sizes: Any = None, n: int | None = None, model: str | None = None,
               **extra: Any) -> tuple[str, str]:
        """``(file stem, caption)`` of a figure of this notebook: the stem carries everything
        that changes the figure (model, methods, layers, batch sizes, protocol, dataset, n,
        ``extra``), the caption names model, layer(s), protocol, dataset and n
        (:func:`editkit.plots.figure_name`, :func:`editkit.plots.caption`)."""
        from . import plots

        model = model or (self.lm.name if self.lm is not None else "model")
        protocol = self.protocol(methods) if methods else None  # tracing figures: no editor, no protocol
        dataset = self.parameters.get("dataset")
        name = plots.figure_name(kind, model, methods=methods, layers=layers, batch_sizes=batch_sizes,
                                 protocol=protocol, dataset=dataset, n=n, **extra)
        return name, plots.caption(model, layers=layers, protocol=protocol, dataset=dataset, n=n)

    def __repr__(self) -> str:  # what the setup cell displays
        from ._version import __version__

        models = ", ".join(f"{lm.name} ({lm.n_layers} layers, {lm.device})" for lm in self.lms.values())
        return f"{models or 'no model'} | preset {self.preset} | editkit {__version__}"


def _note_records(dataset: str, recs: list) -> None:
    """The records' content hash in the run log (editkit.runlog), for the run's report."""
    from . import runlog

    if os.environ.get(runlog.ENV):
        from .experiments import records_digest

        runlog.note("records", dataset=str(dataset), n=len(recs), sha256=records_digest(recs))


def _note_model(lm: Any) -> None:
    """The loaded model's weight fingerprint in the run log, for the run's report."""
    from . import runlog

    if os.environ.get(runlog.ENV):
        from .saved import weights_fingerprint

        runlog.note("model", name=lm.name, weights_fingerprint=weights_fingerprint(lm), n_layers=lm.n_layers,
                    dtype=str(lm.dtype), device=str(lm.device))


def setup(ns: dict, *, load: bool = True) -> Setup:
    """Set up a notebook from its parameters (its ``globals()``, changed in place):

    1. check every annotated parameter (:func:`check_parameters`), so a wrong type fails
       here naming the parameter, not three cells later, and the method names, preset and
       ``editor_kwargs`` (:func:`check_editing_parameters`), before the model is loaded;
    2. resolve ``figures_dir`` / ``runs_dir`` relative to the repository (:func:`resolve_dir`);
    3. log to plain output at ``log_level`` (default WARNING);
    4. with ``quick`` set, stamp every saved figure as a smoke test (:data:`SMOKE_TEST_NOTE`);
    5. load ``model`` (or each of ``models``) with ``device``/``dtype``, and pick the preset
       (``preset``, else the one named like the model) and the editor settings (``corpus``,
       ``editor_kwargs``).
    """
    params = check_parameters(ns)
    check_editing_parameters(ns)  # before any model is loaded
    configure_logging(ns.get("log_level") or "WARNING")
    for key in ("figures_dir", "runs_dir"):
        if ns.get(key) is not None:
            ns[key] = str(resolve_dir(ns[key]))
    from . import plots

    plots.set_note(SMOKE_TEST_NOTE if ns.get("quick") else None)
    out = Setup(parameters=params)
    out.editor_kwargs = dict(ns.get("editor_kwargs") or {})
    if ns.get("corpus"):
        out.editor_kwargs["corpus"] = ns["corpus"]
    if not load:
        return out
    from transformers.utils import logging as hf_logging

    from .editors import preset_for
    from .models import load_model

    hf_logging.disable_progress_bar()  # "Loading weights" bars of a few ms each, in every setup cell

    kw = {k: ns[k] for k in ("device", "dtype") if ns.get(k) is not None}
    if ns.get("model"):
        out.lm = load_model(ns["model"], **kw)
        out.lms = {out.lm.name: out.lm}
        out.preset = ns.get("preset") or preset_for(out.lm.name)
    for name in ns.get("models") or []:
        out.lms[name] = load_model(name, **kw)
    for lm in out.lms.values():
        _note_model(lm)
    return out
