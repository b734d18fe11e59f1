"""Edit requests and token location from character offsets.

Tokenizers merge differently in context (GPT-2's byte-level BPE glues the leading
space to a word; SentencePiece adds BOS and a "▁" marker), so editkit never
re-tokenizes substrings to find a subject or a target: it tokenizes the whole
text once and maps *character spans* to tokens through the fast tokenizer's
offset mapping.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

__all__ = ["EditRequest", "RequestError", "Batch", "tokenize_spans", "span_tokens", "with_target", "token_ranges"]


class RequestError(ValueError):
    """A malformed edit request; the message names the field and the fix."""


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``(subject, relation) → target_true`` into ``target_new``.

    ``prompt`` is a template with exactly one ``{}`` where the subject goes, ending
    right before the object: ``"The mother tongue of {} is"``.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            n = self.prompt.count("{}") if isinstance(self.prompt, str) else 0
            raise RequestError(
                f"prompt must contain exactly one '{{}}' placeholder for the subject (found {n}): {self.prompt!r}. "
                "Write it like 'The mother tongue of {} is'."
            )
        if self.prompt.replace("{}", "").count("{") or self.prompt.replace("{}", "").count("}"):
            raise RequestError(f"prompt has stray braces besides the one '{{}}': {self.prompt!r}")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise RequestError("subject must be a non-empty string, e.g. subject='Danielle Darrieux'")
        if self.subject != self.subject.strip():
            raise RequestError(f"subject has leading/trailing whitespace: {self.subject!r}; strip it")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise RequestError("target_new must be a non-empty string, e.g. target_new='English'")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise RequestError("target_true must be a non-empty string or None")
        # The space before a target is the text's (see with_target): a target given with one keeps one space.
        for name in ("target_new", "target_true"):
            value = getattr(self, name)
            if value is not None and value != value.lstrip():
                object.__setattr__(self, name, value.lstrip())
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise RequestError(
                f"target_new equals target_true ({self.target_new!r}): there is nothing to edit; "
                "give target_new the new object the fact should have")
        if self.prompt.endswith(" "):
            raise RequestError(
                f"prompt must not end with a space: {self.prompt!r}; the target is appended with its own leading space"
            )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def subject_span(self) -> tuple[int, int]:
        start = self.prompt.index("{}")
        return start, start + len(self.subject)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_filled(cls, text: str, subject: str, target_new: str, target_true: str | None = None, **kw) -> "EditRequest":
        """Recover the ``{}`` template from a prompt with the subject already filled in."""
        if not subject or subject not in text:
            raise RequestError(f"subject {subject!r} does not occur in the prompt {text!r}; cannot recover the template")
        i = text.index(subject)
        prompt = text[:i].replace("{", "{{").replace("}", "}}") + "{}" + text[i + len(subject):]
        if prompt.count("{}") != 1 or "{{" in prompt or "}}" in prompt:
            raise RequestError(f"prompt {text!r} contains braces; cannot build a '{{}}' template from it")
        return cls(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true, **kw)


def with_target(prompt: str, target: str) -> tuple[str, tuple[int, int]]:
    """``prompt + " " + target`` and the character span of the target *with its leading space*.

    The space belongs to the target: tokenizers either glue it to the target's first
    word (GPT-2's "ĠWarsaw", SentencePiece's "▁Warsaw") or emit it as a token of its own
    (a small byte-level vocabulary's "Ġ" + "Warsaw", SentencePiece's lone "▁" before
    digits, Qwen2's " " before every number). Either way those tokens are predicted
    after the prompt, so they are part of what the target costs. Every target span in
    editkit (scoring, value optimization, tracing, widgets) comes from here.
    """
    text = f"{prompt} {target.lstrip()}"  # a target written with its own leading space gets one space, not two
    return text, (len(prompt), len(text))


def token_ranges(offsets: Sequence[tuple[int, int]], special: Sequence[int] | None = None) -> list[tuple[int, int] | None]:
    """The characters each token stands for; ``None`` for special tokens (BOS, EOS, padding).

    Fast tokenizers that trim offsets (GPT-2's byte-level post-processor) report a token
    that is only whitespace as the empty span at the next word, e.g. ``(3, 3)`` for the
    "Ġ" of "in Warsaw": it covers the gap since the previous token, ``(2, 3)``, and is
    given that range back so that a span containing the space contains the token.
    """
    out: list[tuple[int, int] | None] = []
    prev_end = 0
    for i, (a, b) in enumerate(offsets):
        if (special is not None and special[i]) or (special is None and a == b == 0 and i == 0):
            out.append(None)
            continue
        if a == b and prev_end < a:
            a = prev_end
        out.append((a, b))
        prev_end = max(prev_end, b)
    return out


def span_tokens(offsets: Sequence[tuple[int, int] | None], start: int, end: int) -> list[int]:
    """Indices of tokens whose characters overlap ``[start, end)``.

    ``offsets`` are :func:`token_ranges` (``None`` for special tokens, never included) or
    raw offsets (where a leading special token has the empty span (0, 0)). A token that
    still stands for no character (empty range) belongs to the span it sits in.
    """
    hits = []
    for i, o in enumerate(offsets):
        if o is None:
            continue
        a, b = o
        if (b > a and a < end and b > start) or (a == b and start <= a < end and not (a == 0 and i == 0)):
            hits.append(i)
    return hits


@dataclass
class Batch:
    """A right-padded batch with, per text, the token indices of each requested span."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: list[list[list[int]]]  # [text][span] -> token indices

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.spans)

    def last(self, span: int = 0) -> torch.Tensor:
        """Index of the last token of span ``span`` in every text."""
        return torch.tensor([s[span][-1] for s in self.spans], dtype=torch.long)


def tokenize_spans(tokenizer: Any, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]],
                   max_positions: int | None = None) -> Batch:
    """Tokenize ``texts`` (right-padded) and locate each character span's tokens.

    The one place where editkit maps characters to tokens: a span's tokens are every
    non-special token that stands for one of its characters (see :func:`token_ranges`),
    so a target span from :func:`with_target` includes a token that is only its space.

    ``max_positions`` (the model's context length) makes a text longer than the
    model can read an error naming it, instead of an ``IndexError`` deep in the
    position embeddings (GPT-2) or silently extrapolated positions (rotary models).
    """
    enc = tokenizer(list(texts), return_offsets_mapping=True, return_special_tokens_mask=True, padding=True,
                    return_tensors="pt")
    if max_positions is not None and enc["input_ids"].shape[1] > max_positions:
        lengths = enc["attention_mask"].sum(1).tolist()
        i = max(range(len(lengths)), key=lengths.__getitem__)
        raise RequestError(
            f"text of {lengths[i]} tokens is longer than the model's {max_positions} positions "
            f"(max_position_embeddings): {texts[i][:80]!r}{'...' if len(texts[i]) > 80 else ''}. "
            "Shorten the prompt (context prefixes and the target count too).")
    out: list[list[list[int]]] = []
    for i, (text, text_spans) in enumerate(zip(texts, spans)):
        mask = enc["attention_mask"][i].bool()
        keep = torch.nonzero(mask).flatten().tolist()  # real tokens (padding may sit on either side)
        offsets = [tuple(o) for o in enc["offset_mapping"][i].tolist()]
        special = enc["special_tokens_mask"][i].tolist()
        ranges: list[tuple[int, int] | None] = [None] * len(offsets)
        for j, r in zip(keep, token_ranges([offsets[j] for j in keep], [special[j] for j in keep])):
            ranges[j] = r
        located = []
        for start, end in text_spans:
            toks = span_tokens(ranges, start, end)
            if not toks:
                raise RequestError(f"no token covers characters {start}:{end} ({text[start:end]!r}) of {text!r}")
            located.append(toks)
        out.append(located)
    return Batch(enc["input_ids"], enc["attention_mask"], out)
