"""Two protocols around the same equations: ``"reference"`` and ``"editkit"``.

The closed forms of ROME, MEMIT and EMMET (``docs/equations.md``) leave choices open:
how a key is averaged over context prefixes, the exact terms of the value loss, when
the optimization stops, where ROME's δ lives. The study's numbers come from the
authors' implementation (unified-model-editing, descended from the ROME/MEMIT code),
whose choices are ``"reference"``; editkit's own, more consistent choices are
``"editkit"``. A protocol is configuration only: one :class:`Conventions` row, read by
the one key function, the one value optimizer and the one solver. Every convention
is one field here, so a difference between the two protocols is one line to read.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Conventions", "PrefixSpec", "PROTOCOLS", "conventions", "sample_prefixes"]


@dataclass(frozen=True)
class PrefixSpec:
    """How the reference samples context prefixes from the model (top-k, seeded).

    ``groups`` are ``(count per seed, length)``, the length being the *total* token count
    including the seed's tokens (and a BOS the tokenizer adds), as the reference's
    generator counts it. A seed of ``None`` is the tokenizer's BOS (or EOS) token,
    GPT-2's "<|endoftext|>".
    """

    seeds: tuple[str | None, ...]
    groups: tuple[tuple[int, int], ...]
    top_k: int = 5


@dataclass(frozen=True)
class Conventions:
    """Every choice the two protocols make differently (see the protocol table in docs/protocols.md)."""

    key_mean: Literal["groups", "flat"]  # MEMIT/EMMET/unified-ROME key: mean of (bare, mean of prefixed) / one flat mean
    rome_key_mean: Literal["groups", "flat"]  # ROME's k*
    decay: Literal["norm", "squared"]  # β·‖δ‖/‖h‖²  or  β·‖δ‖²/‖h‖²
    kl: Literal["edited_first", "original_first"]  # KL(P_δ ‖ P_0)  or  KL(P_0 ‖ P_δ)
    kl_token: Literal["subject_last", "prompt_last"]  # where "{s} is a" is read
    stop: Literal["total", "nll"]  # a request stops when its total loss / its NLL falls below the threshold
    updates: Literal["steps_minus_one", "steps"]  # v_steps = N: N − 1 or N Adam updates
    rome_site: Literal["mlp", "block"]  # ROME's δ and its norms: MLP output / residual after the block
    rome_denominator: Literal["k_cur", "k_star"]  # ROME: k_curᵀC0⁻¹k* (un-prefixed key) / k*ᵀC0⁻¹k*
    # Context prefixes sampled from the model (MEMIT, EMMET, unified-ROME / ROME, r-ROME); None: editkit's own
    # (keys.context_prefixes: the editor's n_prefixes texts of prefix_len new tokens after BOS).
    prefixes: PrefixSpec | None
    rome_prefixes: PrefixSpec | None


_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")

PROTOCOLS: dict[str, Conventions] = {
    "reference": Conventions(
        key_mean="groups", rome_key_mean="flat", decay="norm", kl="edited_first", kl_token="subject_last",
        stop="total", updates="steps_minus_one", rome_site="mlp", rome_denominator="k_cur",
        prefixes=PrefixSpec(seeds=_SEED_WORDS, groups=((1, 10),)),
        rome_prefixes=PrefixSpec(seeds=(None,), groups=((10, 5), (10, 10)))),
    "editkit": Conventions(
        key_mean="flat", rome_key_mean="flat", decay="squared", kl="original_first", kl_token="prompt_last",
        stop="nll", updates="steps", rome_site="block", rome_denominator="k_star",
        prefixes=None, rome_prefixes=None),
}


def conventions(protocol: str | Conventions) -> Conventions:
    """The conventions of ``protocol`` (a name, or a :class:`Conventions` for a mix, e.g. to
    measure one convention alone), or a ValueError naming the choices."""
    if isinstance(protocol, Conventions):
        return protocol
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose 'reference' (the study authors' conventions) or "
                         "'editkit' (editkit's own)")
    return PROTOCOLS[protocol]


def _clean(text: str) -> str:
    """A generated text made safe as a prompt prefix: NFKD-normalized as the reference does,
    paragraph breaks to spaces, and braces (which would break the ``{}`` template) to spaces."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("{", " ").replace("}", " ")
    return text.strip()


@torch.no_grad()
def sample_prefixes(lm, spec: PrefixSpec, seed: int = 0) -> list[str]:
    """Context prefixes (each ending in ". ") sampled from ``lm`` under ``spec``, deterministic for a seed.

    Each prefix is its seed text and the sampled continuation (top-k, renormalized), decoded
    without special tokens and followed by ". ", as the reference's templates read
    ``"<text>. {}"``. Sampling is one unpadded sequence per prompt length, so no padding
    convention can change a draw."""
    tok = lm.tokenizer
    gen = torch.Generator().manual_seed(seed)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out: list[str] = []
    for count, length in spec.groups:
        for text in spec.seeds:
            if text is None:
                ids = [start]
            else:
                ids = tok(text)["input_ids"]
            n_new = length - len(ids)
            x = torch.tensor([ids] * count, dtype=torch.long)
            for _ in range(max(n_new, 0)):
                d = x.to(lm.device)
                logits = lm.model(input_ids=d, attention_mask=torch.ones_like(d)).logits[:, -1].float().cpu()
                top = logits.softmax(-1).topk(spec.top_k, dim=-1)
                pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=gen)
                x = torch.cat([x, top.indices.gather(1, pick)], dim=1)
            for row in x:
                cleaned = _clean(tok.decode(row, skip_special_tokens=True))
                out.append(f"{cleaned}. " if cleaned else "")
    return out
