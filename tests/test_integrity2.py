"""Integrity, round 2 (issue 25): no silent wrong answer, no stale row, no lost result,
and warnings a notebook user sees.

Each test reproduces one reported failure on a tiny GPT-2 and checks the fix."""
from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch

import editkit as ek
from editkit.testing import TINY_TEXT, tiny_lm

from test_integrity import FAST, _record, _records  # the same six facts as round 1


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


# --- editors: inputs ------------------------------------------------------------------------

def test_rome_layer_float_and_apply_none_are_clear_errors(lm, cache):
    with pytest.raises(ValueError, match="layers"):  # main: TypeError 'float' object is not iterable
        ek.ROME(layer=1.5, **FAST)
    with pytest.raises(ek.RequestError, match="requests"):  # main: TypeError 'NoneType' object is not iterable
        ek.ROME(layer=0, **FAST).apply(lm, None, progress=False)
    assert lm.edits == []


def test_alphaedit_threshold_that_protects_nothing(lm, cache):
    with pytest.raises(ValueError, match="nullspace_threshold"):  # main: accepted; the projector is the identity
        ek.AlphaEdit(layers=[0], nullspace_threshold=1.5, nullspace_relative=True, **FAST)
    C0 = ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)
    top = torch.linalg.eigvalsh(C0)[-1].item()
    with pytest.warns(UserWarning, match="identity"):  # absolute cut above the top eigenvalue
        ns = ek.solver.NullSpace.of(C0, threshold=2 * top)
    assert ns.rank == C0.shape[0]


def test_foreign_c0_is_refused(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    other = tiny_lm("gpt2", n_layer=2, seed=1)
    rome = ek.ROME(layer=0, **FAST)
    req = _records(1)[0].request
    C1 = ek.second_moment(lm, 1, TINY_TEXT, None, progress=False)  # same shape as layer 0's
    with pytest.raises(ValueError, match="layer 1"):  # main: accepted as layer 0's C0
        rome.apply(lm, [req], stats={0: C1}, progress=False)
    Cother = ek.second_moment(other, 0, TINY_TEXT, None, progress=False)
    with pytest.raises(ValueError, match=other.name):
        rome.apply(lm, [req], stats={0: Cother}, progress=False)
    C0 = ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)
    with pytest.raises(ValueError, match="float16"):
        rome.apply(lm, [req], stats={0: C0.half()}, progress=False)
    assert lm.edits == []
    rome.apply(lm, [req], stats={0: C0}, progress=False).undo()  # its own C0 is fine


# --- statistics held on the model --------------------------------------------------------------

def _stat_keys(lm):
    return {k for k in lm.cache if isinstance(k, tuple) and k and k[0] in ("C0", "C0factor", "prefixes")}


def test_statistics_on_the_model_do_not_survive_foreign_weight_changes(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    rome = ek.ROME(layer=1, **dict(FAST, protocol="editkit"))
    reqs = [r.request for r in _records(2)]
    e = rome.apply(lm, [reqs[0]], progress=False)
    C0 = rome.second_moment(lm, 1)
    prefixes = rome.context(lm)
    e.commit()  # editkit's own edits keep the unedited model's statistics (sequential editing needs them)
    rome.apply(lm, [reqs[1]], progress=False).undo()
    assert rome.second_moment(lm, 1) is C0 and rome.context(lm) is prefixes
    with torch.no_grad():
        lm.block(0).mlp.c_fc.weight.data.mul_(1.5)  # a change editkit did not make: main keeps C0 and prefixes
    with pytest.warns(ek.StaleStatisticsWarning, match="c_fc"):
        fresh = rome.apply(lm, [reqs[1]], progress=False)
    fresh.undo()
    C0b = rome.second_moment(lm, 1)
    assert C0b is not C0 and not torch.allclose(C0b, C0)
    assert torch.allclose(C0b, ek.second_moment(lm, 1, TINY_TEXT, None, cache=False, progress=False))
    assert rome.context(lm) is not prefixes


# --- the edit stack -----------------------------------------------------------------------------

def _weights(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in lm.model.state_dict().items())


def test_committing_an_applied_edit_is_refused(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    a, b = _records(2)
    rome = ek.ROME(layer=0, **FAST)
    before = _weights(lm)
    with pytest.raises(ek.EditError, match="applied"):
        with rome.applied(lm, [a], progress=False) as e:
            e.commit()  # main: accepted, and the edit stays in the weights after the block
    assert _same(lm, before) and lm.edits == []
    with pytest.raises(ek.EditError, match="applied"):
        with rome.applied(lm, [a], progress=False) as outer:
            with rome.applied(lm, [b], progress=False):
                outer.commit()  # main: accepted, the outer edit stays
    assert _same(lm, before) and lm.edits == []


def test_one_batch_rewriting_a_fact_two_ways_is_refused(lm, cache):
    r = _records(1)[0].request
    other = ek.EditRequest(r.prompt, r.subject, "Sweden" if r.target_new != "Sweden" else "Spain", r.target_true)
    with pytest.raises(ek.RequestError, match=r.subject):  # main: both accepted, one silently wins
        ek.MEMIT(layers=[0], **FAST).apply(lm, [r, other], progress=False)
    assert lm.edits == []
    ek.MEMIT(layers=[0], **FAST).apply(lm, [r, r], progress=False).undo()  # the same rewrite twice is no conflict


# --- warnings a notebook user sees -------------------------------------------------------------

def test_absurd_update_last_layer_and_non_convergence_warn_and_are_flagged(lm, cache):
    wild = ek.ValueConfig(v_steps=2, v_lr=1e4, clamp_norm_factor=1e6)
    with pytest.warns(UserWarning, match="dwarfs"):  # main: logging only, under a NullHandler
        edit = ek.ROME(layer=0, **dict(FAST, values=wild)).apply(lm, _records(1), progress=False)
    edit.undo()
    assert edit.flags["huge_update"] == [0]
    with pytest.warns(UserWarning, match="last layer"):
        edit = ek.ROME(layer=lm.n_layers - 1, **FAST).apply(lm, _records(1), progress=False)
    edit.undo()
    assert edit.flags["last_layer"] is True
    with pytest.warns(UserWarning, match="did not converge"):
        edit = ek.ROME(layer=0, **dict(FAST, values=ek.ValueConfig(v_steps=1))).apply(lm, _records(2), progress=False)
    edit.undo()
    assert edit.flags["not_converged"] == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy edit warns of nothing
        edit = ek.ROME(layer=0, **dict(FAST, values=ek.ValueConfig(v_steps=40, stop_nll=50.0))).apply(
            lm, _records(1), progress=False)
    edit.undo()
    assert edit.flags == {}


def test_convergence_summary_counts_over_all_edits(lm, cache):
    from editkit.editors import summarized_edit_warnings

    recs = _records(4)
    slow = ek.ROME(layer=0, **dict(FAST, values=ek.ValueConfig(v_steps=1)))
    easy = ek.ROME(layer=0, **dict(FAST, values=ek.ValueConfig(v_steps=40, stop_nll=50.0)))
    with pytest.warns(UserWarning) as seen:
        with summarized_edit_warnings("study"):
            for r in recs[:3]:
                easy.apply(lm, [r], progress=False).undo()  # converge
            slow.apply(lm, [recs[3]], progress=False).undo()  # does not
            easy.apply(lm, [recs[0]], progress=False).undo()
    msgs = [str(w.message) for w in seen if "did not converge" in str(w.message)]
    assert len(msgs) == 1 and "1 of 5" in msgs[0], msgs  # main: "1 of 1" (counted only edits that warned)


# --- results: the run store ------------------------------------------------------------------

def _sweep(lm, recs, run_dir, **kw):
    from editkit import experiments

    kw = dict(dict(editor_kwargs=FAST, run_dir=run_dir, progress=False, chunk=2), **kw)
    return experiments.layer_sweep(lm, recs, ["ROME"], [0], None, **kw)


def test_units_carry_the_run_key(lm, tmp_path, cache):
    run = tmp_path / "run"
    a = _sweep(lm, _records(4, shift=1), run)
    (run / "params.json").unlink()
    other = _records(4, shift=2)  # same case_ids, other target_new
    with pytest.warns(UserWarning, match="another run"):
        b = _sweep(lm, other, run)  # main: the old rows are served
    for rec in other:
        rows = b[(b.case_id == rec.case_id) & (b.phase == "post")]
        assert set(rows.target_new) == {rec.target_new}
    assert len(b) == len(a)
    man = json.loads(next((run / "units").glob("ROME-*.json")).read_text())
    assert man["run"] == json.loads((run / "params.json").read_text())["key"]


def test_an_edited_manifest_redoes_the_unit_and_says_so(lm, tmp_path, cache):
    run = tmp_path / "run"
    a = _sweep(lm, _records(2), run)
    m = next((run / "units").glob("ROME-*.json"))
    man = json.loads(m.read_text())
    man["rows"] += 3  # main: every later load raises, and resuming never redoes it
    m.write_text(json.dumps(man))
    with pytest.warns(UserWarning, match=f"redoing unit.*{m.stem}"):
        b = _sweep(lm, _records(2), run)
    assert len(b) == len(a)
    assert json.loads(m.read_text())["rows"] == man["rows"] - 3


def test_a_resumed_sequential_run_equals_an_uninterrupted_one(tmp_path, cache, monkeypatch):
    """A fresh process (a fresh model object) resumes from saved weights: the prefixes must be
    those of the unedited model, so every row equals the uninterrupted run's, bit for bit."""
    from editkit import experiments
    from editkit.studies import common as study_common

    recs = _records(6)
    kw = dict(editor_kwargs=dict(FAST, n_prefixes=3, prefix_len=4), progress=False, checkpoints=[2, 6])
    for protocol in ("reference", "editkit"):
        kw["editor_kwargs"]["protocol"] = protocol
        clean = experiments.sequential_batched(tiny_lm("gpt2", n_layer=2), recs, ["MEMIT"], 0, [2], 6,
                                               run_dir=tmp_path / f"clean-{protocol}", **kw)
        real, calls = study_common._evaluate, {"n": 0}

        def dies(*a, **k):
            calls["n"] += 1
            if calls["n"] == 4:  # pre, batch 0, its checkpoint, then batch 1 dies mid-unit
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(study_common, "_evaluate", dies)
        with pytest.raises(KeyboardInterrupt):
            experiments.sequential_batched(tiny_lm("gpt2", n_layer=2), recs, ["MEMIT"], 0, [2], 6,
                                           run_dir=tmp_path / f"resumed-{protocol}", **kw)
        monkeypatch.setattr(study_common, "_evaluate", real)
        resumed = experiments.sequential_batched(tiny_lm("gpt2", n_layer=2), recs, ["MEMIT"], 0, [2], 6,
                                                 run_dir=tmp_path / f"resumed-{protocol}", **kw)
        key = ["phase", "batch", "case_id", "kind", "prompt_index"]
        a = clean.drop(columns=["edit_seconds"]).sort_values(key).reset_index(drop=True)
        b = resumed.drop(columns=["edit_seconds"]).sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)  # main: update norms differ after the resume


def test_a_lock_held_elsewhere_says_who_and_shows_the_wait(tmp_path):
    import platform
    import time as _time

    from editkit.experiments import RunStore

    store = RunStore.open("t", {"a": 1}, root=tmp_path)
    store.poll, store.stale_after = 0.05, 1.0
    lock = store._lock("u1")
    lock.write_text(json.dumps({"host": "other-host.example", "pid": 4242, "token": "t", "time": _time.time()}))
    assert platform.node() != "other-host.example"
    t0 = _time.time()
    with pytest.warns(UserWarning, match=r"other-host\.example.*4242"):  # main: waits in silence
        store.run_units([("u1", lambda: pd.DataFrame({"x": [1]}))], progress=False)
    assert store.is_done("u1") and _time.time() - t0 >= 0.9  # taken over once stale


def test_layer_sweep_with_no_layers_is_an_error(lm, tmp_path):
    from editkit import experiments

    with pytest.raises(ValueError, match="layers"):  # main: 0 rows, silently
        experiments.layer_sweep(lm, _records(2), ["ROME"], layers=[], n_edits=2, root=tmp_path, progress=False)


@pytest.mark.parametrize("on_device", [False, True])
def test_content_check_sees_one_changed_element_and_permutations(on_device):
    """The cheap checksum that validates cached digests: crc32 on the CPU, an integer hash
    computed where the tensor lives on an accelerator (run here on the CPU)."""
    from editkit.models import _content_check

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3 * (1 << 20) + 7, generator=g).to(dtype)  # not a multiple of the chunk or of 4 bytes
        base = _content_check(x, on_device)
        assert base == _content_check(x.clone(), on_device)
        for i in (0, 5, len(x) - 1, (1 << 22) // 2 + 1):
            y = x.clone()
            y.view(torch.int16 if dtype != torch.float32 else torch.int32)[i] ^= 1  # one bit of one element
            assert _content_check(y, on_device) != base, (dtype, i)
        z = x.clone()
        z[[3, 4]] = z[[4, 3]]
        assert torch.equal(z, x) or _content_check(z, on_device) != base


def test_a_loaded_saved_edit_keeps_the_statistics(tmp_path, cache):
    lm = tiny_lm("gpt2", n_layer=2)
    rome = ek.ROME(layer=0, **FAST)
    edit = rome.apply(lm, _records(1), progress=False)
    edit.save(tmp_path / "edit")
    edit.undo()
    C0 = rome.second_moment(lm, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ek.StaleStatisticsWarning)  # an editkit edit, not a foreign change
        again = ek.load_edit(tmp_path / "edit").apply(lm)
        assert rome.second_moment(lm, 0) is C0
        again.undo()
        assert rome.second_moment(lm, 0) is C0
