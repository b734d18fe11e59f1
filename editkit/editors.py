"""ROME, MEMIT and EMMET as thin configurations of one solver, and the reversible Edit.

An editor is a dataclass of hyperparameters. ``apply`` runs the pipeline
statistics → values → (per layer) keys, residual, solve → write, and returns an
:class:`Edit` that knows how to put the weights back bit for bit.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from .keys import context_prefixes, hidden_at_subject, keys
from .models import LanguageModel
from .requests import EditRequest, RequestError
from .solver import ridge, solve
from .stats import corpus_name, second_moment
from .values import ValueConfig, optimize_values

log = logging.getLogger(__name__)

__all__ = ["Editor", "ROME", "MEMIT", "EMMET", "Edit", "EditError", "available_presets", "preset_for"]


class EditError(RuntimeError):
    """An edit could not be applied or undone safely."""


@dataclass
class Edit:
    """The result of ``editor.apply``: per-layer deltas, norms, timings, diagnostics."""

    lm: LanguageModel = field(repr=False)
    method: str
    requests: list[EditRequest] = field(repr=False)
    originals: dict[int, torch.Tensor] = field(repr=False)  # stored weights before the edit
    deltas: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # Δ (d_out × d_in), float32 CPU
    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # K (d_in × E) used at each layer
    residuals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # R (d_out × E) at each layer
    targets: torch.Tensor | None = field(default=None, repr=False)  # Z (E × d): residual wanted at the top layer
    norms: dict[int, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    undone: bool = False

    def undo(self) -> None:
        """Restore the edited weights exactly. Only the most recent edit can be undone."""
        if self.undone:
            raise EditError("this edit was already undone")
        if self.lm.edits and self.lm.edits[-1] is not self:
            raise EditError("undo the later edits first: edits on a model are undone in reverse order")
        with torch.no_grad():
            for layer, w in self.originals.items():
                self.lm.edit_module(layer).weight.copy_(w)
        if self.lm.edits and self.lm.edits[-1] is self:
            self.lm.edits.pop()
        self.undone = True

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
    """Hyperparameters shared by every method of the preservation–memorization family."""

    corpus: Any = "wikitext"  # where C0 comes from: Hub name, local path, list of strings, or "world"
    n_samples: int | None = 100_000
    max_tokens: int | None = None  # stop C0 after this many token keys (minimal precomputation)
    n_prefixes: int = 5  # context prefixes for keys and values (plus the empty one)
    prefix_len: int = 10
    seed: int = 0
    values: ValueConfig = field(default_factory=ValueConfig)
    solve_dtype: str = "float64"
    c0_ridge: float = 0.0  # add ε·mean(diag C0)·I before solving; for layers with dead units (see solver.ridge)

    constraint: ClassVar[str]
    method: ClassVar[str]

    # --- configuration ----------------------------------------------------
    @property
    def edit_layers(self) -> list[int]:
        raise NotImplementedError

    @property
    def reg(self) -> float:
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str | Path, **overrides: Any) -> "Editor":
        """An editor configured by a named preset (``editkit/presets/<name>.json``)."""
        data = _read_preset(name)
        if cls.method not in data:
            raise KeyError(f"preset {name!r} has no {cls.method} entry (has {sorted(data)})")
        params = {k: v for k, v in {**data[cls.method], **overrides}.items() if not k.startswith("_")}
        names = {f.name for f in fields(cls)}
        unknown = set(params) - names - set(ValueConfig.__dataclass_fields__)
        if unknown:
            raise KeyError(f"preset {name!r}: unknown {cls.method} parameters {sorted(unknown)}")
        vparams = {k: params.pop(k) for k in list(params) if k in ValueConfig.__dataclass_fields__}
        if vparams:
            params["values"] = ValueConfig(**{**asdict(params.get("values", ValueConfig())), **vparams})
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = self.method
        if not isinstance(self.corpus, (str, Path)):
            d["corpus"] = corpus_name(self.corpus)
        return d

    # --- application ------------------------------------------------------
    def apply(self, lm: LanguageModel, requests: Sequence[EditRequest | Any], *,
              stats: dict[int, torch.Tensor] | None = None, progress: bool = True) -> Edit:
        """Edit ``requests`` into ``lm`` in place. ``stats`` may give precomputed C0 per layer."""
        reqs = _as_requests(requests)
        layers = sorted(self.edit_layers)
        for layer in layers:
            lm.edit_module(layer)  # range check before any work
        if layers[-1] == lm.n_layers - 1:
            log.warning("editing the last layer (%d): a change at the subject's last token there cannot reach "
                        "the later tokens that predict the object; pick an earlier layer", layers[-1])
        originals = {l: lm.edit_module(l).weight.detach().clone() for l in layers}
        edit = Edit(lm=lm, method=self.method, requests=reqs, originals=originals)
        lm.edits.append(edit)
        try:
            t0 = time.perf_counter()
            C0 = {l: (stats[l] if stats and l in stats else self._C0(lm, l, progress)) for l in layers}
            edit.timings["stats"] = time.perf_counter() - t0
            for group in self._groups(reqs):
                self._apply_group(lm, group, layers, C0, edit, progress)
        except BaseException:
            edit.undo()
            raise
        for layer in layers:
            w = lm.weight(layer).detach()
            d = (w.double() - (originals[layer].T if lm.adapter.conv1d else originals[layer]).double())
            edit.deltas[layer] = d.float().cpu()
            edit.norms[layer] = {"delta_norm": d.norm().item(), "weight_norm": w.double().norm().item(),
                                 "original_norm": originals[layer].double().norm().item()}
        return edit

    @contextmanager
    def applied(self, lm: LanguageModel, requests: Sequence[EditRequest | Any], **kw: Any) -> Iterator[Edit]:
        """Apply for the duration of the block; restored on exit, even on exceptions."""
        edit = self.apply(lm, requests, **kw)
        try:
            yield edit
        finally:
            edit.undo()

    def _groups(self, reqs: list[EditRequest]) -> list[list[EditRequest]]:
        return [reqs]

    def _C0(self, lm: LanguageModel, layer: int, progress: bool) -> torch.Tensor:
        # C0 always describes the *unedited* model: it is remembered on the model object
        # before the first edit and reused by every later (sequential) edit.
        key = ("C0", layer, corpus_name(self.corpus), self.n_samples, self.max_tokens)
        if key not in lm.cache:
            lm.cache[key] = second_moment(lm, layer, self.corpus, self.n_samples, max_tokens=self.max_tokens,
                                          progress=progress)
        return lm.cache[key]

    def _apply_group(self, lm: LanguageModel, reqs: list[EditRequest], layers: list[int],
                     C0: dict[int, torch.Tensor], edit: Edit, progress: bool) -> None:
        diag = edit.diagnostics
        prefixes = context_prefixes(lm, self.n_prefixes, self.prefix_len, self.seed)
        top = layers[-1]
        t0 = time.perf_counter()
        val = optimize_values(lm, reqs, top, prefixes, self.values, progress=progress)
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
            K = keys(lm, reqs, layer, prefixes)
            H = hidden_at_subject(lm, reqs, top)
            R = (Z.cpu() - H).T / (len(layers) - i)  # this layer's share of what is left
            W = lm.weight(layer)
            C = ridge(C0[layer].to(device=W.device, dtype=dtype), self.c0_ridge)
            sol = solve(K.to(W.device), R.to(W.device), C, self.constraint, self.reg, dtype)
            with torch.no_grad():
                new = (W.to(dtype) + sol.delta).to(W.dtype)
                if not torch.isfinite(new).all():
                    raise EditError(f"layer {layer}: the update overflows {W.dtype}; no weights were changed")
                W.copy_(new)
            diag.setdefault("cond", {}).setdefault(layer, []).append(sol.cond)
            edit.keys[layer] = torch.cat([edit.keys[layer], K], 1) if layer in edit.keys else K
            edit.residuals[layer] = torch.cat([edit.residuals[layer], R], 1) if layer in edit.residuals else R
            edit.timings["solve"] = edit.timings.get("solve", 0.0) + time.perf_counter() - t0


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


@dataclass(kw_only=True)
class ROME(Editor):
    """Rank-one edit of one fact at ``layer`` (equality constraint). Several requests
    are applied one after another, each a rank-one update of the already-edited model."""

    layer: int
    method: ClassVar[str] = "ROME"
    constraint: ClassVar[str] = "equality"

    @property
    def edit_layers(self) -> list[int]:
        return [self.layer]

    @property
    def reg(self) -> float:
        return 0.0

    def _groups(self, reqs: list[EditRequest]) -> list[list[EditRequest]]:
        return [[r] for r in reqs]


@dataclass(kw_only=True)
class MEMIT(Editor):
    """Batched least-squares edit spread over ``layers``; λ = ``mom2_update_weight``."""

    layers: list[int]
    mom2_update_weight: float = 15000.0
    method: ClassVar[str] = "MEMIT"
    constraint: ClassVar[str] = "least_squares"

    @property
    def edit_layers(self) -> list[int]:
        return list(self.layers)

    @property
    def reg(self) -> float:
        return self.mom2_update_weight


@dataclass(kw_only=True)
class EMMET(Editor):
    """Batched equality-constrained edit (batched ROME); λ_E = ``lambda_e`` conditions D."""

    layers: list[int]
    lambda_e: float = 0.1
    method: ClassVar[str] = "EMMET"
    constraint: ClassVar[str] = "equality"

    @property
    def edit_layers(self) -> list[int]:
        return list(self.layers)

    @property
    def reg(self) -> float:
        return self.lambda_e
