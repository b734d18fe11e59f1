"""ek.generate: greedy by default, batched with left padding, seeded sampling; before/after an edit."""
from __future__ import annotations

import pytest
import torch

import editkit as ek
from editkit import world as W
from editkit.generation import before_after
from editkit.testing import tiny_lm

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the", "Apple A5 was developed by"]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2", n_layer=2)


def greedy_by_hand(lm, prompt, n):
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, lm.model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return lm.tokenizer.decode(ids[0, -n:], skip_special_tokens=True)


def test_greedy_batched_with_left_padding_equals_one_prompt_at_a_time(lm):
    batched = ek.generate(lm, PROMPTS, 6, batch_size=3)  # prompts of different lengths share a padded batch
    assert batched == [greedy_by_hand(lm, p, 6) for p in PROMPTS]
    assert ek.generate(lm, PROMPTS[1], 6) == batched[1:2]
    assert lm.tokenizer.padding_side == "right"  # left padding only inside generate


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(lm):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ek.generate(lm, PROMPTS, 8, sample=True, seed=1, top_k=50)
    assert torch.equal(torch.get_rng_state(), state)
    assert ek.generate(lm, PROMPTS, 8, sample=True, seed=1, top_k=50) == a
    others = [ek.generate(lm, PROMPTS, 8, sample=True, seed=s, top_k=50) for s in (2, 3, 4)]
    assert any(o != a for o in others)


def test_bad_arguments_are_named(lm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        ek.generate(lm, PROMPTS, 0)
    with pytest.raises(ValueError, match="prompts"):
        ek.generate(lm, ["", "x"])


def test_before_after_an_edit_of_the_world_model():
    lm = ek.load_model("world-gpt2", device="cpu")
    rec = ek.CounterFactRecord.from_dict(W.load_world_counterfact(n=1)[0])
    w = lm.weight(0).detach().clone()
    frame = before_after(lm, ek.ROME.preset("world-gpt2"), [rec], max_new_tokens=4)
    assert list(frame["prompt"]) == rec.generation_prompts  # the record's generation prompts by default
    assert frame["before"].str.strip().str.startswith(rec.request.target_true).all()
    assert frame["after"].str.strip().str.startswith(rec.request.target_new).any()
    assert torch.equal(lm.weight(0), w)  # undone
