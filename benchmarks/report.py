"""The benchmarks' outputs: results.json, RESULTS.md, and the marked sections of docs/performance.md."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import HERE, METRICS, ROOT, log

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
#: The page whose marked sections a full run rewrites (the README is a front page that links to it).
PERFORMANCE_PAGE = ROOT / "docs" / "performance.md"


# --------------------------------------------------------------------------- outputs

def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 1e-3:
            return f"{x:.1e}"
        return f"{x:.{digits}g}"
    return str(x)


def _scores_str(d: dict) -> str:
    return "/".join(_fmt(d.get(m), 3) for m in METRICS)


def markdown_table(entries: list[dict], machine: dict) -> str:
    """The short results table (also pasted into the README)."""
    lines = ["| Benchmark | editkit | baseline | ratio | check |", "| --- | --- | --- | --- | --- |"]
    for e in entries:
        if e.get("skipped"):
            lines.append(f"| {e['name']} | skipped: {e['skipped']} | | | |")
            continue
        o, b, sec = e["ours"], e["baseline"] or {}, e["section"]
        ratio = f"{e['ratio']:.3g}×" if e["ratio"] is not None else "–"
        met = {True: " ✓", False: " ✗", None: ""}[e.get("met")]
        if e.get("target") and e.get("met") is not None:
            met = f"; target {e['target']}{met}"
        if sec == "values":
            p = e["params"]
            own = b.get("editkit_loop", {})
            loop = (f"reference protocol {_fmt(b['s_per_edit'])} s/edit; editkit one at a time "
                    f"{_fmt(own.get('s_per_edit'))} s/edit ({_fmt(own.get('speedup_of_batched'))}×)"
                    + (f" ({p['loop_requests']} req.)" if p["loop_requests"] != p["E"] else ""))
            ref = o.get("max_abs_delta_diff_reference")
            dd = _fmt(o["max_abs_delta_diff"]) + (f" (vs reference {_fmt(ref)})" if ref is not None else "")
            lines.append(f"| δ optimization, E={p['E']}, {p['v_steps']} steps | batched {_fmt(o['s_per_edit'])} s/edit "
                         f"| {loop} | {ratio} | max‖Δδ‖ {dd}{met} |")
        elif sec == "scoring":
            p = e["params"]
            lines.append(f"| scoring, {p['records']} records | batched {_fmt(o['records_per_s'])} rec/s "
                         f"| 1 prompt at a time {_fmt(b['records_per_s'])} rec/s | {ratio} "
                         f"| max‖ΔNLL‖ {_fmt(o['max_abs_nll_diff'])}{met} |")
        elif sec == "covariance" and "tokens_per_s" in o and not isinstance(o["tokens_per_s"], list):
            lines.append(f"| C0, {e['params']['tokens']:,} tokens | streaming {_fmt(o['tokens_per_s'])} tok/s, "
                         f"{_fmt(o['peak_rss_delta_mb'])} MB | keep all keys {_fmt(b['tokens_per_s'])} tok/s, "
                         f"{_fmt(b['peak_rss_delta_mb'])} MB | {ratio} memory | |")
        elif sec == "covariance":
            peaks = " → ".join(_fmt(x) for x in o["peak_rss_delta_mb"])
            naive = " → ".join(_fmt(x) for x in b["peak_rss_delta_mb"])
            lines.append(f"| C0 peak memory, {e['params']['tokens'][0]:,} → {e['params']['tokens'][-1]:,} tokens "
                         f"(d_in={e['params']['d_in']}) | streaming {peaks} MB | keep all keys {naive} MB | {ratio} "
                         f"| {met.lstrip('; ')} |")
        elif sec == "precompute":
            toks = o["tokens"]
            tok = _fmt(float(next(iter(toks.values())))) if isinstance(toks, dict) and toks else "–"
            label = (f"{e['params']['multiple']}× d_in" if e["params"].get("multiple") else "full corpus")
            base = f"full corpus {_scores_str(b)}" if b else ""
            ours = "edit failed: singular system" if o.get("error") else _scores_str(o)
            lines.append(f"| C0 from {label} ({tok} tok), {e['params']['facts']} facts, ES/PS/NS/S "
                         f"| {ours} | {base} | {ratio} | |")
        elif sec == "e2e":
            stages = ", ".join(f"{k[:-2]} {_fmt(o.get(k))} s" for k in ("stats_s", "values_s", "solve_s", "eval_s"))
            lines.append(f"| {e['name']}, ES/PS/NS/S | {stages}; {_scores_str(o)} | | | |")
        elif sec.startswith("paper"):
            lines.append(_paper_row(e, o, b, ratio, met))
    m = machine
    lines.append("")
    lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} "
                 f"({m.get('torch_threads')} threads), device {m.get('device')}"
                 + (f" ({m['gpu']})" if m.get("gpu") else "")
                 + f"; load average {m.get('load_start')} → {m.get('load_end')}. "
                 f"Medians of {entries[0]['repeats'] if entries else '?'} repeats; both sides of each ratio measured in "
                 f"the same run. Mode: {m.get('mode')}, {m.get('date')}. Regenerate with `make bench`.")
    return "\n".join(lines)


def _mb(x: Any) -> str:
    return "–" if x is None else (f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MB")


def _paper_row(e: dict, o: dict, b: dict, ratio: str, met: str) -> str:
    """One table row for the paper-dimension entries (benchmarks/paper.py)."""
    p, sec = e["params"], e["section"]
    if sec == "paper solve" and not p.get("E"):
        return (f"| C0 Cholesky factor, d_in={p['d_in']:,}, {p['dtype']} (once per layer) | {_fmt(o['s'])} s, "
                f"peak {_mb(o['peak_rss_mb'])} | | | |")
    if sec == "paper solve":
        rel = o.get("rel_delta_diff")
        base = f"direct {_fmt(b['s'])} s, peak {_mb(b['peak_rss_mb'])}" if b else "direct: not run"
        return (f"| {p['method']} Δ, d_in={p['d_in']:,}, E={p['E']} | cached factor {_fmt(o['s'])} s, "
                f"peak {_mb(o['peak_rss_mb'])} | {base} | {ratio} | "
                f"{'‖ΔΔ‖/‖Δ‖ ' + _fmt(rel) if rel is not None else ''}{met} |")
    if sec == "paper C0":
        return (f"| C0 streaming, d_in={p['d_in']:,}, {p['dtype']}, {p['tokens']:,} tokens | stop at the layer "
                f"{_fmt(o['tokens_per_s'])} tok/s, peak {_mb(o['peak_rss_mb'])} | whole model "
                f"{_fmt(b['tokens_per_s'])} tok/s, peak {_mb(b['peak_rss_mb'])} | {ratio} | |")
    if sec == "paper values":
        layers = f", {p['n_layer']} layers" if p.get("n_layer") else ""
        return (f"| δ optimization, d_in={p['d_in']:,}{layers}, {p['dtype']}, E={p['E']}, {p['v_steps']} steps | batched "
                f"{_fmt(o['s_per_edit'])} s/edit, +{_mb(o['peak_rss_delta_mb'])} | one at a time "
                f"{_fmt(b['s_per_edit'])} s/edit ({b['requests']} req.) | {ratio} | max‖Δδ‖ "
                f"{_fmt(o['max_abs_delta_diff'])} |")
    if sec == "paper e2e":
        stages = ", ".join(f"{k[:-2]} {_fmt(o.get(k))} s" for k in ("factor_s", "values_s", "solve_s"))
        return (f"| MEMIT edit of {p['E']} facts, d_in={p['d_in']:,}, {p['dtype']} | {stages}; whole edit "
                f"{_fmt(o['s'])} s, +{_mb(o['peak_rss_delta_mb'])} | | | |")
    return f"| {e['name']} | {str(o.get('error', ''))[:120].replace('|', '/')} | | | |"


PAPER_START, PAPER_END = "<!-- paper:start -->", "<!-- paper:end -->"


def render_paper(entries: list[dict], figure: Path = HERE / "paper.png") -> str | None:
    """The Performance page's paper-dimension block: the 14 336-wide rows, the figure, the slopes, the memory budget."""
    paper = [e for e in entries if e["section"].startswith("paper")]
    if not paper:
        return None
    sys.path.insert(0, str(HERE))
    from paper import budget_markdown, memory_budget, plot_paper, slopes

    big = max((e["params"].get("d_in") or 0) for e in paper)
    order = {"paper solve": 0, "paper C0": 1, "paper values": 2, "paper e2e": 3}
    rows = sorted([e for e in paper if e["params"].get("d_in") == big or e["section"] == "paper failed"],
                  key=lambda e: (order.get(e["section"], 9), {"MEMIT": 0, "EMMET": 1}.get(e["params"].get("method"), 2),
                                 e["params"].get("dtype") or "", e["params"].get("n_layer") or 0, e["params"].get("E") or 0))
    table = markdown_table(rows, paper[0]["machine"]).split("\n\nMachine:")[0]
    fig = plot_paper(paper, figure)
    sl = slopes(paper)
    lines = [table, ""]
    if fig:
        lines += [f"![solve time and memory vs E and width](../benchmarks/{fig.name})", ""]  # from docs/
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    if sl["vs_E"]:
        lines.append("Slopes (log-log least squares; time ∝ E^slope at d_in = "
                     f"{big:,}; cached factor over E ≥ 256, direct over E ≥ 16): " + "; ".join(f"{k} {fmt(v['time'])}" for k, v in sl["vs_E"].items()) + ".")
    if sl["vs_width"]:
        lines.append("Slopes against d_in (time ∝ d_in^slope, solve memory ∝ d_in^slope, over "
                     f"{', '.join(str(w) for w in next(iter(sl['vs_width'].values()))['d_in'])}): "
                     + "; ".join(f"{k}: time {fmt(v['time'])}, memory {fmt(v['peak_rss'])}"
                                 for k, v in sl["vs_width"].items()) + ".")
    try:
        budget = memory_budget(paper)
        (HERE / "memory_budget.json").write_text(json.dumps(budget, indent=1, default=str) + "\n")
        lines += ["", budget_markdown(budget)]
    except KeyError as exc:
        lines += ["", f"Memory budget: not computed ({exc})."]
    m = paper[0]["machine"]
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} ({m.get('torch_threads')} "
              f"threads), load average {m.get('load_start')} → {m.get('load_end')}; {m.get('date')}. All rows and "
              "the other widths: benchmarks/RESULTS.md. Regenerate with `.venv/bin/python benchmarks/run.py --only paper --merge`."]
    return "\n".join(lines)


def update_readme(table: str, readme: Path = PERFORMANCE_PAGE, start: str = README_START,
                  end: str = README_END) -> bool:
    """Rewrite only the text between ``start`` and ``end`` in ``readme``. Returns
    whether the file changed; raises ValueError when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ValueError(f"{readme}: markers {start!r} … {end!r} not found")
    new = text[: i + len(start)] + "\n" + table.strip() + "\n" + text[j:]
    if new == text:
        return False
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)
    return True


def _section_group(section: str) -> str:
    """The --only name a section belongs to ("paper solve" → "paper")."""
    return section.split(" ")[0]


def write_outputs(entries: list[dict], machine: dict, out: Path, md: Path) -> str:
    for e in entries:
        e.setdefault("machine", machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    table = markdown_table(entries, machine)
    md.parent.mkdir(parents=True, exist_ok=True)
    old = md.read_text(encoding="utf-8") if md.exists() else ""
    others = "".join(f"\n{m.group(0)}\n" for m in _SECTION.finditer(old))  # the other benchmarks' sections
    md.write_text(f"# editkit benchmarks ({machine.get('mode')})\n\nGenerated by `benchmarks/run.py`; the raw "
                  f"figures are in `{out.name}`.\n\n{table}\n{others}")
    return table


#: A section of RESULTS.md written by another benchmark (``profile_edit.py``, ``vs_authors.py``): kept by a full run.
_SECTION = re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S)


def update_section(md: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``md`` (appended the
    first time); the rest of the file is kept, and a full ``run.py`` keeps the section."""
    text = md.read_text(encoding="utf-8") if md.exists() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    text = text[:i] + block + text[j + len(end):] if 0 <= i < j else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = md.with_suffix(md.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, md)


def _write_readme(tiny: list[dict], entries: list[dict], readme: bool) -> None:
    """docs/performance.md: the tiny/world table between the bench markers, the paper block between the paper markers."""
    paper = render_paper(entries)
    if not readme:
        return
    if tiny:
        changed = update_readme(markdown_table(tiny, tiny[0]["machine"]))
        log.info("docs/performance.md: Performance table %s", "updated" if changed else "unchanged")
    if paper:
        changed = update_readme(paper, start=PAPER_START, end=PAPER_END)
        log.info("docs/performance.md: paper-dimension section %s", "updated" if changed else "unchanged")
