"""Tiny, offline models for tests and examples: random-weight transformers of each
supported architecture, with a tokenizer trained in milliseconds."""
from __future__ import annotations

import torch

from .models import LanguageModel, ModelSpec
from .world.tokenizer import train_tokenizer

__all__ = ["tiny_lm", "TINY_TEXT", "ARCHS"]

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral", "gemma")

_NAMES = ["Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid", "Thomas Joannes Stieltjes",
          "Anaal Nathrakh", "Apple A5", "Kaiser Chiefs", "Jürgen Müller", "O'Neil, Jr.", "Édith Piaf"]
_OBJS = ["English", "French", "Spain", "Sweden", "Apple", "Google", "piano", "guitar", "Paris", "Berlin", "Dutch"]
_TEMPLATES = ["The mother tongue of {} is {}.", "{} is a citizen of {}.", "{} was developed by {}.",
              "{} plays the {}.", "{} was born in {}.", "The native language of {} is {}."]

#: A small deterministic corpus covering the test subjects and targets.
TINY_TEXT: list[str] = [t.format(s, o) for t in _TEMPLATES for s in _NAMES for o in _OBJS[:4]] + [
    f"{s} is a person and {o} is a thing." for s in _NAMES for o in _OBJS
]


def _config(arch: str, vocab: int, n_layer: int, d: int, tokenizer):
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    llama_like = dict(num_hidden_layers=n_layer, hidden_size=d, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * d, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_layer=n_layer, n_embd=d, n_head=4, n_positions=256, **common)
    if arch == "gptj":
        return T.GPTJConfig(n_layer=n_layer, n_embd=d, n_head=4, n_positions=256, rotary_dim=d // 8, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=d, num_attention_heads=4,
                               intermediate_size=2 * d, max_position_embeddings=256, **common)
    if arch == "llama":
        return T.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return T.Qwen2Config(**llama_like)
    if arch == "mistral":
        return T.MistralConfig(**llama_like)
    if arch == "gemma":
        return T.GemmaConfig(head_dim=d // 4, **llama_like)
    raise ValueError(f"arch={arch!r}: choose one of {ARCHS}")


def tiny_lm(arch: str = "gpt2", style: str | None = None, n_layer: int = 3, d: int = 32, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> LanguageModel:
    """A random-weight model of ``arch`` with a tokenizer of ``style`` (default: llama
    style for Llama-family architectures, GPT-2 style otherwise)."""
    from transformers import AutoModelForCausalLM

    style = style or ("llama" if arch in ("llama", "mistral", "gemma") else "gpt2")
    tokenizer = train_tokenizer(TINY_TEXT, style=style, vocab_size=600 if style == "gpt2" else 300)
    torch.manual_seed(seed)
    config = _config(arch, len(tokenizer), n_layer, d, tokenizer)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    spec = ModelSpec("editkit.testing:tiny_lm", factory=True,
                     kwargs=tuple(sorted(dict(arch=arch, style=style, n_layer=n_layer, d=d, seed=seed,
                                              dtype=dtype).items())))
    return LanguageModel(model=model, tokenizer=tokenizer, name=f"tiny-{arch}-{style}-{n_layer}x{d}-s{seed}",
                         spec=spec)
