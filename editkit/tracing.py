"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

Three runs of the model on a factual prompt ("{subject} was born in" → object):

* clean: the probability ``P̄`` of the true object (per-token geometric mean under
  teacher forcing; for a one-token object, its probability);
* corrupted: Gaussian noise (σ = ``noise`` × the standard deviation of the input
  embeddings, 3 by default, seeded) added to the embeddings of the subject's tokens;
* corrupted-with-restoration: as corrupted, but the clean hidden state of one site
  (a layer's MLP output, attention output or block output at one token, or a window
  of layers around it) is put back.

The *indirect effect* of a site is ``P̄(restored) − P̄(corrupted)``: how much of the
fact that site alone carries past the corruption. In ROME's GPT-2 XL figures the
MLP sites at the subject's last token in the early-to-middle layers carry it.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Sequence

import torch
from torch import nn

from .hooks import add_at_positions
from .metrics import token_logprobs
from .models import LanguageModel, in_eval_mode
from .requests import RequestError, tokenize_spans, with_target

__all__ = ["causal_trace", "layer_importance", "trace_sites", "KINDS"]

KINDS = ("mlp", "attn", "block")


def trace_sites(lm: LanguageModel, kind: str) -> list[nn.Module]:
    """The module whose output is the traced state, per layer."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    out = []
    for layer in range(lm.n_layers):
        block = lm.block(layer)
        if kind == "block":
            out.append(block)
        elif kind == "mlp":
            out.append(lm.edit_module(layer))  # the MLP's out-projection: its output is the MLP output
        else:
            for name in ("attn", "self_attn", "attention"):
                if hasattr(block, name):
                    out.append(getattr(block, name))
                    break
            else:
                raise ValueError(f"no attention module found in {type(block).__name__}; use kind='mlp' or 'block'")
    return out


def _prepare(lm: LanguageModel, prompt: str, subject: str, target: str):
    if "{}" in prompt:
        text = prompt.format(subject)
        s0 = prompt.index("{}")
    else:
        text = prompt
        if subject not in text:
            raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        s0 = text.index(subject)
    full, target_span = with_target(text, target)
    try:
        batch = tokenize_spans(lm.tokenizer, [full], [[(s0, s0 + len(subject)), target_span]],
                               max_positions=lm.max_positions)
    except RequestError as exc:
        raise ValueError(f"could not locate subject/target tokens in {full!r}: {exc}") from None
    subj, tgt = batch.spans[0]
    ids = batch.input_ids[0]
    n_prompt = tgt[0]  # tokens before the target
    return text, ids, subj, tgt, n_prompt


def _embed_std(lm: LanguageModel) -> float:
    """The spread of what the embedding module *outputs*, where the noise is added: its
    weight's std times the module's own output scale (Gemma 3's embedding multiplies by
    √d inside the module; with the weight's std alone the noise would be √d too small and
    the corruption would barely move the model). For a plain ``nn.Embedding`` the scale is 1."""
    emb = lm.model.get_input_embeddings()
    W = emb.weight.detach()
    ids = torch.arange(min(16, W.shape[0]), device=W.device)
    with torch.no_grad():
        scale = float(emb(ids).float().norm() / W[ids].float().norm())
    return float(W.float().std()) * (1.0 if abs(scale - 1.0) < 1e-6 else scale)


@torch.no_grad()
def _scores(lm: LanguageModel, ids: torch.Tensor, tgt: list[int], subj: list[int], n_rows: int, noise: torch.Tensor | None,
            site: nn.Module | list[nn.Module] | None = None, rows=None, cols=None, clean_states=None) -> torch.Tensor:
    """``P̄(target)`` for each of ``n_rows`` copies of ``ids``, with optional noise on the
    subject embeddings (``noise``: n_rows × |subj| × d) and restored sites."""
    batch = ids.unsqueeze(0).expand(n_rows, -1).to(lm.device)
    with ExitStack() as stack:
        if noise is not None:
            r = torch.arange(n_rows).repeat_interleave(len(subj))
            c = torch.tensor(subj).repeat(n_rows)
            stack.enter_context(add_at_positions(lm.model.get_input_embeddings(), r, c, noise.reshape(-1, noise.shape[-1])))
        if site is not None:
            for module, states in zip(site, clean_states):
                stack.enter_context(add_at_positions(module, rows, cols, states, replace=True))
        logits = lm.model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
    pos = torch.tensor(tgt, device=logits.device)
    copy = torch.arange(n_rows, device=logits.device).repeat_interleave(len(tgt))
    lp = token_logprobs(logits, copy, (pos - 1).repeat(n_rows), batch[0, pos].repeat(n_rows))[0]
    return lp.view(n_rows, len(tgt)).cpu().mean(1).exp()


def _noise(lm: LanguageModel, n: int, n_subj: int, scale: float, seed: int) -> torch.Tensor:
    d = lm.model.get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_subj, d, generator=gen) * scale * _embed_std(lm)


@torch.no_grad()
def _clean_states(lm: LanguageModel, ids: torch.Tensor, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    from .hooks import capture_output

    with ExitStack() as stack:
        seen = [stack.enter_context(capture_output(m)) for m in modules]
        x = ids.unsqueeze(0).to(lm.device)
        lm.model(input_ids=x, attention_mask=torch.ones_like(x))
    return [s[0][0].detach() for s in seen]  # each T × d


def _window(layer: int, n_layers: int, window: int) -> list[int]:
    lo = max(0, layer - window // 2)
    hi = min(n_layers, lo + window)
    lo = max(0, hi - window)
    return list(range(lo, hi))


@in_eval_mode
@torch.no_grad()
def causal_trace(lm: LanguageModel, prompt: str, subject: str, target: str, kind: str = "mlp", *,
                 samples: int = 10, noise: float = 3.0, window: int = 1, seed: int = 0,
                 tokens: Sequence[int] | None = None):
    """Indirect effect of every (layer, token) site on ``P̄(target)``.

    ``prompt`` has a ``{}`` for ``subject`` (or contains it); ``target`` is the true
    object. ``samples`` noise draws (seeded) are averaged; ``window`` > 1 restores that
    many consecutive layers around each layer (ROME uses 10 on GPT-2 XL; 1 suits the
    4-layer world models). Returns a long-form DataFrame with columns ``layer,
    token_index, token, score, indirect_effect, is_subject, is_subject_last,
    is_last`` and ``attrs`` ``clean``, ``corrupted``, ``kind``, ``prompt``.
    """
    import pandas as pd

    text, ids, subj, tgt, n_prompt = _prepare(lm, prompt, subject, target)
    modules = trace_sites(lm, kind)
    clean_states = _clean_states(lm, ids, modules)
    eps = _noise(lm, samples, len(subj), noise, seed)
    clean = float(_scores(lm, ids, tgt, subj, 1, None)[0])
    corrupted = float(_scores(lm, ids, tgt, subj, samples, eps).mean())
    positions = list(tokens) if tokens is not None else list(range(n_prompt))
    P = len(positions)
    rows = torch.arange(P * samples)
    cols = torch.tensor(positions).repeat_interleave(samples)
    noise_rep = eps.repeat(P, 1, 1)
    pieces = [lm.tokenizer.decode([i]) for i in ids[:n_prompt].tolist()]
    toks = [t.strip() or repr(t) for t in pieces]  # readable labels; whitespace-only tokens quoted
    records = []
    for layer in range(lm.n_layers):
        restore = _window(layer, lm.n_layers, window)
        mods = [modules[l] for l in restore]
        states = [clean_states[l][cols] for l in restore]
        s = _scores(lm, ids, tgt, subj, P * samples, noise_rep, mods, rows, cols, states).view(P, samples).mean(1)
        for i, t in enumerate(positions):
            records.append({"layer": layer, "token_index": t, "token": toks[t], "score": float(s[i]),
                            "indirect_effect": float(s[i]) - corrupted, "is_subject": t in subj,
                            "is_subject_last": t == subj[-1], "is_last": t == n_prompt - 1})
    frame = pd.DataFrame.from_records(records)
    frame.attrs.update(clean=clean, corrupted=corrupted, kind=kind, prompt=text, target=target, window=window,
                       noise=noise, samples=samples)
    return frame


def _triples(records: Sequence[Any]) -> list[tuple[str, str, str]]:
    out = []
    for r in records:
        if isinstance(r, dict) and "requested_rewrite" in r:
            rw = r["requested_rewrite"]
            out.append((rw["prompt"], rw["subject"], rw["target_true"]["str"]))
            continue
        req = getattr(r, "request", r)
        if getattr(req, "target_true", None) is None:
            raise ValueError("layer_importance needs records with a true target (target_true)")
        out.append((req.prompt, req.subject, req.target_true))
    return out


@in_eval_mode
@torch.no_grad()
def layer_importance(lm: LanguageModel, records: Sequence[Any], kind: str = "mlp", *, samples: int = 10,
                     noise: float = 3.0, window: int = 1, seed: int = 0, per_record: bool = False,
                     progress: bool = True):
    """Average indirect effect, per layer, of the site at the subject's last token
    (and, for comparison, at the prompt's last token) over ``records`` (CounterFact
    dicts, records with ``.request``, or EditRequests with ``target_true``).

    Returns one row per (layer, position) with ``indirect_effect`` (mean), ``sem``,
    ``n`` and the mean ``clean`` / ``corrupted`` probabilities; with
    ``per_record=True`` the unaggregated rows.
    """
    import pandas as pd
    from .progress import tqdm

    modules = trace_sites(lm, kind)
    rows_out = []
    triples = _triples(records)
    for i, (prompt, subject, target) in enumerate(tqdm(triples, desc=f"tracing ({kind})", disable=not progress)):
        text, ids, subj, tgt, n_prompt = _prepare(lm, prompt, subject, target)
        clean_states = _clean_states(lm, ids, modules)
        eps = _noise(lm, samples, len(subj), noise, seed + i)
        clean = float(_scores(lm, ids, tgt, subj, 1, None)[0])
        corrupted = float(_scores(lm, ids, tgt, subj, samples, eps).mean())
        positions = {"subject_last": subj[-1], "last": n_prompt - 1}
        pos = list(positions.values())
        r_ = torch.arange(len(pos) * samples)
        c_ = torch.tensor(pos).repeat_interleave(samples)
        for layer in range(lm.n_layers):
            restore = _window(layer, lm.n_layers, window)
            s = _scores(lm, ids, tgt, subj, len(pos) * samples, eps.repeat(len(pos), 1, 1), [modules[l] for l in restore],
                        r_, c_, [clean_states[l][c_] for l in restore]).view(len(pos), samples).mean(1)
            for k, name in enumerate(positions):
                rows_out.append({"record": i, "layer": layer, "position": name, "kind": kind, "score": float(s[k]),
                                 "clean": clean, "corrupted": corrupted, "indirect_effect": float(s[k]) - corrupted})
    frame = pd.DataFrame.from_records(rows_out)
    if per_record:
        return frame
    g = frame.groupby(["kind", "position", "layer"])
    out = g.agg(indirect_effect=("indirect_effect", "mean"), sem=("indirect_effect", "sem"),
                n=("indirect_effect", "size"), clean=("clean", "mean"), corrupted=("corrupted", "mean")).reset_index()
    out.attrs.update(kind=kind, window=window, noise=noise, samples=samples)
    return out
