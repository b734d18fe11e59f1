"""A run as one self-contained HTML page a colleague opens without Python.

``editkit report RUN`` (or :func:`write_report`) reads the executed notebook of a run
(``editkit run`` writes it, with the run's metadata, into its run folder) and writes
``report.html``: what the run was computed from (parameters, run key, the records'
hash, the models' weight fingerprints, package versions, CPU and wall time), then every
cell with its outputs, figures embedded as data URIs. No script, stylesheet or image is
fetched from anywhere: the file is the whole report.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["write_report", "render", "find_notebook"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table.meta { border-collapse: collapse; margin-bottom: 2rem; }
table.meta td, table.meta th { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; font-size: .85rem; }
pre.code { border-left: 3px solid #8888cc; }
pre.error { background: #fdecec; }
div.cell { margin: 1rem 0; }
img { max-width: 100%; }
div.output table { border-collapse: collapse; font-size: .85rem; }
div.output td, div.output th { border: 1px solid #ddd; padding: .2rem .5rem; }
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def find_notebook(run: str | Path) -> Path:
    """The executed notebook of ``run``: the ``.ipynb`` itself, or the one in the run folder."""
    p = Path(run)
    if p.is_file() and p.suffix == ".ipynb":
        return p
    if p.is_dir():
        found = sorted(p.glob("*.ipynb"))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{p} holds several notebooks ({', '.join(f.name for f in found)}); name one")
    raise FileNotFoundError(f"{p}: no executed notebook; pass a run folder written by `editkit run` or an .ipynb")


def _text(x: Any) -> str:
    return "".join(x) if isinstance(x, list) else str(x)


def _markdown(src: str) -> str:
    """A small Markdown subset (headings, paragraphs, lists, `code`, **bold**, *italic*), escaped."""
    out, para, items = [], [], []

    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
        return re.sub(r"(?<![*\w])\*([^*]+)\*(?!\*)", r"<em>\1</em>", t)

    def flush() -> None:
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in src.splitlines():
        m = re.match(r"(#{1,6})\s+(.*)", line)
        if m:
            flush()
            level = len(m.group(1))
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif re.match(r"\s*[-*]\s+", line):
            if para:
                flush()
            items.append(re.sub(r"^\s*[-*]\s+", "", line))
        elif not line.strip():
            flush()
        elif items:
            items[-1] += " " + line.strip()
        else:
            para.append(line.strip())
    flush()
    return "\n".join(out)


def _output(o: dict) -> str:
    kind = o.get("output_type")
    if kind == "stream":
        return f"<pre>{html.escape(_ANSI.sub('', _text(o.get('text', ''))))}</pre>"
    if kind == "error":
        tb = _ANSI.sub("", "\n".join(o.get("traceback", [])))
        return f"<pre class='error'>{html.escape(o.get('ename', ''))}: {html.escape(o.get('evalue', ''))}\n" \
               f"{html.escape(tb)}</pre>"
    data = o.get("data", {})
    if "image/png" in data:
        return f"<img alt='figure' src='data:image/png;base64,{_text(data['image/png']).strip()}'>"
    if "image/svg+xml" in data:
        return _text(data["image/svg+xml"])
    if "text/html" in data:
        page = _text(data["text/html"])
        if "<script" not in page.lower():  # a table; widget views and scripts are left to text/plain
            return page
    if "text/plain" in data:
        return f"<pre>{html.escape(_text(data['text/plain']))}</pre>"
    return ""


def _meta_rows(nb: dict) -> list[tuple[str, str]]:
    meta = nb.get("metadata", {})
    pm, ek = meta.get("papermill", {}), meta.get("editkit", {})
    rows = [("notebook", ek.get("notebook") or pm.get("input_path", "?"))]
    params = pm.get("parameters", {})
    rows.append(("parameters", json.dumps(params, indent=1, ensure_ascii=False, default=str) if params else
                 "(the notebook's defaults)"))
    if ek.get("run_key"):
        rows.append(("run key", ek["run_key"]))
    for entry in ek.get("log", []):
        if entry.get("kind") == "records":
            rows.append(("records", f"{entry.get('dataset')}: {entry.get('n')} records, sha256 {entry.get('sha256')}"))
        elif entry.get("kind") == "model":
            rows.append(("model", f"{entry.get('name')} ({entry.get('n_layers')} layers, {entry.get('dtype')}, "
                                  f"{entry.get('device')}): weight fingerprint {entry.get('weights_fingerprint')}"))
    if ek.get("versions"):
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in ek["versions"].items())))
    if ek.get("cpu_seconds") is not None:
        rows.append(("CPU time", f"{ek['cpu_seconds']:.1f} s (this process and the notebook's kernel)"))
    if pm.get("duration") is not None:
        rows.append(("wall time", f"{pm['duration']:.1f} s, {pm.get('start_time', '?')} to {pm.get('end_time', '?')}"))
    if ek.get("host"):
        rows.append(("host", ek["host"]))
    if pm.get("exception"):
        rows.append(("status", "FAILED: a cell raised an error (shown below)"))
    return rows


def render(nb: dict, title: str | None = None) -> str:
    """The HTML page of an executed notebook (its JSON as a dict)."""
    title = title or Path(str(nb.get("metadata", {}).get("editkit", {}).get("notebook", "run"))).stem
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)} — editkit "
             f"report</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<table class='meta'>"]
    for k, v in _meta_rows(nb):
        parts.append(f"<tr><th>{html.escape(k)}</th><td><pre>{html.escape(v)}</pre></td></tr>")
    parts.append("</table>")
    for cell in nb.get("cells", []):
        src = _text(cell.get("source", ""))
        if cell.get("cell_type") == "markdown":
            parts.append(f"<div class='cell markdown'>{_markdown(src)}</div>")
        elif cell.get("cell_type") == "code":
            outs = "".join(_output(o) for o in cell.get("outputs", []))
            parts.append(f"<div class='cell code'><pre class='code'>{html.escape(src)}</pre>"
                         f"<div class='output'>{outs}</div></div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run`` (a run folder or an executed ``.ipynb``) to ``out``
    (default ``report.html`` beside the notebook); returns its path."""
    src = find_notebook(run)
    nb = json.loads(src.read_text(encoding="utf-8"))
    path = Path(out) if out is not None else src.with_name("report.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(nb, title=src.stem), encoding="utf-8")
    return path
