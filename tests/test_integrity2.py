"""Integrity, round 2 (issue 25): no silent wrong answer, no stale row, no lost result,
and warnings a notebook user sees.

Each test reproduces one reported failure on a tiny GPT-2 and checks the fix."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import editkit as ek
from editkit.testing import TINY_TEXT, tiny_lm

SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Apple A5", "Kaiser Chiefs", "Anaal Nathrakh", "Jürgen Müller"]
OBJECTS = ["English", "French", "Spain", "Sweden"]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, values=ek.ValueConfig(v_steps=2))


def _record(i: int, shift: int = 1) -> dict:
    s = SUBJECTS[i]
    true, new = OBJECTS[i % 4], OBJECTS[(i + shift) % 4]
    return {"case_id": i, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                                 "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"{s} is a citizen of"],
            "neighborhood_prompts": [f"The native language of {SUBJECTS[(i + 3) % 6]} is"]}


def _records(n: int = 4, shift: int = 1):
    return ek.load_counterfact([_record(i, shift) for i in range(n)])


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2", n_layer=2)


# --- statistics and their caches ------------------------------------------------------

@pytest.mark.parametrize("kw, field", [(dict(n_samples=0), "n_samples"), (dict(n_samples=-5), "n_samples"),
                                       (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0), "max_tokens"),
                                       (dict(batch_size=0), "batch_size")])
def test_second_moment_rejects_impossible_counts(lm, cache, kw, field):
    kw = dict(dict(n_samples=None), **kw)
    with pytest.raises(ValueError, match=field):
        ek.second_moment(lm, 0, TINY_TEXT, progress=False, **kw)


def test_cache_false_never_touches_the_cache_and_a_file_cache_is_named(lm, tmp_path, monkeypatch):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    monkeypatch.setenv("EDITKIT_CACHE", str(f))
    C0 = ek.second_moment(lm, 0, TINY_TEXT, None, cache=False, progress=False)  # main: NotADirectoryError/FileExists
    assert C0.shape == (lm.d_in(0),) * 2
    F = ek.stats.c0_factor(lm, 0, TINY_TEXT, None, cache=False, progress=False)
    assert F.d_in == lm.d_in(0)
    with pytest.raises(NotADirectoryError, match="EDITKIT_CACHE"):
        ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)


def _factor_files(cache):
    return sorted((cache / "stats").glob("*.chol-*.safetensors"))


def test_cached_factor_is_verified_and_recomputed(lm, cache, caplog):
    from editkit.stats import c0_factor

    F = c0_factor(lm, 0, TINY_TEXT, None, ridge_eps=1e-3, progress=False)
    (f,) = _factor_files(cache)
    good = f.read_bytes()
    i = len(good) - 40  # two bytes inside the tensor data
    breakages = {
        "garbage": b"not a safetensors file" * 10,  # main: SafetensorError naming no path, never recomputed
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "two flipped bytes": good[:i] + bytes([good[i] ^ 0xFF, good[i + 1] ^ 0x01]) + good[i + 2:],  # main: unnoticed
    }
    for what, data in breakages.items():
        f.write_bytes(data)
        caplog.clear()
        with caplog.at_level("WARNING"):
            again = c0_factor(lm, 0, TINY_TEXT, None, ridge_eps=1e-3, progress=False)
        assert torch.equal(again.L, F.L), what
        assert any(str(f) in r.getMessage() for r in caplog.records), what
        assert f.read_bytes() != data, what  # rewritten


def test_factor_files_name_the_ridge_losslessly(lm, cache):
    from editkit.stats import c0_factor

    a = c0_factor(lm, 0, TINY_TEXT, None, ridge_eps=0.1234567, progress=False)
    b = c0_factor(lm, 0, TINY_TEXT, None, ridge_eps=0.1234568, progress=False)  # main: a's file, a's factor
    assert len(_factor_files(cache)) == 2
    assert b.ridge == 0.1234568 and not torch.equal(a.L, b.L)


def test_fingerprint_sees_writes_that_bypass_the_version_counter(lm):
    before = lm.fingerprint()
    w = lm.weight(0)
    with torch.no_grad():
        keep = w.detach().clone()
        w.data.mul_(2)  # main: same fingerprint, so the C0 file and the value memo of the old weights are reused
    try:
        assert lm.fingerprint() != before
        assert lm.fingerprint(upto_layer=0) != before
    finally:
        with torch.no_grad():
            w.data.copy_(keep)
    assert lm.fingerprint() == before


def test_c0_file_of_other_weights_is_not_served(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    C0 = ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)
    with torch.no_grad():
        lm.block(0).mlp.c_fc.weight.data.mul_(2)  # feeds layer 0's edited module
    C0b = ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)  # main: the first file (old fingerprint)
    assert not torch.allclose(C0, C0b)
    assert len(list((cache / "stats").glob("*.safetensors"))) == 2
    assert ek.stats.provenance(C0b)["fingerprint"] == lm.fingerprint(upto_layer=0)


# --- loaders ----------------------------------------------------------------------------

def test_empty_json_file_is_an_error(tmp_path):
    f = tmp_path / "cf.json"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):  # main: 0 records
        ek.load_counterfact(str(f))
    with pytest.raises(ValueError, match="empty"):
        ek.load_zsre(str(f))


@pytest.mark.parametrize("bad", [None, 3, 2.5])
def test_non_string_paraphrases_are_an_error_naming_the_field(bad):
    rec = _record(0)
    rec["paraphrase_prompts"] = ["Danielle Darrieux speaks", bad]
    with pytest.raises(ValueError, match=r"paraphrase_prompts\[1\]"):  # main: the prompt "None" / "3"
        ek.load_counterfact([rec])


def test_duplicate_case_ids_are_an_error():
    recs = [_record(0), _record(1)]
    recs[1]["case_id"] = 0
    with pytest.raises(ValueError, match="case_id 0"):  # main: accepted, duplicate frame keys later
        ek.load_counterfact(recs)
    z = [dict(case_id=7, subject="Apple A5", src="Who made Apple A5?", rephrase="Apple A5 was made by whom?",
              alt="Google", answers=["Apple"], loc="nq question: who sang", loc_ans="Elvis")] * 2
    with pytest.raises(ValueError, match="case_id 7"):
        ek.load_zsre(z)


def test_jsonl_error_names_the_line(tmp_path):
    f = tmp_path / "cf.jsonl"
    lines = [json.dumps(_record(i)) for i in range(3)]
    lines.insert(2, '{"case_id": 9, broken')
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3"):  # main: "line 1 column 14"
        ek.load_counterfact(str(f))


def test_utf16_file_and_directory_path(tmp_path):
    f = tmp_path / "cf.json"
    f.write_text(json.dumps([_record(0), _record(5)], ensure_ascii=False), encoding="utf-16")
    recs = ek.load_counterfact(str(f))  # main: UnicodeDecodeError
    assert [r.subject for r in recs] == ["Danielle Darrieux", "Jürgen Müller"]
    for load in (ek.load_counterfact, ek.load_zsre):
        for src in (str(tmp_path), tmp_path):
            with pytest.raises(IsADirectoryError, match="folder"):  # main: "does not exist"
                load(src)


def test_target_with_a_leading_space_gets_one_space():
    from editkit.requests import with_target

    rec = _record(0)
    rec["requested_rewrite"]["target_new"]["str"] = " French"
    (r,) = ek.load_counterfact([rec])
    assert r.target_new == "French" and r.request.target_new == "French"
    text, (a, b) = with_target(r.text, " French")
    assert text == "The mother tongue of Danielle Darrieux is French"  # main: "is  French"
    assert text[a:b] == " French"
    assert ek.EditRequest("The mother tongue of {} is", "Toko Yasuda", " French", " English").target_new == "French"


def test_cli_methods_with_an_unknown_preset_exits_nonzero(capsys):
    from editkit import cli

    with pytest.raises(SystemExit) as exc:  # main: exit 0, every method "not in preset"
        cli.main(["methods", "--preset", "nonexistent"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "nonexistent" in err and "gpt2-xl" in err
    assert cli.main(["methods", "--preset", "gpt2-xl"]) == 0
