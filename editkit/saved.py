"""Saved edits: hand a colleague "these 64 facts, edited with MEMIT at layer 8" as files.

``edit.save(path)`` writes a folder with two files:

* ``updates.safetensors``: per edited layer, the update Δ (d_out × d_in, float64, so that
  ``W + Δ`` rounds back to the edited weights bit for bit), or low-rank factors
  ``Δ ≈ U Vᵀ`` where they are smaller (an edit of E facts has rank ≤ E) and rebuild the
  edited weights within 1e-6 (the card says how close), plus the keys K the update was
  written at (AlphaEdit's later edits preserve them);
* ``edit.json``: the card: method, every hyperparameter, protocol, requests, the
  unedited model's name and weight fingerprint, C0's provenance, the versions of
  editkit/torch/transformers, norms, diagnostics and timings.

``ek.load_edit(path)`` reads them back (safetensors and JSON only: nothing is
unpickled) and ``.apply(lm)`` returns an :class:`~editkit.editors.Edit` that undoes and
commits as usual. It refuses a model whose weights differ from the ones the edit was
made on (the fingerprint), unless ``force=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import runlog
from .editors import METHODS, Edit, EditError, Editor
from .models import LanguageModel, _tensor_digest
from .requests import EditRequest

log = logging.getLogger(__name__)

__all__ = ["save_edit", "load_edit", "SavedEdit", "weights_fingerprint", "FORMAT"]

FORMAT = "editkit-edit/1"
CARD, UPDATES = "edit.json", "updates.safetensors"


def weights_fingerprint(lm: LanguageModel) -> str:
    """sha256 over the names and bytes of the model's parameters, in the module's order:
    the identity of the *weights*, whatever the model is called or where it was loaded from
    (``lm.fingerprint()`` also hashes the name and config). Per-tensor digests are cached
    on ``lm`` as for ``lm.fingerprint``, so only tensors changed since are hashed again."""
    digests: dict = lm.cache.setdefault("_tensor_digests", {})
    h = hashlib.sha256()
    for name, t in lm.model.named_parameters(remove_duplicate=False):
        h.update(name.encode())
        h.update(_tensor_digest(name, t, digests).encode())
    return h.hexdigest()[:16]


@contextmanager
def _unedited(edit: Edit) -> Iterator[None]:
    """The model as it was before ``edit`` for the duration of the block (its edited layers
    swapped back to the saved originals), then exactly as it is now."""
    lm = edit.lm
    if edit.undone:
        yield
        return
    if edit.committed or not lm.edits or lm.edits[-1] is not edit:
        raise EditError("save an edit while it is the most recent one on the model (or after undoing it): after "
                        "commit() or a later edit the unedited weights it must record are gone")
    now = {l: lm.weight(l).detach().clone() for l in edit.originals}
    try:
        with torch.no_grad():
            for l, w in edit.originals.items():
                lm.weight(l).copy_(w)
        yield
    finally:
        with torch.no_grad():
            for l, w in now.items():
                lm.weight(l).copy_(w)


def _factor(delta: torch.Tensor, original: torch.Tensor, rank_bound: int,
            tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(U, V, err)`` with ``Ŵ = W + U Vᵀ`` within ``tol`` (max abs, ``err``) of ``W + Δ`` once
    rounded to the weights' dtype, when ``rank_bound`` (+8) columns take less room than Δ; else None.

    The solver's update has rank ≤ the number of requests, but the stored difference of
    edited and original weights also carries their rounding (full rank, half an ulp). Δ's
    column space is taken from ``Δ Ω`` (seeded random Ω, a few columns more than the rank),
    which keeps the update and drops most of that rounding; the factors are kept only if
    the weights they rebuild are within ``tol`` of the edited ones."""
    d_out, d_in = delta.shape
    r = min(rank_bound + 8, d_out, d_in)
    if r * (d_out + d_in) >= d_out * d_in:
        return None
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(d_in, r, dtype=torch.float64, generator=g)
    Q, _ = torch.linalg.qr(delta @ omega)
    V = delta.T @ Q  # Δ ≈ Q Qᵀ Δ = Q Vᵀ
    W = original.detach().cpu()
    err = ((W.double() + Q @ V.T).to(W.dtype).double() - (W.double() + delta).to(W.dtype).double()).abs().max().item()
    if not err <= tol:
        return None
    return Q.contiguous(), V.contiguous(), err


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    return repr(x)


def save_edit(edit: Edit, path: str | Path) -> Path:
    """Write ``edit`` to the folder ``path`` (created; files in it replaced). See the module doc."""
    from safetensors.torch import save_file

    if not edit.deltas:
        raise EditError("this edit has no updates to save (it failed before finishing)")
    lm = edit.lm
    with _unedited(edit):
        fingerprint = weights_fingerprint(lm)
    tensors: dict[str, torch.Tensor] = {}
    storage: dict[str, dict[str, Any]] = {}
    for layer in sorted(edit.deltas):
        # exact in float64: the edited and the original weights differ by a difference of two stored numbers
        delta = edit_delta(edit, layer)
        keys = edit.keys.get(layer)
        factors = None
        if layer in edit.originals:  # after commit() the originals are gone: Δ is stored as it is
            factors = _factor(delta, edit.originals[layer], keys.shape[1] if keys is not None else min(delta.shape))
        if factors is None:
            tensors[f"delta.{layer}"] = delta.contiguous()
            storage[str(layer)] = {"form": "dense", "shape": list(delta.shape)}
        else:
            tensors[f"u.{layer}"], tensors[f"v.{layer}"], err = factors
            storage[str(layer)] = {"form": "low_rank", "shape": list(delta.shape), "rank": factors[0].shape[1],
                                   "max_abs_error": err}
        if keys is not None:
            tensors[f"keys.{layer}"] = keys.detach().to(torch.float64).cpu().contiguous()
    editor = edit.editor
    hparams = editor.to_dict() if hasattr(editor, "to_dict") else dict(editor or {})
    card = {
        "format": FORMAT,
        "method": edit.method,
        "hparams": _jsonable(hparams),
        "protocol": _jsonable(hparams.get("protocol")),
        "requests": [asdict(r) for r in edit.requests],
        "model": {"name": lm.name, "weights_fingerprint": fingerprint, "n_layers": lm.n_layers,
                  "model_type": getattr(lm.model.config, "model_type", None), "dtype": str(lm.dtype)},
        "layers": storage,
        "c0": _jsonable(edit.c0),
        "versions": runlog.versions(),
        "norms": _jsonable(edit.norms),
        "diagnostics": _jsonable(edit.diagnostics),
        "timings": _jsonable(edit.timings),
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / UPDATES), metadata={"format": FORMAT})
    (out / CARD).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    log.info("saved the %s edit of %d request(s) to %s", edit.method, len(edit.requests), out)
    return out


def edit_delta(edit: Edit, layer: int) -> torch.Tensor:
    """Δ at ``layer`` in float64: edited minus original weights, exactly (from the model while the
    edit is applied, else from the float32 ``edit.deltas``)."""
    if layer in edit.originals and not edit.undone and not edit.committed and edit.lm.edits and \
            edit.lm.edits[-1] is edit:
        return (edit.lm.weight(layer).detach().double() - edit.originals[layer].double()).cpu()
    return edit.deltas[layer].double()


@dataclass
class SavedEdit:
    """An edit read from disk: its card and its per-layer updates, ready to :meth:`apply`."""

    card: dict[str, Any]
    deltas: dict[int, torch.Tensor] = field(repr=False)  # Δ per layer, float64 CPU
    keys: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)
    path: Path | None = None

    @property
    def method(self) -> str:
        return self.card["method"]

    @property
    def requests(self) -> list[EditRequest]:
        return [EditRequest(**r) for r in self.card["requests"]]

    def apply(self, lm: LanguageModel, *, force: bool = False) -> Edit:
        """Write the saved updates into ``lm`` and return the :class:`Edit` (undo, commit as usual).

        Refused, changing nothing, when ``lm``'s weights are not the ones the edit was made on
        (its fingerprint differs), unless ``force=True``; a layer of another shape is refused always."""
        want = self.card["model"]["weights_fingerprint"]
        for layer, d in self.deltas.items():
            lm._check_layer(layer)
            if tuple(lm.weight(layer).shape) != tuple(d.shape):
                raise EditError(f"layer {layer}: the saved update is {tuple(d.shape)} but {lm.name}'s weight is "
                                f"{tuple(lm.weight(layer).shape)}; this edit is for another architecture")
        have = weights_fingerprint(lm)
        if have != want:
            if not force:
                raise EditError(f"{lm.name}'s weights (fingerprint {have}) are not the ones this edit was made on "
                                f"({self.card['model']['name']}, fingerprint {want}); load that model, or pass "
                                "force=True to write the updates into these weights anyway")
            log.warning("applying a saved edit made on %s (fingerprint %s) to other weights (%s): forced",
                        self.card["model"]["name"], want, have)
        lm.check_finite()
        originals = {l: lm.weight(l).detach().clone() for l in sorted(self.deltas)}
        edit = Edit(lm=lm, method=self.method, requests=self.requests, originals=originals,
                    editor=dict(self.card.get("hparams", {})),
                    c0={int(k): v for k, v in self.card.get("c0", {}).items()})
        lm.edits.append(edit)
        try:
            with torch.no_grad():
                for layer, d in self.deltas.items():
                    W = lm.weight(layer)
                    new = (W.double() + d.to(W.device)).to(W.dtype)
                    if not torch.isfinite(new).all():
                        raise EditError(f"layer {layer}: the saved update overflows {W.dtype}; no weights were changed")
                    W.copy_(new)
            lm.weights_written({lm.weight_name(l) for l in self.deltas})  # an editkit edit: statistics stay
            self._written(lm, edit)
        except BaseException:
            edit.undo()
            raise
        for layer in sorted(self.deltas):
            w = lm.weight(layer).detach().double()
            edit.deltas[layer] = (w - originals[layer].double()).float().cpu()
            edit.norms[layer] = {"delta_norm": (w - originals[layer].double()).norm().item(),
                                 "weight_norm": w.norm().item(), "original_norm": originals[layer].double().norm().item()}
        edit.keys = {l: k.clone() for l, k in self.keys.items()}
        edit.diagnostics = dict(self.card.get("diagnostics", {}))
        return edit

    def _written(self, lm: LanguageModel, edit: Edit) -> None:
        """The method's model state besides the weights (AlphaEdit: the preserved keys), as apply leaves it."""
        cls = METHODS.get(self.method)
        if cls is None or cls._written is Editor._written or not self.keys:
            return
        helper = cls(layers=sorted(self.keys))
        for layer, K in self.keys.items():
            helper._written(lm, layer, K, edit)


def load_edit(path: str | Path) -> SavedEdit:
    """Read an edit written by ``edit.save(path)``; ``.apply(lm)`` makes it."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CARD).is_file() or not (folder / UPDATES).is_file():
        raise FileNotFoundError(f"{folder}: not a saved edit (needs {CARD} and {UPDATES}, written by edit.save)")
    card = json.loads((folder / CARD).read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{folder / CARD}: format {card.get('format')!r}, expected {FORMAT!r} (a newer editkit?)")
    tensors = load_file(str(folder / UPDATES))
    deltas, keys = {}, {}
    for layer_s, info in card["layers"].items():
        layer = int(layer_s)
        if info["form"] == "dense":
            deltas[layer] = tensors[f"delta.{layer}"]
        else:
            deltas[layer] = tensors[f"u.{layer}"] @ tensors[f"v.{layer}"].T
        if f"keys.{layer}" in tensors:
            keys[layer] = tensors[f"keys.{layer}"]
    return SavedEdit(card=card, deltas=deltas, keys=keys, path=folder)
