"""The editing engine, checked against its equations on tiny random models of every
supported architecture (no downloads, CPU only)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import editkit as ek
from editkit.testing import TINY_TEXT, tiny_lm

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2"]  # Mistral and Gemma share the Llama adapter
REQS = [
    ek.EditRequest("The mother tongue of {} is", "Danielle Darrieux", target_new="French", target_true="English"),
    ek.EditRequest("{} plays the", "Toko Yasuda", target_new="guitar", target_true="piano"),
    ek.EditRequest("{} was developed by", "Apple A5", target_new="Google", target_true="Apple"),
]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4)


def fast_values(**kw):
    return ek.ValueConfig(v_steps=kw.pop("v_steps", 6), v_lr=kw.pop("v_lr", 0.5), **kw)


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return tiny_lm(request.param, n_layer=4)


@pytest.fixture(scope="module")
def C0s(lm):
    return {l: ek.second_moment(lm, l, TINY_TEXT, n_samples=None, cache=False, progress=False)
            for l in range(lm.n_layers)}


def weights(lm):
    return [lm.edit_module(l).weight.detach().clone() for l in range(lm.n_layers)]


def assert_restored(lm, before):
    for l, w in enumerate(before):
        assert torch.equal(lm.edit_module(l).weight, w), f"layer {l} not restored bit for bit"


@pytest.mark.parametrize("protocol", ["editkit", "reference"])
def test_rome_memorizes_key_value_pair(lm, C0s, protocol):
    before = weights(lm)
    editor = ek.ROME(layer=1, values=fast_values(), protocol=protocol, **FAST)
    edit = editor.apply(lm, REQS[:1], stats=C0s, progress=False)
    W0 = before[1].T if lm.adapter.conv1d else before[1]
    K, R = edit.keys[1].double(), edit.residuals[1].double()
    W1 = lm.weight(1).detach().double()
    if protocol == "reference":  # the original ROME writes v* at the un-prefixed prompt's key k_cur
        torch.testing.assert_close(K, ek.compute_keys(lm, REQS[:1], 1, [""]).double())
    # Ŵ k = v* = W k + R (k* for editkit / r-ROME, k_cur for the original ROME), up to float32 storage.
    torch.testing.assert_close(W1 @ K, W0.double() @ K + R, rtol=1e-4, atol=1e-4)
    # ...and the update is rank one.
    assert torch.linalg.matrix_rank(edit.deltas[1].double(), rtol=1e-6).item() == 1
    edit.undo()
    assert_restored(lm, before)


def test_rrome_maps_the_averaged_key_to_v_star(lm, C0s):
    """r-ROME's defining property: after the edit, the edited module maps the averaged key k̄
    (the flat mean over the bare and the prefixed prompts, the key the update divides by) to
    v* = h + δ, the MLP output the value optimization asked for. The original ROME maps the
    bare prompt's key there instead, which r-ROME does not."""
    before = weights(lm)
    prefixes = ["The weather was fine. ", "I said so. "]
    editor = ek.RROME(layer=1, values=fast_values(), protocol="reference", prefixes=prefixes, **FAST)
    with editor.applied(lm, REQS[:1], stats=C0s, progress=False) as edit:
        k_bar = ek.compute_keys(lm, REQS[:1], 1, ["", *prefixes], mean="flat")[:, 0]
        k_bare = ek.compute_keys(lm, REQS[:1], 1, [""])[:, 0]
        module = lm.edit_module(1)
        with torch.no_grad():
            out, out_bare = module(k_bar[None].to(module.weight.dtype))[0], module(k_bare[None])[0]
        v_star = edit.targets[0]  # the MLP output at the bare prompt plus δ
        torch.testing.assert_close(edit.keys[1][:, 0], k_bar)
        torch.testing.assert_close(out.double(), v_star.double(), rtol=1e-4, atol=1e-4 * v_star.norm().item())
        assert (out_bare - v_star).norm() > 1e-2 * v_star.norm()  # k_bare ≠ k̄ here: not ROME's property
    assert_restored(lm, before)


def test_emmet_satisfies_every_constraint(lm, C0s):
    before = weights(lm)
    editor = ek.EMMET(layers=[1], lambda_e=0.0, values=fast_values(), **FAST)
    edit = editor.apply(lm, REQS, stats=C0s, progress=False)
    W0 = (before[1].T if lm.adapter.conv1d else before[1]).double()
    K, R = edit.keys[1].double(), edit.residuals[1].double()
    assert K.shape[1] == len(REQS)
    torch.testing.assert_close(lm.weight(1).detach().double() @ K, W0 @ K + R, rtol=1e-4, atol=1e-4)
    edit.undo()
    assert_restored(lm, before)


def test_memit_satisfies_normal_equations(lm, C0s):
    before = weights(lm)
    lam = 2.0
    editor = ek.MEMIT(layers=[1], mom2_update_weight=lam, values=fast_values(), **FAST)
    with editor.applied(lm, REQS, stats=C0s, progress=False) as edit:
        K, R = edit.keys[1].double(), edit.residuals[1].double()
        delta = (lm.weight(1).detach().double() - (before[1].T if lm.adapter.conv1d else before[1]).double())
        # Δ (λ C0 + K Kᵀ) = R Kᵀ
        lhs = delta @ (lam * C0s[1] + K @ K.T)
        torch.testing.assert_close(lhs, R @ K.T, rtol=1e-3, atol=1e-5)
    assert_restored(lm, before)


def test_spreading_over_layers_reaches_single_layer_target(lm, C0s):
    """With exact constraints and no context prefixes, a multi-layer edit moves the top
    layer's hidden state exactly to the target Z that a single-layer edit reaches.
    (The top edited layer is below the last: δ at the last layer's subject token
    cannot reach the later target tokens.)"""
    before = weights(lm)
    common = dict(FAST, prefixes=[], lambda_e=0.0, values=fast_values())
    top = lm.n_layers - 2
    single = ek.EMMET(layers=[top], **common)
    with single.applied(lm, REQS[:2], stats=C0s, progress=False) as e1:
        h1 = ek.hidden_at_subject(lm, REQS[:2], top)
        Z = e1.targets
    assert (Z - ek.hidden_at_subject(lm, REQS[:2], top)).norm() > 1e-3  # the target is a real change
    torch.testing.assert_close(h1, Z, rtol=1e-3, atol=1e-4)
    spread = ek.EMMET(layers=[top - 1, top], **common)
    with spread.applied(lm, REQS[:2], stats=C0s, progress=False) as e3:
        h3 = ek.hidden_at_subject(lm, REQS[:2], top)
        torch.testing.assert_close(e3.targets, Z)  # values depend only on the top layer
        # every layer took a share of the change
        assert all(e3.norms[l]["delta_norm"] > 0 for l in (top - 1, top)), e3.norms
    torch.testing.assert_close(h3, Z, rtol=1e-3, atol=1e-4)
    assert_restored(lm, before)


def test_batched_values_equal_one_at_a_time(lm):
    prefixes = ek.context_prefixes(lm, 2, 4, seed=0)
    cfg = fast_values(v_steps=8)
    batched = ek.optimize_values(lm, REQS, 1, prefixes, cfg)
    for i, r in enumerate(REQS):
        alone = ek.optimize_values(lm, [r], 1, prefixes, cfg)
        assert (batched.delta[i] - alone.delta[0]).abs().max().item() < 1e-4
        torch.testing.assert_close(batched.h[i], alone.h[0], rtol=1e-5, atol=1e-5)
    assert batched.delta.abs().max() > 0


def test_values_in_chunks_equal_one_batch(lm):
    prefixes = ek.context_prefixes(lm, 2, 4, seed=0)
    one = ek.optimize_values(lm, REQS, 1, prefixes, fast_values(v_steps=4, v_batch_size=8))
    chunks = ek.optimize_values(lm, REQS, 1, prefixes, fast_values(v_steps=4, v_batch_size=2))
    for f in ("delta", "h", "nll_init", "nll_final", "steps"):
        torch.testing.assert_close(getattr(chunks, f), getattr(one, f), rtol=1e-5, atol=1e-5)


def test_cached_prefix_gives_the_values_of_whole_prompts(lm, monkeypatch):
    """Positions before the subject's last token run once (their keys/values reused);
    δ, h and the NLLs equal those from recomputing every position every step."""
    import editkit.values as V

    used = []
    real = V._prefix_kv
    monkeypatch.setattr(V, "_prefix_kv", lambda *a: used.append(real(*a)) or used[-1])
    prefixes = ek.context_prefixes(lm, 2, 4, seed=0)
    cached = ek.optimize_values(lm, REQS, 1, prefixes, fast_values(v_steps=8, cache_prefix=True))
    assert used and all(kv is not None for kv in used), "the prefix keys/values were not cached"
    whole = ek.optimize_values(lm, REQS, 1, prefixes, fast_values(v_steps=8, cache_prefix=False))
    assert cached.delta.abs().max() > 0
    for f in ("delta", "h", "nll_init", "nll_final"):
        torch.testing.assert_close(getattr(cached, f), getattr(whole, f), rtol=1e-4, atol=1e-5)


def test_early_stopped_requests_leave_the_batch_without_changing_the_others(lm):
    """Requests that reach stop_nll are frozen and the batch is re-padded without
    them; every δ still equals the one its request gets alone."""
    prefixes = ek.context_prefixes(lm, 2, 4, seed=0)
    init = ek.optimize_values(lm, REQS, 1, prefixes, fast_values(v_steps=0)).nll_init
    cfg = fast_values(v_steps=6, stop_nll=float(init.sort().values[1]) + 1e-4)  # two stop at once: re-pad
    batched = ek.optimize_values(lm, REQS, 1, prefixes, cfg)
    assert (batched.steps == 0).sum() == 2 and batched.steps.max() >= 1
    for i, r in enumerate(REQS):
        alone = ek.optimize_values(lm, [r], 1, prefixes, cfg)
        assert batched.steps[i] == alone.steps[0]
        assert (batched.delta[i] - alone.delta[0]).abs().max().item() < 1e-4
        assert abs(batched.nll_final[i] - alone.nll_final[0]) < 1e-4


def test_context_manager_restores_on_exception(lm, C0s):
    before = weights(lm)
    editor = ek.MEMIT(layers=[1, 2], mom2_update_weight=1.0, values=fast_values(v_steps=2), **FAST)
    with pytest.raises(KeyError):
        with editor.applied(lm, REQS[:1], stats=C0s, progress=False):
            assert not torch.equal(lm.edit_module(1).weight, before[1])
            raise KeyError("boom")
    assert_restored(lm, before)
    assert lm.edits == []


def test_stacked_edits_undo_in_reverse_order(lm, C0s):
    before = weights(lm)
    ed = ek.EMMET(layers=[1], values=fast_values(v_steps=2), **FAST)
    e1 = ed.apply(lm, REQS[:1], stats=C0s, progress=False)
    e2 = ed.apply(lm, REQS[1:2], stats=C0s, progress=False)
    with pytest.raises(ek.EditError, match="reverse order"):
        e1.undo()
    e2.undo()
    e1.undo()
    assert_restored(lm, before)


def test_duplicate_keys_are_singular_and_leave_weights_untouched(lm, C0s):
    before = weights(lm)
    ed = ek.EMMET(layers=[1], lambda_e=0.0, values=fast_values(v_steps=1), **FAST)
    with pytest.raises(ek.SingularSystemError, match="lambda_e"):
        ed.apply(lm, [REQS[0], REQS[0]], stats=C0s, progress=False)
    assert_restored(lm, before)
    assert lm.edits == []


def test_dead_units_need_the_ridge_and_it_keeps_weights_finite(lm, C0s):
    """A C0 with a dead direction (a unit that never fires) is refused with a hint;
    with ``c0_ridge`` the edit goes through, finite and effective."""
    before = weights(lm)
    C0 = C0s[1].clone()
    C0[0, :] = 0.0
    C0[:, 0] = 0.0
    ed = ek.ROME(layer=1, values=fast_values(v_steps=4), **FAST)
    with pytest.raises(ek.SingularSystemError, match="c0_ridge"):
        ed.apply(lm, REQS[:1], stats={1: C0}, progress=False)
    assert_restored(lm, before)
    ridged = dataclasses.replace(ed, c0_ridge=1e-6)
    with ridged.applied(lm, REQS[:1], stats={1: C0}, progress=False) as edit:
        assert torch.isfinite(lm.edit_module(1).weight).all()
        assert edit.norms[1]["delta_norm"] > 0
        K, R = edit.keys[1].float(), edit.residuals[1].float()
        torch.testing.assert_close(edit.deltas[1] @ K, R, rtol=1e-3, atol=1e-4)  # the constraint Δk = r holds
    assert_restored(lm, before)


# --- things that do not need every architecture ---------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="The mother tongue of is", subject="X", target_new="Y"), "prompt"),
    (dict(prompt="{} and {} are", subject="X", target_new="Y"), "prompt"),
    (dict(prompt="{} is", subject="", target_new="Y"), "subject"),
    (dict(prompt="{} is", subject="X", target_new=""), "target_new"),
    (dict(prompt="{} is", subject="X", target_new="  "), "target_new"),
    (dict(prompt="{} is", subject="X", target_new="Y", target_true=""), "target_true"),
])
def test_malformed_requests_name_the_field(kwargs, field):
    with pytest.raises(ek.RequestError, match=field):
        ek.EditRequest(**kwargs)


def test_emmet_with_ridge_is_memit_with_the_same_lambda():
    """Push-through identity: Kᵀ(λC0 + KKᵀ)⁻¹ = (λI + KᵀC0⁻¹K)⁻¹KᵀC0⁻¹, so EMMET's
    λ_E-regularized equality solve equals MEMIT's least squares with λ = λ_E."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 64, generator=g, dtype=torch.float64)
    C0 = A @ A.T / 64 + 0.1 * torch.eye(16, dtype=torch.float64)
    K = torch.randn(16, 5, generator=g, dtype=torch.float64)
    R = torch.randn(8, 5, generator=g, dtype=torch.float64)
    for lam in (0.1, 10.0, 1000.0):
        memit = ek.solve(K, R, C0, "least_squares", lam, path="direct").delta  # factorizes λC0 + KKᵀ
        emmet = ek.solve(K, R, C0, "equality", lam, path="direct").delta
        torch.testing.assert_close(emmet, memit, rtol=1e-9, atol=1e-10)
    exact = ek.solve(K, R, C0, "equality", 0.0).delta  # λ_E = 0: every constraint holds exactly
    torch.testing.assert_close(exact @ K, R)


def test_template_recovered_from_filled_prompt():
    r = ek.EditRequest.from_filled("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English")
    assert r.prompt == "The mother tongue of {} is" and r.text == "The mother tongue of Danielle Darrieux is"
    with pytest.raises(ek.RequestError, match="does not occur"):
        ek.EditRequest.from_filled("The mother tongue of X is", "Danielle Darrieux", "English")


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_subject_and_target_tokens_from_offsets(style):
    from editkit.requests import tokenize_spans

    lm = tiny_lm("llama" if style == "llama" else "gpt2")
    text = "The mother tongue of Danielle Darrieux is English"
    b = tokenize_spans(lm.tokenizer, [text], [[(21, 38), (42, 49)]])
    subj = lm.tokenizer.decode(b.input_ids[0, b.spans[0][0]]).strip()
    tgt = lm.tokenizer.decode(b.input_ids[0, b.spans[0][1]]).strip()
    assert subj == "Danielle Darrieux" and tgt == "English"
    if style == "llama":
        assert b.input_ids[0, 0].item() == lm.tokenizer.bos_token_id  # BOS never part of a span
        assert 0 not in b.spans[0][0]


def test_unknown_architecture_lists_supported_and_override_works():
    lm = tiny_lm("gpt2")
    lm.model.config.model_type = "mystery"
    with pytest.raises(ek.UnknownArchitectureError, match="gpt2.*llama|Supported"):
        ek.LanguageModel(lm.model, lm.tokenizer)
    custom = ek.Adapter("mine", "transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", conv1d=True)
    lm2 = ek.LanguageModel(lm.model, lm.tokenizer, adapter=custom)
    assert lm2.weight(0).shape == (lm.model.config.n_embd, 4 * lm.model.config.n_embd)
    bad = ek.Adapter("bad", "transformer.h", "transformer.h.{}.mlp.nope", "transformer.ln_f")
    with pytest.raises(ek.UnknownArchitectureError, match="mlp.nope"):
        ek.LanguageModel(lm.model, lm.tokenizer, adapter=bad)


def test_bfloat16_edit_solves_in_float64_and_writes_model_dtype():
    lm = tiny_lm("llama", dtype=torch.bfloat16)
    before = lm.edit_module(1).weight.clone()
    ed = ek.EMMET(layers=[1], values=fast_values(v_steps=3), **FAST)
    with ed.applied(lm, REQS[:2], progress=False) as edit:
        w = lm.edit_module(1).weight
        assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
        assert edit.norms[1]["delta_norm"] > 0
    assert torch.equal(lm.edit_module(1).weight, before)


def test_second_moment_matches_direct_computation_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))
    lm = tiny_lm("gpt2")
    texts = TINY_TEXT[:40]
    C0, info = ek.second_moment(lm, 1, texts, n_samples=None, batch_size=7, return_info=True, progress=False)
    # direct: every token's key, one text at a time
    from editkit.hooks import capture_input

    ks = []
    for t in texts:
        enc = lm.tokenizer(t, return_tensors="pt")
        with capture_input(lm.edit_module(1)) as seen, torch.no_grad():
            lm.model(**enc)
        ks.append(seen[0][0].double())
    K0 = torch.cat(ks)
    torch.testing.assert_close(C0, K0.T @ K0 / len(K0), rtol=1e-5, atol=1e-8)
    assert info.n_tokens == len(K0) and info.condition_number > 1
    assert list(tmp_path.rglob("*.safetensors"))
    again = ek.second_moment(lm, 1, texts, n_samples=None, batch_size=7, progress=False)
    assert torch.equal(again, C0)
    few, info_few = ek.second_moment(lm, 1, texts, n_samples=None, max_tokens=100, return_info=True, progress=False)
    assert info_few.n_tokens == 100 and not torch.equal(few, C0)


def test_missing_corpus_and_offline_hub_fail_fast(monkeypatch):
    lm = tiny_lm("gpt2")
    with pytest.raises(ek.CorpusUnavailableError, match="does not exist"):
        ek.second_moment(lm, 0, "./no/such/corpus.txt", cache=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ek.CorpusUnavailableError, match="Hub"):
        ek.second_moment(lm, 0, "wikitext", cache=False)
    with pytest.raises(ek.ModelUnavailableError, match="world-gpt2"):
        ek.load_model("some-owner/some-model-that-is-not-cached")
    with pytest.raises(ek.ModelUnavailableError, match="does not exist"):
        ek.load_model("./no/such/checkpoint")


def test_local_checkpoint_round_trip(tmp_path):
    lm = tiny_lm("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    lm2 = ek.load_model(tmp_path, device="cpu")
    assert lm2.adapter.family == "qwen2" and lm2.n_layers == lm.n_layers
    torch.testing.assert_close(lm2.weight(1), lm.weight(1))


def test_presets_are_data():
    m = ek.MEMIT.preset("llama-3-8b")
    assert m.layers == [1] and m.mom2_update_weight == 1.0  # the study-time authors' Llama setting
    r = ek.ROME.preset("gpt2-xl", layer=12)
    assert r.layer == 12 and r.values.v_lr == 0.5
    assert {"gpt2-xl", "gpt-j-6b", "llama-3-8b"} <= set(ek.available_presets())
    with pytest.raises(KeyError, match="available"):
        ek.EMMET.preset("no-such-model")


def test_one_vocabulary_layers_and_reg_with_each_papers_alias():
    """Every editor has ``layers`` and ``reg``; the papers' names are aliases, in
    constructors, presets and on reading."""
    assert ek.ROME(layer=3) == ek.ROME(layers=[3]) == ek.ROME(layers=3)
    assert ek.ROME(layer=3).layer == 3 and ek.ROME(layer=3).reg == 0.0
    m = ek.MEMIT(layers=[1], mom2_update_weight=7.0)
    assert m == ek.MEMIT(layers=[1], reg=7.0) and m.reg == m.mom2_update_weight == 7.0
    e = ek.EMMET(layers=[1], lambda_e=0.3)
    assert e == ek.EMMET(layers=[1], reg=0.3) and e.lambda_e == 0.3
    assert ek.MEMIT(layers=[1]).reg == 15000.0 and ek.EMMET(layers=[1]).reg == 0.1  # the papers' defaults
    assert ek.MEMIT.preset("world-gpt2").reg == 100.0 and ek.ROME.preset("world-gpt2").layers == [0]
    assert dataclasses.replace(m, reg=2.0).mom2_update_weight == 2.0
    assert ek.MEMIT(layers=[1], v_steps=3).values.v_steps == 3  # flat value settings fold into `values`
    with pytest.raises(ValueError, match="layers: ROME edits exactly one layer"):
        ek.ROME(layers=[1, 2])
    with pytest.raises(TypeError, match="both reg and mom2_update_weight"):
        ek.MEMIT(layers=[1], reg=1.0, mom2_update_weight=2.0)
    with pytest.raises(TypeError, match="unknown parameters \\['lamda_e'\\]"):
        ek.EMMET(layers=[1], lamda_e=1.0)
    with pytest.raises(ValueError, match="layers: give a non-empty list"):
        ek.MEMIT(layers=[])


def test_make_editor_is_the_one_constructor():
    assert set(ek.METHODS) >= {"ROME", "MEMIT", "EMMET"}
    r = ek.make_editor("ROME", 2, "world-gpt2", v_steps=3)
    assert r.layers == [2] and r.values.v_steps == 3 and r.corpus == "world"  # the rest from the preset
    m = ek.make_editor("MEMIT", [1, 2], mom2_update_weight=5.0)
    assert m.layers == [1, 2] and m.reg == 5.0
    t = ek.make_editor(m, 0, v_lr=0.1)  # an editor is a template
    assert t.layers == [0] and t.reg == 5.0 and t.values.v_lr == 0.1 and m.layers == [1, 2]
    with pytest.raises(ValueError, match="layers: MEMIT needs"):
        ek.make_editor("MEMIT")
    with pytest.raises(ValueError, match="choose from"):
        ek.make_editor("MEMET", 1)


def test_commit_keeps_the_weights_and_drops_the_undo_record(lm, C0s):
    before = weights(lm)
    ed = ek.EMMET(layers=[1], values=fast_values(v_steps=2), **FAST)
    e1 = ed.apply(lm, REQS[:1], stats=C0s, progress=False)
    # originals are stored as lm.weight() returns them (d_out × d_in, for GPT-2's Conv1D too)
    W0 = before[1].T if lm.adapter.conv1d else before[1]
    assert torch.equal(e1.originals[1], W0)
    edited = lm.edit_module(1).weight.detach().clone()
    e1.commit()
    assert lm.edits == [] and e1.originals == {} and torch.equal(lm.edit_module(1).weight, edited)
    with pytest.raises(ek.EditError, match="committed"):
        e1.undo()
    e2 = ed.apply(lm, REQS[1:2], stats=C0s, progress=False)  # a later edit still undoes exactly
    e2.undo()
    assert torch.equal(lm.edit_module(1).weight, edited)
    with torch.no_grad():
        lm.edit_module(1).weight.copy_(before[1])
    with pytest.raises(ek.EditError, match="undone"):
        e2.commit()


def test_second_moment_accessor_is_computed_once_per_model():
    lm = tiny_lm("gpt2", n_layer=2)
    ed = ek.MEMIT(layers=[1], **FAST)
    C0 = ed.second_moment(lm, 1, progress=False)
    assert ed.second_moment(lm, 1) is C0
    torch.testing.assert_close(C0, ek.second_moment(lm, 1, TINY_TEXT, n_samples=None, cache=False, progress=False))


def test_value_batch_stepped_by_hand_is_optimize_values():
    """ValueBatch is the public state of the δ optimization: driving it step by step (as a
    new loss convention would) gives optimize_values' δ bit for bit, re-pads included."""
    from editkit.values import ValueBatch

    lm = tiny_lm("gpt2", n_layer=3)
    prefixes = ek.context_prefixes(lm, 2, 4, 0)
    start = ek.optimize_values(lm, REQS, 1, prefixes, ek.ValueConfig(v_steps=1)).nll_init.sort().values
    cfg = ek.ValueConfig(v_steps=6, v_lr=0.5, stop_nll=float(start[1] + start[2]) / 2)  # two of three freeze
    ref = ek.optimize_values(lm, REQS, 1, prefixes, cfg)
    state, repads = ValueBatch(lm, REQS, 1, prefixes, cfg), 0
    while state.n_steps < cfg.v_steps and state.active.any():
        if state.needs_repad:
            state.repad()
            repads += 1
        state.step()
    state.measure()
    got = state.result()
    assert repads >= 1 and len(state.idx) == 1  # the batch was re-padded down to the one active request
    assert torch.equal(got.delta, ref.delta) and torch.equal(got.steps, ref.steps)
    assert torch.equal(got.nll_final, ref.nll_final) and got.history == ref.history


def test_one_cache_root_with_home_expanded(monkeypatch, tmp_path):
    """World models, datasets and C0 files all live under one EDITKIT_CACHE, ``~`` expanded
    (the world and C0 caches used to create a literal '~' folder)."""
    from pathlib import Path

    from editkit import paths, stats, world
    from editkit.data import data_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EDITKIT_CACHE", "~/ek-cache")
    root = tmp_path / "ek-cache"
    assert paths.cache_root() == root == Path("~/ek-cache").expanduser()
    assert world._root() == root / "world" and data_cache_dir() == root / "data"
    lm = tiny_lm("gpt2", n_layer=2)
    assert stats._cache_path(lm, 1, TINY_TEXT, None, None, 64).parent == root / "stats"
    monkeypatch.delenv("EDITKIT_CACHE")
    assert paths.cache_root() == tmp_path / ".cache" / "editkit"


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), ("on", True),
                                            ("0", False), ("", False), ("false", False), ("no", False)])
def test_hf_hub_offline_is_parsed_once_as_huggingface_hub_does(monkeypatch, value, offline):
    from editkit import hub, paths

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert paths.hub_offline() is offline
    if offline:
        assert hub.hub_reachable() is False and "HF_HUB_OFFLINE" in hub.hub_offline_reason()


def test_public_names_and_modules():
    import editkit
    import editkit.data.corpus
    import editkit.experiments
    import editkit.keys
    import editkit.stats

    assert all(hasattr(ek, name) for name in ek.__all__)
    assert ek.keys is editkit.keys and callable(ek.compute_keys) and editkit.keys.keys is ek.compute_keys
    assert editkit.experiments.__version__ == ek.__version__  # from editkit._version, not the package root
    assert editkit.stats.iter_corpus is editkit.data.corpus.iter_corpus  # corpus reading lives in data/corpus.py
    assert list(editkit.data.corpus.iter_corpus(["a", " ", "b"], n_samples=5)) == ["a", "b"]
