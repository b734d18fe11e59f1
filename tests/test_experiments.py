"""Experiment runners: tidy frames, incremental writes, and resuming after an interruption."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

import editkit as ek
from editkit import cli, experiments, plots
from editkit.studies import common as study_common  # where every study scores its rows
from editkit.testing import TINY_TEXT, tiny_lm

matplotlib.use("Agg")

SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Apple A5", "Kaiser Chiefs", "Anaal Nathrakh", "Jürgen Müller",
            "Édith Piaf", "Thomas Joannes Stieltjes"]
OBJECTS = ["English", "French", "Spain", "Sweden"]


def _record(i: int) -> dict:
    s = SUBJECTS[i]
    true, new = OBJECTS[i % 4], OBJECTS[(i + 1) % 4]
    other = SUBJECTS[(i + 3) % len(SUBJECTS)]
    return {"case_id": i, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                                 "subject": s, "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"{s} is a citizen of"],
            "neighborhood_prompts": [f"The native language of {other} is"],
            "attribute_prompts": [], "generation_prompts": [f"{s} was born in"]}


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2", n_layer=3)


@pytest.fixture(scope="module")
def records():
    return ek.load_counterfact([_record(i) for i in range(len(SUBJECTS))])


FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=1, prefix_len=3, values=ek.ValueConfig(v_steps=3))
KEY = ["method", "layer", "case_id", "kind", "prompt_index"]


class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, n_calls: int) -> dict:
    """Make experiments' scoring raise after ``n_calls`` calls (a simulated Ctrl-C)."""
    real = study_common._evaluate
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(study_common, "_evaluate", flaky)
    return calls


def test_layer_sweep_frame_and_resume(lm, records, tmp_path, monkeypatch):
    before = [lm.edit_module(l).weight.clone() for l in range(lm.n_layers)]
    args = (lm, records, ["ROME", "MEMIT"], [0, 1], 4)
    kw = dict(editor_kwargs=FAST, chunk=2, run_dir=tmp_path / "run", progress=False)
    _interrupt_after(monkeypatch, 5)  # 2 pre units + 3 of the first edit unit's... then Ctrl-C
    with pytest.raises(Interrupt):
        experiments.layer_sweep(*args, **kw)
    partial = experiments.load_run(tmp_path / "run")
    assert 0 < len(list((tmp_path / "run" / "units").glob("*.csv"))) < 2 + 2 * 2 * 2
    # the model was restored even though the run died mid-edit
    for l, w in enumerate(before):
        assert torch.equal(lm.edit_module(l).weight, w)
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 10_000)
    frame = experiments.layer_sweep(*args, **kw)
    post = frame[frame.phase == "post"]
    # every (method, layer, record, prompt) exactly once
    assert not post.duplicated(KEY).any()
    per_record = len(frame[(frame.phase == "pre")]) // 4
    assert len(post) == 2 * 2 * 4 * per_record
    assert set(post.method) == {"ROME", "MEMIT"} and set(post.layer) == {0, 1}
    assert {"nll_new", "nll_true", "success", "delta_norm"} <= set(post.columns)
    # finished units were not recomputed: only the missing single edits were scored again
    assert calls["n"] == len(post[["method", "layer", "case_id"]].drop_duplicates()) - len(
        partial[partial.phase == "post"][["method", "layer", "case_id"]].drop_duplicates())
    assert experiments.load_run(tmp_path / "run").attrs["run"]["params"]["layers"] == [0, 1]
    fig = plots.layer_sweep(frame)
    assert len(fig.axes) == 4


def test_run_dir_is_keyed_by_parameters(lm, records, tmp_path):
    experiments.batch_sweep(lm, records, ["MEMIT"], 1, [2], editor_kwargs=FAST, root=tmp_path, progress=False)
    experiments.batch_sweep(lm, records, ["MEMIT"], 1, [2, 4], editor_kwargs=FAST, root=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match="other parameters"):
        run = next(tmp_path.iterdir())
        experiments.batch_sweep(lm, records, ["EMMET"], 1, [2], editor_kwargs=FAST, run_dir=run, progress=False)


def test_batch_sweep_sizes_and_lambda(lm, records, tmp_path):
    frame = experiments.batch_sweep(lm, records, ["MEMIT", "EMMET"], 1, [2, 4], editor_kwargs=FAST,
                                    regs={"MEMIT": [1.0, 100.0]}, root=tmp_path, progress=False)
    post = frame[frame.phase == "post"]
    counts = post.groupby(["method", "reg", "batch_size"]).case_id.nunique()
    # every batch size is scored over the same 4 facts: 2 batches of 2, or 1 of 4
    assert (counts == 4).all() and len(counts) == 2 * 2 + 2
    assert post.groupby(["method", "reg", "batch_size"]).batch.nunique().loc[("MEMIT", 1.0, 2)] == 2
    fig = plots.batch_sweep(frame)
    assert len(fig.axes) == 3
    fig = plots.reg_sweep(frame)  # one panel per (method, batch size); x = λ
    assert len(fig.axes) == 4 and fig.axes[0].get_xscale() == "log"


@pytest.fixture
def toy_method():
    """A new method, as a user or a new module adds one: one dataclass and one ``@register`` line.
    (MEMIT's least squares under its own name and alias, so its result is known.)"""
    @ek.register
    @dataclasses.dataclass(kw_only=True)
    class Toy(ek.Editor):
        reg: float = 10.0
        method: ClassVar[str] = "TOY"
        constraint: ClassVar[str] = "least_squares"
        aliases: ClassVar[dict[str, str]] = {"toy_lambda": "reg"}

    yield Toy
    del ek.METHODS["TOY"]


def test_a_registered_method_runs_through_the_runners(lm, records, tmp_path, toy_method):
    assert ek.make_editor("TOY", 1, toy_lambda=3.0) == toy_method(layers=[1], reg=3.0)
    assert "TOY      constraint=least_squares  aliases: toy_lambda=reg" in cli.describe_methods()
    frame = experiments.batch_sweep(lm, records, ["TOY", "MEMIT"], 1, [2], editor_kwargs=FAST,
                                    regs={"TOY": [1.0], "MEMIT": [1.0]}, root=tmp_path, progress=False)
    post = frame[frame.phase == "post"]
    toy, memit = (post[post.method == m].drop(columns="method").reset_index(drop=True) for m in ("TOY", "MEMIT"))
    assert len(toy) > 0 and set(toy.reg) == {1.0}
    pd.testing.assert_frame_equal(toy.drop(columns="edit_seconds"), memit.drop(columns="edit_seconds"))


def test_batch_sweep_batches_are_independent_and_resume(lm, records, tmp_path, monkeypatch):
    """Batch 1 of size 2 is edited into the unedited model, not on top of batch 0: its
    rows equal an edit of those two facts alone. An interrupted sweep resumes per batch."""
    before = lm.edit_module(1).weight.clone()
    args = (lm, records, ["MEMIT"], 1, [2, 4])
    _interrupt_after(monkeypatch, 3)  # pre, batch 0 and batch 1 of size 2, then dies
    with pytest.raises(Interrupt):
        experiments.batch_sweep(*args, editor_kwargs=FAST, run_dir=tmp_path / "run", progress=False)
    assert torch.equal(lm.edit_module(1).weight, before)
    monkeypatch.undo()
    frame = experiments.batch_sweep(*args, editor_kwargs=FAST, run_dir=tmp_path / "run", progress=False)
    assert torch.equal(lm.edit_module(1).weight, before)
    post = frame[frame.phase == "post"]
    assert not post.duplicated(["batch_size", "batch", "case_id", "kind", "prompt_index"]).any()
    second = post[(post.batch_size == 2) & (post.batch == 1)].sort_values(["case_id", "kind", "prompt_index"])
    editor = experiments.make_editor("MEMIT", 1, **FAST)
    with editor.applied(lm, records[2:4], progress=False):
        alone = ek.evaluate(lm, records[2:4], progress=False).sort_values(["case_id", "kind", "prompt_index"])
    assert list(second.case_id) == list(alone.case_id)
    assert second.nll_new.to_numpy() == pytest.approx(alone.nll_new.to_numpy(), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="n_facts=6 is not a multiple.*multiple of 4"):
        experiments.batch_sweep(lm, records, ["MEMIT"], 1, [2, 4], n_facts=6, editor_kwargs=FAST, root=tmp_path)


def test_sequential_batched_resumes_to_the_same_result(lm, records, tmp_path, monkeypatch):
    before = lm.edit_module(1).weight.clone()
    kw = dict(editor_kwargs=FAST, heldout=TINY_TEXT[:10], progress=False)
    clean = experiments.sequential_batched(lm, records, ["MEMIT"], 1, [2], 8, run_dir=tmp_path / "a", **kw)
    assert torch.equal(lm.edit_module(1).weight, before)
    _interrupt_after(monkeypatch, 4)  # pre, batch 0, checkpoint..., dies in the middle
    with pytest.raises(Interrupt):
        experiments.sequential_batched(lm, records, ["MEMIT"], 1, [2], 8, run_dir=tmp_path / "b", **kw)
    assert torch.equal(lm.edit_module(1).weight, before)
    assert (tmp_path / "b" / "state-MEMIT-bs000002.safetensors").exists()
    monkeypatch.undo()
    resumed = experiments.sequential_batched(lm, records, ["MEMIT"], 1, [2], 8, run_dir=tmp_path / "b", **kw)
    cols = ["phase", "batch", "edits_so_far", "case_id", "kind", "prompt_index", "nll_new", "nll_true",
            "update_norm", "perplexity"]
    a = clean[cols].sort_values(cols[:6]).reset_index(drop=True)
    b = resumed[cols].sort_values(cols[:6]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-5)
    probes = resumed[resumed.phase == "probe"].sort_values("edits_so_far")
    assert probes.edits_so_far.tolist() == [0, 2, 4, 6, 8]
    assert (probes.update_norm.diff().dropna() != 0).all()
    assert set(resumed[resumed.phase == "all"].edits_so_far) == {4, 8}
    for phase in ("batch", "all"):
        plots.sequential(resumed, "MEMIT", phase=phase)
    plots.sequential_probes(resumed, "MEMIT")


def test_layers_the_model_does_not_have_are_refused_up_front(tmp_path):
    from editkit.testing import tiny_lm

    lm = tiny_lm("gpt2")
    with pytest.raises(ValueError, match=rf"layers=.*{lm.n_layers} layers"):
        experiments.layer_sweep(lm, [object()] * 2, ["ROME"], layers=range(lm.n_layers + 4), n_edits=2,
                                root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="layer=9"):
        experiments.batch_sweep(lm, [object()] * 2, ["MEMIT"], layer=9, batch_sizes=[2], root=tmp_path,
                                progress=False)
    assert not list(tmp_path.iterdir())  # nothing started


def test_a_study_reports_non_converged_edits_once_not_per_edit(lm, records, tmp_path, caplog):
    """Hundreds of single edits must not print hundreds of warnings: one summary per method."""
    import logging

    kw = dict(FAST, values=ek.ValueConfig(v_steps=1, stop_nll=1e-9))  # nothing converges in 1 step
    with caplog.at_level(logging.WARNING, logger="editkit"):
        frame = experiments.layer_sweep(lm, records[:4], ["ROME", "MEMIT"], [0, 1], 4, editor_kwargs=kw, chunk=2,
                                        root=tmp_path, progress=False)
    msgs = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(msgs) == 2, msgs  # one per method, not one per edit (8 each)
    assert any("ROME" in m and "8 of 8 request(s)" in m for m in msgs)
    assert (~frame[frame.phase == "post"]["converged"].astype(bool)).all()  # still flagged per edit
    # outside a study a single edit still warns at once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="editkit"):
        ek.ROME(layer=0, **kw).apply(lm, records[0].request).undo()
    assert sum("did not converge" in r.getMessage() for r in caplog.records) == 1


def test_batch_sweep_optimizes_each_fact_once_and_scores_as_without_the_memo(lm, records, tmp_path, monkeypatch):
    """Values depend on the request and the unedited model only: batch sizes and λ values
    reuse them (the memo), and the results are the ones computed afresh (bit for bit with one
    thread; with several, batched kernels of other shapes round differently in the last bits)."""
    from editkit import values as V

    calls: list[int] = []
    real = V.optimize_values
    monkeypatch.setattr(V, "optimize_values", lambda lm_, reqs, *a, **k: (calls.append(len(reqs)), real(lm_, reqs, *a, **k))[1])
    lm.cache.pop("_values_memo", None)
    recs = records[:4]
    fast = experiments.batch_sweep(lm, recs, ["MEMIT"], 0, [1, 2, 4], editor_kwargs=FAST, root=tmp_path / "a",
                                   progress=False)
    assert sum(calls) == 4, calls  # 4 facts, 3 batch sizes: each δ optimized once

    monkeypatch.setattr(V, "VALUE_MEMO_SIZE", 0)  # no memo: every batch optimizes its own
    lm.cache.pop("_values_memo", None)
    calls.clear()
    slow = experiments.batch_sweep(lm, recs, ["MEMIT"], 0, [1, 2, 4], editor_kwargs=FAST, root=tmp_path / "b",
                                   progress=False)
    assert sum(calls) == 12
    cols = ["method", "batch_size", "batch", "case_id", "kind", "prompt_index"]
    a, b = (f[f.phase == "post"].sort_values(cols).reset_index(drop=True) for f in (fast, slow))
    for c in ("nll_new", "nll_true", "delta_norm"):  # bit for bit with one thread; to rounding with several
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-5, atol=1e-6, err_msg=c)


def test_values_are_not_reused_after_the_model_changed(lm, records):
    """A committed edit changes the weights, hence the fingerprint: the next edit of the same
    fact optimizes its δ on the edited model."""
    from editkit import values as V

    lm.cache.pop("_values_memo", None)
    ed = ek.MEMIT(layers=[0], **FAST)
    with ed.applied(lm, [records[0].request]) as first:
        with ed.applied(lm, [records[0].request]) as again:  # on top of the first: a sequence
            assert not torch.equal(first.targets, again.targets)
    assert len(lm.cache["_values_memo"]) == 2
    with ed.applied(lm, [records[0].request]) as third:  # the unedited model again: reused
        assert torch.equal(third.targets, first.targets)
    assert len(lm.cache["_values_memo"]) == 2


def test_values_memo_on_disk_survives_the_process_and_refuses_other_weights(lm, records, tmp_path, monkeypatch):
    """With a values folder, a fresh memo (a resumed process) reads each request's δ from disk
    instead of optimizing it again, bit for bit; a file whose stored key is another request's
    is not used; other weights never find the file (the key holds the fingerprint)."""
    from editkit import values as V

    calls: list[int] = []
    real = V.optimize_values
    monkeypatch.setattr(V, "optimize_values", lambda lm_, reqs, *a, **k: (calls.append(len(reqs)), real(lm_, reqs, *a, **k))[1])
    reqs = [r.request for r in records[:3]]
    lm.cache.pop("_values_memo", None)
    monkeypatch.setenv("EDITKIT_VALUES_DIR", str(tmp_path / "values"))
    first = V.memoized_values(lm, reqs, 0, cfg=V.ValueConfig(v_steps=3))
    assert calls == [3] and len(list((tmp_path / "values").glob("*.safetensors"))) == 3

    lm.cache.pop("_values_memo", None)  # a new process: memory memo empty
    again = V.memoized_values(lm, reqs, 0, cfg=V.ValueConfig(v_steps=3))
    assert calls == [3]  # nothing optimized
    assert torch.equal(first.delta, again.delta) and torch.equal(first.h, again.h)

    # a file whose content belongs to another key is refused and recomputed
    files = sorted((tmp_path / "values").glob("*.safetensors"))
    data = files[0].read_bytes()
    files[1].write_bytes(data)
    lm.cache.pop("_values_memo", None)
    V.memoized_values(lm, reqs, 0, cfg=V.ValueConfig(v_steps=3))
    assert calls == [3, 1]

    # a pass cut off after its first chunk keeps that chunk on disk
    lm.cache.pop("_values_memo", None)
    more = [r.request for r in records[3:6]]
    cfg = V.ValueConfig(v_steps=3, v_batch_size=2)
    seen = len(calls)
    monkeypatch.setattr(V, "optimize_values", lambda lm_, reqs, *a, **k: (
        calls.append(len(reqs)), (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) > seen + 1 else None,
        real(lm_, reqs, *a, **k))[2])
    with pytest.raises(KeyboardInterrupt):
        V.memoized_values(lm, more, 0, cfg=cfg)
    lm.cache.pop("_values_memo", None)
    monkeypatch.setattr(V, "optimize_values", lambda lm_, reqs, *a, **k: (calls.append(len(reqs)), real(lm_, reqs, *a, **k))[1])
    del calls[seen:]
    V.memoized_values(lm, more, 0, cfg=cfg)
    assert calls[seen:] == [1]  # only the request of the interrupted chunk

    # other weights: a new key, optimized afresh
    lm.cache.pop("_values_memo", None)
    w = lm.model.transformer.wte.weight
    with torch.no_grad():
        w.add_(1e-3)
    try:
        n = len(calls)
        V.memoized_values(lm, reqs[:1], 0, cfg=V.ValueConfig(v_steps=3))
        assert calls[n:] == [1]
    finally:
        with torch.no_grad():
            w.sub_(1e-3)
        lm.cache.pop("_values_memo", None)


def test_batch_sweep_measures_heldout_perplexity_of_the_first_batches(lm, records, tmp_path):
    texts = list(TINY_TEXT[-6:])
    frame = experiments.batch_sweep(lm, records[:4], ["MEMIT"], 0, [1, 4], editor_kwargs=FAST, root=tmp_path,
                                    heldout=texts, heldout_batches=2, progress=False)
    pre = frame[frame.phase == "pre"].perplexity
    assert pre.notna().all() and pre.nunique() == 1
    post = frame[frame.phase == "post"].groupby(["batch_size", "batch"]).perplexity.first()
    assert post.loc[1].notna().tolist() == [True, True, False, False]  # the first 2 batches of 1
    assert post.loc[(4, 0)] != pre.iloc[0]  # a batch of 4 moves it
    with pytest.raises(ValueError, match="heldout is empty"):
        experiments.batch_sweep(lm, records[:4], ["MEMIT"], 0, [4], editor_kwargs=FAST, root=tmp_path, heldout=[],
                                progress=False)
    plain = experiments.batch_sweep(lm, records[:4], ["MEMIT"], 0, [4], editor_kwargs=FAST, root=tmp_path / "p",
                                    progress=False)
    assert "perplexity" not in plain.columns


def test_batch_and_sequential_studies_need_a_layer_or_a_preset(lm, records, tmp_path):
    """They used to edit layer 1 when given neither (a default nobody chose)."""
    for study, args in ((experiments.batch_sweep, ([2],)), (experiments.sequential_batched, ([2], 4))):
        with pytest.raises(ValueError, match="layer: .* needs the layer\\(s\\) to edit"):
            study(lm, records, ["MEMIT"], None, *args, editor_kwargs=FAST, root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="layer=\\[1, 7\\]: .* out of range"):
        experiments.batch_sweep(lm, records, ["MEMIT"], [1, 7], [2], editor_kwargs=FAST, root=tmp_path)


def test_batch_and_sequential_studies_edit_several_layers_as_memit_does(lm, records, tmp_path):
    """layer=[1, 2]: each edit spreads over both layers; norms are over both, and the model
    comes back exactly."""
    before = {l: lm.edit_module(l).weight.clone() for l in (1, 2)}
    frame = experiments.batch_sweep(lm, records, ["MEMIT"], [1, 2], [2], n_facts=2, editor_kwargs=FAST,
                                    root=tmp_path, progress=False)
    editor = experiments.make_editor("MEMIT", [1, 2], **FAST)
    with editor.applied(lm, records[:2], progress=False) as edit:
        both = (edit.norms[1]["delta_norm"] ** 2 + edit.norms[2]["delta_norm"] ** 2) ** 0.5
    assert sorted(edit.deltas) == [1, 2] and edit.norms[1]["delta_norm"] > 0 and edit.norms[2]["delta_norm"] > 0
    assert frame[frame.phase == "post"].delta_norm.unique() == pytest.approx([both], rel=1e-6)
    seq = experiments.sequential_batched(lm, records, ["MEMIT"], [1, 2], [2], 4, editor_kwargs=FAST,
                                         root=tmp_path, progress=False)
    probe = seq[(seq.phase == "probe") & (seq.method == "MEMIT")].sort_values("edits_so_far")
    assert (probe.update_norm > 0).all() and probe.update_norm.iloc[0] == pytest.approx(
        probe.batch_delta_norm.iloc[0], rel=1e-6)  # after the first batch the update is that batch's
    for l, w in before.items():
        assert torch.equal(lm.edit_module(l).weight, w)
    again = experiments.sequential_batched(lm, records, ["MEMIT"], [1, 2], [2], 4, editor_kwargs=FAST,
                                           root=tmp_path, progress=False)  # resumed from the store: the same rows
    pd.testing.assert_frame_equal(again.reset_index(drop=True), seq.reset_index(drop=True))
