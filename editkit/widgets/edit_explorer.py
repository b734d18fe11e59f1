"""EditExplorer: fill a request, press Edit, compare before and after, Undo."""
from __future__ import annotations

import html
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as widgets
import numpy as np

from ..editors import METHODS, Edit, EditError, Editor, make_editor, preset_for
from ..metrics import edit_success
from ..models import LanguageModel
from ..requests import EditRequest, RequestError
from .common import _error_html, _fig_png, _fmt, _table
from ..generation import generate
from .probes import next_token_topk, target_nll

log = logging.getLogger("editkit.widgets")

_FIELDS = ("prompt", "subject", "target_new", "target_true", "layers", "paraphrases", "neighborhood")


class _FieldError(ValueError):
    """Bad input in one widget: shown next to that widget, never raised to the user."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass
class Snapshot:
    """What the model says about one request at one moment (before or after an edit)."""

    topk: list[tuple[str, float]]
    continuations: dict[str, str]
    nll: dict[str, dict[str, list[float]]]  # kind ("rewrite"/"paraphrase"/"neighborhood") -> target -> NLLs
    scores: dict[str, float | None]  # ES, PS, NS (None when undefined)


@dataclass
class AppliedEdit:
    """One edit made through the explorer, with the measurements around it."""

    edit: Edit
    request: EditRequest
    method: str
    layers: list[int]
    paraphrases: list[str]
    neighborhood: list[str]
    before: Snapshot
    after: Snapshot
    editor: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        r = self.request
        old = r.target_true if r.target_true else "?"
        return f"{self.method} L{','.join(map(str, self.layers))}: {r.subject}: {old} → {r.target_new}"


def parse_layers(text: str, n_layers: int | None = None) -> list[int]:
    """``"17"``, ``"13,14,15"``, ``"13 14"`` or ``"13-17"`` → sorted unique layers.

    Raises a ValueError whose message starts with ``layers`` (shown next to the field).
    """
    out: set[int] = set()
    for part in re.split(r"[,\s]+", str(text).strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"layers: {part!r} is not a layer number; write e.g. '5', '3,4,5' or '3-5'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"layers: range {part!r} is empty; write the smaller layer first")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError("layers: give at least one layer, e.g. '5' or '3-5'")
    if n_layers is not None and max(out) >= n_layers:
        raise ValueError(f"layers: {max(out)} is out of range; this model has layers 0..{n_layers - 1}")
    return sorted(out)


def _lines(text: str, subject: str) -> list[str]:
    """One prompt per non-empty line; a ``{}`` is filled with the subject for convenience."""
    return [line.strip().replace("{}", subject) for line in str(text).splitlines() if line.strip()]


class EditExplorer:
    """Edit a model interactively: fill a request, press Edit, compare before/after, Undo.

    ``preset`` names an editor preset (default: the model's name, e.g. ``"world-gpt2"``);
    when none fits, the layer falls back to a middle-early one. ``corpus`` and any
    other keyword (``n_samples``, ``v_steps``, ``mom2_update_weight``, ...) override the
    editor's settings, so a notebook can make edits cheap without changing code.

    Edits stack: each is applied to the already-edited model (sequential editing) and
    Undo pops the most recent one, restoring the weights bit for bit.
    """

    def __init__(self, lm: LanguageModel, preset: str | Path | None = None, corpus: Any = None, *,
                 top_k: int = 10, n_tokens: int = 8, **overrides: Any) -> None:
        self.lm = lm
        self.preset = preset
        self.corpus = corpus
        self.top_k = top_k
        self.n_tokens = n_tokens
        self.overrides = overrides
        self.applied: list[AppliedEdit] = []
        self._listing = False  # True while the list is rebuilt, so selection events are not user clicks
        # (subject, paraphrases, neighborhood) as fill() set them: the extra prompts belong to that fact
        self._filled: tuple[str, str, str] | None = None
        # a filled CounterFact record's generation prompts ("what does the model now say about the subject?"),
        # continued before and after each edit beside the edit's own prompts; dropped when the subject changes
        self.generation_prompts: list[str] = []

        def text(desc: str, placeholder: str) -> widgets.Text:
            return widgets.Text(description=desc, placeholder=placeholder, style={"description_width": "110px"},
                                layout=widgets.Layout(width="460px"))

        self.prompt = text("Prompt", "The mother tongue of {} is")
        self.subject = text("Subject", "Danielle Darrieux")
        self.target_new = text("New target", "English")
        self.target_true = text("True target", "French (optional)")
        self.method = widgets.Dropdown(options=list(METHODS), value="ROME", description="Method",
                                       style={"description_width": "110px"}, layout=widgets.Layout(width="240px"))
        self.layers = widgets.Text(description="Layer(s)", style={"description_width": "60px"},
                                   layout=widgets.Layout(width="210px"))
        self.paraphrases = widgets.Textarea(description="Paraphrases", placeholder="one prompt per line",
                                            style={"description_width": "110px"},
                                            layout=widgets.Layout(width="460px", height="70px"))
        self.neighborhood = widgets.Textarea(description="Neighborhood", placeholder="one prompt per line",
                                             style={"description_width": "110px"},
                                             layout=widgets.Layout(width="460px", height="70px"))
        self.messages: dict[str, widgets.HTML] = {f: widgets.HTML() for f in _FIELDS}
        self.edit_button = widgets.Button(description="Edit", button_style="primary", icon="pencil")
        self.undo_button = widgets.Button(description="Undo", icon="undo")
        self.progress = widgets.IntProgress(value=0, min=0, max=4, description="", layout=widgets.Layout(width="160px"))
        self.status = widgets.HTML()
        self.edits_list = widgets.Select(options=[], rows=8, layout=widgets.Layout(width="420px"))
        self.figure = widgets.Image(format="png")
        self.continuations = widgets.HTML()
        self.scores = widgets.HTML()
        self.norms = widgets.HTML()

        self.edit_button.on_click(self.on_edit)
        self.undo_button.on_click(self.on_undo)
        self.method.observe(self._on_method, names="value")
        self.subject.observe(self._on_subject, names="value")
        self.edits_list.observe(self._on_select, names="value")
        self.layers.value = self.default_layers("ROME")

        def row(w: widgets.Widget, name: str) -> widgets.HBox:
            return widgets.HBox([w, self.messages[name]])

        inputs = widgets.VBox([
            row(self.prompt, "prompt"), row(self.subject, "subject"), row(self.target_new, "target_new"),
            row(self.target_true, "target_true"),
            widgets.HBox([self.method, self.layers, self.messages["layers"]]),
            row(self.paraphrases, "paraphrases"), row(self.neighborhood, "neighborhood"),
            widgets.HBox([self.edit_button, self.undo_button, self.progress]),
            self.status,
        ])
        applied = widgets.VBox([widgets.HTML("<b>Applied edits</b> (Undo pops the latest)"), self.edits_list])
        outputs = widgets.Tab(children=[self.figure, self.continuations, widgets.VBox([self.scores, self.norms])],
                              titles=("Next token", "Continuations", "Scores & norms"))
        self.ui = widgets.VBox([widgets.HBox([inputs, applied]), outputs])

    # ---- display ----------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)

    # ---- configuration ----------------------------------------------------
    def _preset_names(self) -> list[str]:
        if self.preset is not None:
            return [str(self.preset)]
        name = preset_for(self.lm.name)
        return [name] if name else []

    @property
    def preset_name(self) -> str | None:
        """The preset the defaults come from (None: no preset fits; layers fall back)."""
        for name in self._preset_names():
            try:
                make_editor(next(iter(METHODS)), preset=name)  # a preset names every method
                return name
            except (KeyError, OSError, ValueError):
                continue
        return None

    def _preset_editor(self, method: str, **kw: Any) -> Editor | None:
        """The method's editor from the first preset that has it, or None (fallback)."""
        for name in self._preset_names():
            try:
                return make_editor(method, preset=name, **kw)
            except (KeyError, OSError, ValueError) as exc:
                if self.preset is not None:
                    log.warning("preset %r unusable for %s (%s); falling back to defaults", name, method, exc)
        return None

    def default_layers(self, method: str) -> str:
        """Layers from the preset when it fits this model, else the middle-early layer
        (where single-layer edits of factual associations usually work)."""
        editor = self._preset_editor(method)
        if editor is not None and max(editor.edit_layers) < self.lm.n_layers:
            return ", ".join(map(str, editor.edit_layers))
        if editor is not None:
            log.warning("preset layers %s do not fit %s (%d layers); using a middle-early layer",
                        editor.edit_layers, self.lm.name, self.lm.n_layers)
        n = self.lm.n_layers
        return str(max(0, min(n // 3, n - 2)))

    def _on_method(self, change: dict) -> None:
        self.layers.value = self.default_layers(change["new"])

    def make_editor(self) -> Editor:
        """The editor the current widget values describe (preset + overrides + layers)."""
        method = self.method.value
        try:
            layers = parse_layers(self.layers.value, self.lm.n_layers)
        except ValueError as exc:
            raise _FieldError("layers", str(exc)) from None
        kw: dict[str, Any] = dict(self.overrides)
        if self.corpus is not None:
            kw["corpus"] = self.corpus
        try:
            return self._preset_editor(method, **kw, layers=layers) or make_editor(method, layers, **kw)
        except ValueError as exc:  # e.g. ROME given several layers
            if str(exc).startswith("layers"):
                raise _FieldError("layers", str(exc)) from None
            raise

    def make_request(self) -> EditRequest:
        """The request the text fields describe.

        The prompt is a template with ``{}``; a prompt with the subject written out is
        accepted too (the template is recovered), since that is what people type.
        """
        prompt = self.prompt.value.strip()
        subject = self.subject.value.strip()
        new, true = self.target_new.value.strip(), self.target_true.value.strip() or None
        if "{}" not in prompt and subject and subject in prompt:
            try:
                return EditRequest.from_filled(prompt, subject, new, true)
            except RequestError as exc:
                raise _FieldError(_field_of(str(exc), "prompt"), str(exc)) from None
        if "{}" not in prompt:
            hint = f" or contain the subject {subject!r} verbatim" if subject else ""
            raise _FieldError("prompt", f"prompt must contain '{{}}' where the subject goes{hint}, "
                                        "e.g. 'The mother tongue of {} is'")
        try:
            return EditRequest(prompt, subject, new, true)
        except RequestError as exc:
            raise _FieldError(_field_of(str(exc), "prompt"), str(exc)) from None

    def validate(self) -> dict[str, str]:
        """Every field's problem at once (field → message), so one Edit press shows them all."""
        errors: dict[str, str] = {}
        for make in (self.make_request, self.make_editor):
            try:
                make()
            except _FieldError as exc:
                errors[exc.field] = str(exc)
        for name, w in (("subject", self.subject), ("target_new", self.target_new)):
            if name not in errors and not w.value.strip():
                errors[name] = f"{name} must be a non-empty string"
        return errors

    def fill(self, record: Any, n_prompts: int = 3) -> None:
        """Fill the inputs from an ``EditRequest``, a dataset record (``.request`` and
        ``.paraphrase_prompts`` / ``.neighborhood_prompts``) or a CounterFact-schema
        dict, so a dataset's fact can be tried in one call. Keeps ``n_prompts`` of each extra kind."""
        if isinstance(record, dict):
            rw = record.get("requested_rewrite", record)
            req = EditRequest(rw["prompt"], rw["subject"], _target_str(rw["target_new"]),
                              _target_str(rw.get("target_true")))
            get = record.get
        else:
            req = record if isinstance(record, EditRequest) else record.request
            get = lambda name, default=(): getattr(record, name, default)  # noqa: E731
        self._filled = None  # the subject changes below: not a user edit of the previous fact
        self.prompt.value, self.subject.value = req.prompt, req.subject
        self.target_new.value, self.target_true.value = req.target_new, req.target_true or ""
        self.paraphrases.value = "\n".join(list(get("paraphrase_prompts", ()) or ())[:n_prompts])
        self.neighborhood.value = "\n".join(list(get("neighborhood_prompts", ()) or ())[:n_prompts])
        self.generation_prompts = [str(p) for p in list(get("generation_prompts", ()) or ())[:n_prompts]]
        self._filled = (self.subject.value, self.paraphrases.value, self.neighborhood.value)

    def _on_subject(self, change: dict) -> None:
        """A new subject typed over a filled record: its paraphrase and neighborhood prompts
        describe the old fact (a paraphrase of another subject would score PS on the wrong
        prompts), so they are cleared, unless the user has edited them since."""
        if self._filled is None or change["new"] == self._filled[0]:
            return
        self.generation_prompts = []  # about the previous subject
        _, para, neigh = self._filled
        self._filled = None
        if self.paraphrases.value == para and self.neighborhood.value == neigh and (para or neigh):
            self.paraphrases.value = self.neighborhood.value = ""
            self.status.value = ("<span style='color:#555'>Subject changed: the filled record's paraphrase and "
                                 "neighborhood prompts were cleared (they described the previous fact).</span>")

    # ---- measurements -----------------------------------------------------
    def measure(self, request: EditRequest, paraphrases: Sequence[str], neighborhood: Sequence[str]) -> Snapshot:
        """Top-k, greedy continuations (of the edit's prompts and a filled record's generation prompts,
        one batched :func:`editkit.generate` call), target NLLs and ES/PS/NS of ``request`` on the model
        as it is now."""
        prompts = list(dict.fromkeys([request.text, *paraphrases, *neighborhood, *self.generation_prompts]))
        conts = dict(zip(prompts, generate(self.lm, prompts, self.n_tokens)))
        kinds = {"rewrite": [request.text], "paraphrase": list(paraphrases), "neighborhood": list(neighborhood)}
        targets = {"new": request.target_new, **({"true": request.target_true} if request.target_true else {})}
        nll = {kind: {t: target_nll(self.lm, ps, s) for t, s in targets.items()} for kind, ps in kinds.items()}
        return Snapshot(topk=next_token_topk(self.lm, request.text, self.top_k), continuations=conts, nll=nll,
                        scores=_scores(nll))

    # ---- handlers ---------------------------------------------------------
    def on_edit(self, _button: Any = None) -> AppliedEdit | None:
        """Validate the inputs, measure, apply the edit on top of earlier ones, measure again.

        Never raises: bad input goes next to its field, failures of the edit into ``status``.
        """
        for m in self.messages.values():
            m.value = ""
        self.progress.value, self.progress.bar_style = 0, "info"
        try:
            errors = self.validate()
            if errors:
                for name, message in errors.items():
                    self.messages[name].value = _error_html(message)
                return self._fail(f"invalid input in {', '.join(errors)}: see the message next to it")
            request, editor = self.make_request(), self.make_editor()
            paraphrases = _lines(self.paraphrases.value, request.subject)
            neighborhood = _lines(self.neighborhood.value, request.subject)
        except Exception as exc:  # e.g. a preset file that does not parse
            log.warning("could not configure the editor", exc_info=True)
            return self._fail(f"{type(exc).__name__}: {exc}")

        self.edit_button.disabled = self.undo_button.disabled = True
        try:
            self._stage(1, "measuring the model before the edit…")
            before = self.measure(request, paraphrases, neighborhood)
            self._stage(2, f"optimizing values and solving ({editor.method}, layers {editor.edit_layers})…")
            edit = editor.apply(self.lm, [request], progress=False)
            try:
                self._stage(3, "measuring the model after the edit…")
                after = self.measure(request, paraphrases, neighborhood)
            except BaseException:
                edit.undo()
                raise
        except RequestError as exc:  # e.g. a subject no token covers
            name = _field_of(str(exc), None)
            if name:
                self.messages[name].value = _error_html(str(exc))
            return self._fail(f"RequestError: {exc}")
        except Exception as exc:
            log.warning("edit failed", exc_info=True)
            return self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.edit_button.disabled = self.undo_button.disabled = False

        record = AppliedEdit(edit=edit, request=request, method=editor.method, layers=list(editor.edit_layers),
                             paraphrases=paraphrases, neighborhood=neighborhood, before=before, after=after,
                             editor=editor.to_dict())
        self.applied.append(record)
        self._refresh_list()
        self._show(record)
        self.progress.value, self.progress.bar_style = 4, "success"
        took = sum(edit.timings.values())
        self.status.value = f"✓ applied {html.escape(record.label)} in {took:.1f}s ({len(self.applied)} stacked)"
        log.info("applied %s", record.label)
        return record

    def on_undo(self, _button: Any = None) -> AppliedEdit | None:
        """Undo the most recent edit (weights restored bit for bit). Never raises."""
        for m in self.messages.values():
            m.value = ""
        if not self.applied:
            self.status.value = _error_html("nothing to undo")
            return None
        record = self.applied[-1]
        try:
            record.edit.undo()
        except EditError as exc:  # an edit made outside the explorer sits on top
            return self._fail(f"EditError: {exc}")
        self.applied.pop()
        self._refresh_list()
        if self.applied:
            self._show(self.applied[-1])
        else:
            self._clear_outputs()
        self.progress.value, self.progress.bar_style = 0, ""
        self.status.value = f"↶ undid {html.escape(record.label)} ({len(self.applied)} stacked)"
        log.info("undid %s", record.label)
        return record

    def frame(self) -> Any:
        """The stacked edits' scores as a long-form frame in the runners' schema
        (method, layer, batch_size, n_edits, metric, value, n), e.g. for ResultsExplorer."""
        import pandas as pd

        rows = []
        for i, rec in enumerate(self.applied, 1):
            counts = {"ES": 1, "PS": len(rec.paraphrases), "NS": len(rec.neighborhood)}
            for when, snap in (("pre", rec.before), ("post", rec.after)):
                for metric, value in snap.scores.items():
                    if value is not None:
                        rows.append(dict(method=rec.method, layer=rec.layers[-1], batch_size=1, n_edits=i,
                                         metric=metric, when=when, value=100 * value, n=counts[metric]))
            for layer, norms in rec.edit.norms.items():
                rows.append(dict(method=rec.method, layer=layer, batch_size=1, n_edits=i, metric="delta_norm",
                                 when="post", value=norms["delta_norm"], n=1))
        return pd.DataFrame(rows, columns=["method", "layer", "batch_size", "n_edits", "metric", "when", "value", "n"])

    # ---- rendering --------------------------------------------------------
    def _stage(self, value: int, message: str) -> None:
        self.progress.value = value
        self.status.value = f"⏳ {html.escape(message)}"

    def _fail(self, message: str) -> None:
        self.progress.bar_style = "danger"
        self.status.value = _error_html(message)
        return None

    def _refresh_list(self) -> None:
        self._listing = True
        try:
            self.edits_list.options = [(f"{i}. {r.label}", i - 1) for i, r in enumerate(self.applied, 1)]
            self.edits_list.value = len(self.applied) - 1 if self.applied else None
        finally:
            self._listing = False

    def _on_select(self, change: dict) -> None:
        if self._listing or change["new"] is None:
            return
        self._show(self.applied[change["new"]])

    def _clear_outputs(self) -> None:
        self.figure.value = b""
        self.continuations.value = self.scores.value = self.norms.value = ""

    def _show(self, rec: AppliedEdit) -> None:
        self.figure.value = _fig_png(_topk_figure(rec))
        self.continuations.value = _table(
            ["prompt", "before", "after"],
            [(p, rec.before.continuations[p], rec.after.continuations[p]) for p in rec.after.continuations])
        score_rows = [(m, _fmt(rec.before.scores[m], pct=True), _fmt(rec.after.scores[m], pct=True))
                      for m in ("ES", "PS", "NS")]
        prob_rows = []
        for kind, by_target in rec.after.nll.items():
            for t, vals in by_target.items():
                if vals:
                    b = [math.exp(-x) for x in rec.before.nll[kind][t]]
                    a = [math.exp(-x) for x in vals]
                    prob_rows.append((f"P̄({t} target) on {kind}", _fmt(sum(b) / len(b)), _fmt(sum(a) / len(a))))
        note = "" if rec.request.target_true else "<i>give the true target to score ES/PS/NS</i>"
        self.scores.value = ("<b>Scores of this edit (%)</b>" + _table(["", "before", "after"], score_rows + prob_rows)
                             + note)
        self.norms.value = "<b>Update norm per layer</b>" + _table(
            ["layer", "‖Δ‖", "‖W₀‖", "‖Δ‖/‖W₀‖"],
            [(l, _fmt(n["delta_norm"]), _fmt(n["original_norm"]), _fmt(n["delta_norm"] / max(n["original_norm"], 1e-30)))
             for l, n in sorted(rec.edit.norms.items())])


def _target_str(t: Any) -> str | None:
    """CounterFact writes targets as ``{"str": ..., "id": ...}``."""
    return t.get("str") if isinstance(t, dict) else t


def _field_of(message: str, default: str | None) -> str | None:
    """The input field a RequestError names (its messages start with the field)."""
    m = re.match(r"\W*(prompt|subject|target_new|target_true)\b", message)
    return m.group(1) if m else default


def _scores(nll: dict[str, dict[str, list[float]]]) -> dict[str, float | None]:
    """ES/PS/NS: the share of prompts where :func:`editkit.metrics.edit_success` holds; None
    without a true target or prompts."""
    def frac(kind: str) -> float | None:
        by = nll[kind]
        if "true" not in by or not by["new"]:
            return None
        return float(edit_success(np.array(by["new"]), np.array(by["true"]), kind == "neighborhood").mean())

    return {"ES": frac("rewrite"), "PS": frac("paraphrase"), "NS": frac("neighborhood")}


def _topk_figure(rec: AppliedEdit) -> Any:
    """Before/after bars of the top-k next tokens; the targets' first tokens are highlighted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 0.3 * len(rec.after.topk) + 1.2))
    axes = fig.subplots(1, 2, sharex=True)
    new, true = rec.request.target_new, rec.request.target_true or ""
    for ax, (title, snap) in zip(axes, (("before", rec.before), ("after", rec.after))):
        toks = [t for t, _ in snap.topk][::-1]
        probs = [p for _, p in snap.topk][::-1]
        colors = ["tab:green" if t.strip() and new.startswith(t.strip()) else
                  "tab:red" if t.strip() and true.startswith(t.strip()) else "tab:gray" for t in toks]
        ax.barh(range(len(toks)), probs, color=colors)
        ax.set_yticks(range(len(toks)), [repr(t) for t in toks])
        ax.set_xlim(0, 1)
        ax.set_title(f"{title}: P(next token)")
    fig.suptitle(rec.request.text, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- results explorer
