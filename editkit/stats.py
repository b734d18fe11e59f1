"""Second-moment statistics ``C0 = E[k kᵀ]`` at the edited layer's input.

``C0`` stands for every key the edit should leave alone (the preservation term
``‖Ŵ K0 − W K0‖² = tr(Δ K0 K0ᵀ Δᵀ)`` only needs ``K0 K0ᵀ``). It is streamed over a
general text corpus, accumulated in float64 in a d_in × d_in buffer (memory
independent of the number of samples), and cached on disk in safetensors, keyed
by everything that affects it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .data.corpus import CorpusUnavailableError, corpus_name, iter_corpus, materialize_corpus
from .hooks import capture_input, stop_after
from .models import LanguageModel, in_eval_mode
from .paths import cache_dir
from .progress import tqdm

log = logging.getLogger(__name__)

__all__ = ["second_moment", "SecondMomentInfo", "condition_number", "save_cached_c0", "load_cached_c0"]


@dataclass(frozen=True)
class SecondMomentInfo:
    """What a C0 was computed from, and how usable it is."""

    model: str
    layer: int
    corpus: str
    n_samples: int
    max_tokens: int | None
    n_tokens: int
    d_in: int
    condition_number: float
    min_eigenvalue: float
    path: str | None = None
    fingerprint: str | None = None  # lm.fingerprint(upto_layer=layer) of the weights it was computed from


def condition_number(C: torch.Tensor) -> tuple[float, float]:
    """(λ_max / λ_min, λ_min) of a symmetric PSD matrix, in float64."""
    ev = torch.linalg.eigvalsh(C.double())
    lo, hi = ev[0].item(), ev[-1].item()
    return (hi / lo if lo > 0 else float("inf")), lo


def _offline_or(corpus: Any, lm: LanguageModel) -> Any:
    """An offline real-text corpus name (``"counterfact-text"``, ``"model-text"``, ``"offline-text"``: see
    :mod:`editkit.corpora`) as its texts, which may need the model; any other corpus unchanged."""
    from .corpora import is_offline_corpus, offline_texts

    return offline_texts(corpus, lm) if is_offline_corpus(corpus) else corpus


def _cache_path(lm: LanguageModel, layer: int, corpus: Any, n_samples: int | None, max_tokens: int | None,
                seq_len: int, fingerprint: str | None = None) -> Path:
    """The C0 file of these settings, keyed by the content of every weight that feeds ``layer``."""
    fingerprint = fingerprint or lm.fingerprint(upto_layer=layer)
    key = json.dumps([fingerprint, layer, corpus_name(corpus), n_samples, max_tokens, seq_len])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.name)[-60:]
    return cache_dir("stats") / f"{safe}-L{layer}-{digest}.safetensors"


def _count(name: str, value: Any, what: str, allow_none: bool = True) -> None:
    ok = (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r} is impossible; give {what}")


def float_name(x: float) -> str:
    """``x`` in a file name, losslessly (``repr`` round-trips every float: 0.1234567 and
    0.1234568 get two names, where ``%g`` gave one)."""
    return repr(float(x)).replace("+", "")


def provenance(C0: torch.Tensor) -> dict | None:
    """Where a C0 returned by :func:`second_moment` came from (model, layer, fingerprint of the
    weights feeding that layer), or None for a tensor made elsewhere."""
    return getattr(C0, "editkit_provenance", None)


@in_eval_mode
@torch.no_grad()
def second_moment(
    lm: LanguageModel,
    layer: int,
    corpus: str | Sequence[str] | os.PathLike = "wikitext",
    n_samples: int | None = 100_000,
    *,
    max_tokens: int | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    cache: bool = True,
    progress: bool = True,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SecondMomentInfo]:
    """``C0 = (1/N) Σ k kᵀ`` over the non-pad tokens of ``n_samples`` corpus texts.

    ``max_tokens`` stops after that many token keys (the minimal-precomputation
    setting: a small multiple of d_in keys already gives a usable C0). Returns a
    float64 CPU tensor (d_in × d_in); with ``return_info`` also a
    :class:`SecondMomentInfo` with the token count and condition number.
    """
    _count("n_samples", n_samples, "a positive number of corpus texts, or None for the whole corpus")
    _count("max_tokens", max_tokens, "a positive number of token keys, or None for no limit")
    _count("batch_size", batch_size, "a positive number of texts per forward pass", allow_none=False)
    _count("seq_len", seq_len, "a positive number of tokens, or None for the model's context")
    seq_len = seq_len or min(getattr(lm.tokenizer, "model_max_length", 1024) or 1024, 1024,
                             lm.max_positions or 1024)
    corpus = materialize_corpus(corpus, n_samples)
    d_in = lm.d_in(layer)
    fingerprint = lm.fingerprint(upto_layer=layer)
    origin = {"model": lm.name, "layer": int(layer), "fingerprint": fingerprint}
    path = _cache_path(lm, layer, corpus, n_samples, max_tokens, seq_len, fingerprint) if cache else None
    if cache and path.exists():
        cached = load_cached_c0(path, d_in, fingerprint)
        if cached is not None:
            C0, info = cached
            C0.editkit_provenance = origin
            log.info("C0 for %s layer %d loaded from %s (%d tokens)", lm.name, layer, path, info.n_tokens)
            return (C0, info) if return_info else C0

    module = lm.edit_module(layer)
    acc = torch.zeros(d_in, d_in, dtype=torch.float64, device=module.weight.device)
    n_tokens = 0
    texts = iter_corpus(_offline_or(corpus, lm), n_samples)
    bar = tqdm(total=max_tokens or n_samples, desc=f"C0 layer {layer}", unit="tok" if max_tokens else "text",
               disable=not progress)
    done = False
    while not done:
        chunk = [t for _, t in zip(range(batch_size), texts)]
        if not chunk:
            break
        enc = lm.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
        mask = enc["attention_mask"].bool()
        with capture_input(module) as seen, stop_after(module):  # the layers above and the LM head are not needed
            lm.model(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device))
        K = seen[0][mask.to(seen[0].device)].to(acc.device, torch.float64)  # (tokens, d_in)
        if max_tokens is not None and n_tokens + len(K) >= max_tokens:
            K, done = K[: max_tokens - n_tokens], True
        acc.addmm_(K.T, K)
        n_tokens += len(K)
        bar.update(len(K) if max_tokens else len(chunk))
    bar.close()
    if n_tokens == 0:
        raise CorpusUnavailableError(f"corpus {corpus_name(corpus)!r} produced no tokens; C0 cannot be estimated")
    C0 = (acc / n_tokens).cpu()
    if not torch.isfinite(C0).all():
        raise ValueError(f"C0 at layer {layer} of {lm.name} is not finite (NaN/inf keys): the model's weights or "
                         "activations overflow; check the model (e.g. load it in float32) before editing")
    cond, lo = condition_number(C0)
    info = SecondMomentInfo(lm.name, layer, corpus_name(corpus), int(n_samples or 0), max_tokens, n_tokens, d_in,
                            cond, lo, str(path) if cache else None, fingerprint)
    if n_tokens < d_in:
        log.warning("C0 at layer %d from only %d keys < d_in=%d: it is rank-deficient; use more samples", layer,
                    n_tokens, d_in)
    log.info("C0 for %s layer %d: %d tokens, condition number %.3g", lm.name, layer, n_tokens, cond)
    if cache:
        save_cached_c0(path, C0, info)
    C0.editkit_provenance = origin
    return (C0, info) if return_info else C0


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().data).hexdigest()


def save_cached_c0(path: Path, C0: torch.Tensor, info: SecondMomentInfo) -> None:
    """Write C0 with its shape, dtype, sha256 and info in the file's metadata, atomically
    (a unique temporary name, so concurrent writers never collide)."""
    from safetensors.torch import save_file

    C0 = C0.contiguous()
    meta = {"info": json.dumps(asdict(info)), "sha256": _tensor_sha256(C0), "shape": json.dumps(list(C0.shape)),
            "dtype": str(C0.dtype)}
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    save_file({"C0": C0}, str(tmp), metadata=meta)
    side = path.with_suffix(".json")
    side_tmp = side.with_name(f".{side.name}.{tag}.tmp")
    side_tmp.write_text(json.dumps(asdict(info)))
    os.replace(side_tmp, side)
    os.replace(tmp, path)


def load_cached_c0(path: Path, d_in: int, fingerprint: str | None = None
                   ) -> tuple[torch.Tensor, SecondMomentInfo] | None:
    """The cached C0 if the file is intact: a (d_in × d_in) float64 tensor whose bytes
    match the sha256 it was saved with, finite, and (given ``fingerprint``) computed from
    weights of that fingerprint. Otherwise None, with a warning naming the file and why
    (the caller recomputes and overwrites it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as h:
            meta = h.metadata() or {}
            C0 = h.get_tensor("C0")
        if "sha256" not in meta or "info" not in meta:
            raise ValueError("no checksum in its metadata (written by an older editkit)")
        if tuple(C0.shape) != (d_in, d_in):
            raise ValueError(f"shape {tuple(C0.shape)} ≠ ({d_in}, {d_in})")
        if C0.dtype != torch.float64:
            raise ValueError(f"dtype {C0.dtype} ≠ torch.float64")
        if _tensor_sha256(C0) != meta["sha256"]:
            raise ValueError("its bytes do not match the sha256 it was saved with")
        if not torch.isfinite(C0).all():
            raise ValueError("it holds NaN/inf")
        info = SecondMomentInfo(**json.loads(meta["info"]))
        if fingerprint is not None and info.fingerprint not in (None, fingerprint):  # None: written before it was stored
            raise ValueError(f"it was computed from weights with fingerprint {info.fingerprint}, not {fingerprint}")
    except Exception as exc:  # safetensors raises its own types for garbage, truncated or empty files
        log.warning("cached C0 %s is unusable (%s: %s); recomputing it", path, type(exc).__name__, exc)
        return None
    return C0, info


def c0_factor(lm: LanguageModel, layer: int, corpus: str | Sequence[str] | os.PathLike = "wikitext",
              n_samples: int | None = 100_000, *, max_tokens: int | None = None, ridge_eps: float = 0.0,
              dtype: torch.dtype = torch.float64, device: torch.device | str | None = None, cache: bool = True,
              progress: bool = True, C0: torch.Tensor | None = None) -> "C0Factor":
    """The Cholesky factor of ``C0 + ridge`` (:class:`~editkit.solver.C0Factor`), cached on disk beside C0.

    Same key as :func:`second_moment` plus the ridge and dtype; the stored factor
    carries the checksum of the C0 it factorizes and is recomputed when the C0 on
    disk no longer matches it. Factorizing is O(d_in³) (a minute on one CPU core at
    d_in = 14 336); reading it back is a file read. ``C0`` given (e.g. the unedited
    model's, kept by an editor across sequential edits): that C0 is factorized, and a
    stored factor is used only if it was made from exactly that C0.
    """
    from .solver import C0Factor, c0_checksum

    if not (isinstance(ridge_eps, (int, float)) and math.isfinite(ridge_eps) and ridge_eps >= 0):
        raise ValueError(f"ridge_eps={ridge_eps!r} is impossible; give a finite ε ≥ 0 (c0_ridge)")
    if C0 is None:
        C0 = second_moment(lm, layer, corpus, n_samples, max_tokens=max_tokens, cache=cache, progress=progress)
    if not cache:
        F = C0Factor.of(C0, ridge_eps, dtype, device)
        F.checksum = c0_checksum(C0)
        return F
    checksum = c0_checksum(C0)
    seq_len = min(getattr(lm.tokenizer, "model_max_length", 1024) or 1024, 1024, lm.max_positions or 1024)
    c0_path = _cache_path(lm, layer, materialize_corpus(corpus, n_samples), n_samples, max_tokens, seq_len)  # C0's key
    # The file is tied to the exact C0 by its checksum (checked on load), so the name only has to keep
    # factors of other settings apart: the ridge written losslessly (``%g`` merged 0.1234567 and 0.1234568).
    path = c0_path.with_name(f"{c0_path.stem}.chol-{str(dtype).removeprefix('torch.')}-r{float_name(ridge_eps)}"
                             ".safetensors")
    if path.exists():
        F = C0Factor.load(path, checksum, d_in=C0.shape[0], dtype=dtype)
        if F is not None:
            log.info("C0 factor for %s layer %d loaded from %s", lm.name, layer, path)
            return F.to(device) if device is not None else F
    F = C0Factor.of(C0, ridge_eps, dtype, device)
    F.checksum = checksum
    if cache:
        F.save(path)
    return F
