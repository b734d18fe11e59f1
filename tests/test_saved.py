"""Saved edits: saved in one process, reloaded in a fresh one with the same weights; exact undo; refused by
other weights. And an edited model's save_pretrained round trip through ek.load_model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import editkit as ek
from editkit.testing import TINY_TEXT, tiny_lm

REQS = [
    ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="French", target_true="English"),
    ek.EditRequest("{} plays the", "Toko Yasuda", target_new="guitar", target_true="piano"),
]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4, v_steps=5)
LM_ARGS = dict(arch="gpt2", n_layer=4, d=128)  # d_in 512: two facts' update is smaller as factors


def edited_layers(lm):
    return {f"w.{l}": lm.weight(l).detach().clone().contiguous() for l in range(lm.n_layers)}


@pytest.mark.parametrize("method", ["MEMIT", "AlphaEdit", "ROME"])
def test_saved_edit_reloads_in_a_fresh_process(tmp_path, method):
    lm = tiny_lm(**LM_ARGS)
    before = edited_layers(lm)
    layers = dict(layer=1) if method == "ROME" else dict(layers=[1, 2])
    edit = ek.make_editor(method, **layers, **FAST).apply(lm, REQS, progress=False)
    save_file(edited_layers(lm), str(tmp_path / "expected.safetensors"))
    save_file(before, str(tmp_path / "before.safetensors"))
    edit.save(tmp_path / "edit")
    card = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert card["method"] == method and len(card["requests"]) == 2
    assert card["hparams"]["values"]["v_steps"] == 5 and card["protocol"] == "reference"
    assert {"editkit", "torch", "transformers"} <= set(card["versions"])
    assert card["c0"]["1"]["source"] == "computed" and card["norms"]["1"]["delta_norm"] > 0
    if method != "ROME":  # rank ≤ 2 of a 128 × 512 update: stored as factors
        assert card["layers"]["1"]["form"] == "low_rank" and card["layers"]["1"]["rank"] <= 10
    edit.undo()
    script = textwrap.dedent(f"""
        import torch, editkit as ek
        from safetensors.torch import load_file
        from editkit.testing import tiny_lm
        expected, before = load_file({str(tmp_path / 'expected.safetensors')!r}), load_file({str(tmp_path / 'before.safetensors')!r})
        lm = tiny_lm(**{LM_ARGS!r})
        saved = ek.load_edit({str(tmp_path / 'edit')!r})
        edit = saved.apply(lm)
        err = max((lm.weight(l) - expected[f"w.{{l}}"]).abs().max().item() for l in range(lm.n_layers))
        assert err <= 1e-6, err
        if {method!r} == "AlphaEdit":  # the preserved keys' Gram matrix, for AlphaEdit edits after this one
            assert ek.editors.preserved_keys(lm, 1) is not None
        edit.undo()
        assert all(torch.equal(lm.weight(l), before[f"w.{{l}}"]) for l in range(lm.n_layers)), "undo not exact"
        assert ek.editors.preserved_keys(lm, 1) is None
        other = tiny_lm(**dict({LM_ARGS!r}, seed=1))
        w = other.weight(1).detach().clone()
        try:
            saved.apply(other)
        except ek.EditError as exc:
            assert "fingerprint" in str(exc) and "force=True" in str(exc), exc
        else:
            raise AssertionError("applied to other weights")
        assert torch.equal(other.weight(1), w) and not other.edits
        saved.apply(other, force=True).undo()
        print("OK", err)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


def test_save_needs_the_unedited_weights(tmp_path):
    lm = tiny_lm(**LM_ARGS)
    editor = ek.MEMIT(layers=[1], **FAST)
    first = editor.apply(lm, REQS[:1], progress=False)
    second = editor.apply(lm, REQS[1:], progress=False)
    with pytest.raises(ek.EditError, match="most recent"):
        first.save(tmp_path / "a")
    w = lm.weight(1).detach().clone()
    second.save(tmp_path / "b")  # records the weights under it (after `first`), and leaves the model as it was
    assert torch.equal(lm.weight(1), w)
    second.undo()
    first.save(tmp_path / "c")
    first.undo()
    with pytest.raises(ek.EditError, match="fingerprint"):
        ek.load_edit(tmp_path / "b").apply(lm)  # made on the model with `first` applied
    ek.load_edit(tmp_path / "c").apply(lm).undo()
    with pytest.raises(FileNotFoundError, match="not a saved edit"):
        ek.load_edit(tmp_path)


def test_other_architecture_refused_even_forced(tmp_path):
    lm = tiny_lm(**LM_ARGS)
    edit = ek.MEMIT(layers=[1], **FAST).apply(lm, REQS, progress=False)
    edit.save(tmp_path / "e")
    edit.undo()
    small = tiny_lm("gpt2", n_layer=4, d=64)
    with pytest.raises(ek.EditError, match="another architecture"):
        ek.load_edit(tmp_path / "e").apply(small, force=True)


def test_save_pretrained_round_trip(tmp_path):
    """An edited model saved with transformers' save_pretrained loads back, edited, through ek.load_model."""
    lm = tiny_lm(**LM_ARGS)
    edit = ek.MEMIT(layers=[1], **FAST).apply(lm, REQS, progress=False)
    lm.model.save_pretrained(tmp_path / "edited")
    lm.tokenizer.save_pretrained(tmp_path / "edited")
    again = ek.load_model(tmp_path / "edited", device="cpu")
    for l in range(lm.n_layers):
        assert torch.equal(again.weight(l), lm.weight(l))
    assert torch.equal(again.weight(1) - edit.originals[1], lm.weight(1) - edit.originals[1])
    # and it predicts like the edited model
    batch = lm.tokenizer([REQS[0].prompt.format(REQS[0].subject)], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, lm.model(**batch).logits)
