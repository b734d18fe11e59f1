"""Tokenizers trained locally with the ``tokenizers`` library, in two styles.

* ``"gpt2"``: byte-level BPE, no BOS, the leading space glued to the next word
  (offsets trimmed), as GPT-2 / GPT-J / Llama-3 do.
* ``"llama"``: SentencePiece-like BPE over a ``▁`` metaspace, a ``<s>`` BOS token
  added to every text, and a space prepended to the first word, as Llama-2 /
  Mistral do.

Both paths matter because subject and target tokens are located from offsets,
and these two styles disagree about where a word's space belongs.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["train_tokenizer", "STYLES"]

STYLES = ("gpt2", "llama")


def train_tokenizer(texts: Iterable[str], style: str = "gpt2", vocab_size: int = 2000,
                    add_prefix_space: bool = False) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer of the given ``style`` on ``texts``.

    ``add_prefix_space`` (gpt2 style only) treats the first word of a text like any
    other, as GPT-2's ``add_prefix_space=True`` does: ``"Anna"`` at the start then
    becomes the same token ``"ĠAnna"`` as mid-sentence. The world's GPT-2 model uses
    it so a subject at the start of a prompt has the same tokens as in running text
    (the Llama style does the same through its prepended ``▁``)."""
    texts = list(texts)
    if style == "gpt2":
        eos = "<|endoftext|>"
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos,
                                       model_max_length=1024)
    if style == "llama":
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        # Punctuation is split off (as SentencePiece vocabularies trained on large corpora
        # effectively do), so "▁Paris" is the same token before "." as before " is".
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted({c for t in texts for c in t.replace(" ", "▁")} | {"▁"})
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", add_bos_token=True, model_max_length=1024)
    raise ValueError(f"style={style!r}: choose one of {STYLES}")
