"""Metrics: batched scoring equals one-at-a-time scoring, a model whose next-token
probabilities the test sets gives exactly the scores docs/metrics.md defines, and the
real CounterFact sample scores end to end."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from editkit.data import CounterFactRecord, load_counterfact, load_zsre
from editkit.metrics import FRAME_COLUMNS, _Tfidf, evaluate, ngram_entropy, summarize
from editkit.models import Adapter, LanguageModel
from editkit.testing import tiny_lm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CF_EASYEDIT = SHARED / "counterfact" / "counterfact-easyedit-1000.json"
ZSRE_MEND = SHARED / "zsre" / "zsre-mend-500.json"


def cf(case_id, subject, prompt, new, true, para=(), neigh=(), neigh_targets=None, gen=()) -> CounterFactRecord:
    return CounterFactRecord(case_id=case_id, subject=subject, prompt=prompt, target_new=new, target_true=true,
                             paraphrase_prompts=list(para), neighborhood_prompts=list(neigh),
                             neighborhood_targets=neigh_targets, generation_prompts=list(gen))


# Multi-token targets, non-ASCII names, apostrophes and commas inside subjects.
RECORDS = [
    cf(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
       ["Danielle Darrieux is a citizen of", "Where Danielle Darrieux grew up, people speak"],
       ["The native language of Édith Piaf is", "Jürgen Müller plays the"]),
    cf(1, "O'Neil, Jr.", "{} was developed by", "Autonomous University of Madrid", "Apple",
       ["O'Neil, Jr. is a person and"], ["Apple A5 was developed by"], ["Google"]),
    cf(2, "Thomas Joannes Stieltjes", "{} was born in", "Berlin", "Thomas Joannes Stieltjes",
       [], ["Kaiser Chiefs was born in", "Toko Yasuda was born in", "Anaal Nathrakh is"], ["Paris", "Spain", "piano"]),
]


# --------------------------------------------------------------------------- batched == single

def _reference_nll(lm: LanguageModel, prompt: str, target: str) -> float:
    """Independent reference: the target tokens are what follows the prompt's own
    tokens in the full text (valid here: no token straddles the prompt/target edge)."""
    tok = lm.tokenizer
    p_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + " " + target)["input_ids"]
    assert ids[:len(p_ids)] == p_ids
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return -float(np.mean([logp[i - 1, ids[i]].item() for i in range(len(p_ids), len(ids))]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_equals_one_at_a_time(arch):
    lm = tiny_lm(arch)
    if arch == "llama":  # the Llama-style tokenizer adds BOS and a metaspace marker
        assert lm.tokenizer("Paris")["input_ids"][0] == lm.tokenizer.bos_token_id
    batched = evaluate(lm, RECORDS, batch_size=64, progress=False)
    single = evaluate(lm, RECORDS, batch_size=1, progress=False)
    odd = evaluate(lm, RECORDS[::-1], batch_size=3, progress=False)
    assert list(batched.columns) == list(FRAME_COLUMNS)
    assert len(batched) == sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in RECORDS)
    assert (batched["n_tokens_new"] > 1).any()  # multi-token targets are exercised
    num = ["nll_new", "nll_true", "p_new", "p_true", "acc_new", "acc_true"]
    np.testing.assert_allclose(batched[num].to_numpy(float), single[num].to_numpy(float), rtol=1e-5, atol=1e-5)
    key = ["case_id", "kind", "prompt_index"]
    np.testing.assert_allclose(batched.sort_values(key)[num].to_numpy(float),
                               odd.sort_values(key)[num].to_numpy(float), rtol=1e-5, atol=1e-5)
    for c in ("success", "top1_new", "top1_true", "n_tokens_new"):
        assert (batched[c] == single[c]).all()
    for row in batched.itertuples():
        assert row.nll_new == pytest.approx(_reference_nll(lm, row.prompt, row.target_new), abs=1e-4)
        assert row.nll_true == pytest.approx(_reference_nll(lm, row.prompt, row.target_true), abs=1e-4)


# --------------------------------------------------------------------------- hand-built model

class Bigram(nn.Module):
    """Next-token logits depend only on the current token: ``logits[t] = table[ids[t]]``,
    so every probability a test needs is a softmax of one table row."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        nn.init.zeros_(self.table.weight)
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].proj = nn.Linear(1, 1)
        self.norm = nn.Identity()
        self.config = SimpleNamespace(model_type="bigram")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.table

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table(input_ids))


@pytest.fixture(scope="module")
def bigram():
    tok = tiny_lm("gpt2").tokenizer
    model = Bigram(len(tok))
    lm = LanguageModel(model, tok, Adapter("bigram", "blocks", "blocks.{}.proj", "norm"), name="bigram")

    def tid(word: str) -> int:
        ids = tok(" " + word)["input_ids"]
        assert len(ids) == 1, f"{word!r} must be one token for this test"
        return ids[0]

    ids = {w: tid(w) for w in ("is", "of", "in", "by", "English", "French", "Spain", "Sweden")}
    w = model.table.weight.data
    w[ids["is"], ids["English"]], w[ids["is"], ids["French"]] = 3.0, 1.0    # o* wins, o* is argmax
    w[ids["of"], ids["English"]], w[ids["of"], ids["French"]] = 0.0, 2.0    # o^c wins, o^c is argmax
    w[ids["in"], ids["English"]], w[ids["in"], ids["French"]] = 1.0, 1.0    # a tie: no success either way,
    w[ids["in"], ids["Sweden"]] = 2.0                                       # and neither is the argmax
    w[ids["by"], ids["Spain"]] = 2.0                                        # neighbour's own object wins
    w[ids["Spain"], ids["Sweden"]] = 4.0                                    # second token of "Spain Sweden"
    return lm, ids


def _p(lm, prev: int, nxt: int) -> float:
    return torch.softmax(lm.model.table.weight[prev].double(), -1)[nxt].item()


def test_hand_built_model_gives_the_defined_scores(bigram):
    lm, ids = bigram
    records = [
        cf(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
           para=["The language of Danielle Darrieux is", "Danielle Darrieux speaks in"],   # success, tie
           neigh=["Toko Yasuda is", "The mother tongue of Apple A5 is of"]),                # leak, no leak
        cf(1, "Toko Yasuda", "The mother tongue of {} is of", "English", "French",         # fails
           para=["Toko Yasuda is"],                                                         # success
           neigh=["Kaiser Chiefs was developed by"], neigh_targets=["Spain"]),              # own object wins
    ]
    frame = evaluate(lm, records, progress=False)
    exp_success = [True, True, False, False, True, False, True, True]
    assert frame["success"].tolist() == exp_success
    assert frame["kind"].tolist() == ["rewrite", "paraphrase", "paraphrase", "neighborhood", "neighborhood",
                                      "rewrite", "paraphrase", "neighborhood"]
    assert frame["target_true"].iloc[-1] == "Spain"  # the neighbour's own o^c
    p_is_new, p_is_true = _p(lm, ids["is"], ids["English"]), _p(lm, ids["is"], ids["French"])
    p_of_new, p_of_true = _p(lm, ids["of"], ids["English"]), _p(lm, ids["of"], ids["French"])
    assert frame["p_new"].iloc[0] == pytest.approx(p_is_new, rel=1e-5)
    assert frame["nll_true"].iloc[0] == pytest.approx(-math.log(p_is_true), rel=1e-5)
    assert frame["top1_new"].tolist() == [True, True, False, True, False, False, True, False]
    assert frame["top1_true"].tolist() == [False, False, False, False, True, True, False, True]

    s = summarize(frame, n_boot=200)
    assert list(s.columns) == ["value", "ci_low", "ci_high", "n"]
    # averaged over a record's prompts first, then over records
    es, ps, ns = (1 + 0) / 2, (0.5 + 1) / 2, (0.5 + 1) / 2
    assert s.loc["ES", "value"] == pytest.approx(es)
    assert s.loc["PS", "value"] == pytest.approx(ps)
    assert s.loc["NS", "value"] == pytest.approx(ns)  # pooled over prompts it would be 2/3
    assert s.loc["S", "value"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))
    assert s.loc["EM", "value"] == pytest.approx(((p_is_new - p_is_true) + (p_of_new - p_of_true)) / 2, rel=1e-5)
    p_in = _p(lm, ids["in"], ids["English"])
    assert s.loc["PM", "value"] == pytest.approx(((p_is_new - p_is_true + 0 * p_in) / 2 + (p_is_new - p_is_true)) / 2,
                                                 rel=1e-5)
    p_by_spain, p_by_new = _p(lm, ids["by"], ids["Spain"]), _p(lm, ids["by"], ids["English"])
    nm = ((p_is_true - p_is_new) + (p_of_true - p_of_new)) / 2
    assert s.loc["NM", "value"] == pytest.approx((nm + (p_by_spain - p_by_new)) / 2, rel=1e-5)
    assert s.loc["ES_top1", "value"] == pytest.approx(0.5)
    assert s.loc["PS_top1", "value"] == pytest.approx((0.5 + 1) / 2)
    assert s.loc["NS_top1", "value"] == pytest.approx((0.5 + 1) / 2)
    assert (s["n"] == 2).all()
    for m in ("ES", "PS", "NS", "S"):
        assert s.loc[m, "ci_low"] <= s.loc[m, "value"] <= s.loc[m, "ci_high"]
    assert summarize(frame, n_boot=200).equals(s)  # seeded: reproducible


def test_multi_token_target_nll_is_the_per_token_mean(bigram):
    lm, ids = bigram
    frame = evaluate(lm, [cf(0, "Toko Yasuda", "{} is", "Spain Sweden", "French")], progress=False)
    row = frame.iloc[0]
    expected = -(math.log(_p(lm, ids["is"], ids["Spain"])) + math.log(_p(lm, ids["Spain"], ids["Sweden"]))) / 2
    assert row.n_tokens_new == 2
    assert row.nll_new == pytest.approx(expected, rel=1e-5)
    assert row.p_new == pytest.approx(math.exp(-expected), rel=1e-5)
    assert row.acc_new == 0.5 and not row.top1_new  # " Sweden" is the argmax after " Spain", " Spain" is not after "is"


def test_summarize_by_groups_and_edge_cases(bigram, tmp_path):
    lm, _ = bigram
    rec = [cf(i, "Toko Yasuda", "{} is" if i % 2 else "{} is of", "English", "French", para=["Toko Yasuda in"],
              neigh=["Apple A5 of"]) for i in range(6)]
    frame = evaluate(lm, rec, progress=False)
    frame["method"] = np.where(frame["case_id"] % 2 == 1, "good", "bad")
    frame["layer"] = 3
    out = summarize(frame, by=["method", "layer"], n_boot=50)
    assert list(out.columns) == ["method", "layer", "metric", "value", "ci_low", "ci_high", "n"]
    es = out[out.metric == "ES"].set_index("method")
    assert es.loc["good", "value"] == 1.0 and es.loc["bad", "value"] == 0.0 and (es["n"] == 3).all()
    s_bad = out[(out.method == "bad") & (out.metric == "S")].iloc[0]
    assert s_bad.value == 0.0 and s_bad.ci_high == 0.0  # harmonic mean with a zero term is zero
    assert summarize(frame, by="method", n_boot=0)["ci_low"].isna().all()
    frame.to_csv(tmp_path / "rows.csv", index=False)  # the run store's round trip
    pd.testing.assert_frame_equal(summarize(pd.read_csv(tmp_path / "rows.csv"), by=["method", "layer"], n_boot=50), out)
    with pytest.raises(KeyError, match="nope"):
        summarize(frame, by=["nope"])
    with pytest.raises(ValueError, match="kinds"):
        evaluate(lm, rec, kinds=["attribute"], progress=False)


# --------------------------------------------------------------------------- generation metrics

def test_ngram_entropy_and_tfidf():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams ab, ba, ab
    assert ngram_entropy("a b a b") == pytest.approx(2 / 3 * h2 + 4 / 3 * 1.0)  # trigrams aba, bab
    assert ngram_entropy("same same same same") == 0.0
    tfidf = _Tfidf({"paris": 0, "france": 1, "city": 2}, np.array([1.0, 2.0, 1.0]))
    assert tfidf.similarity("Paris!", "paris city") == pytest.approx(1 / math.sqrt(2))
    assert tfidf.similarity("France", "city") == 0.0


def test_generation_rows_are_optional(caplog):
    lm = tiny_lm("gpt2")
    rec = [cf(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
              gen=["Danielle Darrieux was born in", "Danielle Darrieux plays the"])]
    assert "generation" not in set(evaluate(lm, rec, progress=False)["kind"])
    with caplog.at_level("INFO"):
        frame = evaluate(lm, rec, generation=True, progress=False, generation_kwargs={"max_new_tokens": 6})
    gen = frame[frame.kind == "generation"]
    assert len(gen) == 2 and gen["generated"].str.startswith("Danielle Darrieux").all()
    again = evaluate(lm, rec, generation=True, progress=False, generation_kwargs={"max_new_tokens": 6})
    assert again[again.kind == "generation"]["generated"].tolist() == gen["generated"].tolist()  # seeded
    assert "reference score (RS) skipped" in caplog.text
    s = summarize(frame, n_boot=20)
    assert s.loc["GE", "value"] == pytest.approx(gen["entropy"].mean())
    assert "RS" not in s.index


# --------------------------------------------------------------------------- real data end to end

@pytest.mark.skipif(not CF_EASYEDIT.is_file(), reason=f"reference data absent: {CF_EASYEDIT}")
def test_real_counterfact_sample_end_to_end():
    lm = tiny_lm("gpt2")
    records = load_counterfact(CF_EASYEDIT, n=50)
    frame = evaluate(lm, records, batch_size=32, progress=False)
    assert len(frame) == 150 and set(frame["kind"]) == {"rewrite", "paraphrase", "neighborhood"}
    assert np.isfinite(frame[["nll_new", "nll_true"]].to_numpy(float)).all()
    neigh = frame[frame.kind == "neighborhood"].set_index("case_id")["target_true"]
    assert all(neigh[r.case_id] == r.neighborhood_target(0) for r in records)
    s = summarize(frame, n_boot=100)
    for m in ("ES", "PS", "NS", "S"):
        assert 0.0 <= s.loc[m, "ci_low"] <= s.loc[m, "value"] <= s.loc[m, "ci_high"] <= 1.0
        assert s.loc[m, "n"] == 50
    for m in ("EM", "PM", "NM"):
        assert -1.0 <= s.loc[m, "value"] <= 1.0


@pytest.mark.skipif(not ZSRE_MEND.is_file(), reason=f"reference data absent: {ZSRE_MEND}")
def test_real_zsre_sample_top1():
    lm = tiny_lm("llama")
    records = load_zsre(ZSRE_MEND, n=20, seed=0)
    frame = evaluate(lm, records, progress=False)
    assert (frame["dataset"] == "zsre-rome").all()
    rw = frame[frame.kind != "neighborhood"]
    assert rw["target_true"].isna().all() and rw["nll_true"].isna().all() and rw["success"].isna().all()
    assert rw["target_new"].tolist() == [a for r in records for a in [r.answers[0]] * 2]
    loc = frame[frame.kind == "neighborhood"]
    assert loc["target_true"].tolist() == [r.loc_ans for r in records]
    s = summarize(frame, n_boot=50)
    assert {"ES_top1", "PS_top1", "NS_top1", "ES_acc"} <= set(s.index)
    assert "ES" not in s.index  # no true object under ROME/MEMIT's definition: no probability comparison
    mend = evaluate(lm, load_zsre(ZSRE_MEND, n=20, seed=0, definition="mend"), progress=False)
    assert (mend["dataset"] == "zsre-mend").all() and mend["success"].notna().all()
    assert mend[mend.kind == "neighborhood"]["prompt"].tolist() == [r.loc for r in records]
    assert loc["prompt"].tolist() == [r.loc + "?" for r in records]
    # both definitions of the same 20 records in one frame: 40 records, not 20
    both = summarize(pd.concat([frame, mend]), n_boot=0)
    assert both.loc["NS", "n"] == 40


def test_summarize_keeps_datasets_sharing_case_ids_apart():
    rows = []
    for ds, ok in (("counterfact", True), ("zsre-mend", False)):
        for cid in range(5):
            rows.append({"dataset": ds, "case_id": cid, "kind": "rewrite", "success": ok, "p_new": 0.5, "p_true": 0.1})
    frame = pd.DataFrame(rows)
    s = summarize(frame, n_boot=0)
    assert s.loc["ES", "n"] == 10 and s.loc["ES", "value"] == 0.5
    by = summarize(frame, n_boot=0, by="dataset").set_index(["dataset", "metric"])
    assert by.loc[("counterfact", "ES"), "value"] == 1.0 and by.loc[("zsre-mend", "ES"), "n"] == 5


# --------------------------------------------------------------------------- one scorer

def test_widgets_world_report_and_tracing_score_as_evaluate():
    """The explorer's NLLs and ES/PS/NS, the world's fact accuracy and causal tracing's
    clean probability are evaluate's numbers: one span rule, one scorer."""
    from editkit.requests import RequestError
    from editkit.tracing import causal_trace
    from editkit.widgets import _scores, target_nll
    from editkit.world import fact_accuracy

    lm = tiny_lm("gpt2")
    rec = RECORDS[0]
    frame = evaluate(lm, RECORDS, progress=False)
    mine = frame[frame.case_id == 0]
    kinds = {k: list(mine[mine.kind == k].prompt) for k in ("rewrite", "paraphrase", "neighborhood")}
    true = {k: list(mine[mine.kind == k].target_true)[0] for k in kinds}
    nll = {k: {"new": target_nll(lm, ps, rec.request.target_new), "true": target_nll(lm, ps, true[k])}
           for k, ps in kinds.items()}
    for k in kinds:
        assert nll[k]["new"] == list(mine[mine.kind == k].nll_new) and nll[k]["true"] == list(mine[mine.kind == k].nll_true)
    assert _scores(nll) == {m: float(mine[mine.kind == k].success.mean())
                            for m, k in (("ES", "rewrite"), ("PS", "paraphrase"), ("NS", "neighborhood"))}
    with pytest.raises(RequestError, match="first token"):  # the widget no longer drops such a token silently
        target_nll(lm, [""], "Paris")

    raw = [{"requested_rewrite": {"prompt": r.request.prompt, "subject": r.request.subject,
                                  "target_new": {"str": r.request.target_new}, "target_true": {"str": r.request.target_true}},
            "paraphrase_prompts": r.paraphrase_prompts} for r in RECORDS]
    rewrite, para = frame[frame.kind == "rewrite"], frame[frame.kind == "paraphrase"]
    assert fact_accuracy(lm.model, lm.tokenizer, raw) == (rewrite.nll_true < rewrite.nll_new).mean()
    assert fact_accuracy(lm.model, lm.tokenizer, raw, which="paraphrase") == (para.nll_true < para.nll_new).mean()

    trace = causal_trace(lm, rec.request.prompt, rec.request.subject, rec.request.target_true, samples=1)
    assert trace.attrs["clean"] == pytest.approx(float(mine[mine.kind == "rewrite"].p_true.iloc[0]), rel=1e-5)
