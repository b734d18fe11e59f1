"""Target spans include a token that is only the target's leading space.

Three small tokenizers are built here, each emitting such a token: a GPT-2-style
byte-level BPE whose vocabulary has "Warsaw" but not "ĠWarsaw" (so " Warsaw" is
"Ġ" + "Warsaw"), a SentencePiece-style Metaspace tokenizer with a BOS that puts a lone
"▁" before digits (Llama-2), and a Qwen2-style byte-level tokenizer that splits
digits, so " 1810" starts with a lone " ". Scores and the value optimizer's NLL must
equal a teacher-forced computation written out here.
"""
from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import editkit as ek
from editkit.metrics import score_targets
from editkit.requests import tokenize_spans, with_target
from editkit.values import ValueConfig, optimize_values

PROMPT, SUBJECT = "The composer {} was born in", "Frederic Chopin"
TARGETS = ["Warsaw", "1810", "Paris"]


def _chain(word: str) -> list[tuple[str, str]]:
    return [(word[:i], word[i]) for i in range(1, len(word))]


def _bytelevel(words: list[str], pre_tokenizer, trim: bool) -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    merges = []
    for w in words:
        for a, b in _chain(w):
            vocab.setdefault(a + b, len(vocab))
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def gpt2_small_vocab() -> PreTrainedTokenizerFast:
    """GPT-2 style (trimmed offsets): "Warsaw" is a token, "ĠWarsaw" is not."""
    return _bytelevel(["Warsaw", "ĠParis", "Ġborn"], pre_tokenizers.ByteLevel(add_prefix_space=False), trim=True)


def qwen2_digits() -> PreTrainedTokenizerFast:
    """Qwen2 style: its pre-tokenizer regex isolates every digit, so a number after a space
    starts with a lone "Ġ"; offsets are not trimmed."""
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _bytelevel(["ĠWarsaw", "ĠParis", "Ġborn"], pre, trim=False)


def metaspace_digits() -> PreTrainedTokenizerFast:
    """SentencePiece / Llama-2 style: BOS, "▁" glued to words, a lone "▁" before digits."""
    text = PROMPT.format(SUBJECT) + " " + " ".join(TARGETS)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(set(text.replace(" ", "▁")) | {"▁"}):
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in ["▁Warsaw", "▁Paris", "▁born"]:
        for a, b in _chain(w):
            vocab.setdefault(a + b, len(vocab))
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


TOKENIZERS = {"gpt2-small-vocab": (gpt2_small_vocab, "Warsaw"), "qwen2-digits": (qwen2_digits, "1810"),
              "metaspace-digits": (metaspace_digits, "1810")}


def _lm(tokenizer) -> ek.LanguageModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=128,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return ek.LanguageModel(model=GPT2LMHeadModel(cfg).eval(), tokenizer=tokenizer, name="spans-test")


def _teacher_forced(lm: ek.LanguageModel, prompt: str, target: str) -> tuple[float, int]:
    """Mean NLL of the tokens that follow the prompt's own tokens in prompt + " " + target."""
    tok = lm.tokenizer
    n_prompt = len(tok(prompt)["input_ids"])
    full = tok(prompt + " " + target)["input_ids"]
    assert full[:n_prompt] == tok(prompt)["input_ids"], "the prompt must tokenize the same alone and in context"
    with torch.no_grad():
        logp = lm.model(input_ids=torch.tensor([full])).logits[0].double().log_softmax(-1)
    nll = [-logp[t - 1, full[t]].item() for t in range(n_prompt, len(full))]
    return sum(nll) / len(nll), len(nll)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_lone_space_token_belongs_to_the_target(name):
    make, lone = TOKENIZERS[name]
    tok = make()
    prompt = PROMPT.format(SUBJECT)
    text, span = with_target(prompt, lone)
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[len(tok(prompt)["input_ids"])] in ("Ġ", "▁"), pieces  # the tokenizer does emit a lone space
    batch = tokenize_spans(tok, [text], [[span]])
    assert batch.spans[0][0] == list(range(len(tok(prompt)["input_ids"]), len(ids)))
    # and a subject right after a space does not pick that space up
    s0 = prompt.index(SUBJECT)
    subj = tokenize_spans(tok, [text], [[(s0, s0 + len(SUBJECT))]]).spans[0][0]
    assert tok.decode([ids[i] for i in subj]).strip() == SUBJECT


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_scores_and_value_nll_equal_teacher_forcing(name):
    make, _ = TOKENIZERS[name]
    lm = _lm(make())
    prompt = PROMPT.format(SUBJECT)
    scores = score_targets(lm, [(prompt, t) for t in TARGETS], progress=False)
    for i, target in enumerate(TARGETS):
        nll, n = _teacher_forced(lm, prompt, target)
        assert scores.n_tokens[i] == n
        assert math.isclose(scores.nll[i], nll, rel_tol=1e-5)
    # the value optimizer's initial NLL (δ = 0) is the same quantity
    reqs = [ek.EditRequest(PROMPT, SUBJECT, t) for t in TARGETS]
    val = optimize_values(lm, reqs, 0, ("",), ValueConfig(v_steps=1), progress=False)
    expected = torch.tensor([_teacher_forced(lm, prompt, t)[0] for t in TARGETS], dtype=torch.float64)
    torch.testing.assert_close(val.nll_init.double(), expected, rtol=1e-5, atol=1e-6)
