"""Peers' hyperparameter files → editkit editors.

The ROME and MEMIT repositories, the study authors' unified-model-editing and AlphaEdit
ship one JSON file per method and model (``hparams/MEMIT/gpt2-xl.json``); EasyEdit ships
YAML with the same fields plus ``alg_name``, ``model_name``, ``device`` and ``stats_dir``.
:func:`load_hparams` reads either into the editor with their values, so a colleague's
configuration runs here unchanged::

    editor = ek.load_hparams("hparams/MEMIT/gpt2-xl.json", lm=lm)

Every field of such a file falls in one of four groups, each a table below:

* mapped onto an editkit setting (``v_num_grad_steps`` → ``v_steps``, ``mom2_update_weight``
  → MEMIT's λ, ...);
* fixed: editkit implements one value (``fact_token: subject_last``); another value raises;
* no meaning here (``device``, ``stats_dir``, the module templates, which editkit's adapter
  names): reported, and checked against the model's adapter when ``lm`` is given;
* anything else: an error listing the unknown fields, never silently dropped.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from .editors import METHODS, Editor, make_editor
from .models import ADAPTERS, LanguageModel

log = logging.getLogger(__name__)

__all__ = ["load_hparams", "read_hparams", "PeerHparams", "HparamsError", "HparamsNotice"]


class HparamsError(ValueError):
    """A hyperparameter file editkit cannot run as its authors meant it."""


class HparamsNotice(UserWarning):
    """Fields of a hyperparameter file that have no effect in editkit (listed once per load)."""


#: The file's name → editkit's, for every method (values: ek.ValueConfig's fields keep their names).
MAPPED: dict[str, str] = {
    "layers": "layers", "v_num_grad_steps": "v_steps", "v_lr": "v_lr", "v_weight_decay": "v_weight_decay",
    "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor", "mom2_n_samples": "n_samples",
    "mom2_dataset": "corpus",
}

#: Per method: the file's name → editkit's, or → None with the reason it does nothing there.
METHOD_FIELDS: dict[str, dict[str, str | tuple[None, str]]] = {
    "MEMIT": {"mom2_update_weight": "reg"},
    "EMMET": {"mom2_update_weight": "mom2_update_weight", "emmet_lambda": "reg"},
    "AlphaEdit": {"L2": "reg", "nullspace_threshold": "nullspace_threshold",
                  "mom2_update_weight": (None, "AlphaEdit's solve has no C0 weight: C0 enters only through the "
                                               "null-space projector")},
    "ROME": {"mom2_update_weight": (None, "scaling C0 does not change an equality-constrained (ROME) update")},
    "r-ROME": {"mom2_update_weight": (None, "scaling C0 does not change an equality-constrained (ROME) update")},
    "unified-ROME": {"mom2_update_weight": (None, "scaling C0 does not change an equality-constrained (ROME) update")},
}

#: Fields whose one value editkit implements: (accepted values, what editkit does).
FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "fact_token": (("subject_last",), "keys and values are read at the subject's last token"),
    "layer_selection": (("all",), "every layer in `layers` is edited"),
    "mom2_adjustment": ((True,), "every method preserves C0"),
    "update_norm_lambda": ((0, 0.0), "EMMET's update-norm penalty is not implemented"),
    "norm_control": ((0, 0.0), "EMMET's norm control is not implemented"),
    "prob_cutoff": ((0, 0.0), "EMMET's probability cut-off is not implemented"),
}

#: Fields with no meaning here, and why.
NO_MEANING: dict[str, str] = {
    "alg_name": "names the method",
    "model_name": "the model is the one you pass to apply()",
    "device": "editkit edits on the model's own device",
    "stats_dir": "C0 is cached under EDITKIT_CACHE, keyed by the model's weights",
    "model_parallel": "the model's placement is load_model's device_map",
    "calculate_objective_value": "a logging switch of the authors' code",
    "mom2_dtype": "C0 is accumulated in float64 here and solved in the editor's solve_dtype",
    "v_loss_layer": "the value loss is always read at the model's output (the last layer)",
}

#: Module templates and the adapter attribute each must agree with.
TEMPLATES = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
             "lm_head_module")


@dataclass
class PeerHparams:
    """A peer's hyperparameter file, read: the method, the editor's keyword arguments,
    and every field that has no effect here with the reason (``ignored``)."""

    method: str
    params: dict[str, Any]
    ignored: dict[str, str] = field(default_factory=dict)
    source: str = "<dict>"

    def editor(self, **overrides: Any) -> Editor:
        """The editor with the file's values (``overrides``, any field or alias, on top)."""
        return make_editor(self.method, **{**self.params, **overrides})


def _read(src: str | PathLike | dict) -> tuple[dict, Path | None]:
    if isinstance(src, dict):
        return dict(src), None
    path = Path(src)
    if not path.is_file():
        raise HparamsError(f"hparams file {str(path)!r} does not exist; pass a ROME/MEMIT .json, an EasyEdit "
                           ".yaml, or a dict")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # PyYAML comes with transformers

        data = yaml.safe_load(text)
        if isinstance(data, dict):  # YAML 1.1 reads "5e-1" (no dot) as a string; the authors meant 0.5
            data = {k: _number(v) for k, v in data.items()}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise HparamsError(f"{path}: expected a mapping of field names to values, got {type(data).__name__}")
    return data, path


def _number(value: Any) -> Any:
    """A string that spells a number, as that number (``"5e-1"`` → 0.5); anything else unchanged."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
        return float(value)
    return value


def _method(data: dict, path: Path | None, method: str | None) -> str:
    """``method``, else the file's ``alg_name``, else its folder's name (``hparams/MEMIT/x.json``)."""
    def norm(name: Any) -> str:
        return str(name).lower().replace("-", "").replace("_", "")

    names = {norm(m): m for m in METHODS}
    for given, what in ((method, "method"), (data.get("alg_name"), "alg_name")):
        if given is not None:
            if norm(given) not in names:
                raise HparamsError(f"{what}={given!r} is not one of {sorted(METHODS)}")
            return names[norm(given)]
    folder = path.parent.name if path is not None else None
    if folder is not None and norm(folder) in names:
        return names[norm(folder)]
    raise HparamsError(f"cannot tell the method: no alg_name in the file and its folder ({folder!r}) is not a "
                       f"method's name; pass method= (one of {sorted(METHODS)})")


def _check_template(name: str, value: Any, lm: LanguageModel | None) -> str:
    """Why a module template is ignored, or HparamsError if it disagrees with ``lm``'s adapter."""
    if lm is None:
        families = [a.family for a in ADAPTERS.values() if name == "rewrite_module_tmp" and a.edit_module == value]
        hint = f" (the {'/'.join(families)} adapter's)" if families else ""
        return f"module template{hint}: editkit's adapter names the modules; pass lm= to check it against the model"
    a = lm.adapter
    want = {"rewrite_module_tmp": a.edit_module, "layer_module_tmp": f"{a.blocks}.{{}}", "ln_f_module": a.final_norm}
    if name in want and value != want[name]:
        raise HparamsError(f"{name}={value!r} does not match {lm.name}'s adapter ({want[name]!r}); the file is for "
                           "another architecture, or pass load_model(..., adapter=ek.Adapter(...)) with its modules")
    if name in ("mlp_module_tmp", "attn_module_tmp", "lm_head_module"):
        path = str(value).format(0)
        try:
            module = lm.model.get_submodule(path)
        except AttributeError:
            raise HparamsError(f"{name}={value!r}: {lm.name} has no module {path!r}; the file is for another "
                               "architecture") from None
        if name == "lm_head_module":
            out = lm.model.get_output_embeddings()
            if getattr(module, "weight", None) is not getattr(out, "weight", object()):
                raise HparamsError(f"lm_head_module={value!r} is not {lm.name}'s unembedding ({a.unembed!r})")
    return "module template: matches the model's adapter"


def read_hparams(src: str | PathLike | dict, *, method: str | None = None,
                 lm: LanguageModel | None = None) -> PeerHparams:
    """Read a ROME/MEMIT/unified-model-editing/AlphaEdit JSON or EasyEdit YAML file (or
    its dict) into a :class:`PeerHparams`. ``method`` overrides ``alg_name`` and the
    folder name; with ``lm``, the module templates and ``v_loss_layer`` are checked
    against the model. Unknown fields raise :class:`HparamsError` listing them all."""
    data, path = _read(src)
    name = _method(data, path, method)
    own = METHOD_FIELDS.get(name, {})
    params: dict[str, Any] = {"protocol": "reference"}  # these files come from the reference implementation
    ignored: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in data.items():
        target = own.get(key, MAPPED.get(key))
        if isinstance(target, tuple):
            ignored[key] = target[1]
        elif target is not None:
            params[target] = value
        elif key in FIXED:
            allowed, what = FIXED[key]
            if value not in allowed or isinstance(value, bool) is not isinstance(allowed[0], bool):
                raise HparamsError(f"{key}={value!r}: editkit implements only {key}={allowed[0]!r} ({what}); "
                                   "remove the field or set it to that value")
        elif key in TEMPLATES:
            ignored[key] = _check_template(key, value, lm)
        elif key in NO_MEANING:
            ignored[key] = NO_MEANING[key]
        else:
            unknown.append(key)
    if unknown:
        raise HparamsError(f"{path or 'hparams'}: unknown field(s) {sorted(unknown)} for {name}; editkit maps "
                           f"{sorted({*MAPPED, *own})}, fixes {sorted(FIXED)} and ignores "
                           f"{sorted({*NO_MEANING, *TEMPLATES})}")
    if lm is not None and "v_loss_layer" in data and data["v_loss_layer"] != lm.n_layers - 1:
        raise HparamsError(f"v_loss_layer={data['v_loss_layer']} but {lm.name} has {lm.n_layers} layers: the file "
                           f"is for another model (editkit reads the loss at the output, layer {lm.n_layers - 1})")
    return PeerHparams(name, params, ignored, str(path) if path else "<dict>")


def load_hparams(src: str | PathLike | dict, *, method: str | None = None, lm: LanguageModel | None = None,
                 **overrides: Any) -> Editor:
    """The editor a peer's hyperparameter file describes, with its values.

    ``src``: a path to a JSON (ROME, MEMIT, unified-model-editing, AlphaEdit) or YAML
    (EasyEdit) file, or its contents as a dict. The method is ``method``, else the
    file's ``alg_name``, else its folder's name. ``overrides`` (any editor field or
    alias) go on top, e.g. ``corpus="wikitext"`` where Wikipedia is not available.
    The fields that have no effect here are listed in one :class:`HparamsNotice`
    warning; :func:`read_hparams` returns them instead."""
    hp = read_hparams(src, method=method, lm=lm)
    if hp.ignored:
        listing = "; ".join(f"{k} ({why})" for k, why in hp.ignored.items())
        warnings.warn(f"{hp.source}: fields with no effect in editkit: {listing}", HparamsNotice, stacklevel=2)
    return hp.editor(**overrides)
