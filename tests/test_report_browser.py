"""A report opens in a real browser (the system Chromium, driven by Playwright): its figures
load from the file itself and nothing is fetched from elsewhere. Skipped without them
(`apt-get install chromium`, `pip install -e '.[ui]'`)."""
from __future__ import annotations

import base64
import io

import pytest

from editkit.report import write_report

from test_browser import BROWSER_MARKS, CHROMIUM

pytestmark = BROWSER_MARKS


def executed_notebook() -> dict:
    """An executed notebook as papermill and `editkit run` leave it: a figure, a table, a print."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = base64.b64encode(buf.getvalue()).decode()
    table = pd.DataFrame({"ES": [99.0], "NS": [80.0]}, index=["MEMIT"]).to_html()
    return {"metadata": {"papermill": {"parameters": {"n_edits": 4}, "duration": 1.5},
                         "editkit": {"notebook": "layer_sweep.ipynb", "run_key": "abc123", "cpu_seconds": 2.0,
                                     "versions": {"torch": "x"}, "log": []}},
            "cells": [{"cell_type": "markdown", "source": "# Layer sweep"},
                      {"cell_type": "code", "source": "fig", "outputs": [
                          {"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure>"}}]},
                      {"cell_type": "code", "source": "table", "outputs": [
                          {"output_type": "execute_result", "data": {"text/html": table, "text/plain": "..."}}]}]}


def test_report_opens_in_chromium(tmp_path):
    import json

    from playwright.sync_api import sync_playwright

    src = tmp_path / "run" / "layer_sweep.ipynb"
    src.parent.mkdir()
    src.write_text(json.dumps(executed_notebook()))
    page_path = write_report(tmp_path / "run")
    fetched = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: fetched.append(r.url))
            page.goto(page_path.resolve().as_uri())
            assert "layer_sweep" in page.title()
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert widths and all(w > 0 for w in widths)  # the figure decoded from the page itself
            assert page.locator("text=abc123").count() >= 1 and page.locator("table.dataframe").count() == 1
        finally:
            browser.close()
    assert all(u.startswith(("file:", "data:")) for u in fetched), fetched
