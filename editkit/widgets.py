"""Interactive explorers for Jupyter: poke a model or a run without writing a loop.

Both explorers are thin layers over the public API (``EditRequest``, the editors,
``Edit.undo``, the experiment runners' frames and ``editkit.plots``): everything
they show can be reproduced in three lines of code, and every handler is a plain
method (``on_edit``, ``on_undo``, ``redraw``) so tests and scripts can drive them
without a browser.

Figures are rendered to PNG into an ``ipywidgets.Image`` rather than through
pyplot's global figure registry, so redrawing never leaks figures, needs no
``%matplotlib`` magic, and renders the same in JupyterLab, classic notebooks and
headless papermill runs.
"""
from __future__ import annotations

import html
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as widgets
import numpy as np
import torch

from .editors import METHODS, Edit, EditError, Editor, make_editor, preset_for
from .metrics import edit_success, score_targets
from .models import LanguageModel
from .requests import EditRequest, RequestError

log = logging.getLogger(__name__)

__all__ = [
    "EditExplorer",
    "ResultsExplorer",
    "AppliedEdit",
    "Snapshot",
    "parse_layers",
    "greedy_continuation",
    "next_token_topk",
    "target_nll",
    "load_results",
]

_FIELDS = ("prompt", "subject", "target_new", "target_true", "layers", "paraphrases", "neighborhood")
_ALL = "(all)"


class _FieldError(ValueError):
    """Bad input in one widget: shown next to that widget, never raised to the user."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


# --------------------------------------------------------------------------- model probes
# Small, self-contained measurements (no generation config, no sampling) so what the
# explorer shows depends only on the weights, which is what an edit changes.

def _encode(lm: LanguageModel, text: str) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(text, return_tensors="pt")
    return {k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def greedy_continuation(lm: LanguageModel, text: str, n_tokens: int = 8) -> str:
    """Greedy (argmax) continuation of ``text``: deterministic, so before/after differ only by the edit."""
    # Full recompute each step (no KV cache): a few tokens on a prompt are cheap, and
    # it stays independent of the cache API, which differs across transformers versions.
    ids = _encode(lm, text)["input_ids"]
    new: list[int] = []
    for _ in range(n_tokens):
        nxt = int(lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        new.append(nxt)
        if nxt == lm.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def next_token_topk(lm: LanguageModel, text: str, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``text`` with their probabilities."""
    logits = lm.model(**_encode(lm, text)).logits[0, -1].float()
    top = logits.softmax(-1).topk(min(k, logits.shape[-1]))
    return [(lm.tokenizer.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


def target_nll(lm: LanguageModel, prompts: Sequence[str], target: str) -> list[float]:
    """Per-token mean NLL of `` target`` after each prompt: :func:`editkit.metrics.score_targets`,
    so the explorer scores exactly as ``evaluate`` does (same span rule, same scorer)."""
    return score_targets(lm, [(p, target) for p in prompts], progress=False).nll.tolist() if prompts else []


# --------------------------------------------------------------------------- records

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


def _error_html(message: str) -> str:
    return f'<span style="color:#b00020">⚠ {html.escape(message)}</span>'


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th style='text-align:left;padding:0 8px'>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:0 8px'>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- edit explorer

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
        self._filled = (self.subject.value, self.paraphrases.value, self.neighborhood.value)

    def _on_subject(self, change: dict) -> None:
        """A new subject typed over a filled record: its paraphrase and neighborhood prompts
        describe the old fact (a paraphrase of another subject would score PS on the wrong
        prompts), so they are cleared, unless the user has edited them since."""
        if self._filled is None or change["new"] == self._filled[0]:
            return
        _, para, neigh = self._filled
        self._filled = None
        if self.paraphrases.value == para and self.neighborhood.value == neigh and (para or neigh):
            self.paraphrases.value = self.neighborhood.value = ""
            self.status.value = ("<span style='color:#555'>Subject changed: the filled record's paraphrase and "
                                 "neighborhood prompts were cleared (they described the previous fact).</span>")

    # ---- measurements -----------------------------------------------------
    def measure(self, request: EditRequest, paraphrases: Sequence[str], neighborhood: Sequence[str]) -> Snapshot:
        """Top-k, greedy continuations, target NLLs and ES/PS/NS of ``request`` on the model as it is now."""
        prompts = [request.text, *paraphrases, *neighborhood]
        conts = {p: greedy_continuation(self.lm, p, self.n_tokens) for p in dict.fromkeys(prompts)}
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

#: Columns a summary is grouped by, when the frame has them (the runners' design columns).
_GROUPS = ("phase", "method", "layer", "reg", "batch_size", "edits_so_far", "n_edits")
_SUMMARY_COLS = ("metric", "value")


def load_results(frame_or_run_dir: Any) -> Any:
    """A results frame from a DataFrame, a run directory or a CSV/Parquet file.

    A run directory goes through ``editkit.experiments.load_run``, so the explorer
    reads runs exactly as the figure notebooks do (with the run's parameters in
    ``.attrs["run"]``); a plain folder of tables falls back to reading every
    CSV/Parquet file under it.
    """
    import pandas as pd

    if isinstance(frame_or_run_dir, pd.DataFrame):
        return frame_or_run_dir.copy()
    path = Path(frame_or_run_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist; pass a DataFrame or a run directory")
    if path.is_dir() and (path / "units").is_dir():
        from .experiments import load_run

        return load_run(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no CSV or Parquet files under {str(path)!r}")
    return pd.concat([pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f) for f in files],
                     ignore_index=True)


def _figure_of(obj: Any) -> Any:
    """A matplotlib Figure from what a plotting function returns (Figure, Axes, FacetGrid, tuple)."""
    from matplotlib.figure import Figure

    if isinstance(obj, tuple) and obj:
        obj = obj[0]
    if isinstance(obj, Figure):
        return obj
    fig = getattr(obj, "figure", None) or getattr(obj, "fig", None)
    if fig is None and hasattr(obj, "flat"):  # an array of Axes
        fig = obj.flat[0].figure
    if fig is None:
        raise TypeError(f"cannot get a figure from {type(obj).__name__}")
    return fig


class ResultsExplorer:
    """Browse an experiment run: filter by metric, method, batch size and layer; the
    figure (the same ``editkit.plots`` function the study notebooks use) and the
    table of numbers follow the filters.

    ``frame_or_run_dir`` is a run directory, a runner's raw frame (one row per record
    × prompt, with ``phase``; summarized with ``editkit.plots.summary``), or an
    already summarized long-form frame (``metric``, ``value``, ``ci_low``, ``ci_high``, ``n``).
    """

    FILTERS = ("metric", "method", "batch_size", "layer")
    KINDS = ("auto", "layer_sweep", "batch_sweep", "sequential", "line")

    def __init__(self, frame_or_run_dir: Any, *, n_boot: int = 200, max_rows: int = 200) -> None:
        self.frame = load_results(frame_or_run_dir)
        self.n_boot = n_boot
        self.max_rows = max_rows
        self.raw = not set(_SUMMARY_COLS) <= set(self.frame.columns)
        self.summary_error: str | None = None
        summary = self._summarize(self.frame)
        self.dropdowns: dict[str, widgets.Dropdown] = {}
        for col in self.FILTERS:
            src = summary if col == "metric" and summary is not None else self.frame
            present = col in src.columns
            values = src[col].dropna().unique().tolist() if present else []
            if col == "method":
                values = [v for v in values if v != "none"]  # the unedited baseline rows
            values = sorted(values, key=_sort_key)
            dd = widgets.Dropdown(options=[(_ALL, _ALL)] + [(str(v), v) for v in values], value=_ALL,
                                  description=col.replace("_", " "), disabled=not present,
                                  layout=widgets.Layout(width="220px"))
            dd.observe(self.redraw, names="value")
            self.dropdowns[col] = dd
        self.metric, self.method = self.dropdowns["metric"], self.dropdowns["method"]
        self.batch_size, self.layer = self.dropdowns["batch_size"], self.dropdowns["layer"]
        self.kind = widgets.Dropdown(options=list(self.KINDS), value="auto", description="figure",
                                     layout=widgets.Layout(width="220px"))
        self.kind.observe(self.redraw, names="value")
        self.figure = widgets.Image(format="png")
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        self.drawn_with: str | None = None
        self.summary: Any = None
        self.ui = widgets.VBox([widgets.HBox([*self.dropdowns.values(), self.kind]), self.status,
                                widgets.Tab(children=[self.figure, self.table], titles=("Figure", "Table"))])
        self.redraw()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)

    # ---- data -------------------------------------------------------------
    def _summarize(self, rows: Any) -> Any:
        """Per-group scores of a raw frame (None when editkit.metrics is unavailable)."""
        if not self.raw:
            return rows
        if rows.empty:
            return rows.iloc[:0]
        try:
            from .plots import summary
        except ImportError as exc:
            self.summary_error = f"{type(exc).__name__}: {exc}"
            return None
        by = [c for c in _GROUPS if c in rows.columns]
        try:
            return summary(rows, by, self.n_boot)
        except Exception as exc:  # e.g. editkit.metrics not installed, or a frame without scores
            log.warning("could not summarize the frame", exc_info=True)
            self.summary_error = f"{type(exc).__name__}: {exc}"
            return None

    def filtered(self) -> Any:
        """The rows the method / batch size / layer dropdowns select (the metric is a column of the summary)."""
        df = self.frame
        for col in ("method", "batch_size", "layer"):
            value = self.dropdowns[col].value
            if value != _ALL and col in df.columns:
                keep = df[col] == value
                if col == "method" and "phase" in df.columns:
                    keep |= df["phase"] == "pre"  # keep the unedited baseline beside the chosen method
                df = df[keep]
        if not self.raw and self.metric.value != _ALL:
            df = df[df["metric"] == self.metric.value]
        return df

    def figure_kind(self, df: Any) -> str:
        """Which study the frame comes from: the run's recorded kind, else which column varies."""
        if self.kind.value != "auto":
            return self.kind.value
        if not self.raw:
            return "line"
        run_kind = (self.frame.attrs.get("run") or {}).get("kind")
        if run_kind in ("layer_sweep", "batch_sweep"):
            return run_kind
        if run_kind == "sequential_batched" or "edits_so_far" in df.columns:
            return "sequential"
        if "batch_size" in df.columns and df["batch_size"].nunique() > 1:
            return "batch_sweep"
        return "layer_sweep" if "layer" in df.columns else "line"

    # ---- drawing ----------------------------------------------------------
    def redraw(self, _change: Any = None) -> None:
        """Refilter, resummarize, redraw the figure and refresh the table. Never raises."""
        df = self.filtered()
        self.summary_error = None
        summary = self._summarize(df)
        if summary is not None and self.raw and self.metric.value != _ALL:
            summary = summary[summary["metric"] == self.metric.value]
        self.summary = summary
        shown = summary if summary is not None else df
        fmt = lambda x: f"{x:.4g}"  # noqa: E731
        self.table.value = (f"<div style='max-height:420px;overflow:auto'>"
                            f"{shown.to_html(index=False, max_rows=self.max_rows, float_format=fmt)}</div>")
        if df.empty or (summary is not None and summary.empty):
            self.figure.value, self.drawn_with = b"", None
            self.status.value = _error_html("no rows match these filters")
            return
        kind = self.figure_kind(df)
        note = f" (no summary: {self.summary_error}; the table shows raw rows)" if self.summary_error else ""
        try:
            fig, self.drawn_with = self._draw(kind, df, summary)
        except Exception as exc:
            log.warning("figure %s failed", kind, exc_info=True)
            self.figure.value, self.drawn_with = b"", None
            self.status.value = _error_html(f"cannot draw {kind}: {type(exc).__name__}: {exc}{note}")
            return
        self.figure.value = _fig_png(fig)
        _close(fig)
        self.status.value = f"{len(df)} rows · figure: {html.escape(self.drawn_with)}{html.escape(note)}"

    def _draw(self, kind: str, df: Any, summary: Any) -> tuple[Any, str]:
        if kind == "line" or not self.raw:
            if summary is None:
                raise ValueError("a line plot needs metric/value columns")
            return _line_figure(summary), "line"
        from . import plots

        metrics = (self.metric.value,) if self.metric.value != _ALL else ("ES", "PS", "NS", "S")
        if kind == "sequential":
            methods = [m for m in df["method"].unique() if m != "none"]
            method = self.method.value if self.method.value != _ALL else methods[0]
            fig = plots.sequential(df, method, metrics=metrics, n_boot=self.n_boot)
        else:
            fig = getattr(plots, kind)(df, metrics=metrics, n_boot=self.n_boot)
        return _figure_of(fig), f"editkit.plots.{kind}"


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


#: Metrics that are not percentages (update norms, perplexity): drawn on their own panel,
#: never on the score axis.
_NOT_PERCENT = re.compile(r"norm|perplexity|loss|nll|seconds", re.I)


def _line_figure(df: Any) -> Any:
    """Summarized scores against whichever of edits / batch size / layer varies: one line per
    metric, method and stage. Before/after rows (``when`` or ``phase``) are separate lines
    (solid: before, dashed: after; for a single edit before → after is the x axis), never
    averaged together; norms and other non-percent metrics get
    their own panel; layer and edit-count axes have integer ticks."""
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = df.reset_index(drop=True)
    x = next((c for c in ("n_edits", "edits_so_far", "batch_size", "layer")
              if c in data.columns and data[c].nunique() > 1),
             next((c for c in ("layer", "batch_size", "n_edits", "edits_so_far") if c in data.columns), None))
    if x is None:
        data = data.assign(row=range(len(data)))
        x = "row"
    stage = next((c for c in ("when", "phase") if c in data.columns and data[c].nunique() > 1), None)
    stages = None
    if stage:
        data = data.assign(**{stage: data[stage].replace({"pre": "before", "post": "after"})})
    if stage and data[x].nunique() == 1:  # one edit / one setting: before → after is the x axis
        stages = sorted(data[stage].astype(str).unique(), key=lambda v: (v != "before", v))
        data = data.assign(**{stage: data[stage].astype(str)})
        data = data.assign(_stage_x=data[stage].map({v: i for i, v in enumerate(stages)}))
        x, stage = "_stage_x", None
    varying = [c for c in ("method", stage) if c and c in data.columns and data[c].nunique() > 1]
    if varying:  # one line style per method × stage (pre dashed, post solid when only the stage varies)
        data = data.assign(stage=data[varying].astype(str).agg(" · ".join, axis=1))
    other = data["metric"].astype(str).str.contains(_NOT_PERCENT)
    parts = [("score (%)", data[~other]), ("", data[other])]
    parts = [(label, part) for label, part in parts if len(part)]
    fig = Figure(figsize=(6.5 * len(parts), 4))
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, (label, part) in zip(axes, parts):
        hue = "metric" if label or part["metric"].nunique() > 1 else ("layer" if "layer" in part and
                                                                      part["layer"].nunique() > 1 else None)
        style = "stage" if varying and part["stage"].nunique() > 1 else None
        style_order = sorted(part["stage"].unique(), key=lambda v: ("before" not in v, v)) if style else None
        sns.lineplot(data=part, x=x, y="value", hue=hue, style=style, style_order=style_order, marker="o", ax=ax,
                     errorbar=None)
        if label:
            ax.set_ylabel(label)
            ax.set_ylim(-2, 102)
        else:
            names = sorted(part["metric"].astype(str).unique())
            ax.set_ylabel(", ".join(names))
            ax.set_title("update norm" if all("norm" in n for n in names) else "not in percent")
        if stages is not None:
            ax.set_xticks(range(len(stages)), stages)
            ax.set_xlim(-0.3, len(stages) - 0.7)
            ax.set_xlabel("")
        elif data[x].nunique() == 1:
            ax.set_xticks([data[x].iloc[0]])
        elif x in ("batch_size", "n_edits", "edits_so_far") and (part[x] > 0).all() and part[x].max() > 8:
            ax.set_xscale("log", base=2)
        if stages is None and x in ("layer", "n_edits", "edits_so_far", "row"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    fig.tight_layout()
    return fig


def _close(fig: Any) -> None:
    """Release a figure that a plotting function registered with pyplot (ours are not registered)."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and getattr(fig, "number", None) is not None and plt.fignum_exists(fig.number):
        plt.close(fig)
