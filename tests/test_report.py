"""`editkit run` writes into its own run folder, and `editkit report` turns the run into one
self-contained HTML page (parsed here; tests/test_browser.py opens one in Chromium)."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from editkit import cli
from editkit.report import render

ROOT = Path(__file__).resolve().parents[1]


class Page(HTMLParser):
    """Every tag's attributes and the page's text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def tiny_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('model: str = "world-gpt2-mini"\ndataset: str = "world:small"\n'
                                       'figures_dir: str = "runs/figures"\nruns_dir: str = "runs"\nn: int = 3')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# A tiny study\n\nIt plots **n** points."), params,
                nbformat.v4.new_code_cell(
                    "import editkit as ek\nimport matplotlib.pyplot as plt\nfrom editkit import plots\n"
                    "nb = ek.notebook.setup(globals())\nrecords = nb.records(dataset, n=n)\n"
                    "fig, ax = plt.subplots()\nax.plot(range(n))\nplots.save(fig, 'tiny', figures_dir)\n"
                    "print('edited', len(records), 'records')\nfig")]
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_run_folder_and_self_contained_report(tmp_path, capsys):
    src = tmp_path / "tiny.ipynb"
    tiny_notebook(src)
    out = tmp_path / "run" / "tiny.ipynb"
    committed = set((ROOT / "figures").iterdir())
    assert cli.main(["run", str(src), "-p", "n", "4", "--out", str(out)]) == 0
    assert (tmp_path / "run" / "figures" / "tiny.png").is_file()  # figures under the run folder...
    assert set((ROOT / "figures").iterdir()) == committed  # ...never over the committed ones
    meta = json.loads(out.read_text())["metadata"]["editkit"]
    assert meta["run_key"] == cli.run_key("tiny.ipynb", {"n": 4}) and meta["cpu_seconds"] > 0
    assert {e["kind"] for e in meta["log"]} == {"model", "records"}
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    page = Page()
    page.feed(html)
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    pngs = [o["data"]["image/png"] for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert pngs and len(imgs) == len(pngs) and all(i.startswith("data:image/png;base64,") for i in imgs)
    # nothing is fetched from elsewhere: no external script, stylesheet, image or frame
    assert not [a for t, a in page.tags if t in ("script", "link", "iframe")]
    assert not [a for t, a in page.tags if any(str(v).startswith(("http", "//")) for v in a.values())]
    text = "".join(page.text)
    import editkit as ek
    from editkit.saved import weights_fingerprint

    fp = weights_fingerprint(ek.load_model("world-gpt2-mini", device="cpu"))
    for shown in ("A tiny study", "run key", meta["run_key"], '"n": 4', "edited 4 records", fp, "sha256",
                  "CPU time", "torch", "transformers"):
        assert shown in text, shown


def test_run_key_follows_the_parameters_not_the_output_folders():
    k = cli.run_key("layer_sweep.ipynb", {"n_edits": 5})
    assert k == cli.run_key("layer_sweep.ipynb", {"n_edits": 5, "figures_dir": "/x", "runs_dir": "/y"})
    assert k != cli.run_key("layer_sweep.ipynb", {"n_edits": 6}) != cli.run_key("batch_editing.ipynb", {"n_edits": 5})


def test_report_of_a_failed_run_says_so_and_escapes_text():
    nb = {"metadata": {"papermill": {"parameters": {"x": "<b>"}, "exception": True}},
          "cells": [{"cell_type": "code", "source": "1/0", "outputs": [
              {"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero",
               "traceback": ["\x1b[31mZeroDivisionError\x1b[0m: <script>"]}]}]}
    html = render(nb, "failed")
    assert "FAILED" in html and "ZeroDivisionError" in html and "<script>" not in html and "\x1b" not in html


def test_report_refuses_a_folder_without_a_notebook(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path)])
    assert "no executed notebook" in capsys.readouterr().err
