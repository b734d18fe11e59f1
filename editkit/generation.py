"""Text generation: what the model says about the subject, before and after an edit.

:func:`generate` continues a list of prompts, batched with left padding (so every prompt's
last token is the last position and the continuations line up), greedy by default, or
top-k sampling under a fixed seed that leaves the global random state untouched.
:func:`before_after` puts the unedited and the edited model's continuations side by side.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch

from .models import LanguageModel, in_eval_mode
from .progress import tqdm

__all__ = ["generate", "before_after"]


@in_eval_mode
@torch.no_grad()
def generate(lm: LanguageModel, prompts: str | Sequence[str], max_new_tokens: int = 30, *, sample: bool = False,
             top_k: int | None = 5, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
             progress: bool = False) -> list[str]:
    """The continuation of each prompt (without the prompt), one string per prompt.

    Greedy by default: deterministic, and what "the model now says" means after an edit.
    ``sample=True`` draws top-k (``top_k``, ``temperature``) samples as ROME's fluency
    metric does, seeded by ``seed`` without touching the global RNG: the same prompts,
    ``seed`` and ``batch_size`` give the same texts. Prompts go through in batches of
    ``batch_size``, left-padded."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts: give non-empty strings, e.g. ['Danielle Darrieux's mother tongue is']")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: give a number of tokens ≥ 1")
    if sample and not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: give a positive temperature for sampling")
    tok = lm.tokenizer
    out: list[str] = []
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            batch = prompts[start:start + batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, padding_side="left").to(lm.device)
            kw: dict[str, Any] = {"do_sample": True, "top_k": top_k, "temperature": temperature} if sample else {
                "do_sample": False, "top_k": None, "top_p": None, "temperature": None}
            ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def before_after(lm: LanguageModel, editor: Any, requests: Sequence[Any], prompts: Sequence[str] | None = None,
                 **generate_kw: Any) -> pd.DataFrame:
    """A frame of ``prompt``, ``before``, ``after``: each prompt continued by the unedited
    model and by the model with ``editor`` applied to ``requests`` (undone afterwards).

    ``prompts`` default to the records' ``generation_prompts`` where they carry them (CounterFact),
    else each request's own prompt."""
    if prompts is None:
        prompts = [p for r in requests for p in (getattr(r, "generation_prompts", None) or [])]
        prompts = prompts or [getattr(r, "request", r).text for r in requests]
    before = generate(lm, prompts, **generate_kw)
    with editor.applied(lm, requests, progress=False):
        after = generate(lm, prompts, **generate_kw)
    return pd.DataFrame({"prompt": list(prompts), "before": before, "after": after})
