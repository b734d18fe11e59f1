"""Results you can trust (issue 13): the run store never serves stale, duplicated or
corrupt rows; caches and inputs are checked before use.

Each test reproduces one reported failure on a tiny GPT-2 and checks the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

import editkit as ek
from editkit import experiments
from editkit.studies import common as study_common  # where every study scores its rows
from editkit.experiments import RunStore, RunStoreError, UnitClaimed
from editkit.testing import TINY_TEXT, tiny_lm

SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Apple A5", "Kaiser Chiefs", "Anaal Nathrakh", "Jürgen Müller"]
OBJECTS = ["English", "French", "Spain", "Sweden"]
FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, values=ek.ValueConfig(v_steps=2))
KEY = ["phase", "method", "layer", "case_id", "kind", "prompt_index"]


def _record(i: int, shift: int = 1) -> dict:
    s = SUBJECTS[i]
    true, new = OBJECTS[i % 4], OBJECTS[(i + shift) % 4]
    return {"case_id": i, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                                 "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"{s} is a citizen of"],
            "neighborhood_prompts": [f"The native language of {SUBJECTS[(i + 3) % 6]} is"]}


def _records(n: int = 4, shift: int = 1):
    return ek.load_counterfact([_record(i, shift) for i in range(n)])


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2", n_layer=2)


def _sweep(lm, recs, tmp, **kw):
    kw = dict(dict(editor_kwargs=FAST, root=tmp, progress=False, chunk=2), **kw)
    return experiments.layer_sweep(lm, recs, ["ROME"], [0], None, **kw)


# --- run key ---------------------------------------------------------------------

def test_run_key_includes_how_units_are_cut(lm, tmp_path):
    recs = _records(3)
    a = _sweep(lm, recs, tmp_path, chunk=2)
    b = _sweep(lm, recs, tmp_path, chunk=3)  # on main: same directory, rows of both cuts (duplicated keys)
    assert not b.duplicated(KEY).any()
    assert len(b) == len(a)
    c = _sweep(lm, recs, tmp_path, chunk=3, eval_batch_size=1)
    assert not c.duplicated(KEY).any() and len(c) == len(a)
    assert len(list(tmp_path.iterdir())) == 3


def test_run_key_is_the_records_content_not_their_case_ids(lm, tmp_path):
    a = _sweep(lm, _records(2, shift=1), tmp_path)
    other = _records(2, shift=2)  # same case_ids, other target_new
    b = _sweep(lm, other, tmp_path)
    for rec in other:
        rows = b[(b.case_id == rec.case_id) & (b.kind == "rewrite")]
        assert set(rows.target_new) == {rec.target_new}
    assert set(a.target_new) != set(b.target_new)


def test_run_key_is_the_model_weights_not_its_name(lm, tmp_path):
    recs = _records(2)
    a = _sweep(lm, recs, tmp_path)
    other = tiny_lm("gpt2", n_layer=2, seed=1)
    other.name = lm.name  # other weights saved under the same name
    b = _sweep(other, recs, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert not torch.allclose(torch.tensor(a.nll_new.values), torch.tensor(b.nll_new.values))


def test_fingerprint_sees_every_change_including_permutations():
    lm = tiny_lm("gpt2", n_layer=2)
    f0, f0_l0 = lm.fingerprint(), lm.fingerprint(upto_layer=0)
    w = lm.edit_module(1).weight
    with torch.no_grad():
        w.copy_(w.flip(0))  # same sums, permuted rows: a sum checksum keeps its value
    assert lm.fingerprint() != f0
    assert lm.fingerprint(upto_layer=0) == f0_l0  # layer 1 does not feed layer 0
    with torch.no_grad():
        w.copy_(w.flip(0))
    assert lm.fingerprint() == f0
    with torch.no_grad():
        lm.edit_module(0).weight[0, 0] += 1e-3  # one element, one ulp-scale change
    assert lm.fingerprint() != f0 and lm.fingerprint(upto_layer=0) != f0_l0
    # a second wrapper over a model with equal weights has the same fingerprint
    assert tiny_lm("gpt2", n_layer=2).fingerprint() == f0


def test_float_unit_names_are_lossless(lm, tmp_path):
    recs = _records(2)
    frame = experiments.batch_sweep(lm, recs, ["MEMIT"], 0, [2], editor_kwargs=FAST, root=tmp_path,
                                    regs={"MEMIT": [1234567.0, 1234568.0]}, progress=False)
    post = frame[frame.phase == "post"]
    assert set(post.reg) == {1234567.0, 1234568.0}  # on main: %g named both 'reg1.23457e+06'
    assert experiments.unit_float(0.1) == "0.1" and float(experiments.unit_float(1 / 3)) == 1 / 3
    with pytest.raises(ValueError, match="duplicates"):
        experiments.batch_sweep(lm, recs, ["MEMIT"], 0, [2], editor_kwargs=FAST, root=tmp_path,
                                regs={"MEMIT": [10.0, 10.0]}, progress=False)


# --- unit files ------------------------------------------------------------------

def test_truncated_or_header_only_unit_is_redone_and_reported(lm, tmp_path, monkeypatch):
    recs = _records(4)
    run = tmp_path / "run"
    full = _sweep(lm, recs, tmp_path, run_dir=run)
    unit = run / "units" / "ROME-L000-000002.csv"
    text = unit.read_text()
    for broken in (text.splitlines()[0] + "\n", text[: len(text) // 2]):  # header only; cut mid-file
        unit.write_text(broken)
        with pytest.raises(RunStoreError, match="ROME-L000-000002.csv"):
            experiments.load_run(run)
        calls = []
        real = study_common._evaluate
        monkeypatch.setattr(study_common, "_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
        again = _sweep(lm, recs, tmp_path, run_dir=run)
        monkeypatch.undo()
        assert len(calls) == 2  # only that unit's two single edits were scored again
        cols = KEY + ["nll_new", "nll_true"]
        pd.testing.assert_frame_equal(again[cols].sort_values(KEY).reset_index(drop=True),
                                      full[cols].sort_values(KEY).reset_index(drop=True))
    manifest = json.loads(unit.with_suffix(".json").read_text())
    assert manifest["rows"] == len(pd.read_csv(unit)) and len(manifest["sha256"]) == 64


def test_unit_without_manifest_is_unfinished(tmp_path):
    store = RunStore.open("t", {"a": 1}, run_dir=tmp_path / "r")
    store.write("u1", pd.DataFrame({"x": [1, 2]}))
    (tmp_path / "r" / "units" / "u2.csv").write_text("x\n3\n")  # a crash between the CSV and its manifest
    assert store.is_done("u1") and not store.is_done("u2") and store.units() == ["u1"]
    assert experiments.load_run(tmp_path / "r").x.tolist() == [1, 2]


def test_load_run_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        experiments.load_run(tmp_path / "nope")
    store = RunStore.open("t", {"a": 1}, run_dir=tmp_path / "r")
    store.write("u1", pd.DataFrame({"x": [1, 2]}))
    unit = tmp_path / "r" / "units" / "u1.csv"
    unit.write_bytes(bytes(range(256)) * 4)  # a binary file where a CSV should be
    with pytest.raises(RunStoreError, match="u1.csv"):
        experiments.load_run(tmp_path / "r")
    pfile = tmp_path / "r" / "params.json"
    pfile.write_text('{"kind": "t", "key": ')  # truncated JSON
    with pytest.raises(RunStoreError, match="params.json"):
        experiments.load_run(tmp_path / "r")
    with pytest.raises(RunStoreError, match="params.json"):
        RunStore.open("t", {"a": 1}, run_dir=tmp_path / "r")
    # a run written before manifests existed: binary CSV still named
    legacy = tmp_path / "legacy"
    (legacy / "units").mkdir(parents=True)
    (legacy / "params.json").write_text(json.dumps({"kind": "t", "key": "x", "params": {}}))
    (legacy / "units" / "a.csv").write_bytes(b"\xff\xfe\x00\x81" * 50)
    with pytest.raises(RunStoreError, match="a.csv"):
        experiments.load_run(legacy)


# --- concurrent runners ------------------------------------------------------------

def test_claims_are_exclusive_and_stale_claims_are_taken_over(tmp_path):
    store = RunStore.open("t", {"a": 1}, run_dir=tmp_path / "r", stale_after=60)
    with store.claim("u"):
        with pytest.raises(UnitClaimed, match="being computed by"):
            with store.claim("u"):
                pass
    lock = tmp_path / "r" / "units" / "u.lock"
    assert not lock.exists()
    # a claim left by a process of this host that died
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "t1"}))
    with store.claim("u"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a remote worker's claim: live while refreshed, stale once older than stale_after
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t2"}))
    with pytest.raises(UnitClaimed, match="elsewhere"):
        with store.claim("u"):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))
    with store.claim("u"):
        pass


def test_claim_is_held_across_processes(tmp_path):
    store = RunStore.open("t", {"a": 1}, run_dir=tmp_path / "r")
    code = ("import sys, time; from pathlib import Path; from editkit.experiments import RunStore;\n"
            f"s = RunStore(Path({str(tmp_path / 'r')!r}))\n"
            "with s.claim('u'):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UnitClaimed):
            with store.claim("u"):
                pass
    finally:
        child.kill()
        child.wait()
    with store.claim("u"):  # its owner died: the claim is free again
        pass


def test_two_runners_on_one_directory(tmp_path, monkeypatch):
    """Two layer sweeps started at once on one run dir (two wrappers of equal models, two
    threads): both finish, every unit is computed once, and both return every row once."""
    recs = _records(4)
    models = [tiny_lm("gpt2", n_layer=2), tiny_lm("gpt2", n_layer=2)]
    counts: dict = {}
    real = study_common._evaluate
    lock = threading.Lock()

    def slow(lm_, part, *a, **k):
        key = (k.get("phase"), k.get("layer"), tuple(r.case_id for r in part))
        with lock:
            counts[key] = counts.get(key, 0) + 1
        time.sleep(0.05)
        return real(lm_, part, *a, **k)

    monkeypatch.setattr(study_common, "_evaluate", slow)
    out, errors = [None, None], []

    def go(i):
        try:
            out[i] = experiments.layer_sweep(models[i], recs, ["ROME"], [0], None, editor_kwargs=FAST,
                                             chunk=1, run_dir=tmp_path / "run", progress=False)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(counts.values()) == 1, counts  # no unit computed twice
    for frame in out:
        assert not frame.duplicated(KEY).any() and len(frame) == len(out[0])
    assert not list((tmp_path / "run" / "units").glob("*.tmp")) and not list((tmp_path / "run" / "units").glob("*.lock"))


# --- caches and inputs ---------------------------------------------------------------

@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _c0_file(cache):
    (f,) = (cache / "stats").glob("*.safetensors")
    return f


def test_cached_c0_is_verified_and_recomputed(lm, cache, caplog):
    from safetensors.torch import save_file

    C0 = ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)
    f = _c0_file(cache)
    good = f.read_bytes()
    d = lm.d_in(0)
    wrong = torch.eye(d + 1, dtype=torch.float64)
    breakages = {
        "garbage": lambda: f.write_bytes(b"not a safetensors file" * 10),
        "truncated": lambda: f.write_bytes(good[: len(good) // 2]),
        "empty": lambda: f.write_bytes(b""),
        "bitflip": lambda: f.write_bytes(good[:-8] + bytes(8)),
        "wrong shape": lambda: save_file({"C0": wrong}, str(f)),
        "wrong dtype": lambda: save_file({"C0": C0.float()}, str(f)),
    }
    for what, brk in breakages.items():
        brk()
        caplog.clear()
        with caplog.at_level("WARNING", logger="editkit.stats"):
            again = ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)
        assert torch.equal(again, C0), what
        assert any(str(f) in r.getMessage() for r in caplog.records), what
        assert ek.second_moment(lm, 0, TINY_TEXT, None, progress=False).shape == (d, d)  # the file was rewritten
    from editkit.stats import SecondMomentInfo, save_cached_c0  # a file with a valid checksum but another shape

    save_cached_c0(f, wrong, SecondMomentInfo("x", 0, "c", 0, None, 1, d + 1, 1.0, 1.0))
    assert torch.equal(ek.second_moment(lm, 0, TINY_TEXT, None, progress=False), C0)


def test_wrong_c0_is_never_kept_on_the_model(cache):
    from safetensors.torch import save_file

    lm = tiny_lm("gpt2", n_layer=2)
    ek.second_moment(lm, 0, TINY_TEXT, None, progress=False)
    f = _c0_file(cache)
    d = lm.d_in(0)
    save_file({"C0": torch.eye(d - 1, dtype=torch.float64)}, str(f))
    editor = ek.ROME(layer=0, **FAST)
    with editor.applied(lm, _records(1)[0].request, progress=False):
        pass
    cached = [v for k, v in lm.cache.items() if isinstance(k, tuple) and k and k[0] == "C0"]
    assert cached and all(c.shape == (d, d) for c in cached)


def test_corpus_may_be_any_iterable_of_strings(lm, cache):
    ref = ek.second_moment(lm, 0, list(TINY_TEXT), None, cache=False, progress=False)
    gen = ek.second_moment(lm, 0, (t for t in TINY_TEXT), None, progress=False)  # main: "produced no tokens"
    assert torch.allclose(gen, ref, rtol=1e-12, atol=0)
    assert torch.allclose(ek.second_moment(lm, 0, iter(TINY_TEXT), None, progress=False), ref, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="strings"):
        ek.second_moment(lm, 0, iter([1, 2]), None, progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_longer_than_the_context_is_an_error(arch):
    lm = tiny_lm(arch, n_layer=2)
    long = ek.EditRequest(" ".join(["The mother tongue of"] * 200) + " {} is", "Toko Yasuda", "French", "English")
    with pytest.raises(ek.RequestError, match="256 positions"):
        ek.ROME(layer=0, **FAST).apply(lm, [long], progress=False)
    with pytest.raises(ek.RequestError, match="positions"):
        ek.metrics.score_targets(lm, [(long.text, "French")])
    assert lm.edits == []


def test_target_new_equal_to_target_true_is_rejected():
    with pytest.raises(ek.RequestError, match="target_new equals target_true"):
        ek.EditRequest("The mother tongue of {} is", "Toko Yasuda", "French", "French")


def test_cli_bad_arguments_exit_nonzero_with_a_message(capsys):
    from editkit import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["figures", "--notebooks", "/nonexistent"])
    assert exc.value.code != 0 and "/nonexistent" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["world", "build", "--models", "bogus"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "bogus" in err and "world-gpt2" in err and "Traceback" not in err
def test_non_finite_weights_or_c0_are_named(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    editor = ek.ROME(layer=0, **FAST)
    req = _records(1)[0].request
    d = lm.d_in(0)
    bad_c0 = torch.eye(d, dtype=torch.float64)
    bad_c0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="C0.*(NaN|not finite)"):
        editor.apply(lm, [req], stats={0: bad_c0}, progress=False)
    assert lm.edits == []
    with torch.no_grad():
        lm.block(0).attn.c_attn.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight holds 1 NaN/inf"):
        editor.apply(lm, [req], progress=False)
    assert lm.edits == []



# --- edit stack and model state -----------------------------------------------------------

def _weights(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(lm, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in lm.model.state_dict().items())


class Boom(Exception):
    pass


def test_applied_never_masks_the_error_and_restores_everything(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    a, b = _records(2)
    rome0, rome1 = ek.ROME(layer=0, **FAST), ek.ROME(layer=1, **FAST)
    before = _weights(lm)
    with pytest.raises(Boom):  # on main: EditError('undo the later edits first'), both edits left in
        with rome0.applied(lm, [a], progress=False):
            rome1.apply(lm, [b], progress=False)
            raise Boom
    assert _same(lm, before) and lm.edits == []
    with rome0.applied(lm, [a], progress=False):  # no error: the later edit is undone as well
        rome0.apply(lm, [b], progress=False)
    assert _same(lm, before) and lm.edits == []
    with pytest.raises(ek.EditError, match="applied"):
        with rome0.applied(lm, [a], progress=False):
            rome1.apply(lm, [b], progress=False).commit()  # would be discarded on exit: refused
    assert _same(lm, before) and lm.edits == []


def test_edit_stack_belongs_to_the_torch_module(cache):
    w1 = tiny_lm("gpt2", n_layer=2)
    w2 = ek.LanguageModel(w1.model, w1.tokenizer, name="second wrapper")
    a_req, b_req = _records(2)
    rome = ek.ROME(layer=0, **FAST)
    before = _weights(w1)
    a = rome.apply(w1, [a_req], progress=False)
    b = rome.apply(w2, [b_req], progress=False)
    assert w1.edits == w2.edits == [a, b]
    with pytest.raises(ek.EditError, match="later edits first"):  # on main: accepted, edit A left in
        a.undo()
    b.undo()
    a.undo()
    assert _same(w1, before) and w1.edits == w2.edits == []


def test_edits_and_scores_are_computed_in_eval_mode(cache):
    lm = tiny_lm("gpt2", n_layer=2)
    rec = _records(1)[0]
    lm.model.train()  # dropout on
    lm.block(1).eval()  # a caller's mixed modes are restored as they were
    modes = {n: m.training for n, m in lm.model.named_modules()}
    rome = ek.ROME(layer=0, **FAST)
    d1 = rome.apply(lm, [rec], progress=False)
    delta1 = d1.deltas[0].clone()
    d1.undo()
    d2 = rome.apply(lm, [rec], progress=False)
    assert torch.equal(d2.deltas[0], delta1)  # on main: differs by up to ~1 on every call
    e1 = ek.evaluate(lm, [rec], progress=False)
    e2 = ek.evaluate(lm, [rec], progress=False)
    d2.undo()
    pd.testing.assert_frame_equal(e1, e2)
    assert {n: m.training for n, m in lm.model.named_modules()} == modes


def test_non_convergence_is_flagged_logged_and_carried_into_rows(lm, tmp_path, cache, caplog):
    rec = _records(2)
    with caplog.at_level("WARNING", logger="editkit.editors"):
        edit = ek.ROME(layer=0, **dict(FAST, values=ek.ValueConfig(v_steps=1))).apply(lm, rec, progress=False)
    edit.undo()
    assert edit.diagnostics["converged"] == [False, False] and not edit.converged
    assert any("did not converge" in r.getMessage() for r in caplog.records)
    kw = dict(editor_kwargs=FAST, root=tmp_path, progress=False)
    sweep = experiments.layer_sweep(lm, rec, ["ROME"], [0], None, **kw)
    batch = experiments.batch_sweep(lm, rec, ["MEMIT"], 0, [2], **kw)
    seq = experiments.sequential_batched(lm, rec, ["MEMIT"], 0, [1], 2, **kw)
    for frame, phases in ((sweep, ["post"]), (batch, ["post"]), (seq, ["batch", "all", "probe"])):
        rows = frame[frame.phase.isin(phases) & (frame.method != "none")]
        assert "converged" in frame and rows.converged.notna().all() and rows.converged.isin([True, False]).all()
    assert not sweep[sweep.phase == "post"].converged.any()  # 2 value steps never reach stop_nll here


def test_huge_update_is_logged(lm, cache, caplog):
    wild = ek.ValueConfig(v_steps=2, v_lr=1e4, clamp_norm_factor=1e6)
    with caplog.at_level("WARNING", logger="editkit.editors"):
        edit = ek.ROME(layer=0, **dict(FAST, values=wild)).apply(lm, _records(1), progress=False)
    edit.undo()
    assert edit.norms[0]["delta_norm"] > 100 * edit.norms[0]["original_norm"]
    assert any("dwarfs" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field, kw", [
    ("values.v_steps", dict(values=ek.ValueConfig(v_steps=0))),
    ("values.v_steps", dict(v_steps=-3)),
    ("n_samples", dict(n_samples=0)),
    ("max_tokens", dict(max_tokens=-1)),
    ("layers", dict(layers=[0, 0])),
    ("layers", dict(layers=[0.5])),
    ("layers", dict(layers=["1"])),
    ("layers", dict(layers=[])),
])
def test_impossible_hyperparameters_are_rejected_naming_the_field(field, kw):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ek.MEMIT(**{"layers": [0], **kw})
