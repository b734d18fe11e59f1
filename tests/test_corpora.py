"""Offline real-text corpora for C0 (editkit.corpora): CounterFact sentences from the corpus half
only, never a scored record; model samples reproducible; both usable as ``corpus=`` names."""
from __future__ import annotations

import json

import pytest
import torch

import editkit as ek
from editkit import corpora
from editkit.testing import tiny_lm


def _cf_file(tmp_path, n=40):
    recs = []
    for i in range(n):
        recs.append({"case_id": i, "requested_rewrite": {
            "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": f"Person{i} Smith",
            "target_new": {"str": "English"}, "target_true": {"str": "French"}},
            "paraphrase_prompts": [f"Person{i} Smith spoke the language"],
            "neighborhood_prompts": [f"The native language of Neighbour{i} is"],
            "attribute_prompts": [], "generation_prompts": [f"Person{i} Smith often says that"]})
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    return path


def test_corpus_split_is_fixed_and_about_half():
    splits = [corpora.corpus_split(i) for i in range(1000)]
    assert splits == [corpora.corpus_split(i) for i in range(1000)]
    assert 400 < splits.count("corpus") < 600


def test_counterfact_text_reads_only_the_corpus_half_and_never_a_scored_record(tmp_path):
    path = _cf_file(tmp_path)
    recs = ek.load_counterfact(str(path))
    scored = corpora.scoring_records(recs)
    assert scored and len(scored) < len(recs)
    texts = list(corpora.counterfact_texts(str(path)))
    for r in recs:
        mentioned = any(f"Person{r.case_id} Smith" in t or f"Neighbour{r.case_id} " in t for t in texts)
        assert mentioned == (corpora.corpus_split(r.case_id) == "corpus")
    # true objects only: the counterfactual target never appears
    assert all("English" not in t for t in texts) and any(t.endswith(" French") for t in texts)
    # explicit exclusion without the split: every record but the excluded ones (by subject too)
    some = recs[:5]
    texts = list(corpora.counterfact_texts(str(path), exclude=some, split=False))
    assert not any(r.subject in t for r in some for t in texts)
    assert any(recs[10].subject in t for t in texts)


def test_model_text_is_reproducible_and_leaves_the_global_rng_alone():
    lm = tiny_lm("llama")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = [t for _, t in zip(range(20), corpora.model_texts(lm, max_new_tokens=6, batch_size=8))]
    assert torch.equal(torch.random.get_rng_state(), state)
    b = [t for _, t in zip(range(20), corpora.model_texts(lm, max_new_tokens=6, batch_size=8))]
    c = [t for _, t in zip(range(20), corpora.model_texts(lm, seed=1, max_new_tokens=6, batch_size=8))]
    assert a == b and a != c and len(set(a)) > 10


def test_offline_corpus_names_work_in_second_moment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    path = _cf_file(tmp_path)
    lm = tiny_lm("llama")
    texts = list(corpora.counterfact_texts(str(path)))
    C_name = ek.second_moment(lm, 1, f"counterfact-text:{path}", n_samples=None, cache=False, progress=False)
    C_list = ek.second_moment(lm, 1, texts, n_samples=None, cache=False, progress=False)
    torch.testing.assert_close(C_name, C_list, rtol=0, atol=0)
    C_mix, info = ek.second_moment(lm, 1, f"offline-text:{path}", n_samples=None, max_tokens=500, progress=False,
                                   return_info=True)
    assert info.n_tokens == 500 and torch.isfinite(C_mix).all()
    C_model = ek.second_moment(lm, 1, "model-text", n_samples=None, max_tokens=300, progress=False)
    assert torch.isfinite(C_model).all() and not torch.equal(C_model, C_mix)
    with pytest.raises(ValueError, match="takes no source"):
        ek.second_moment(lm, 1, "model-text:x", n_samples=10, progress=False)


def test_notebook_records_take_the_eval_half_when_c0_reads_counterfact_text(tmp_path):
    """The notebooks' records (``nb.records``) never include a fact an offline CounterFact C0 read."""
    from editkit.notebook import Setup

    path = str(_cf_file(tmp_path))
    offline = Setup(editor_kwargs={"corpus": f"counterfact-text:{path}"})
    recs = offline.records(path, n=5, seed=0)
    assert len(recs) == 5 and all(corpora.corpus_split(r.case_id) == "eval" for r in recs)
    plain = Setup(editor_kwargs={"corpus": "world"}).records(path, n=5, seed=0)
    assert [r.case_id for r in plain] == [r.case_id for r in ek.load_counterfact(path, n=5, seed=0, unique_subjects=True)]
    assert any(corpora.corpus_split(r.case_id) == "corpus" for r in Setup().records(path, n=40, seed=0))
    with pytest.raises(ValueError, match="eval half"):
        offline.records(path, n=40, seed=0)


def test_heldout_texts_of_a_counterfact_file_are_eval_half_sentences_never_edited_and_never_c0(tmp_path):
    """Offline (a local CounterFact file) the perplexity probe reads the eval half's true sentences
    minus the edited records: disjoint from C0's corpus half and from every edit. It used to try
    wikitext on the Hub and fail offline."""
    path = _cf_file(tmp_path, n=60)
    recs = ek.load_counterfact(str(path))
    edited = corpora.scoring_records(recs)[:10]
    texts = ek.heldout_texts(str(path), n=200, seed=0, exclude=edited)
    assert texts and texts == ek.heldout_texts(str(path), n=200, seed=0, exclude=edited)
    named = {r.case_id for r in recs if any(f"Person{r.case_id} Smith" in t for t in texts)}
    assert named and all(corpora.corpus_split(i) == "eval" for i in named)
    assert not named & {r.case_id for r in edited}
    c0 = set(corpora.counterfact_texts(str(path)))
    assert not c0 & set(texts)
    assert ek.heldout_texts(f"counterfact-text:{path}", n=5, seed=0, exclude=edited) == texts[:5]
    with pytest.raises(ValueError, match="eval half"):
        ek.heldout_texts(str(path), exclude=corpora.scoring_records(recs))
    with pytest.raises(ValueError, match="split="):
        list(corpora.counterfact_texts(str(path), split="train"))
