"""ROME, MEMIT and EMMET as thin configurations of one solver, and the reversible Edit.

An editor is a dataclass of hyperparameters. ``apply`` runs the pipeline
statistics → values → (per layer) keys, residual, solve → write, and returns an
:class:`Edit` that knows how to put the weights back bit for bit.

Every method speaks the same vocabulary: ``layers`` (the edited layers) and ``reg``
(the λ of its solve), with each paper's own name accepted as an alias
(``MEMIT(mom2_update_weight=...)``, ``EMMET(lambda_e=...)``, ``ROME(layer=...)``).
Methods live in one registry, :data:`METHODS`; a new method is one dataclass plus
``@register``, and :func:`make_editor` builds any of them the same way for the
runners, the widgets and the command line.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from .data.corpus import corpus_name, materialize_corpus
from .keys import compute_keys, context_prefixes, hidden_at_subject
from .models import LanguageModel
from .protocols import Conventions, conventions, sample_prefixes
from .requests import EditRequest, RequestError
from .solver import C0Factor, NullSpace, Solution, ridge, solve
from .stats import c0_factor, second_moment
from .values import ValueConfig, memoized_values

log = logging.getLogger(__name__)


class _EditWarnings(logging.Filter):
    """Holds back the per-edit warnings (value optimization not converged, update dwarfing
    the weights) and counts them, so a study of hundreds of edits says it once, at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, str], list] = {}  # (kind, method) -> [flagged, out of, first message]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = getattr(record, "editkit_kind", None)
        if kind is None:
            return True
        method = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        c = self.counts.setdefault((kind, method), [0, 0, record.getMessage()])
        bad, total = getattr(record, "editkit_count", (1, 1))
        c[0] += bad
        c[1] += total
        return False


@contextmanager
def summarized_edit_warnings(what: str = "this run") -> Iterator[_EditWarnings]:
    """Within the block, the editors' per-edit warnings are counted instead of logged; on
    exit one warning per kind and method gives the totals and the first example. (Each
    edit's ``converged`` flag and update norm stay in the results.)"""
    f = _EditWarnings()
    log.addFilter(f)
    try:
        yield f
    finally:
        log.removeFilter(f)
        for (kind, method), (bad, total, first) in f.counts.items():
            if kind == "not_converged":
                log.warning("%s, %s: the value optimization did not converge for %d of %d request(s) (the `converged` "
                            "column flags them; raise v_steps or v_lr). First: %s", what, method, bad, total, first)
            else:
                log.warning("%s, %s: %d edit(s) changed a layer by more than %g × its norm. First: %s", what,
                            method, bad, HUGE_UPDATE_RATIO, first)

__all__ = ["Editor", "ROME", "RROME", "MEMIT", "EMMET", "AlphaEdit", "preserved_keys", "Edit", "EditError", "METHODS", "register", "make_editor",
           "available_presets", "preset_for"]


#: The ROME/MEMIT/EasyEdit hyperparameter files' names for settings every method has, accepted by
#: every editor's constructor (``ROME(v_num_grad_steps=20, mom2_n_samples=100000)``); a method's own
#: names (MEMIT's ``mom2_update_weight``, AlphaEdit's ``L2``) are in its ``aliases``. Whole files:
#: :func:`editkit.hparams.load_hparams`.
PEER_ALIASES: dict[str, str] = {"v_num_grad_steps": "v_steps", "mom2_n_samples": "n_samples", "mom2_dataset": "corpus"}

#: ‖Δ‖ / ‖W‖ above which an edit is logged as suspicious. Healthy ROME edits of the world
#: models measure 1.3-2.5 (a small model's layer is small); 100 flags only runaway updates.
HUGE_UPDATE_RATIO = 100.0


class EditError(RuntimeError):
    """An edit could not be applied or undone safely."""


@dataclass
class Edit:
    """The result of ``editor.apply``: per-layer deltas, norms, timings, diagnostics.

    ``originals`` hold the edited weights as ``lm.weight(layer)`` returns them
    (d_out × d_in), so nothing outside the model adapter knows about GPT-2's Conv1D.
    """

    lm: LanguageModel = field(repr=False)
    method: str
    requests: list[EditRequest] = field(repr=False)
    originals: dict[int, torch.Tensor] = field(repr=False)  # lm.weight(layer) before the edit (d_out × d_in)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # Δ (d_out × d_in), float32 CPU
    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # K (d_in × E) at which R is written (ROME: k_cur)
    residuals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # R (d_out × E) at each layer
    targets: torch.Tensor | None = field(default=None, repr=False)  # Z (E × d): residual wanted at the top layer
    norms: dict[int, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # model state besides the weights that this edit changed, as it was before (``lm.cache``
    # key -> previous value, None if absent): AlphaEdit's K_p K_pᵀ. Undo puts it back.
    state_before: dict[Any, Any] = field(default_factory=dict, repr=False)
    undone: bool = False
    committed: bool = False
    scoped: bool = field(default=False, repr=False)  # applied by ``Editor.applied``: undone when its block ends
    # What made it, for saved edits (editkit.saved): the editor (its settings: ``editor.to_dict()``; a loaded
    # edit holds them as a dict) and, per layer, where C0 came from.
    editor: Any = field(default=None, repr=False)
    c0: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write this edit to the folder ``path``: its per-layer updates (safetensors; low-rank
        factors where smaller) and a JSON card (method, settings, protocol, requests, the
        unedited model's weight fingerprint, C0's provenance, versions, norms, diagnostics).
        ``ek.load_edit(path).apply(lm)`` makes it again, in any process. See editkit.saved."""
        from .saved import save_edit  # the file format lives above the editors

        return save_edit(self, path)

    def undo(self) -> None:
        """Restore the edited weights exactly. Only the most recent edit can be undone."""
        if self.undone:
            raise EditError("this edit was already undone")
        if self.committed:
            raise EditError("this edit was committed: its weights are part of the model now and cannot be undone")
        if self.lm.edits and self.lm.edits[-1] is not self:
            raise EditError("undo the later edits first: edits on a model are undone in reverse order")
        with torch.no_grad():
            for layer, w in self.originals.items():
                self.lm.weight(layer).copy_(w)
        for key, value in self.state_before.items():
            if value is None:
                self.lm.cache.pop(key, None)
            else:
                self.lm.cache[key] = value
        self._forget()
        self.undone = True

    def commit(self) -> None:
        """Keep the edit's weights and drop its undo record (and the saved originals).

        For edits that stay: sequential editing applies batch after batch and keeps
        each, so the model's undo stack must not grow with every batch."""
        if self.undone:
            raise EditError("this edit was undone; there is nothing to commit")
        stack = self.lm.edits
        below = stack[:next((i for i, e in enumerate(stack) if e is self), len(stack))]
        if any(e.scoped for e in below):
            raise EditError("this edit sits inside an `applied()` block, which undoes every edit made in it on exit; "
                            "commit it outside the block")
        self._forget()
        self.originals, self.state_before = {}, {}
        self.committed = True

    def _forget(self) -> None:
        """Remove this edit from the model's undo stack (by identity: Edits hold tensors)."""
        self.lm.edits[:] = [e for e in self.lm.edits if e is not self]

    @property
    def converged(self) -> bool:
        """Whether the value optimization of every request reached its stopping criterion
        (per request in ``diagnostics["converged"]``)."""
        return all(self.diagnostics.get("converged", [True]))

    def summary(self) -> dict[str, Any]:
        """A flat dict for logs and tidy frames."""
        out: dict[str, Any] = {"method": self.method, "n_requests": len(self.requests)}
        for layer, n in self.norms.items():
            out.update({f"{k}_L{layer}": v for k, v in n.items()})
        out.update({f"time_{k}": v for k, v in self.timings.items()})
        return out


def _read_preset(name: str | Path) -> dict:
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    res = resources.files("editkit") / "presets" / f"{name}.json"
    if not res.is_file():
        raise KeyError(f"no preset {str(name)!r}; available: {', '.join(available_presets())} "
                       "(or pass a path to a JSON file of the same shape)")
    return json.loads(res.read_text())


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("editkit") / "presets").iterdir() if p.name.endswith(".json"))


def preset_for(model_name: str) -> str | None:
    """The preset whose name the model's name contains (longest match), or None.

    ``"meta-llama/Meta-Llama-3-8B"`` → ``"llama-3-8b"``, ``"EleutherAI/gpt-j-6B"`` →
    ``"gpt-j-6b"``, ``"world-gpt2"`` → ``"world-gpt2"``.
    """
    name = str(model_name).lower().replace("_", "-")
    hits = [p for p in available_presets() if p in name]
    return max(hits, key=len) if hits else None


@dataclass(kw_only=True)
class Editor:
    """Hyperparameters shared by every method of the preservation–memorization family.

    ``layers`` and ``reg`` are the two settings every method has; ``aliases`` maps a
    paper's own parameter names onto them (and any other field), so
    ``MEMIT(mom2_update_weight=1e4)`` and ``MEMIT(reg=1e4)`` are the same editor.
    Flat value settings (``v_steps=10``) are accepted too and go into ``values``.
    """

    layers: list[int]  # the edited layers; the residual is spread over them as MEMIT does
    reg: float = 0.0  # λ of the solve (MEMIT: mom2_update_weight; EMMET: λ_E on D)
    corpus: Any = "wikitext"  # where C0 comes from: Hub name, local path, list of strings, or "world"
    n_samples: int | None = 100_000
    max_tokens: int | None = None  # stop C0 after this many token keys (minimal precomputation)
    n_prefixes: int = 5  # protocol "editkit": context prefixes for keys and values (plus the empty one)
    prefix_len: int = 10  # protocol "editkit": their length in sampled tokens
    seed: int = 0
    values: ValueConfig = field(default_factory=ValueConfig)
    solve_dtype: str = "float64"
    c0_ridge: float = 0.0  # add ε·mean(diag C0)·I before solving; for layers with dead units (see solver.ridge)
    # "cached": factorize C0 once per layer (cached beside C0 on disk and on the model) and solve every batch
    # as an E × E system on that factor; "direct": factorize the batch's own system (λC0 + KKᵀ or C0) each time.
    solve_path: str = "cached"
    # Keep the factors on the CPU and copy each layer's to the weight's device only for its own solve:
    # one d_in² factor on the GPU at a time instead of one per edited layer (see README, memory budget).
    offload_factor: bool = False
    # "reference": the study authors' conventions around the equations (the default, so the study's
    # numbers come out of every preset); "editkit": editkit's own. See editkit.protocols and the README.
    protocol: str | Conventions = "reference"
    # Context prefixes to use instead of sampling them (the bare prompt is always used as well). Each is
    # put verbatim before the prompt, so end it as the sampled ones end, with ". ".
    prefixes: list[str] | None = None

    constraint: ClassVar[str]  # "equality" or "least_squares" (see solver.solve)
    method: ClassVar[str]  # the registry name
    aliases: ClassVar[dict[str, str]] = {}  # a paper's parameter name -> field
    #: The original ROME's own conventions (prefixes, key mean, value site, denominator; see protocols.Conventions).
    original_rome: ClassVar[bool] = False

    def __post_init__(self) -> None:
        layers = [self.layers] if isinstance(self.layers, int) else self.layers
        if not layers or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
            raise ValueError(f"layers: give a non-empty list of layer numbers, e.g. [1] or [3, 4, 5] "
                             f"(got {self.layers!r})")
        self.layers = [int(l) for l in layers]
        conventions(self.protocol)  # an unknown protocol fails here, naming the choices
        if self.prefixes is not None:
            if isinstance(self.prefixes, str) or not all(isinstance(p, str) for p in self.prefixes):
                raise ValueError("prefixes: give a list of strings, e.g. ['The weather was fine. ', 'I said. ']")
            bad = [p for p in self.prefixes if "{" in p or "}" in p]
            if bad:
                raise ValueError(f"prefixes: {bad[0]!r} contains braces, which would break the prompt template")
            self.prefixes = list(self.prefixes)
        if len(set(self.layers)) < len(self.layers):
            raise ValueError(f"layers: {self.layers} names a layer twice; give each edited layer once")
        _check_hyperparameters(self)
        # A one-shot corpus (a generator) would be used up by the first C0 or by hashing it for a key.
        self.corpus = materialize_corpus(self.corpus, self.n_samples)

    # --- configuration ----------------------------------------------------
    @property
    def edit_layers(self) -> list[int]:
        """The edited layers (the same as ``layers``; kept for older callers)."""
        return list(self.layers)

    @classmethod
    def params(cls, *dicts: dict[str, Any]) -> dict[str, Any]:
        """Constructor keywords from ``dicts`` (later ones win): each paper's alias
        resolved to its field, flat value settings (``v_steps=...``) folded into
        ``values``. Unknown names raise a TypeError naming what the method takes."""
        out: dict[str, Any] = {}
        for d in dicts:
            seen: dict[str, str] = {}
            for k, v in d.items():
                name = cls.aliases.get(k, PEER_ALIASES.get(k, k))
                if name in seen:
                    raise TypeError(f"{cls.method}: got both {seen[name]} and {k} (the same setting); give one")
                seen[name] = k
                out[name] = v
        names, vnames = {f.name for f in fields(cls)}, set(ValueConfig.__dataclass_fields__)
        unknown = set(out) - names - vnames
        if unknown:
            raise TypeError(f"{cls.method}: unknown parameters {sorted(unknown)}; it takes {sorted(names)}, "
                            f"the aliases {sorted({**PEER_ALIASES, **cls.aliases})} and the value settings "
                            f"{sorted(vnames)} (a whole ROME/MEMIT/EasyEdit hparams file: ek.load_hparams)")
        vparams = {k: out.pop(k) for k in list(out) if k in vnames}
        if vparams:
            out["values"] = dataclasses.replace(out.get("values", ValueConfig()), **vparams)
        return out

    @classmethod
    def preset(cls, name: str | Path, **overrides: Any) -> "Editor":
        """An editor configured by a named preset (``editkit/presets/<name>.json``)."""
        data = _read_preset(name)
        if cls.method not in data:
            raise KeyError(f"preset {name!r} has no {cls.method} entry (has {sorted(data)})")
        params = {k: v for k, v in data[cls.method].items() if not k.startswith("_")}
        try:
            return cls(**cls.params(params, overrides))
        except TypeError as exc:
            raise KeyError(f"preset {name!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = self.method
        # How the solve runs changes Δ by float rounding only: left out at its defaults, so run
        # directories (keyed by these parameters) stay where they were.
        for name, default in (("solve_path", "cached"), ("offload_factor", False)):
            if d.get(name) == default:
                d.pop(name)
        if not isinstance(self.corpus, (str, Path)):
            d["corpus"] = corpus_name(self.corpus)
        return d

    # --- statistics -------------------------------------------------------
    def second_moment(self, lm: LanguageModel, layer: int, progress: bool = True) -> torch.Tensor:
        """``C0 = E[k kᵀ]`` at ``layer`` from this editor's corpus settings, computed once per model.

        C0 always describes the *unedited* model: it is remembered on the model object
        the first time it is asked for (call this before a sequence of edits) and reused
        by every later edit."""
        key = ("C0", layer, corpus_name(self.corpus), self.n_samples, self.max_tokens)
        C0 = lm.cache.get(key)
        if C0 is not None and tuple(C0.shape) != (lm.d_in(layer),) * 2:  # never reuse a C0 of another shape
            log.warning("dropping a cached C0 of shape %s for layer %d (d_in=%d)", tuple(C0.shape), layer,
                        lm.d_in(layer))
            C0 = None
        if C0 is None:
            C0 = lm.cache[key] = second_moment(lm, layer, self.corpus, self.n_samples, max_tokens=self.max_tokens,
                                               progress=progress)
        return C0

    def c0_factor(self, lm: LanguageModel, layer: int, C0: torch.Tensor | None = None,
                  progress: bool = True) -> C0Factor:
        """The Cholesky factor of this layer's ``C0 + ridge`` in ``solve_dtype``, computed once per model.

        Without ``C0``: of :meth:`second_moment` (this editor's corpus settings, the
        unedited model), cached on disk beside it (:func:`editkit.stats.c0_factor`). With a given ``C0`` tensor (``apply(stats=...)``):
        factorized once and reused for as long as that same tensor is passed unchanged.
        Kept on the CPU with ``offload_factor``, else on the edited weight's device."""
        dtype = getattr(torch, self.solve_dtype)
        device = torch.device("cpu") if self.offload_factor else lm.weight(layer).device
        if C0 is None:
            key = ("C0factor", layer, corpus_name(self.corpus), self.n_samples, self.max_tokens, self.c0_ridge,
                   dtype, device)
            if key not in lm.cache:  # of the C0 this editor keeps for the model (the unedited model's)
                lm.cache[key] = c0_factor(lm, layer, self.corpus, self.n_samples, max_tokens=self.max_tokens,
                                          ridge_eps=self.c0_ridge, dtype=dtype, device=device, progress=progress,
                                          C0=self.second_moment(lm, layer, progress))
            return lm.cache[key]
        key = ("C0factor-given", layer, self.c0_ridge, dtype, device)
        ref, version, F = lm.cache.get(key, (None, None, None))
        if ref is None or ref() is not C0 or version != C0._version:
            F = C0Factor.of(C0, self.c0_ridge, dtype, device)
            lm.cache[key] = (weakref.ref(C0), C0._version, F)
        return F

    # --- application ------------------------------------------------------
    def apply(self, lm: LanguageModel, requests: Sequence[EditRequest | Any], *,
              stats: dict[int, torch.Tensor] | None = None, progress: bool = True) -> Edit:
        """Edit ``requests`` into ``lm`` in place. ``stats`` may give precomputed C0 per layer."""
        reqs = _as_requests(requests)
        layers = sorted(self.layers)
        for layer in layers:
            lm.edit_module(layer)  # range check before any work
        lm.check_finite()  # NaN weights otherwise surface far away (a singular solve, a misleading hint)
        for layer, C in (stats or {}).items():
            _check_c0(C, lm.d_in(layer), f"stats[{layer}]")
        if layers[-1] == lm.n_layers - 1:
            log.warning("editing the last layer (%d): a change at the subject's last token there cannot reach "
                        "the later tokens that predict the object; pick an earlier layer", layers[-1])
        originals = {l: lm.weight(l).detach().clone() for l in layers}
        edit = Edit(lm=lm, method=self.method, requests=reqs, originals=originals, editor=self)
        lm.edits.append(edit)
        try:
            with lm.eval_mode():  # dropout would make every Δ random
                t0 = time.perf_counter()
                given = stats or {}
                if self.solve_path == "cached":
                    C0 = {l: self.c0_factor(lm, l, given.get(l), progress) for l in layers}
                elif self.solve_path == "direct":
                    C0 = {l: (given[l] if l in given else self.second_moment(lm, l, progress)) for l in layers}
                    for l in layers:
                        _check_c0(C0[l], lm.d_in(l), f"C0 of layer {l}")
                else:
                    raise ValueError(f"solve_path={self.solve_path!r}: choose 'cached' or 'direct'")
                edit.timings["stats"] = time.perf_counter() - t0
                edit.c0 = {l: self._c0_provenance(l, given, C0[l]) for l in layers}
                for group in self._groups(reqs):
                    self._apply_group(lm, group, layers, C0, edit, progress)
        except BaseException:
            edit.undo()
            raise
        self._flag_convergence(edit)
        for layer in layers:
            w = lm.weight(layer).detach()
            d = w.double() - originals[layer].double()
            edit.deltas[layer] = d.float().cpu()
            edit.norms[layer] = {"delta_norm": d.norm().item(), "weight_norm": w.double().norm().item(),
                                 "original_norm": originals[layer].double().norm().item()}
            ratio = edit.norms[layer]["delta_norm"] / max(edit.norms[layer]["original_norm"], 1e-30)
            if ratio > HUGE_UPDATE_RATIO:
                log.warning("%s at layer %d: ‖Δ‖ = %.3g is %.3g × ‖W‖; the edit dwarfs the layer's weights (check "
                            "C0, reg and the value optimization)", self.method, layer, edit.norms[layer]["delta_norm"],
                            ratio, extra={"editkit_kind": "huge_update", "editkit_count": (1, 1)})
        return edit

    def _c0_provenance(self, layer: int, given: dict, C0: Any) -> dict[str, Any]:
        """Where this layer's C0 came from, for the saved edit's card."""
        out: dict[str, Any] = {"source": "stats= (given by the caller)"} if layer in given else {
            "source": "computed", "corpus": corpus_name(self.corpus), "n_samples": self.n_samples,
            "max_tokens": self.max_tokens}
        out["c0_ridge"] = self.c0_ridge
        if isinstance(C0, C0Factor) and C0.checksum:
            out["sha256"] = C0.checksum
        return out

    def _flag_convergence(self, edit: "Edit") -> None:
        """``diagnostics["converged"]``: per request, whether the value optimization reached
        its own stopping criterion (NLL of target_new below ``values.stop_nll``) within
        ``values.v_steps``; a request that did not is logged as a warning."""
        final = edit.diagnostics.get("nll_final", [])
        conv = [bool(n < self.values.stop_nll) for n in final]
        edit.diagnostics["converged"] = conv
        bad = [i for i, c in enumerate(conv) if not c]
        if bad:
            init = edit.diagnostics.get("nll_init", [])
            shown = ", ".join(f"{edit.requests[i].subject!r} NLL {init[i]:.3g} → {final[i]:.3g}" for i in bad[:3])
            log.warning("%s: value optimization did not converge for %d of %d request(s) in %d steps (stop_nll=%g): "
                        "%s%s. Raise v_steps or v_lr; edit.diagnostics['converged'] flags them",
                        self.method, len(bad), len(conv), self.values.v_steps, self.values.stop_nll, shown,
                        " ..." if len(bad) > 3 else "",
                        extra={"editkit_kind": "not_converged", "editkit_count": (len(bad), len(conv))})

    @contextmanager
    def applied(self, lm: LanguageModel, requests: Sequence[EditRequest | Any], **kw: Any) -> Iterator[Edit]:
        """Apply for the duration of the block; on exit the weights are bitwise as found.

        Whatever happens inside: every edit applied to the model inside the block (through
        any wrapper of it) is undone too, most recent first, then this one. Committing an
        edit inside the block is refused, since leaving the block would discard it. An
        exception raised in the block is never replaced: were restoring to fail as well,
        that failure is attached to it as a note."""
        depth = len(lm.edits)
        edit = self.apply(lm, requests, **kw)
        edit.scoped = True
        try:
            yield edit
        except BaseException as exc:
            try:
                _unwind(lm, depth)
            except Exception as undo_exc:  # pragma: no cover - copying saved weights back does not fail
                exc.add_note(f"editkit: restoring the weights after this error failed too: {undo_exc!r}")
            raise
        else:
            _unwind(lm, depth)

    def _groups(self, reqs: list[EditRequest]) -> list[list[EditRequest]]:
        return [reqs]

    def context(self, lm: LanguageModel) -> list[str]:
        """The context prefixes of keys and values, the bare prompt ``""`` first: ``prefixes``
        if given, else sampled from the model as the protocol says. Sampled once per model and
        kept on it, so a sequence of edits keeps the prefixes of the unedited model, as the
        reference does (it samples them on its first edit and caches them for the process)."""
        if self.prefixes is not None:
            return ["", *self.prefixes]
        conv = conventions(self.protocol)
        spec = conv.rome_prefixes if self.original_rome else conv.prefixes
        if spec is None:
            return context_prefixes(lm, self.n_prefixes, self.prefix_len, self.seed)
        key = ("prefixes", spec, self.seed)
        if key not in lm.cache:
            lm.cache[key] = ["", *sample_prefixes(lm, spec, self.seed)]
        return lm.cache[key]

    @property
    def solve_reg(self) -> float:
        """The λ handed to the solver (EMMET: w·λ_E)."""
        return self.reg

    # --- the two steps a method may change ---------------------------------
    def keys(self, lm: LanguageModel, reqs: list[EditRequest], layer: int, prefixes: Sequence[str]) -> torch.Tensor:
        """``K`` (d_in × E) the update is solved for: each request's key averaged over ``prefixes``,
        flat or as the mean of the bare and the prefixed group means, as the protocol says."""
        conv = conventions(self.protocol)
        return compute_keys(lm, reqs, layer, prefixes, mean=conv.rome_key_mean if self.original_rome else conv.key_mean)

    def solve(self, K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor | C0Factor, dtype: torch.dtype,
              K_cur: torch.Tensor | None = None, **inputs: Any) -> Solution:
        """``Δ`` (d_out × d_in) for keys ``K`` and residuals ``R``, from the layer's cached
        :class:`C0Factor` or from the C0 matrix (ridge applied), solved in ``dtype``; ``K_cur``:
        the original ROME's denominator keys (see solver.push_through_delta)."""
        if isinstance(C0, C0Factor):
            return solve(K, R, C0, self.constraint, self.solve_reg, K_cur=K_cur, **inputs)
        return solve(K, R, C0, self.constraint, self.solve_reg, dtype, path="direct", K_cur=K_cur, **inputs)
    # --- seams for methods with more inputs than C0 (AlphaEdit) ---------------
    def _solve_inputs(self, lm: LanguageModel, layer: int, C0: torch.Tensor | C0Factor) -> dict[str, Any]:
        """Extra keyword arguments of :func:`editkit.solver.solve` at ``layer`` (none here)."""
        return {}

    def _written(self, lm: LanguageModel, layer: int, K: torch.Tensor, edit: Edit) -> None:
        """Called after keys ``K`` were written into ``layer`` (nothing to remember here)."""

    def sequential_state(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        """Model state besides the weights that this method's later edits read, as named
        tensors (none here; AlphaEdit: the earlier edits' keys). Runners save it beside
        the weights, so a resumed sequence continues exactly."""
        return {}

    def load_sequential_state(self, lm: LanguageModel, tensors: dict[str, torch.Tensor]) -> None:
        """Replace that state by ``tensors`` (``{}``: the state of a model without such edits)."""

    def _apply_group(self, lm: LanguageModel, reqs: list[EditRequest], layers: list[int],
                     C0: dict[int, torch.Tensor | C0Factor], edit: Edit, progress: bool) -> None:
        diag = edit.diagnostics
        conv, rome = conventions(self.protocol), self.original_rome
        prefixes = self.context(lm)
        site = conv.rome_site if rome else "block"  # where δ and its reference vector h live
        top = layers[-1]
        t0 = time.perf_counter()
        values = dataclasses.replace(self.values, conventions=self.protocol, site=site)
        val = memoized_values(lm, reqs, top, prefixes, values, progress=progress)  # each δ once per model state
        diag.setdefault("nll_init", []).extend(val.nll_init.tolist())
        diag.setdefault("nll_final", []).extend(val.nll_final.tolist())
        diag.setdefault("value_steps", []).extend(val.steps.tolist())
        diag.setdefault("delta_norm", []).extend(val.delta.norm(dim=1).tolist())
        edit.timings["values"] = edit.timings.get("values", 0.0) + time.perf_counter() - t0
        Z = val.target
        edit.targets = Z.cpu() if edit.targets is None else torch.cat([edit.targets, Z.cpu()])
        dtype = getattr(torch, self.solve_dtype)
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            K = self.keys(lm, reqs, layer, prefixes)
            # The original ROME divides by k_curᵀC0⁻¹k*, k_cur being the key of the un-prefixed prompt.
            K_cur = compute_keys(lm, reqs, layer, [""]) if rome and conv.rome_denominator == "k_cur" else None
            H = hidden_at_subject(lm, reqs, top, site=site)
            R = (Z.cpu() - H).T / (len(layers) - i)  # this layer's share of what is left
            W = lm.weight(layer)
            kc = None if K_cur is None else K_cur.to(W.device)
            if isinstance(C0[layer], C0Factor):  # the layer's cached factor (copied to W's device if offloaded)
                C = C0[layer].to(W.device)
            else:
                C = ridge(C0[layer].to(device=W.device, dtype=dtype), self.c0_ridge)
            sol = self.solve(K.to(W.device), R.to(W.device), C, dtype, K_cur=kc, **self._solve_inputs(lm, layer, C0[layer]))
            with torch.no_grad():
                new = (W.to(dtype) + sol.delta).to(W.dtype)
                if not torch.isfinite(new).all():
                    raise EditError(f"layer {layer}: the update overflows {W.dtype}; no weights were changed")
                W.copy_(new)
            diag.setdefault("cond", {}).setdefault(layer, []).append(sol.cond)
            K = K if K_cur is None else K_cur  # the keys at which the update writes R exactly
            self._written(lm, layer, K, edit)
            edit.keys[layer] = torch.cat([edit.keys[layer], K], 1) if layer in edit.keys else K
            edit.residuals[layer] = torch.cat([edit.residuals[layer], R], 1) if layer in edit.residuals else R
            edit.timings["solve"] = edit.timings.get("solve", 0.0) + time.perf_counter() - t0



def _unwind(lm: LanguageModel, depth: int) -> None:
    """Undo the edits above position ``depth`` of the model's stack, most recent first."""
    while len(lm.edits) > depth:
        lm.edits[-1].undo()


def _check_c0(C: torch.Tensor, d_in: int, what: str) -> None:
    if not isinstance(C, torch.Tensor) or tuple(C.shape) != (d_in, d_in):
        shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise ValueError(f"{what}: C0 must be a {d_in} × {d_in} tensor (the edited layer's d_in), got {shape}")
    if not bool(torch.isfinite(C).all()):
        raise ValueError(f"{what}: C0 holds {int((~torch.isfinite(C)).sum())} NaN/inf value(s); recompute it "
                         "(ek.second_moment) from a model whose weights are finite")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_hyperparameters(ed: "Editor") -> None:
    """Reject settings no edit can run with, naming the field (instead of a silent no-op
    edit, an empty C0 or a crash deep inside the solver)."""
    v = ed.values
    checks = [
        ("n_samples", ed.n_samples is None or (_int(ed.n_samples) and ed.n_samples > 0),
         "a positive number of corpus texts, or None for the whole corpus"),
        ("max_tokens", ed.max_tokens is None or (_int(ed.max_tokens) and ed.max_tokens > 0),
         "a positive number of token keys, or None for no limit"),
        ("n_prefixes", _int(ed.n_prefixes) and ed.n_prefixes >= 0, "a number of context prefixes ≥ 0"),
        ("prefix_len", _int(ed.prefix_len) and ed.prefix_len >= 1, "a prefix length ≥ 1 token"),
        ("c0_ridge", isinstance(ed.c0_ridge, (int, float)) and math.isfinite(ed.c0_ridge) and ed.c0_ridge >= 0,
         "a finite ε ≥ 0"),
        ("reg", isinstance(ed.reg, (int, float)) and math.isfinite(ed.reg) and ed.reg >= 0, "a finite λ ≥ 0"),
        ("solve_dtype", isinstance(getattr(torch, str(ed.solve_dtype), None), torch.dtype)
         and getattr(torch, str(ed.solve_dtype)).is_floating_point, "a torch float dtype name such as 'float64'"),
        ("values.v_steps", _int(v.v_steps) and v.v_steps >= 1, "at least 1 optimization step"),
        ("values.v_lr", isinstance(v.v_lr, (int, float)) and math.isfinite(v.v_lr) and v.v_lr > 0,
         "a positive finite learning rate"),
        ("values.clamp_norm_factor", isinstance(v.clamp_norm_factor, (int, float)) and v.clamp_norm_factor > 0,
         "a positive factor"),
        ("values.v_batch_size", v.v_batch_size is None or (_int(v.v_batch_size) and v.v_batch_size >= 1),
         "None or a positive batch size"),
    ]
    for name, ok, want in checks:
        if not ok:
            value = getattr(v, name.split(".")[1]) if name.startswith("values.") else getattr(ed, name)
            raise ValueError(f"{type(ed).__name__}: {name}={value!r} is impossible; give {want}")


def _as_requests(requests: Sequence[Any]) -> list[EditRequest]:
    if isinstance(requests, EditRequest) or hasattr(requests, "request"):
        requests = [requests]
    reqs = [r if isinstance(r, EditRequest) else getattr(r, "request", None) for r in requests]
    if not reqs or any(r is None for r in reqs):
        raise RequestError("requests must be a non-empty list of ek.EditRequest (or records with .request)")
    subjects = [r.subject for r in reqs]
    if len(set(subjects)) < len(subjects):
        log.warning("%d requests share a subject; their edits compete (use unique_subjects=True when loading)",
                    len(subjects) - len(set(subjects)))
    return reqs




# --- the methods ------------------------------------------------------------

#: Every editing method by name. ``@register`` adds one; runners, widgets and the CLI read it.
METHODS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    """Add an Editor dataclass to :data:`METHODS` under ``cls.method``, and let its
    constructor take the aliases and flat value settings :meth:`Editor.params` accepts.

    Use as a decorator above ``@dataclass(kw_only=True)``; a method is then one class
    and this one line. The class sets ``method``, ``constraint``, its ``reg`` default and
    ``aliases``, and overrides :meth:`Editor.keys` or :meth:`Editor.solve` when it changes
    those steps (e.g. un-prefixed keys, a projected solve)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Editor, **kw: Any) -> None:
        init(self, **cls.params(kw))

    cls.__init__ = __init__  # type: ignore[method-assign]
    for alias, name in cls.aliases.items():
        if not hasattr(cls, alias):  # read the paper's name too (ROME defines its own `layer`)
            setattr(cls, alias, property(_getter(name), doc=f"alias of ``{name}``"))
    METHODS[cls.method] = cls
    return cls


def _getter(name: str) -> Callable[[Editor], Any]:
    return lambda self: getattr(self, name)


def make_editor(method: str | type[Editor] | Editor, layers: int | Sequence[int] | None = None,
                preset: str | Path | None = None, **overrides: Any) -> Editor:
    """The one way to build an editor from settings: ``method`` (a :data:`METHODS` name,
    an Editor class, or an Editor used as the template), editing ``layers`` (a layer
    number or a list; default: the preset's), configured by ``preset`` if given, with
    ``overrides`` (any field, alias or value setting) on top."""
    if isinstance(method, Editor):
        cls = type(method)
        current = {f.name: getattr(method, f.name) for f in fields(method) if f.init}
        editor = cls(**cls.params(current, overrides))
    else:
        cls = method if isinstance(method, type) else METHODS.get(str(method))
        if cls is None:
            raise ValueError(f"method={method!r}: choose from {sorted(METHODS)} or pass an Editor")
        if preset is not None:
            editor = cls.preset(preset, **overrides)
        elif layers is None and "layers" not in cls.params(overrides):
            raise ValueError(f"layers: {cls.method} needs the layers to edit (or a preset that names them)")
        else:
            return cls(**cls.params(overrides, {} if layers is None else {"layers": layers}))
    return editor if layers is None else dataclasses.replace(editor, layers=layers)


@register
@dataclass(kw_only=True)
class ROME(Editor):
    """Rank-one edit of one fact at one layer (equality constraint). Several requests
    are applied one after another, each a rank-one update of the already-edited model.
    ``ROME(layer=5)`` is ``ROME(layers=[5])``."""

    method: ClassVar[str] = "ROME"
    constraint: ClassVar[str] = "equality"
    aliases: ClassVar[dict[str, str]] = {"layer": "layers"}
    original_rome: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"layers: ROME edits exactly one layer (got {self.layers}); "
                             "use MEMIT or EMMET to spread an edit over several")

    @property
    def layer(self) -> int:
        return self.layers[0]

    def _groups(self, reqs: list[EditRequest]) -> list[list[EditRequest]]:
        return [[r] for r in reqs]


@register
@dataclass(kw_only=True)
class MEMIT(Editor):
    """Batched least-squares edit spread over ``layers``; ``reg`` is λ (MEMIT's ``mom2_update_weight``)."""

    reg: float = 15000.0
    method: ClassVar[str] = "MEMIT"
    constraint: ClassVar[str] = "least_squares"
    aliases: ClassVar[dict[str, str]] = {"mom2_update_weight": "reg"}


@register
@dataclass(kw_only=True)
class EMMET(Editor):
    """Batched equality-constrained edit (batched ROME); ``reg`` is λ_E (``lambda_e``), which conditions D."""

    reg: float = 0.1
    # The authors scale C0 by w = mom2_update_weight before adding λ_E to D, which is λ_E' = w·λ_E on
    # the unscaled C0 (the update is otherwise unchanged): the solve's ridge is w·λ_E (GPT-2 XL: 1000 × 0.1).
    mom2_update_weight: float = 1.0
    method: ClassVar[str] = "EMMET"
    constraint: ClassVar[str] = "equality"
    aliases: ClassVar[dict[str, str]] = {"lambda_e": "reg", "emmet_lambda": "reg"}

    @property
    def solve_reg(self) -> float:
        return self.mom2_update_weight * self.reg


@register
@dataclass(kw_only=True)
class RROME(ROME):
    """r-ROME: ROME with one key in both places of the rank-one update (``k*ᵀC0⁻¹k*``), the fix
    the r-ROME paper proposes for the original ROME's collapse after some edits. Under the
    reference protocol it is the authors' r-ROME code, which is also the ROME of the study's own
    code: MEMIT's prefixes and grouped keys, δ on the residual. ``RROME(layer=5)``."""

    method: ClassVar[str] = "r-ROME"
    original_rome: ClassVar[bool] = False


# --- AlphaEdit: the update projected onto the null space of the preserved keys ---------

def preserved_keys(lm: LanguageModel, layer: int) -> torch.Tensor | None:
    """``K_p K_pᵀ`` at ``layer``: the Gram matrix (float64, d_in × d_in) of the keys that
    AlphaEdit edits have written into ``lm`` and that are still applied, or None.

    It is state of the edited model, like its weights: each AlphaEdit edit adds its
    keys, ``undo()`` puts the previous matrix back, ``commit()`` keeps it, and
    :func:`editkit.experiments.sequential_batched` saves it beside the weights so that
    a resumed run continues with the same ``K_p``. A d_in × d_in matrix rather than
    the keys themselves: its size does not grow with the number of edits."""
    return lm.cache.get(("preserved_keys", layer))


@register
@dataclass(kw_only=True)
class AlphaEdit(Editor):
    """Null-space constrained editing (Fang et al., ICLR 2025): MEMIT's keys and values,
    with the update confined to the directions the preserved keys (almost) never visit,

        Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + λ I)⁻¹,   P = Û Ûᵀ,

    Û the eigenvectors of C0 whose eigenvalues are below ``nullspace_threshold``
    (absolute, the authors' convention, or a fraction of the top eigenvalue with
    ``nullspace_relative``; see :class:`editkit.solver.NullSpace`), λ = ``reg`` (the
    authors' ``L2``), and K_p the keys of the earlier AlphaEdit edits still applied
    to the model (:func:`preserved_keys`). Defaults are the authors' GPT-2 XL, GPT-J
    and Llama-3-8B settings (λ = 10, threshold 2e-2). C0 is never inverted, so
    ``c0_ridge`` plays no role; the projector is computed once per layer and C0 and
    cached beside it on the model."""

    reg: float = 10.0
    nullspace_threshold: float = 2e-2
    nullspace_relative: bool = False
    solve_path: str = "direct"  # C0 is never factorized: the projector comes from its eigenvectors
    method: ClassVar[str] = "AlphaEdit"
    constraint: ClassVar[str] = "null_space"
    aliases: ClassVar[dict[str, str]] = {"L2": "reg"}

    def null_space(self, lm: LanguageModel, layer: int, C0: torch.Tensor | C0Factor) -> NullSpace:
        """The projector's basis for ``C0`` at ``layer`` (or for ``L Lᵀ`` of its cached
        factor), computed once and cached on ``lm`` beside C0 (reused while the same C0
        tensor or factor is passed)."""
        key = ("null_space", layer, self.nullspace_threshold, self.nullspace_relative)
        hit = lm.cache.get(key)
        if hit is None or hit[0] is not C0:
            C = C0.L @ C0.L.mT if isinstance(C0, C0Factor) else C0
            ns = NullSpace.of(C, self.nullspace_threshold, self.nullspace_relative)
            log.info("AlphaEdit layer %d: the null space of C0 has %d of %d dimensions (eigenvalues < %.3g; "
                     "top %.3g)", layer, ns.rank, ns.basis.shape[0], ns.cut, ns.top)
            hit = lm.cache[key] = (C0, ns)
        return hit[1]

    def _solve_inputs(self, lm: LanguageModel, layer: int, C0: torch.Tensor | C0Factor) -> dict[str, Any]:
        return {"null_space": self.null_space(lm, layer, C0), "preserved": preserved_keys(lm, layer)}

    def _written(self, lm: LanguageModel, layer: int, K: torch.Tensor, edit: Edit) -> None:
        key = ("preserved_keys", layer)
        old = lm.cache.get(key)
        edit.state_before.setdefault(key, old)
        K = K.to(torch.float64)
        # a new tensor, never in place: the Edit's reference to the old one is its undo record
        lm.cache[key] = K @ K.T if old is None else old + K.to(old.device) @ K.to(old.device).T

    def sequential_state(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        return {f"preserved_keys.{l}": g for l in self.layers if (g := preserved_keys(lm, l)) is not None}

    def load_sequential_state(self, lm: LanguageModel, tensors: dict[str, torch.Tensor]) -> None:
        for l in self.layers:
            g = tensors.get(f"preserved_keys.{l}")
            if g is None:
                lm.cache.pop(("preserved_keys", l), None)
            else:
                lm.cache[("preserved_keys", l)] = g.to(torch.float64)
