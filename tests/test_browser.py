"""The explorers in a real JupyterLab, driven by Playwright with the system Chromium.

Run with ``make browser-test`` (it installs the ``ui`` extra: jupyterlab, playwright).
The browser is the distribution's Chromium (``apt-get install chromium``), found on the
PATH; Playwright's own browser download is not needed. Without Chromium, Playwright or
JupyterLab the test is skipped, saying which is missing. Screenshots go to
``runs/browser/``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "runs" / "browser"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)

#: What every browser test needs (tests/test_report_browser.py too): Chromium and Playwright.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on the PATH (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install -e '.[ui]', or make browser-test)"),
]
pytestmark = [
    *BROWSER_MARKS,
    pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None,
                       reason="jupyterlab is not installed (pip install -e '.[ui]', or make browser-test)"),
]

TOKEN = "editkit-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free port serving a copy of explore.ipynb set to the miniature world
    (the shipped mini model: no training, C0 from the small world in seconds)."""
    import nbformat

    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += '\nmodel = "world-gpt2-mini"\ncorpus = "world:small"\n'
    nbformat.write(nb, root / "explore.ipynb")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "JUPYTER_CONFIG_DIR": str(root / ".jupyter")}
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             "--ip=127.0.0.1", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={root}",
                             "--allow-root", "--expose-app-in-browser", "--LabApp.news_url=",
                             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(root / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _options(page) -> int:
    return page.locator(".widget-select select option").count()


def _edits_text(page) -> str:
    return page.locator(".widget-select select").first.inner_text().replace("\xa0", " ")


def _images(page) -> list[str]:
    return page.eval_on_selector_all(".jupyter-widgets img", "els => els.map(e => e.src)")


def test_explorers_render_edit_and_undo_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    from editkit.world import load_world_counterfact

    url, root = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    record = load_world_counterfact(size="small")[3]
    fact = record["requested_rewrite"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(f"{url}/lab/tree/explore.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
            page.get_by_text("| Idle").first.wait_for(timeout=120_000)  # the kernel is up
            no = page.get_by_role("button", name="No", exact=True)  # "get notified about Jupyter news?"
            if no.count():
                no.first.click()
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_function("""() => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""", timeout=300_000, polling=1000)
            page.wait_for_timeout(2000)  # widget views render just after the kernel replies
            page.screenshot(path=str(SHOTS / "1-ran-all-cells.png"), full_page=True)
            results = page.locator(".jp-CodeCell").last
            results.scroll_into_view_if_needed()
            results.screenshot(path=str(SHOTS / "4-results-explorer.png"))
            page.locator(".jp-CodeCell").nth(1).scroll_into_view_if_needed()
            tracebacks = page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
            assert tracebacks.count() == 0, tracebacks.first.inner_text()[:2000]
            assert page.get_by_text("Loading widget").count() == 0
            assert page.locator(".jupyter-widgets").count() > 10  # the explorers rendered as widgets

            edits_before, images_before = _options(page), _images(page)
            assert edits_before >= 1  # the notebook's demo edit

            def field(placeholder: str):
                return page.locator(f"input[placeholder='{placeholder}']").first

            field("The mother tongue of {} is").fill(fact["prompt"])
            field("Danielle Darrieux").fill(fact["subject"])
            field("English").fill(fact["target_new"]["str"])
            field("French (optional)").fill(fact["target_true"]["str"])
            lists = page.locator("textarea[placeholder='one prompt per line']")
            lists.nth(0).fill("\n".join(record["paraphrase_prompts"][:2]))
            lists.nth(1).fill("\n".join(record["neighborhood_prompts"][:3]))
            page.locator("button.jupyter-button", has_text="Edit").first.click()
            page.wait_for_function(f"() => document.querySelectorAll('.widget-select select option').length "
                                   f"> {edits_before}", timeout=180_000, polling=500)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(SHOTS / "2-after-edit.png"), full_page=True)
            assert _options(page) == edits_before + 1
            assert fact["subject"] in _edits_text(page)
            assert _images(page)[0] != images_before[0]  # the before/after chart shows the new edit

            page.locator("button.jupyter-button", has_text="Undo").first.click()
            page.wait_for_function(f"() => document.querySelectorAll('.widget-select select option').length "
                                   f"== {edits_before}", timeout=60_000, polling=500)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SHOTS / "3-after-undo.png"), full_page=True)
            assert fact["subject"] not in _edits_text(page)
        except Exception:
            page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
