"""Every notebook runs under papermill with tiny parameters on the miniature world,
writes its figures, and its runs hold the expected rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editkit import cli, experiments

pytestmark = pytest.mark.slow  # end to end; `pytest -m 'not slow'` skips it while developing

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb")
    figures, runs = out / "figures", out / "runs"
    failed = cli.run_notebooks(cli.NOTEBOOKS, NOTEBOOKS, figures, runs, quick=True)
    return figures, runs, failed


def test_every_notebook_has_a_parameters_cell():
    import nbformat

    for name in cli.NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert "figures_dir" in tagged[0].source or name == "explore.ipynb"


def test_notebooks_run_and_write_figures(executed):
    figures, runs, failed = executed
    assert failed == []
    names = {p.name for p in figures.glob("*.png")}
    for prefix in ("world_trace_example", "world_trace_layers", "layer_sweep_", "batch_editing_",
                   "sequential_batch_", "sequential_all_", "sequential_drift_", "sequential_methods_"):
        assert any(n.startswith(prefix) for n in names), (prefix, sorted(names))
    # names carry what changes the figure: the methods, and one comparison figure per batch size
    for kind in ("sequential_batch", "sequential_all", "sequential_drift"):
        for method in ("MEMIT", "EMMET"):
            assert any(n.startswith(f"{kind}_world-gpt2-mini_{method}_L0_") for n in names), (kind, method)
    q = cli.QUICK["sequential_batched.ipynb"]
    compared = [n for n in names if n.startswith("sequential_methods_")]
    assert len(compared) == len(q["compare_batch_sizes"]) and all("_reference_world-small_n4" in n for n in compared)
    for png in figures.glob("*.png"):
        assert png.with_suffix(".pdf").exists() and png.stat().st_size > 5000


def test_executed_copies_hold_no_frozen_progress_bar(executed):
    """A widget progress bar is saved as the text of its first frame, so an executed copy
    showed "0%" forever; the runner's kernels write their bars as text (their last frame)."""
    import json

    _, runs, _ = executed
    for name in cli.NOTEBOOKS:
        cells = json.loads((runs / "notebooks" / name).read_text())["cells"]
        outputs = [o for c in cells for o in c.get("outputs", [])]
        widgets = [o["data"].get("text/plain") for o in outputs
                   if "application/vnd.jupyter.widget-view+json" in o.get("data", {}) and "|" in str(o["data"])]
        assert not widgets, f"{name}: widget progress bars saved as {widgets[:2]}"
        if name == "quickstart.ipynb":  # its C0 and scoring bars, as text that ends at 100%
            text = "".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
            assert "scoring: 100%" in text


def test_notebook_runs_hold_the_expected_rows(executed):
    _, runs, _ = executed
    q = cli.QUICK
    frames, lam = {}, None
    for p in runs.iterdir():
        if (p / "params.json").exists():
            kind, params = p.name.split("-")[0], json.loads((p / "params.json").read_text())
            if kind == "batch_sweep" and params["params"]["batch_sizes"] == [q["batch_editing.ipynb"]["reg_batch_size"]]:
                lam = experiments.load_run(p)
            else:
                frames[kind] = experiments.load_run(p)
    layer = frames["layer_sweep"]
    post = layer[layer.phase == "post"]
    assert set(post.layer) == set(q["layer_sweep.ipynb"]["layers"])
    assert post.groupby(["method", "layer"]).case_id.nunique().eq(q["layer_sweep.ipynb"]["n_edits"]).all()
    assert {"ES", "PS", "NS"} <= set(__import__("editkit").summarize(post).index)
    batch = frames["batch_sweep"]
    sizes = batch[batch.phase == "post"].groupby(["method", "batch_size"]).case_id.nunique()
    assert sorted(set(sizes.index.get_level_values(1))) == q["batch_editing.ipynb"]["batch_sizes"]
    n_facts = max(q["batch_editing.ipynb"]["batch_sizes"])  # every batch size over the same facts
    assert (sizes == n_facts).all()
    lam_post = lam[lam.phase == "post"]
    assert {(m, r) for m, rs in q["batch_editing.ipynb"]["regs"].items() for r in rs} == set(
        zip(lam_post.method, lam_post.reg))
    seq = frames["sequential_batched"]
    probes = seq[(seq.phase == "probe") & (seq.method != "none")]
    assert {"update_norm", "perplexity", "weight_norm"} <= set(probes.columns)
    assert probes.groupby(["method", "batch_size"]).edits_so_far.max().eq(
        q["sequential_batched.ipynb"]["total_edits"]).all()


def _parameters_cell(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    return next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))


@pytest.mark.parametrize("name", cli.NOTEBOOKS)
def test_papermill_sees_every_parameter_with_its_type(name):
    """`papermill --help-notebook` and `-p` know every parameter the cell assigns (a comment
    with a second `=` used to hide the line from papermill), each with a declared type."""
    import ast

    from papermill.inspection import inspect_notebook

    tree = ast.parse(_parameters_cell(name).source)
    assigned = [n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)]
    unannotated = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
    assert assigned and not unannotated, unannotated
    seen = inspect_notebook(str(NOTEBOOKS / name))
    assert list(seen) == assigned
    assert all(p["inferred_type_name"] not in ("None", "") for p in seen.values()), seen
    if name != "explore.ipynb":
        # a notebook run by hand (Jupyter, papermill) never writes over the committed figures/: only
        # `editkit figures` does, passing figures_dir itself
        assert seen["figures_dir"]["default"] == '"runs/figures"' and seen["runs_dir"]["default"] == '"runs"'


def test_parameters_given_as_strings_are_read_or_refused_by_name():
    from typing import Optional

    from editkit.notebook import ParameterError, check_parameters, resolve_dir

    ns = {"__annotations__": {"methods": list[str], "layers": Optional[list[int]], "n_edits": int,
                              "regs": Optional[dict[str, list[float]]], "layer": Optional[int]},
          "methods": "['ROME','MEMIT']", "layers": None, "n_edits": "100", "regs": "{'MEMIT': [10, 100]}",
          "layer": 0}
    check_parameters(ns)
    assert ns["methods"] == ["ROME", "MEMIT"] and ns["n_edits"] == 100 and ns["regs"] == {"MEMIT": [10.0, 100.0]}
    for shell_ate_the_quotes in ("ROME,MEMIT", "[ROME, MEMIT]"):
        assert check_parameters({**ns, "methods": shell_ate_the_quotes})["methods"] == ["ROME", "MEMIT"]
    for bad in ({"methods": "['ROME'"}, {"methods": 3}, {"n_edits": "many"}, {"layers": "[0, 'x']"}):
        (key,) = bad
        with pytest.raises(ParameterError, match=rf"parameter {key}"):
            check_parameters({**ns, **bad})
    assert resolve_dir("figures") == ROOT / "figures" and resolve_dir("/tmp/x") == Path("/tmp/x")


def test_editkit_run_refuses_an_unknown_parameter(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "layer_sweep", "-p", "n_edit", "5"])
    assert "n_edit" in capsys.readouterr().err
    assert cli.parse_value("['ROME', 'MEMIT']") == ["ROME", "MEMIT"] and cli.parse_value("gpt2-xl") == "gpt2-xl"


def test_editkit_run_writes_the_executed_copy_to_out_even_when_it_fails(tmp_path, capsys):
    """`editkit run NB --out X` executes straight into X. It used to execute into
    runs/notebooks/NB and rename only on success, so a failed run's traceback was not where
    the message said, and two runs of one notebook overwrote each other's copy."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("fail = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("assert not fail, 'asked to fail'\nprint('done')")]
    src = tmp_path / "tiny.ipynb"
    nbformat.write(nb, str(src))
    ok, bad = tmp_path / "out" / "ok.ipynb", tmp_path / "out" / "bad.ipynb"
    assert cli.main(["run", str(src), "--out", str(ok)]) == 0
    assert cli.main(["run", str(src), "--out", str(bad), "-p", "fail", "True"]) == 1
    assert f"executed copy in {bad}" in capsys.readouterr().err
    assert "done" in ok.read_text() and "asked to fail" in bad.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad.ipynb", "ok.ipynb"]


def test_sequential_notebook_skips_the_method_comparison_when_asked(tmp_path):
    """A real-model run gives empty compare_methods and one_at_a_time: the comparison (which
    edits the same facts again) is skipped, not run on an empty list or failed."""
    out = tmp_path / "seq.ipynb"
    assert cli.main(["run", "sequential_batched", "--quick", "-p", "compare_methods", "[]",
                     "-p", "one_at_a_time", "[]", "--out", str(out)]) == 0
    assert "'no comparison run: compare_methods and one_at_a_time are empty'" in out.read_text()  # the result
