"""Model probes the explorers show: small, deterministic measurements of what the model says."""
from __future__ import annotations

from typing import Sequence

import torch

from ..metrics import score_targets
from ..models import LanguageModel


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
