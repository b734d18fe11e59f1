"""The :class:`Editor` every method configures: hyperparameters, presets, statistics (C0 and
its factor), context prefixes, and ``apply``: values → (per layer) keys, residual, solve → write."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from ..data.corpus import corpus_name, materialize_corpus
from ..keys import compute_keys, context_prefixes, hidden_at_subject
from ..models import LanguageModel
from ..protocols import Conventions, conventions, sample_prefixes
from ..requests import EditRequest, RequestError
from ..solver import C0Factor, Solution, ridge, solve
from ..stats import c0_factor, provenance, second_moment
from ..values import ValueConfig, memoized_values
from .edit import HUGE_UPDATE_RATIO, Edit, EditError, _report
from .presets import _read_preset

log = logging.getLogger("editkit.editors")  # one logger for the package: summarized_edit_warnings filters it

#: The ROME/MEMIT/EasyEdit hyperparameter files' names for settings every method has, accepted by
#: every editor's constructor (``ROME(v_num_grad_steps=20, mom2_n_samples=100000)``); a method's own
#: names (MEMIT's ``mom2_update_weight``, AlphaEdit's ``L2``) are in its ``aliases``. Whole files:
#: :func:`editkit.hparams.load_hparams`.
PEER_ALIASES: dict[str, str] = {"v_num_grad_steps": "v_steps", "mom2_n_samples": "n_samples", "mom2_dataset": "corpus"}


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
    # one d_in² factor on the GPU at a time instead of one per edited layer (see docs/performance.md, memory budget).
    offload_factor: bool = False
    # "reference": the study authors' conventions around the equations (the default, so the study's
    # numbers come out of every preset); "editkit": editkit's own. See editkit.protocols and docs/protocols.md.
    protocol: str | Conventions = "reference"
    # Context prefixes to use instead of sampling them (the bare prompt is always used as well). Each is
    # put verbatim before the prompt, so end it as the sampled ones end, with ". ".
    prefixes: list[str] | None = None

    constraint: ClassVar[str]  # "equality" or "least_squares" (see solver.solve)
    method: ClassVar[str]  # the registry name
    aliases: ClassVar[dict[str, str]] = {}  # a paper's parameter name -> field
    #: ROME's own conventions for the context prefixes, the key mean and δ's site (``Conventions.rome_*``)
    #: instead of MEMIT's: ROME and r-ROME, whose papers and code share them.
    rome_conventions: ClassVar[bool] = False
    #: The original ROME's denominator ``k_curᵀC0⁻¹k*`` (when the protocol says ``rome_denominator="k_cur"``).
    original_rome: ClassVar[bool] = False
    #: r-ROME's numerator: v* minus the edited module's output at the averaged key k̄ (the key it divides
    #: by), instead of minus its output at the bare prompt, so that the edited module maps k̄ to v*.
    mean_key_residual: ClassVar[bool] = False
    #: The facts of a batch are applied one after another (ROME and its kin), so a sequence's weights
    #: do not depend on the batch size: one run serves every batch size (plots.sequential_methods).
    one_at_a_time: ClassVar[bool] = False

    def __post_init__(self) -> None:
        layers = self.layers if isinstance(self.layers, (list, tuple, range)) else [self.layers]
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
        by every later edit. Weights changed other than by editkit's edits make it stale:
        it is then recomputed (see :meth:`LanguageModel.sync_statistics`)."""
        lm.sync_statistics()
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
        lm.sync_statistics()
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
            _check_c0(C, lm.d_in(layer), f"stats[{layer}]", lm, layer)
        last = layers[-1] == lm.n_layers - 1
        originals = {l: lm.weight(l).detach().clone() for l in layers}
        edit = Edit(lm=lm, method=self.method, requests=reqs, originals=originals, editor=self)
        lm.edits.append(edit)
        if last:
            edit.flags["last_layer"] = True
        try:
            # the statistics cached on lm are checked once against the weights (see sync_statistics)
            with lm.eval_mode(), lm._statistics_checked():  # dropout would make every Δ random
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
        lm.weights_written({lm.weight_name(l) for l in layers})  # editkit's own write: statistics stay valid
        self._flag_convergence(edit)
        for layer in layers:
            w = lm.weight(layer).detach()
            d = w.double() - originals[layer].double()
            edit.deltas[layer] = d.float().cpu()
            edit.norms[layer] = {"delta_norm": d.norm().item(), "weight_norm": w.double().norm().item(),
                                 "original_norm": originals[layer].double().norm().item()}
            ratio = edit.norms[layer]["delta_norm"] / max(edit.norms[layer]["original_norm"], 1e-30)
            if ratio > HUGE_UPDATE_RATIO:
                edit.flags.setdefault("huge_update", []).append(layer)
            _report("huge_update", self.method, int(ratio > HUGE_UPDATE_RATIO), 1,
                    f"{self.method} at layer {layer}: ‖Δ‖ = {edit.norms[layer]['delta_norm']:.3g} is {ratio:.3g} × ‖W‖; "
                    "the edit dwarfs the layer's weights (check C0, reg and the value optimization); "
                    "edit.flags['huge_update'] names the layer")
        _report("last_layer", self.method, int(last), 1,
                f"{self.method} edits the last layer ({layers[-1]}): a change at the subject's last token there "
                "cannot reach the later tokens that predict the object, so the edit has no effect on them; pick "
                "an earlier layer")
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
        message = ""
        if bad:
            edit.flags["not_converged"] = bad
            init = edit.diagnostics.get("nll_init", [])
            shown = ", ".join(f"{edit.requests[i].subject!r} NLL {init[i]:.3g} → {final[i]:.3g}" for i in bad[:3])
            message = (f"{self.method}: value optimization did not converge for {len(bad)} of {len(conv)} request(s) "
                       f"in {self.values.v_steps} steps (stop_nll={self.values.stop_nll:g}): {shown}"
                       f"{' ...' if len(bad) > 3 else ''}. Raise v_steps or v_lr; edit.flags['not_converged'] and "
                       "edit.diagnostics['converged'] flag them")
        _report("not_converged", self.method, len(bad), len(conv), message)

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
        lm.sync_statistics()
        conv = conventions(self.protocol)
        spec = conv.rome_prefixes if self.rome_conventions else conv.prefixes
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
        return compute_keys(lm, reqs, layer, prefixes, mean=conv.rome_key_mean if self.rome_conventions else conv.key_mean)

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

    def _value_settings(self, lm: LanguageModel, layers: list[int]) -> tuple[int, list[str], ValueConfig]:
        """Where and how δ is optimized: the top edited layer, the context prefixes and the
        value settings under this editor's protocol (site: where δ and its reference h live)."""
        site = conventions(self.protocol).rome_site if self.rome_conventions else "block"
        return layers[-1], self.context(lm), dataclasses.replace(self.values, conventions=self.protocol, site=site)

    def prefetch_values(self, lm: LanguageModel, requests: Sequence[EditRequest | Any], progress: bool = False) -> None:
        """Optimize the δ of ``requests`` on the model as it is now, in padded batches, into the
        values memo, so that ``apply`` of any of them to this model state reuses it. Why: a runner
        that edits many facts one at a time into the same unedited model (the layer sweep) would
        otherwise run one unbatched optimization per fact, about as slow per fact on a GPU as on
        a CPU; the δ are the same (requests are independent, see :mod:`editkit.values`)."""
        reqs = _as_requests(requests)
        if reqs:
            top, prefixes, values = self._value_settings(lm, sorted(self.layers))
            with lm.eval_mode():
                memoized_values(lm, reqs, top, prefixes, values, progress=progress)

    def _apply_group(self, lm: LanguageModel, reqs: list[EditRequest], layers: list[int],
                     C0: dict[int, torch.Tensor | C0Factor], edit: Edit, progress: bool) -> None:
        diag = edit.diagnostics
        conv = conventions(self.protocol)
        top, prefixes, values = self._value_settings(lm, layers)
        site = values.site
        t0 = time.perf_counter()
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
            k_cur = self.original_rome and conv.rome_denominator == "k_cur"
            K_bare = compute_keys(lm, reqs, layer, [""]) if k_cur or self.mean_key_residual else None
            K_cur = K_bare if k_cur else None
            H = hidden_at_subject(lm, reqs, top, site=site)
            R = (Z.cpu() - H).T / (len(layers) - i)  # this layer's share of what is left
            W = lm.weight(layer)
            if self.mean_key_residual:  # r-ROME: v* − W k̄ = (Z − H) − W (k̄ − k_bare), H holding W k_bare
                R = (R.double() - (W.double() @ (K - K_bare).to(W.device).double()).cpu()).to(R.dtype)
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


def _check_c0(C: torch.Tensor, d_in: int, what: str, lm: LanguageModel | None = None,
              layer: int | None = None) -> None:
    if not isinstance(C, torch.Tensor) or tuple(C.shape) != (d_in, d_in):
        shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise ValueError(f"{what}: C0 must be a {d_in} × {d_in} tensor (the edited layer's d_in), got {shape}")
    if C.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{what}: C0 is {C.dtype}; give it in float64 (as ek.second_moment returns it) or float32: "
                         "a 16-bit C0 loses the small eigenvalues the solve divides by")
    origin = provenance(C)
    if origin is not None and lm is not None:
        if origin.get("model") != lm.name:
            raise ValueError(f"{what}: this C0 was computed from model {origin.get('model')!r}, not {lm.name!r}; "
                             "compute it with ek.second_moment on the model you edit")
        if layer is not None and origin.get("layer") != layer:
            raise ValueError(f"{what}: this C0 is layer {origin.get('layer')}'s of {lm.name}, not layer {layer}'s; "
                             f"pass stats={{{origin.get('layer')}: C0}} or compute layer {layer}'s")
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
    if requests is None or isinstance(requests, (str, bytes)) or not hasattr(requests, "__iter__"):
        raise RequestError(f"requests={requests!r}: give a non-empty list of ek.EditRequest (or records with "
                           ".request), e.g. editor.apply(lm, [ek.EditRequest('The mother tongue of {} is', "
                           "'Toko Yasuda', 'French')])")
    reqs = [r if isinstance(r, EditRequest) else getattr(r, "request", None) for r in requests]
    if not reqs or any(r is None for r in reqs):
        raise RequestError("requests must be a non-empty list of ek.EditRequest (or records with .request)")
    wanted: dict[tuple[str, str], str] = {}
    for r in reqs:
        old = wanted.setdefault((r.prompt, r.subject), r.target_new)
        if old != r.target_new:
            raise RequestError(
                f"one batch rewrites {r.text!r} both to {old!r} and to {r.target_new!r}: the two edits contradict "
                f"each other (subject {r.subject!r}); keep one of them, or apply them in separate batches")
    subjects = [r.subject for r in reqs]
    if len(set(subjects)) < len(subjects):
        log.warning("%d requests share a subject; their edits compete (use unique_subjects=True when loading)",
                    len(subjects) - len(set(subjects)))
    return reqs




# --- the methods ------------------------------------------------------------

#: Every editing method by name. ``@register`` adds one; runners, widgets and the CLI read it.
