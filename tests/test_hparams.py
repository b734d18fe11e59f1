"""Peers' hyperparameter files (ROME's JSON, EasyEdit's YAML) load into editors with their values."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

import editkit as ek
from editkit.hparams import HparamsNotice
from editkit.testing import tiny_lm

FIXTURES = Path(__file__).parent / "fixtures" / "hparams"
ROME_JSON = FIXTURES / "ROME" / "gpt2-xl.json"  # kmeng01/rome hparams/ROME/gpt2-xl.json, verbatim
EASYEDIT_MEMIT = FIXTURES / "MEMIT" / "gpt2-xl.yaml"  # zjunlp/EasyEdit hparams/MEMIT/gpt2-xl.yaml, verbatim


def load(src, **kw):
    with pytest.warns(HparamsNotice) as rec:
        editor = ek.load_hparams(src, **kw)
    return editor, str(rec[0].message)


def test_rome_repository_json_loads_with_its_values():
    editor, notice = load(ROME_JSON)  # no alg_name: the folder "ROME" names the method
    assert type(editor) is ek.ROME
    assert editor.layers == [17]
    v = editor.values
    assert (v.v_steps, v.v_lr, v.v_weight_decay, v.clamp_norm_factor, v.kl_factor) == (20, 0.5, 0.5, 4, 0.0625)
    assert (editor.corpus, editor.n_samples, editor.protocol) == ("wikipedia", 100000, "reference")
    # what has no effect here is said, with the reason
    for name in ("mom2_dtype", "v_loss_layer", "rewrite_module_tmp", "lm_head_module"):
        assert name in notice
    # the same values as the packaged GPT-2 XL preset, which was transcribed from the same paper's code
    preset = ek.ROME.preset("gpt2-xl")
    assert (editor.layers, editor.values.v_steps, editor.values.clamp_norm_factor) == \
        (preset.layers, preset.values.v_steps, preset.values.clamp_norm_factor)


def test_easyedit_yaml_loads_with_its_values():
    editor, notice = load(EASYEDIT_MEMIT)
    assert type(editor) is ek.MEMIT  # alg_name
    assert editor.layers == [13, 14, 15, 16, 17]
    assert editor.reg == 20000  # mom2_update_weight is MEMIT's λ
    assert (editor.values.v_steps, editor.values.v_lr, editor.values.clamp_norm_factor) == (20, 0.5, 0.75)  # "5e-1" in YAML 1.1
    assert (editor.corpus, editor.n_samples) == ("wikipedia", 100000)
    for name in ("device", "stats_dir", "model_name"):
        assert name in notice
    assert "alg_name" in notice


def test_method_from_folder_alg_name_or_argument(tmp_path):
    data = json.loads(ROME_JSON.read_text())
    # a folder that names no method: the error says how to name it
    odd = tmp_path / "configs" / "x.json"
    odd.parent.mkdir()
    odd.write_text(json.dumps(data))
    with pytest.raises(ek.HparamsError, match="method="):
        ek.read_hparams(odd)
    assert ek.read_hparams(odd, method="r-ROME").method == "r-ROME"
    assert ek.read_hparams({**data, "alg_name": "R-ROME"}).method == "r-ROME"
    with pytest.raises(ek.HparamsError, match="alg_name='FT'"):
        ek.read_hparams({**data, "alg_name": "FT"})


def test_unknown_fields_are_listed_and_fixed_fields_checked():
    data = json.loads(ROME_JSON.read_text())
    with pytest.raises(ek.HparamsError, match=r"\['context_template_length', 'v_prob_threshold'\]"):
        ek.read_hparams({**data, "v_prob_threshold": 0.9, "context_template_length": 3}, method="ROME")
    with pytest.raises(ek.HparamsError, match="fact_token='last'.*subject_last"):
        ek.read_hparams({**data, "fact_token": "last"}, method="ROME")
    with pytest.raises(ek.HparamsError, match="mom2_adjustment=False"):
        ek.read_hparams({**data, "mom2_adjustment": False}, method="ROME")


def test_templates_checked_against_the_model():
    lm = tiny_lm("gpt2", n_layer=3)
    data = {**json.loads(ROME_JSON.read_text()), "layers": [1]}
    with pytest.raises(ek.HparamsError, match="v_loss_layer=47"):
        ek.read_hparams(data, method="ROME", lm=lm)
    data["v_loss_layer"] = 2
    hp = ek.read_hparams(data, method="ROME", lm=lm)
    assert hp.ignored["rewrite_module_tmp"].endswith("matches the model's adapter")
    assert hp.ignored["lm_head_module"].endswith("matches the model's adapter")  # tied to transformer.wte
    llama = tiny_lm("llama", n_layer=3)
    with pytest.raises(ek.HparamsError, match="rewrite_module_tmp.*does not match"):
        ek.read_hparams(data, method="ROME", lm=llama)


def test_emmet_and_alphaedit_fields():
    emmet = ek.read_hparams({"layers": [17], "mom2_update_weight": 1000, "emmet_lambda": 0.1,
                             "update_norm_lambda": 0, "norm_control": 0, "prob_cutoff": 0}, method="EMMET").editor()
    assert (emmet.reg, emmet.mom2_update_weight, emmet.solve_reg) == (0.1, 1000, 100)
    with pytest.raises(ek.HparamsError, match="update_norm_lambda=0.5"):
        ek.read_hparams({"layers": [17], "update_norm_lambda": 0.5}, method="EMMET")
    hp = ek.read_hparams({"layers": [13, 14], "L2": 10, "nullspace_threshold": 2e-2, "mom2_update_weight": 20000},
                         method="AlphaEdit")
    a = hp.editor()
    assert (a.reg, a.nullspace_threshold) == (10, 2e-2)
    assert "mom2_update_weight" in hp.ignored


def test_constructors_accept_the_files_names():
    rome = ek.ROME(layer=3, v_num_grad_steps=7, mom2_n_samples=500, mom2_dataset="wikitext")
    assert (rome.values.v_steps, rome.n_samples, rome.corpus) == (7, 500, "wikitext")
    assert ek.EMMET(layers=[3], emmet_lambda=0.2).reg == 0.2
    with pytest.raises(TypeError, match="load_hparams"):
        ek.ROME(layer=3, rewrite_module_tmp="x")


def test_overrides_and_missing_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HparamsNotice)
        editor = ek.load_hparams(EASYEDIT_MEMIT, corpus="wikitext", layers=[1, 2])
    assert (editor.corpus, editor.layers, editor.reg) == ("wikitext", [1, 2], 20000)
    with pytest.raises(ek.HparamsError, match="does not exist"):
        ek.load_hparams(tmp_path / "nope.json")
