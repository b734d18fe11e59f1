"""CounterFact and zsRE loaders: real records from ../shared/data (skipped when that
folder is absent), small records built here, sampling, round trips, offline errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from editkit.data import (CounterFactRecord, DatasetUnavailableError, ZsreRecord, counterfact, load_counterfact,
                          load_zsre, zsre)
from editkit.requests import EditRequest, RequestError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CF_EASYEDIT = SHARED / "counterfact" / "counterfact-easyedit-1000.json"
ZSRE_MEND = SHARED / "zsre" / "zsre-mend-500.json"
needs_cf = pytest.mark.skipif(not CF_EASYEDIT.is_file(), reason=f"reference data absent: {CF_EASYEDIT}")
needs_zsre = pytest.mark.skipif(not ZSRE_MEND.is_file(), reason=f"reference data absent: {ZSRE_MEND}")


def original(i: int, subject: str = "Danielle Darrieux") -> dict:
    return {"case_id": i, "pararel_idx": 100 + i,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                  "target_new": {"str": "English", "id": "Q1860"},
                                  "target_true": {"str": "French", "id": "Q150"}, "subject": subject},
            "paraphrase_prompts": [f"{subject} spoke", f"Where {subject} grew up, people speak"],
            "neighborhood_prompts": ["The native language of Montesquieu is", "Michel Rocard speaks"],
            "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
            "generation_prompts": [f"{subject}'s mother tongue is"]}


# --------------------------------------------------------------------------- real records

@needs_cf
def test_easyedit_all_records_load_and_templates_round_trip():
    raw = json.loads(CF_EASYEDIT.read_text())
    records = load_counterfact(CF_EASYEDIT)
    assert len(records) == len(raw) == 1000
    for r, d in zip(records, raw):
        assert r.prompt.count("{}") == 1
        assert r.prompt.format(r.subject) == d["prompt"] == r.request.text
        assert (r.case_id, r.target_new, r.target_true) == (d["case_id"], d["target_new"], d["ground_truth"])
        assert r.paraphrase_prompts == [d["rephrase_prompt"]]
        assert r.neighborhood_prompts == [d["locality_prompt"]]
        assert r.neighborhood_target(0) == d["locality_ground_truth"]
        s, e = r.request.subject_span
        assert r.request.text[s:e] == r.subject


@needs_cf
def test_easyedit_subject_absent_raises_or_is_skipped(tmp_path, caplog):
    raw = json.loads(CF_EASYEDIT.read_text())[:5]
    raw[2] = {**raw[2], "subject": "Nobody In Particular"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RequestError, match=r"record #2.*'Nobody In Particular' does not occur.*skip_invalid=True"):
        load_counterfact(path)
    with caplog.at_level("WARNING"):
        kept = load_counterfact(path, skip_invalid=True)
    assert [r.case_id for r in kept] == [raw[i]["case_id"] for i in (0, 1, 3, 4)]
    assert "skipped 1 invalid CounterFact record" in caplog.text


@needs_zsre
def test_zsre_mend_records_load():
    raw = json.loads(ZSRE_MEND.read_text())
    records = load_zsre(ZSRE_MEND)
    assert len(records) == 500
    for i, (r, d) in enumerate(zip(records, raw)):
        req = r.request
        assert r.case_id == i
        # ROME/MEMIT's definition (the default): the edit writes the correct answer; locality prompt + "?"
        assert req.text == d["src"] and req.target_new == d["answers"][0] and req.target_true is None
        assert r.paraphrase_prompts == [d["rephrase"]]
        assert r.neighborhood_prompts == [d["loc"] + "?"] and r.neighborhood_target(0) == d["loc_ans"]
        assert {k: v for k, v in r.to_dict().items() if k not in ("case_id", "definition")} == d
    again = load_zsre([r.to_dict() for r in records])
    assert again == records
    mend = load_zsre(ZSRE_MEND, definition="mend")
    for r, d in zip(mend, raw):  # MEND/EasyEdit's: the edit writes alt against answers[0]; locality prompt as given
        # 10 of the 500 have alt == answers[0]: their request carries no target_true (nothing to rewrite)
        # (a target's leading space is the prompt text's, so " Captain Universe" is requested as "Captain Universe")
        same = d["alt"].strip() == d["answers"][0].strip()
        assert (r.request.target_new, r.request.target_true) == (d["alt"].lstrip(),
                                                                 None if same else d["answers"][0].lstrip())
        assert r.target_true == d["answers"][0]
        assert r.neighborhood_prompts == [d["loc"]] and r.dataset == "zsre-mend"
    assert ZsreRecord.from_dict(mend[0].to_dict()) == mend[0]


@needs_cf
def test_seeded_sampling_is_deterministic_on_real_records():
    a = load_counterfact(CF_EASYEDIT, n=20, seed=3)
    b = load_counterfact(CF_EASYEDIT, n=20, seed=3)
    c = load_counterfact(CF_EASYEDIT, n=20, seed=4)
    assert [r.case_id for r in a] == [r.case_id for r in b] != [r.case_id for r in c]
    first = [d["case_id"] for d in json.loads(CF_EASYEDIT.read_text())[:5]]
    assert [r.case_id for r in load_counterfact(CF_EASYEDIT, n=5)] == first  # no seed: file order
    uniq = load_counterfact(CF_EASYEDIT, unique_subjects=True)
    assert len({r.subject for r in uniq}) == len(uniq) < 1000


# --------------------------------------------------------------------------- built records

def test_original_schema_round_trip_and_request():
    d = original(0)
    r = CounterFactRecord.from_dict(d)
    assert r.to_dict() == d
    assert CounterFactRecord.from_dict(r.to_dict()) == r
    assert r.request == EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0)
    assert (r.relation_id, r.target_new_id, r.target_true_id, r.pararel_idx) == ("P103", "Q1860", "Q150", 100)
    assert r.neighborhood_target(1) == "French"  # original CounterFact: neighbours share target_true
    # EasyEdit per-prompt neighbour objects survive the round trip as an extra key
    e = load_counterfact([{"case_id": 7, "prompt": "Paris is the capital of", "subject": "Paris",
                           "target_new": "Italy", "ground_truth": "France", "rephrase_prompt": "Paris, capital of",
                           "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"}])[0]
    assert e.prompt == "{} is the capital of" and e.neighborhood_target(0) == "Germany"
    assert e.to_dict()["neighborhood_targets"] == ["Germany"]
    assert CounterFactRecord.from_dict(e.to_dict()) == e


def test_original_schema_file_and_unique_subjects(tmp_path):
    data = [original(0, "A B"), original(1, "C D"), original(2, "A B"), original(3, "E F")]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(data))
    assert [r.to_dict() for r in load_counterfact(path)] == data
    assert [r.case_id for r in load_counterfact(str(path), unique_subjects=True)] == [0, 1, 3]
    # JSON Lines works too
    (tmp_path / "cf.jsonl").write_text("\n".join(json.dumps(d) for d in data))
    assert len(load_counterfact(tmp_path / "cf.jsonl")) == 4
    # unique filtering happens before the seeded shuffle: the kept set does not depend on the seed
    for seed in range(5):
        assert sorted(r.case_id for r in load_counterfact(data, seed=seed, unique_subjects=True)) == [0, 1, 3]
    assert len(load_counterfact(data, n=2, seed=1)) == 2


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_counterfact(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_counterfact("./nope/counterfact.json")
    with pytest.raises(ValueError, match="load_zsre"):
        load_counterfact([{"subject": "x", "src": "x?", "alt": "y"}])
    with pytest.raises(ValueError, match="unrecognized CounterFact layout"):
        load_counterfact([{"foo": 1}])
    with pytest.raises(ValueError, match="lacks"):
        load_zsre([{"subject": "x"}])
    bad = {"subject": "Nobody", "src": "What is UniFirst?", "rephrase": "r", "alt": "a", "answers": ["b"],
           "loc": "l", "loc_ans": "m"}
    with pytest.raises(RequestError, match="does not occur"):
        load_zsre([bad])
    assert load_zsre([bad], skip_invalid=True) == []
    with pytest.raises(FileNotFoundError, match="zsRE file"):
        load_zsre(tmp_path / "missing.json")


def test_zsre_built_record():
    kw = dict(case_id=3, subject="UniFirst", src="What is the product made by UniFirst?",
              rephrase="What does UniFirst make?", alt="drones", answers=["uniform"], loc="nq question: who",
              loc_ans="Walter")
    r = ZsreRecord(**kw)
    assert r.request.prompt == "What is the product made by {}?"
    assert (r.target_new, r.target_true, r.dataset) == ("uniform", None, "zsre-rome")
    assert r.neighborhood_prompts == ["nq question: who?"]
    m = ZsreRecord(**kw, definition="mend")
    assert (m.target_new, m.target_true, m.dataset) == ("drones", "uniform", "zsre-mend")
    assert m.neighborhood_prompts == ["nq question: who"]
    assert ZsreRecord.from_dict(r.to_dict()) == r and ZsreRecord.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="definition='memit'.*'rome'.*'mend'"):
        ZsreRecord(**kw, definition="memit")


@pytest.mark.parametrize("definition", ["rome", "mend"])
def test_zsre_empty_alt_is_an_error_unless_skipped(definition):
    good = {"subject": "UniFirst", "src": "What is made by UniFirst?", "rephrase": "r", "alt": "drones",
            "answers": ["uniform"], "loc": "l", "loc_ans": "m"}
    raw = [good, {**good, "alt": ""}, {**good, "alt": "  "}]
    with pytest.raises(RequestError, match=r"record #1.*'alt' is empty.*skip_invalid=True"):
        load_zsre(raw, definition=definition)
    kept = load_zsre(raw, definition=definition, skip_invalid=True)
    assert [r.case_id for r in kept] == [0]


# --------------------------------------------------------------------------- downloads

def test_offline_download_fails_fast_with_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))
    monkeypatch.setitem(counterfact.COUNTERFACT_URLS, "counterfact", "http://127.0.0.1:9/counterfact.json")
    monkeypatch.setitem(zsre.ZSRE_URLS, "zsre", "http://127.0.0.1:9/zsre.json")
    t = time.monotonic()
    with pytest.raises(DatasetUnavailableError, match=r"could not download.*cached at .*counterfact\.json"):
        load_counterfact("counterfact")
    with pytest.raises(DatasetUnavailableError, match="load_zsre"):
        load_zsre()
    assert time.monotonic() - t < 20
    assert not list((tmp_path / "data").glob("*"))  # no truncated file left behind


def test_download_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))
    src = tmp_path / "served.json"
    src.write_text(json.dumps([original(0), original(1, "C D")]))
    monkeypatch.setitem(counterfact.COUNTERFACT_URLS, "multi_counterfact", src.as_uri())
    assert len(load_counterfact("multi_counterfact")) == 2
    src.unlink()  # the second call reads the cache
    assert len(load_counterfact("mcf")) == 2
    assert (tmp_path / "data" / "multi_counterfact.json").is_file()


def test_hf_dataset_offline_is_a_clear_error(monkeypatch):
    import editkit.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(editkit.hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DatasetUnavailableError, match="azhx/counterfact"):
        load_counterfact("azhx/counterfact")
