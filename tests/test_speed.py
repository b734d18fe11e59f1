"""The speed-ups of the value optimization change no result: the blocks under the edited
layer (and the edited block, where its MLP output is simply added to the residual) run once
per padded batch instead of every step, and ΔW stays what recomputing them gives."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import editkit as ek
from editkit import values as V
from editkit.testing import TINY_TEXT, tiny_lm

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2"]
REQS = [
    ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="French", target_true="English"),
    ek.EditRequest("{} plays the", "Toko Yasuda", target_new="guitar", target_true="piano"),
    ek.EditRequest("{} was developed by", "Apple A5", target_new="Google", target_true="Apple"),
]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4)
LAYER = 2


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return tiny_lm(request.param, n_layer=4)


def _edit(lm, method: str, reuse: bool, monkeypatch, cache_prefix: bool = True) -> tuple[torch.Tensor, list[int]]:
    """ΔW of one edit of REQS at LAYER, and how often each block ran in its value optimization
    (counted at its MLP's out-projection: a skipped block's hooks still run, its modules do not)."""
    monkeypatch.setattr(V, "REUSE_LOWER", reuse)
    lm.cache.pop("_values_memo", None)
    ed = ek.make_editor(method, layers=[LAYER], v_steps=8, v_lr=0.5, cache_prefix=cache_prefix, **FAST)
    stats = {LAYER: ek.second_moment(lm, LAYER, TINY_TEXT, n_samples=None, progress=False)}
    blocks = [lm.edit_module(i) for i in range(lm.n_layers)]
    calls, inside = [0] * len(blocks), [False]
    real = V.optimize_values

    def counted(*a, **k):
        inside[0] = True
        try:
            return real(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(V, "optimize_values", counted)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + inside[0]))
               for i, b in enumerate(blocks)]
    try:
        edit = ed.apply(lm, REQS, stats=stats, progress=False)
    finally:
        for h in handles:
            h.remove()
    delta = edit.deltas[LAYER].double()
    edit.undo()
    return delta, calls


@pytest.mark.parametrize("method", ["ROME", "MEMIT", "EMMET"])
def test_blocks_under_the_edit_run_once_and_delta_w_is_unchanged(lm, method, monkeypatch):
    ref, calls_ref = _edit(lm, method, False, monkeypatch)
    new, calls_new = _edit(lm, method, True, monkeypatch)
    assert ref.norm() > 0
    # ΔW within 1e-6 relative of recomputing every block every step (it is the same bit for bit).
    assert (new - ref).norm() <= 1e-6 * ref.norm(), float((new - ref).norm() / ref.norm())
    # The blocks under the edited layer ran once per padded batch, not once per step...
    assert calls_new[0] * 2 < calls_ref[0], (calls_new, calls_ref)
    # ...and so did the edited block itself where it ends residual + MLP output (GPT-2, Llama, Qwen2).
    if lm.adapter.mlp_norm is not None:
        assert calls_new[LAYER] * 2 < calls_ref[LAYER], (calls_new, calls_ref)
    else:
        assert calls_new[LAYER] == calls_ref[LAYER]
    assert calls_new[LAYER + 1] == calls_ref[LAYER + 1]  # the blocks above run every step, as before


def test_unchanged_without_the_prefix_cache(lm, monkeypatch):
    """With whole prompts recomputed (``cache_prefix=False``) the reuse holds too."""
    ref, _ = _edit(lm, "MEMIT", False, monkeypatch, cache_prefix=False)
    new, calls = _edit(lm, "MEMIT", True, monkeypatch, cache_prefix=False)
    assert (new - ref).norm() <= 1e-6 * ref.norm(), float((new - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["ROME", "r-ROME", "MEMIT"])
def test_layer_sweep_optimizes_a_units_values_in_one_batch_with_the_same_scores(method, tmp_path, monkeypatch):
    """The layer sweep edits each fact alone into the unedited model; its δ are optimized for the
    whole unit in padded batches (``Editor.prefetch_values``), not once per fact, and every
    score is what one optimization per fact gives (the same δ up to rounding)."""
    from editkit import experiments

    lm = tiny_lm("gpt2", n_layer=3)
    recs = [ek.EditRequest(r.prompt, r.subject, r.target_new, r.target_true) for r in REQS]
    kw = dict(layers=[1], n_edits=3, chunk=3, editor_kwargs=dict(v_steps=4, **FAST), progress=False)
    sizes = []
    real = V.optimize_values

    def counted(lm_, requests, *a, **k):
        sizes.append(len(requests))
        return real(lm_, requests, *a, **k)

    monkeypatch.setattr(V, "optimize_values", counted)
    batched = experiments.layer_sweep(lm, recs, [method], root=tmp_path / "a", **kw)
    assert sizes == [3]  # one padded batch for the unit's three facts
    lm.cache.pop("_values_memo", None)
    sizes.clear()
    monkeypatch.setattr(ek.Editor, "prefetch_values", lambda self, lm, requests, progress=False: None)
    alone = experiments.layer_sweep(lm, recs, [method], root=tmp_path / "b", **kw)
    assert sizes == [1, 1, 1]
    cols = ["case_id", "kind", "phase", "layer", "p_new", "p_true", "success"]
    cols = [c for c in cols if c in batched.columns]
    key = [c for c in ("phase", "case_id", "kind") if c in batched.columns]
    a = batched[cols].sort_values(key, kind="stable").reset_index(drop=True)
    b = alone[cols].sort_values(key, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
