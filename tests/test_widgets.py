"""The explorers driven programmatically (set widget values, call the handlers) on a
tiny random model: what they display, and what they do to the weights."""
from __future__ import annotations

import json
import sys
import types

import pandas as pd
import pytest
import torch

import editkit as ek
from editkit.testing import TINY_TEXT, tiny_lm
from editkit.widgets import EditExplorer, ResultsExplorer, parse_layers

FAST = dict(corpus=TINY_TEXT, n_samples=None, n_prefixes=2, prefix_len=4, v_steps=6)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))  # no C0 files in the user's cache


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("gpt2")


def weights(lm):
    return [lm.edit_module(l).weight.detach().clone() for l in range(lm.n_layers)]


def same(lm, before) -> bool:
    return all(torch.equal(lm.edit_module(l).weight, w) for l, w in enumerate(before))


def fill(ex, prompt="The mother tongue of {} is", subject="Danielle Darrieux", new="French", true="English",
         paraphrases="The native language of {} is", neighborhood="The mother tongue of Toko Yasuda is"):
    ex.prompt.value, ex.subject.value, ex.target_new.value, ex.target_true.value = prompt, subject, new, true
    ex.paraphrases.value, ex.neighborhood.value = paraphrases, neighborhood


def test_edit_shows_results_and_undo_restores_bit_for_bit(lm):
    before = weights(lm)
    ex = EditExplorer(lm, **FAST)
    assert ex.layers.value == "1"  # no preset for a tiny model: the middle-early layer
    fill(ex)
    rec = ex.on_edit()
    assert rec is not None, ex.status.value
    assert not torch.equal(lm.edit_module(1).weight, before[1])
    assert [label for label, _ in ex.edits_list.options] == ["1. ROME L1: Danielle Darrieux: English → French"]
    assert lm.edits == [rec.edit]
    assert "applied" in ex.status.value and ex.progress.value == ex.progress.max
    assert bytes(ex.figure.value).startswith(b"\x89PNG")
    assert "The native language of Danielle Darrieux is" in ex.continuations.value
    for metric in ("ES", "PS", "NS"):
        assert f">{metric}<" in ex.scores.value
        assert rec.after.scores[metric] is not None
    assert f"{rec.edit.norms[1]['delta_norm']:.4g}" in ex.norms.value
    assert len(rec.before.topk) == ex.top_k
    assert ex.on_undo() is rec
    assert same(lm, before) and lm.edits == [] and ex.edits_list.options == ()
    assert bytes(ex.figure.value) == b"" and ex.scores.value == ""
    assert ex.on_undo() is None and "nothing to undo" in ex.status.value


def test_stacked_edits_undo_in_reverse_order(lm):
    before = weights(lm)
    ex = EditExplorer(lm, **FAST)
    fill(ex)
    assert ex.on_edit() is not None
    after_first = weights(lm)
    ex.method.value = "MEMIT"
    assert ex.layers.value == "1"
    ex.layers.value = "0-1"
    fill(ex, prompt="{} plays the", subject="Toko Yasuda", new="guitar", true="", paraphrases="", neighborhood="")
    second = ex.on_edit()
    assert second is not None, ex.status.value
    assert second.layers == [0, 1] and second.after.scores["ES"] is None  # no true target: no ES
    assert len(ex.edits_list.options) == 2 and ex.edits_list.options[1][0].startswith("2. MEMIT L0,1: Toko Yasuda")
    frame = ex.frame()
    assert set(frame["n_edits"]) == {1, 2} and {"ES", "delta_norm"} <= set(frame["metric"])
    ex.on_undo()
    assert same(lm, after_first) and len(ex.edits_list.options) == 1
    assert "Danielle Darrieux" in ex.continuations.value  # the remaining edit is shown again
    ex.on_undo()
    assert same(lm, before) and lm.edits == []


@pytest.mark.parametrize("change, field, words", [
    (dict(prompt="The mother tongue of X is"), "prompt", "{}"),
    (dict(prompt="The mother tongue of {} is {}"), "prompt", "exactly one"),
    (dict(subject=""), "subject", "subject"),
    (dict(new="  "), "target_new", "target_new"),
    (dict(layers="7"), "layers", "out of range"),
    (dict(layers="0,1"), "layers", "ROME edits exactly one layer"),
    (dict(layers="one"), "layers", "not a layer"),
])
def test_bad_input_is_shown_next_to_the_field(lm, change, field, words):
    before = weights(lm)
    ex = EditExplorer(lm, **FAST)
    layers = change.pop("layers", None)
    fill(ex, **change)
    if layers is not None:
        ex.layers.value = layers
    assert ex.on_edit() is None
    message = ex.messages[field].value
    assert words in message.replace("&#x27;", "'") and field.split("_")[0] in message
    assert all(not m.value for name, m in ex.messages.items() if name != field)
    assert field in ex.status.value and ex.progress.bar_style == "danger"
    assert same(lm, before) and lm.edits == [] and ex.edits_list.options == ()


def test_filled_prompt_is_accepted(lm):
    ex = EditExplorer(lm, **FAST)
    fill(ex, prompt="The mother tongue of Danielle Darrieux is", paraphrases="", neighborhood="")
    assert ex.make_request().prompt == "The mother tongue of {} is"


def test_failing_edit_is_reported_not_raised(lm):
    before = weights(lm)
    ex = EditExplorer(lm, **{**FAST, "corpus": "/nonexistent/corpus.txt"})
    fill(ex)
    assert ex.on_edit() is None
    assert "CorpusUnavailableError" in ex.status.value
    assert same(lm, before) and lm.edits == []


def test_layers_default_from_preset(lm, tmp_path):
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"ROME": {"layer": 2}, "MEMIT": {"layers": [0, 1]}, "EMMET": {"layers": [5, 6]}}))
    ex = EditExplorer(lm, preset=str(preset), **FAST)
    assert ex.layers.value == "2"
    ex.method.value = "MEMIT"
    assert ex.layers.value == "0, 1"
    assert ex.make_editor().edit_layers == [0, 1] and ex.make_editor().corpus is TINY_TEXT
    ex.method.value = "EMMET"  # preset layers beyond this model: fall back
    assert ex.layers.value == "1"


def test_parse_layers():
    assert parse_layers("3-5, 1 3") == [1, 3, 4, 5]
    with pytest.raises(ValueError, match="layers"):
        parse_layers("")


def summarized_frame() -> pd.DataFrame:
    rows = [dict(method=m, layer=l, batch_size=1, metric=k, value=v + l, ci_low=v + l - 2, ci_high=v + l + 2, n=10)
            for m, v in (("ROME", 50.0), ("MEMIT", 70.0)) for l in range(4) for k in ("ES", "NS")]
    return pd.DataFrame(rows)


def test_results_explorer_filters_redraw_table_and_figure(tmp_path):
    ex = ResultsExplorer(summarized_frame())
    assert ex.drawn_with == "line" and bytes(ex.figure.value).startswith(b"\x89PNG")
    assert [v for _, v in ex.method.options] == ["(all)", "MEMIT", "ROME"]
    assert "ROME" in ex.table.value and "MEMIT" in ex.table.value
    full = ex.figure.value
    ex.method.value = "MEMIT"
    assert "ROME" not in ex.table.value and "MEMIT" in ex.table.value
    assert bytes(ex.figure.value) != bytes(full)
    ex.metric.value = "NS"
    ex.layer.value = 2
    assert len(ex.filtered()) == 1 and ">72<" in ex.table.value
    assert ex.batch_size.options[1:] == (("1", 1),)
    ex.layer.value = "(all)"
    ex.method.value = "ROME"
    assert len(ex.filtered()) == 4 and "50" in ex.table.value
    # the same frame from a folder of CSVs
    summarized_frame().to_csv(tmp_path / "part.csv", index=False)
    assert len(ResultsExplorer(tmp_path).frame) == len(summarized_frame())


def _fake_summarize(rows, by, n_boot=200):
    """Stands in for editkit.metrics.summarize: ES = mean of ``es`` per group, as a fraction."""
    out = rows.groupby(by, dropna=False)["es"].agg(["mean", "count"]).reset_index()
    return out.assign(metric="ES", value=out["mean"], ci_low=out["mean"], ci_high=out["mean"], n=out["count"])[
        [*by, "metric", "value", "ci_low", "ci_high", "n"]]


def test_results_explorer_on_a_raw_run_uses_editkit_plots(monkeypatch):
    monkeypatch.setitem(sys.modules, "editkit.metrics", types.SimpleNamespace(summarize=_fake_summarize))
    raw = pd.DataFrame([dict(phase="post", method=m, layer=l, kind="rewrite", es=float((l + i) % 2))
                        for m in ("ROME", "MEMIT") for l in range(3) for i in range(4)]
                       + [dict(phase="pre", method="none", layer=-1, kind="rewrite", es=0.0)])
    ex = ResultsExplorer(raw, n_boot=10)
    assert ex.raw and ex.drawn_with == "editkit.plots.layer_sweep", ex.status.value
    assert [v for _, v in ex.method.options] == ["(all)", "MEMIT", "ROME"]
    assert [v for _, v in ex.metric.options] == ["(all)", "ES"]
    ex.method.value = "ROME"
    assert set(ex.summary["method"]) == {"ROME", "none"} and "MEMIT" not in ex.table.value
    ex.layer.value = 1
    assert set(ex.summary.loc[ex.summary.phase == "post", "layer"]) == {1}


def test_results_explorer_reports_instead_of_raising():
    ex = ResultsExplorer(summarized_frame())
    ex.metric.value = "ES"
    ex.kind.value = "sequential"  # needs a raw frame: reported, not raised
    assert bytes(ex.figure.value) == b"" or ex.drawn_with == "line"


def test_fill_from_a_counterfact_record(lm):
    ex = EditExplorer(lm, **FAST)
    ex.fill({"requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                   "target_new": {"str": "guitar"}, "target_true": {"str": "piano"}},
             "paraphrase_prompts": ["a", "b", "c", "d"], "neighborhood_prompts": ["Kaiser Chiefs plays the"]})
    assert ex.make_request() == ek.EditRequest("{} plays the", "Toko Yasuda", "guitar", "piano")
    assert ex.paraphrases.value == "a\nb\nc" and ex.neighborhood.value == "Kaiser Chiefs plays the"


RECORD = {"requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "guitar"},
                                "target_true": {"str": "piano"}},
          "paraphrase_prompts": ["Toko Yasuda performs on the"], "neighborhood_prompts": ["Kaiser Chiefs plays the"]}


def test_new_subject_clears_the_filled_records_prompts(lm):
    """Typing another subject over a filled record: the old fact's paraphrase and
    neighborhood prompts must not be scored as the new fact's."""
    ex = EditExplorer(lm, **FAST)
    ex.fill(RECORD)
    ex.subject.value = "Danielle Darrieux"
    assert ex.paraphrases.value == "" and ex.neighborhood.value == ""
    assert "cleared" in ex.status.value
    ex.fill(RECORD)  # refilling sets them again (fill's own subject change is not a user edit)
    assert ex.paraphrases.value == "Toko Yasuda performs on the"


def test_prompts_the_user_edited_survive_a_subject_change(lm):
    ex = EditExplorer(lm, **FAST)
    ex.fill(RECORD)
    ex.paraphrases.value = "{} is a musician who plays the"
    ex.subject.value = "Danielle Darrieux"
    assert ex.paraphrases.value == "{} is a musician who plays the"
    assert ex.neighborhood.value == "Kaiser Chiefs plays the"


def test_every_bad_field_is_flagged_at_once(lm):
    before = weights(lm)
    ex = EditExplorer(lm, **FAST)
    fill(ex, prompt="no placeholder", subject="", new="")
    ex.layers.value = "x"
    assert ex.on_edit() is None
    assert {n for n, m in ex.messages.items() if m.value} == {"prompt", "subject", "target_new", "layers"}
    assert same(lm, before) and lm.edits == []


def test_results_explorer_reads_a_run_directory(tmp_path):
    from editkit.experiments import RunStore

    store = RunStore.open("layer_sweep", {"model": "tiny"}, run_dir=tmp_path / "run")
    store.write("part", summarized_frame())
    ex = ResultsExplorer(tmp_path / "run")
    assert ex.frame.attrs["run"]["kind"] == "layer_sweep" and len(ex.frame) == len(summarized_frame())
    assert ex.drawn_with == "line" and "MEMIT" in ex.table.value


def test_results_line_figure_keeps_before_and_after_apart_and_norms_off_the_percent_axis():
    from editkit.widgets import _line_figure

    rows = [dict(method="ROME", layer=0, batch_size=1, n_edits=i, metric="ES", when=w, value=v, n=1)
            for i in (1, 2, 3) for w, v in (("pre", 0.0), ("post", 100.0))]
    rows += [dict(method="ROME", layer=0, batch_size=1, n_edits=i, metric="delta_norm", when="post", value=3.5, n=1)
             for i in (1, 2, 3)]
    ex = ResultsExplorer(pd.DataFrame(rows))
    assert ex.drawn_with == "line", ex.status.value
    fig = _line_figure(ex.summary)
    score_ax, norm_ax = fig.axes[:2]
    ys = {float(y) for line in score_ax.get_lines() for y in line.get_ydata()}
    assert {0.0, 100.0} <= ys and 50.0 not in ys  # an edit that went 0 -> 100 is not drawn at 50
    assert score_ax.get_ylabel() == "score (%)" and "delta_norm" not in score_ax.get_ylabel()
    assert 3.5 not in ys
    assert "delta_norm" in norm_ax.get_ylabel()
    assert 3.5 in {float(y) for line in norm_ax.get_lines() for y in line.get_ydata()}
    fig.canvas.draw() if hasattr(fig, "canvas") and fig.canvas else None
    ticks = [t for t in score_ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_results_line_figure_of_one_edit_goes_from_before_to_after():
    from editkit.widgets import _line_figure

    rows = [dict(method="ROME", layer=0, batch_size=1, n_edits=1, metric="ES", when=w, value=v, n=1)
            for w, v in (("pre", 0.0), ("post", 100.0))]
    fig = _line_figure(ResultsExplorer(pd.DataFrame(rows)).summary)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["before", "after"]
    line = next(l for l in ax.get_lines() if len(l.get_xdata()) == 2)
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [0.0, 100.0]


def test_generation_prompts_of_a_filled_record_are_continued_before_and_after(lm):
    """A CounterFact record's generation prompts ("what does the model now say about the subject?")
    are continued, greedily, before and after the edit; they go with the record's subject."""
    rec = ek.CounterFactRecord.from_dict({
        "case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                            "target_new": {"str": "French"}, "target_true": {"str": "English"}},
        "paraphrase_prompts": ["The native language of Danielle Darrieux is"],
        "neighborhood_prompts": ["The mother tongue of Toko Yasuda is"],
        "generation_prompts": ["Danielle Darrieux was born in", "Danielle Darrieux plays the"]})
    ex = EditExplorer(lm, **FAST)
    ex.fill(rec)
    assert ex.generation_prompts == rec.generation_prompts
    applied = ex.on_edit()
    assert applied is not None, ex.status.value
    for p in rec.generation_prompts:
        assert p in ex.continuations.value
        assert applied.after.continuations[p] == ek.generate(lm, [p], ex.n_tokens)[0]  # the edited model's
    ex.on_undo()
    assert all(applied.before.continuations[p] == ek.generate(lm, [p], ex.n_tokens)[0] for p in rec.generation_prompts)
    ex.subject.value = "Toko Yasuda"
    assert ex.generation_prompts == []
