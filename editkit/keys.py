"""Keys ``k*``: the edited layer's input at the subject's last token.

A key is averaged over the prompt preceded by a few short context prefixes, so the
edit fires whatever text comes before the subject. Because the model is causal, the
key depends only on the text up to the subject, so the prompt's tail is irrelevant.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .hooks import capture_input, capture_output, stop_after
from .models import LanguageModel
from .requests import EditRequest, tokenize_spans

__all__ = ["context_prefixes", "compute_keys", "hidden_at_subject"]


@torch.no_grad()
def context_prefixes(lm: LanguageModel, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``[""]`` plus ``n`` short texts sampled from the model itself (top-5, seeded).

    Deterministic for a given model and seed, and cached on the model object.
    """
    lm.sync_statistics()  # prefixes of weights changed since (outside editkit's edits) are dropped
    key = ("prefixes", n, length, seed)
    if key in lm.cache:
        return lm.cache[key]
    prefixes = [""]
    if n > 0:
        gen = torch.Generator().manual_seed(seed)
        tok = lm.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = torch.full((n, 1), start, dtype=torch.long)
        for _ in range(length):
            x = ids.to(lm.device)  # unpadded: the mask says so (BOS may share the pad id)
            logits = lm.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].float().cpu()
            top = logits.topk(5, dim=-1)
            pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
            ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
        for row in ids[:, 1:]:
            text = tok.decode(row, skip_special_tokens=True).replace("{", "").replace("}", "").strip()
            prefixes.append(f"{text}. " if text else "")
    lm.cache[key] = prefixes
    return prefixes


def _prefixed(requests: Sequence[EditRequest], prefixes: Sequence[str]):
    texts, spans = [], []
    for r in requests:
        s0, s1 = r.subject_span
        for p in prefixes:
            texts.append(p + r.text)
            spans.append([(len(p) + s0, len(p) + s1)])
    return texts, spans


@torch.no_grad()
def compute_keys(lm: LanguageModel, requests: Sequence[EditRequest], layer: int,
                 prefixes: Sequence[str] = ("",), batch_size: int = 64, mean: str = "flat") -> torch.Tensor:
    """``K`` (d_in × E): each request's key averaged over ``prefixes``.

    ``mean="flat"`` averages all prefixed prompts alike; ``mean="groups"`` (the reference
    protocol's MEMIT/EMMET keys) averages two group means, the bare prompt (``prefixes[0]``,
    which must be ``""``) and the mean of the others, so the bare prompt weighs one half
    (with no other prefix, the bare prompt's key)."""
    if mean not in ("flat", "groups"):
        raise ValueError(f"mean={mean!r}: choose 'flat' or 'groups'")
    if mean == "groups" and prefixes[0] != "":
        raise ValueError("mean='groups' needs the bare prompt first (prefixes[0] == '')")
    texts, spans = _prefixed(requests, prefixes)
    module = lm.edit_module(layer)
    rows = []
    for i in range(0, len(texts), batch_size):
        batch = tokenize_spans(lm.tokenizer, texts[i:i + batch_size], spans[i:i + batch_size],
                               max_positions=lm.max_positions)
        with capture_input(module) as seen, stop_after(module):
            lm.model(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device))
        k = seen[0]
        rows.append(k[torch.arange(len(k), device=k.device), batch.last().to(k.device)].float().cpu())
    K = torch.cat(rows).view(len(requests), len(prefixes), -1)
    if mean == "groups" and len(prefixes) > 1:
        K = (K[:, 0] + K[:, 1:].mean(dim=1)) / 2
    else:
        K = K.mean(dim=1)
    return K.T


#: The old name (``editkit.keys.keys``); ``ek.keys`` is this module, so the function is ``ek.compute_keys``.
keys = compute_keys


@torch.no_grad()
def hidden_at_subject(lm: LanguageModel, requests: Sequence[EditRequest], layer: int,
                      batch_size: int = 64, site: str = "block") -> torch.Tensor:
    """``H`` (E × d): at each subject's last token of the un-prefixed prompt, the residual
    stream after block ``layer`` (``site="block"``) or the output of its edited MLP
    projection (``site="mlp"``, where the reference protocol puts ROME's value)."""
    if site not in ("block", "mlp"):
        raise ValueError(f"site={site!r}: choose 'block' or 'mlp'")
    block = lm.block(layer) if site == "block" else lm.edit_module(layer)
    rows = []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        batch = tokenize_spans(lm.tokenizer, [r.text for r in chunk], [[r.subject_span] for r in chunk],
                               max_positions=lm.max_positions)
        with capture_output(block) as seen, stop_after(block):
            lm.model(input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device))
        h = seen[0]
        rows.append(h[torch.arange(len(h), device=h.device), batch.last().to(h.device)].float().cpu())
    return torch.cat(rows)
