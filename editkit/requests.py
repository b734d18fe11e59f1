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

__all__ = ["EditRequest", "RequestError", "Batch", "tokenize_spans", "span_tokens"]


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


def span_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens whose character span overlaps ``[start, end)``.

    Special tokens (BOS) have the empty span (0, 0) and are never included.
    """
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


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


def tokenize_spans(tokenizer: Any, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]) -> Batch:
    """Tokenize ``texts`` (right-padded) and locate each character span's tokens."""
    enc = tokenizer(list(texts), return_offsets_mapping=True, padding=True, return_tensors="pt")
    out: list[list[list[int]]] = []
    for i, (text, text_spans) in enumerate(zip(texts, spans)):
        n = int(enc["attention_mask"][i].sum())
        offsets = [tuple(o) for o in enc["offset_mapping"][i][:n].tolist()]
        located = []
        for start, end in text_spans:
            toks = span_tokens(offsets, start, end)
            if not toks:
                raise RequestError(f"no token covers characters {start}:{end} ({text[start:end]!r}) of {text!r}")
            located.append(toks)
        out.append(located)
    return Batch(enc["input_ids"], enc["attention_mask"], out)
