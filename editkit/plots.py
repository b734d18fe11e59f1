"""Figures as pure functions of the runners' frames.

Every function takes the long-form frame a runner returned (or ``load_run`` read
back), summarizes it with :func:`editkit.metrics.summarize`, and returns a
matplotlib Figure; nothing here touches a model. Scores are shown in percent as
in the papers; bands are 95% bootstrap intervals over records.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import matplotlib

if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["summary", "layer_sweep", "batch_sweep", "reg_sweep", "sequential", "sequential_probes",
           "sequential_methods", "trace_heatmap", "layer_importance", "save", "set_note", "METRIC_NAMES",
           "figure_name", "caption"]

METRIC_NAMES = {"ES": "Efficacy (ES)", "PS": "Paraphrase (PS)", "NS": "Neighborhood (NS)", "S": "Score (S)",
                "EM": "Efficacy magnitude", "PM": "Paraphrase magnitude", "NM": "Neighborhood magnitude"}


def _span(values: Sequence[int] | int | None, prefix: str) -> str:
    """``[13, 14, 15]`` → ``L13-15``, ``[0, 2, 4]`` → ``L0.2.4``, ``5`` → ``L5``; long irregular lists are
    summarized as first-last x count (the figure's caption lists them)."""
    if values is None:
        return ""
    vals = sorted({int(v) for v in ([values] if isinstance(values, int) else values)})
    if len(vals) == 1:
        return f"{prefix}{vals[0]}"
    if vals == list(range(vals[0], vals[-1] + 1)) and prefix == "L":
        return f"{prefix}{vals[0]}-{vals[-1]}"
    if len(vals) <= 6:
        return prefix + ("-" if prefix == "b" else ".").join(map(str, vals))
    return f"{prefix}{vals[0]}-{vals[-1]}x{len(vals)}"


def _dataset_name(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    p = Path(str(dataset))
    return p.stem if p.suffix in (".json", ".jsonl") else str(dataset)


def figure_name(kind: str, model: str, *, methods: Sequence[str] | str | None = None,
                layers: Sequence[int] | int | None = None, batch_sizes: Sequence[int] | int | None = None,
                protocol: str | None = None, dataset: str | None = None, n: int | None = None,
                **extra: object) -> str:
    """The file stem of a figure, carrying everything that changes it, in a fixed order:
    ``batch_editing_world-gpt2_MEMIT-EMMET_L0_b4-16-64-256_reference_world_n256``.

    Two runs with other settings never write the same file, and a figure's name says
    what it shows. ``extra`` (``T=256``) is appended as ``T256``."""
    model = str(model).rstrip("/").split("/")[-1]  # a Hub id or a checkpoint path: its last part
    parts = [kind, model]
    if methods:
        parts.append("-".join([methods] if isinstance(methods, str) else methods))
    parts += [_span(layers, "L"), _span(batch_sizes, "b"), protocol or "", _dataset_name(dataset) or ""]
    if n is not None:
        parts.append(f"n{n}")
    parts += [f"{k}{v}" for k, v in extra.items() if v is not None]
    clean = [re.sub(r"[^A-Za-z0-9_.=-]+", "-", kind)] + [re.sub(r"[^A-Za-z0-9.=-]+", "-", str(p)).strip("-")
                                                         for p in parts[1:] if p not in ("", None)]
    return "_".join(clean)


def caption(model: str, *, layers: Sequence[int] | int | None = None, protocol: str | None = None,
            dataset: str | None = None, n: int | None = None, methods: Sequence[str] | None = None) -> str:
    """One line naming what a figure was computed from: model, layer(s), protocol, dataset and
    number of facts (``world-gpt2 · layer 0 · protocol reference · world · n = 256 facts``)."""
    parts = [str(model)]
    if methods:
        parts.append(", ".join(methods))
    if layers is not None:
        ls = [layers] if isinstance(layers, int) else list(layers)
        vals = sorted({int(v) for v in ls})
        contiguous = vals == list(range(vals[0], vals[-1] + 1))
        parts.append(f"layer {vals[0]}" if len(vals) == 1 else
                     f"layers {vals[0]}-{vals[-1]}" if contiguous else f"layers {', '.join(map(str, vals))}")
    if protocol:
        parts.append(f"protocol {protocol}")
    if dataset:
        parts.append(f"dataset {_dataset_name(dataset)}")
    if n is not None:
        parts.append(f"n = {n} facts")
    return " · ".join(parts)


def _title(fig: plt.Figure, title: str, caption: str | None) -> None:
    """The figure's title, with ``caption`` (what it was computed from) as a second, smaller line."""
    fig.suptitle(title if not caption else f"{title}\n{caption}")


_UNEDITED = dict(color="0.35", ls=(0, (1, 1.5)), lw=1.3)  # the unedited model's score: a grey dotted line


def _baseline(frame: pd.DataFrame, n_boot: int) -> dict[str, float]:
    """The unedited model's score per metric (percent), from the frame's ``phase == "pre"`` rows."""
    if "phase" not in frame:
        return {}
    pre = frame[frame["phase"] == "pre"]
    if pre.empty:
        return {}
    s = summary(pre.assign(_unedited="unedited"), ["_unedited"], n_boot=10)  # only the value is drawn
    return dict(zip(s["metric"], s["value"]))


def _unedited_line(ax, value: float | None, color=None) -> None:
    if value is not None and value == value:
        ax.axhline(value, **{**_UNEDITED, **({"color": color} if color is not None else {})}, label="unedited model")


def summary(frame: pd.DataFrame, by: Sequence[str], n_boot: int = 200) -> pd.DataFrame:
    """Per-group metrics (``by`` + metric, value, ci_low, ci_high, n) in percent."""
    from .metrics import summarize

    rows = frame[frame["phase"].isin(["post", "batch", "all", "pre"])] if "phase" in frame else frame
    rows = rows.dropna(subset=["kind"]) if "kind" in rows else rows
    out = summarize(rows, by=list(by), n_boot=n_boot)
    for c in ("value", "ci_low", "ci_high"):
        out[c] = out[c] * 100
    return out


_MARKERS, _DASHES = "osD^v", ["-", "--", ":", "-.", (0, (5, 1))]

#: Font sizes (points) for figures that are read at page width in the README: a 5-panel
#: row at 18 inches shrinks its 10 pt labels to ~4 pt there, so panels go on a grid.
_TITLE, _LABEL, _TICK, _LEGEND = 13, 12, 11, 11


def _panels(n: int, width: float = 4.0, height: float = 3.3) -> tuple:
    """``n`` axes on a grid of at most 3 columns (2 for four panels), flattened; a spare
    grid cell (five panels on 2 × 3) is returned for the legend, else None."""
    ncols = n if n <= 3 else (2 if n == 4 else 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n], (flat[n] if len(flat) > n else None)


def _readable(fig: plt.Figure, axes) -> None:
    """Font sizes for every panel (titles, axis labels, ticks)."""
    for ax in axes:
        ax.title.set_fontsize(_TITLE)
        ax.xaxis.label.set_fontsize(_LABEL)
        ax.yaxis.label.set_fontsize(_LABEL)
        ax.tick_params(labelsize=_TICK)
    if fig._suptitle is not None:
        fig._suptitle.set_fontsize(_TITLE + 1)


def _legend_off_data(fig: plt.Figure, axes, spare=None, title: str | None = None, handles=None) -> None:
    """One legend for the figure, never over the data: in the ``spare`` grid cell when
    there is one, else in a row below the panels. Call after the last ``tight_layout``-free
    change; it lays the figure out itself."""
    if handles is None:
        handles, labels = axes[0].get_legend_handles_labels()
    else:
        labels = [h.get_label() for h in handles]
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if spare is not None:
        spare.legend(handles, labels, title=title, loc="center", frameon=False, fontsize=_LEGEND,
                     title_fontsize=_LEGEND)
        fig.tight_layout()
        return
    nrows = len({ax.get_subplotspec().rowspan.start for ax in axes})
    bottom = 0.16 / nrows if labels else 0.0
    fig.tight_layout(rect=(0, bottom, 1, 1))
    if labels:
        fig.legend(handles, labels, title=title, loc="lower center", ncol=min(len(labels), 6), frameon=False,
                   fontsize=_LEGEND, title_fontsize=_LEGEND, bbox_to_anchor=(0.5, 0.0))


def _integer_ticks(ax) -> None:
    """Layers are integers: no 0.5 ticks."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colors(keys) -> dict:
    keys = list(dict.fromkeys(keys))
    return dict(zip(keys, sns.color_palette(None, len(keys))))


def _band(ax, data: pd.DataFrame, x: str, hue: str | None, colors: dict | None = None) -> None:
    """One line with its 95% band per ``hue`` value; marker and dash differ per line
    too, so lines that coincide (EMMET and ROME on single edits) stay visible."""
    groups = data.groupby(hue, sort=False) if hue else [(None, data)]
    colors = colors or (_colors(data[hue]) if hue else {})
    for i, (key, g) in enumerate(groups):
        g = g.sort_values(x)
        color = colors.get(key)
        ax.plot(g[x], g["value"], marker=_MARKERS[i % 5], ms=3.5, ls=_DASHES[i % 5], label=str(key) if hue else None,
                color=color)
        ax.fill_between(g[x], g["ci_low"], g["ci_high"], alpha=0.2, color=color, linewidth=0)


def layer_sweep(frame: pd.DataFrame, metrics: Sequence[str] = ("ES", "PS", "NS", "S"), n_boot: int = 200,
                title: str | None = None, caption: str | None = None) -> plt.Figure:
    """x = edited layer, y = score; one panel per metric, one line per method; the
    layer of highest S of each method marked (dashed; faint when another layer's S lies inside
    its 95% interval, i.e. the sweep does not separate it); the unedited model's score (the
    frame's ``phase == "pre"`` rows) as a grey dotted line; causal-tracing importance (if
    the frame has ``phase == "trace"`` rows) as a last panel. Panels on a grid (2 × 3 with
    the legend in the sixth cell), integer layer ticks. ``caption``: a second title line
    (:func:`caption`)."""
    post = frame[frame["phase"] == "post"]
    s = summary(post, ["method", "layer"], n_boot)
    trace = frame[frame["phase"] == "trace"] if "phase" in frame else frame.iloc[:0]
    n = len(metrics) + (1 if len(trace) else 0)
    fig, axes, spare = _panels(n)
    S = s[s["metric"] == "S"]
    top = S.sort_values("value").groupby("method").tail(1).set_index("method")
    best = top["layer"]
    # separated: every other layer's mean S below the best layer's lower bound
    separated = {m: bool((S[(S.method == m) & (S.layer != row.layer)]["value"] < row.ci_low).all())
                 for m, row in top.iterrows()}
    colors = _colors(s["method"])
    base = _baseline(frame, n_boot)
    for ax, metric in zip(axes, metrics):
        _band(ax, s[s["metric"] == metric], "layer", "method", colors)
        _unedited_line(ax, base.get(metric))
        for method, layer in best.items():
            ax.axvline(layer, ls="--", lw=0.8, color=colors[method], alpha=1.0 if separated[method] else 0.3,
                       gid=f"best-layer:{method}:{'separated' if separated[method] else 'not separated'}")
        ax.set_title(METRIC_NAMES.get(metric, metric))
        ax.set_xlabel("edited layer")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-2, 102)
        _integer_ticks(ax)
    handles = axes[0].get_legend_handles_labels()[0]
    if len(trace):
        _importance(axes[-1], trace)
        handles = handles + axes[-1].get_legend_handles_labels()[0]
    _title(fig, title or "Single edits by layer", caption)
    _readable(fig, axes)
    marks = ("dashed line: best layer" if all(separated.values()) else
             "dashed line: highest S; faint: not separated from other layers")
    _legend_off_data(fig, axes, spare, title=f"method ({marks})", handles=handles)
    return fig


def _metric_panels(frame: pd.DataFrame, x: str, panel: str, metrics: Sequence[str], n_boot: int) -> tuple:
    """Summaries by (method, ``panel``, ``x``), one axis per (method, panel value), a line per metric."""
    s = summary(frame[frame["phase"] == "post"], ["method", panel, x], n_boot)
    s = s[s["metric"].isin(metrics)]
    panels = list(s.groupby(["method", panel], sort=False).groups)
    fig, axes, spare = _panels(len(panels), width=4.4, height=3.5)
    colors = _colors([m for m in metrics if m in set(s["metric"])])
    base = _baseline(frame, n_boot)
    for ax, (method, value) in zip(axes, panels):
        _band(ax, s[(s["method"] == method) & (s[panel] == value)], x, "metric", colors)
        for metric, color in colors.items():  # each metric's unedited score, dotted, in its colour
            _unedited_line(ax, base.get(metric), color)
        ax.set_ylabel("score (%)")
        ax.set_ylim(-2, 102)
    return fig, list(zip(axes, panels)), spare


def _metric_handles(axes) -> list:
    """Legend handles: one per metric line, and one grey dotted line for the unedited model."""
    from matplotlib.lines import Line2D

    handles = [h for h in axes[0].get_legend_handles_labels()[0] if h.get_label() != "unedited model"]
    if any(l.get_label() == "unedited model" for ax in axes for l in ax.get_lines()):
        handles.append(Line2D([], [], **_UNEDITED, label="unedited model (dotted, metric's colour)"))
    return handles


def batch_sweep(frame: pd.DataFrame, metrics: Sequence[str] = ("ES", "PS", "NS", "S"), n_boot: int = 200,
                title: str | None = None, caption: str | None = None) -> plt.Figure:
    """x = batch size (log), y = score; one line per metric, one panel per method
    (and per λ when the run swept it); each metric's unedited score dotted."""
    fig, panels, spare = _metric_panels(frame, "batch_size", "reg", metrics, n_boot)
    for ax, (method, reg) in panels:
        ax.set_xscale("log", base=2)
        ax.set_title(f"{method} (λ={reg:g})")
        ax.set_xlabel("batch size (edits)")
    _title(fig, title or "Batch editing", caption)
    axes = [ax for ax, _ in panels]
    _readable(fig, axes)
    _legend_off_data(fig, axes, spare, handles=_metric_handles(axes))
    return fig


def reg_sweep(frame: pd.DataFrame, metrics: Sequence[str] = ("ES", "PS", "NS", "S"), n_boot: int = 200,
              title: str | None = None, caption: str | None = None) -> plt.Figure:
    """x = λ (log), y = score; one line per metric, one panel per method and batch size:
    the preservation–memorization trade-off (bigger λ keeps more of the old model)."""
    fig, panels, spare = _metric_panels(frame, "reg", "batch_size", metrics, n_boot)
    for ax, (method, bs) in panels:
        ax.set_xscale("log")
        ax.set_title(f"{method}, batch of {bs}")
        ax.set_xlabel("λ_E (equality ridge)" if method == "EMMET" else "λ (mom2_update_weight)")
    _title(fig, title or "Effect of λ", caption)
    axes = [ax for ax, _ in panels]
    _readable(fig, axes)
    _legend_off_data(fig, axes, spare, handles=_metric_handles(axes))
    return fig


def sequential(frame: pd.DataFrame, method: str, phase: str = "batch",
               metrics: Sequence[str] = ("ES", "PS", "NS", "S"), n_boot: int = 200,
               title: str | None = None, caption: str | None = None) -> plt.Figure:
    """x = edits so far (log), y = score; one line per batch size, one panel per metric.
    ``phase="batch"`` scores each batch right after it; ``"all"`` every fact so far."""
    rows = frame[(frame["phase"] == phase) & (frame["method"] == method)]
    s = summary(rows, ["batch_size", "edits_so_far"], n_boot)
    fig, axes, spare = _panels(len(metrics))
    sizes = sorted(s["batch_size"].unique())
    colors = dict(zip(sizes, sns.color_palette("viridis", len(sizes))))
    base = _baseline(frame, n_boot)
    for ax, metric in zip(axes, metrics):
        _band(ax, s[s["metric"] == metric].sort_values("batch_size", kind="stable"), "edits_so_far", "batch_size",
              colors)
        _unedited_line(ax, base.get(metric))
        ax.set_xscale("log", base=2)
        ax.set_title(METRIC_NAMES.get(metric, metric))
        ax.set_xlabel("edits so far")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-2, 102)
    what = "each batch after it is applied" if phase == "batch" else "all facts edited so far"
    _title(fig, title or f"{method}: sequential-batched editing ({what})", caption)
    _readable(fig, axes)
    _legend_off_data(fig, axes, spare, title="batch size")
    return fig


def sequential_probes(frame: pd.DataFrame, method: str, title: str | None = None,
                      caption: str | None = None) -> plt.Figure:
    """Norm of the accumulated update ‖Ŵ − W₀‖ and held-out perplexity vs edits so far."""
    p = frame[(frame["phase"] == "probe") & (frame["method"].isin([method]))]
    base = frame[(frame["phase"] == "probe") & (frame["method"] == "none")]
    cols = ["update_norm"] + (["perplexity"] if "perplexity" in p and p["perplexity"].notna().any() else [])
    fig, axes, spare = _panels(len(cols), width=4.6, height=3.5)
    sizes = sorted(p["batch_size"].unique())
    palette = dict(zip(sizes, sns.color_palette("viridis", len(sizes))))  # the same colours as `sequential`
    for ax, col in zip(axes, cols):
        sns.lineplot(data=p, x="edits_so_far", y=col, hue="batch_size", hue_order=sizes, marker="o", ms=4,
                     palette=palette, ax=ax)
        if col == "perplexity" and len(base):
            ax.axhline(base["perplexity"].iloc[0], ls=":", color="grey", label="unedited")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("edits so far")
        ax.set_ylabel({"update_norm": "‖Ŵ − W₀‖ (Frobenius)", "perplexity": "held-out perplexity"}[col])
    _title(fig, title or f"{method}: model drift under sequential editing", caption)
    _readable(fig, axes)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    _legend_off_data(fig, axes, spare, title="batch size", handles=list(handles.values()))
    return fig


_PROBE_NAMES = {"update_norm": "‖Ŵ − W₀‖ (Frobenius)", "perplexity": "held-out perplexity",
                "weight_norm": "‖Ŵ‖ (Frobenius)", "batch_delta_norm": "‖Δ‖ of the batch"}


def sequential_methods(frame: pd.DataFrame, batch_size: int | None = None, phase: str = "all",
                       metrics: Sequence[str] = ("ES", "PS", "NS", "S"),
                       probes: Sequence[str] = ("update_norm", "perplexity"), n_boot: int = 200,
                       title: str | None = None, caption: str | None = None) -> plt.Figure:
    """Methods side by side under sequential editing in batches of ``batch_size``: one
    panel per metric (scores of ``phase``: ``"all"`` = every fact edited so far,
    ``"batch"`` = each batch right after it) and per probe (update norm, held-out
    perplexity), on a grid; x = edits so far, one line per method; the unedited model
    grey and dotted. One figure per batch size (all of them in one figure made 12 panels
    too small to read); ``batch_size`` may be omitted when the frame has only one.

    ROME, r-ROME and unified-ROME (``Editor.one_at_a_time``), run at a single batch size while
    others were run at several, are drawn dashed in every figure and named "(one at a time)":
    they apply the facts of a batch one after another, so their sequence of weights does not
    depend on the batch size and one run serves every batch size. Any other method is drawn
    only in the figures of the batch sizes it was run at (AlphaEdit at 64: the batch-64 figure).
    """
    rows = frame[frame["method"] != "none"]
    sizes_by_method = rows.groupby("method")["batch_size"].unique()
    sizes = sorted({int(b) for bs in sizes_by_method for b in bs})
    if batch_size is None:
        if len(sizes) > 1:
            raise ValueError(f"batch_size: the frame has batch sizes {sizes}; draw one figure per batch size")
        batch_size = sizes[0]
    if batch_size not in sizes:
        raise ValueError(f"batch_size={batch_size}: the frame has batch sizes {sizes}")
    methods = list(dict.fromkeys(rows["method"]))
    shared = {m for m, bs in sizes_by_method.items() if len(bs) == 1 and len(sizes) > 1 and _one_at_a_time(m)}
    methods = [m for m in methods if m in shared or batch_size in sizes_by_method[m]]
    colors = _colors(methods)
    s = summary(rows[rows["phase"] == phase], ["method", "batch_size", "edits_so_far"], n_boot)
    s = s[s["metric"].isin(metrics)]
    p = rows[rows["phase"] == "probe"]
    base_probe = frame[(frame["phase"] == "probe") & (frame["method"] == "none")]
    base = _baseline(frame, n_boot)
    probes = [c for c in probes if c in p and p[c].notna().any()]
    cols = list(metrics) + probes
    fig, axes, spare = _panels(len(cols), width=4.2, height=3.4)
    for ax, col in zip(axes, cols):
        for i, m in enumerate(methods):
            own = m not in shared

            def sel(d: pd.DataFrame) -> pd.DataFrame:
                return d[(d["method"] == m) & (d["batch_size"] == batch_size)] if own else d[d["method"] == m]

            style = dict(color=colors[m], marker=_MARKERS[i % 5], ms=3.5, ls="-" if own else "--",
                         label=m if own else f"{m} (one at a time)")
            if col in metrics:
                g = sel(s[s["metric"] == col]).sort_values("edits_so_far")
                ax.plot(g["edits_so_far"], g["value"], **style)
                ax.fill_between(g["edits_so_far"], g["ci_low"], g["ci_high"], alpha=0.15, color=colors[m],
                                linewidth=0)
            else:
                g = sel(p).sort_values("edits_so_far")
                ax.plot(g["edits_so_far"], g[col], **style)
        if col in metrics:
            _unedited_line(ax, base.get(col))
            ax.set_ylim(-2, 102)
            ax.set_ylabel("score (%)")
        else:
            if col == "perplexity" and len(base_probe) and "perplexity" in base_probe:
                ax.axhline(base_probe["perplexity"].iloc[0], **_UNEDITED, label="unedited model")
                ax.set_yscale("log")
            ax.set_ylabel(_PROBE_NAMES.get(col, col))
        ax.set_xscale("log", base=2)
        ax.set_title(METRIC_NAMES.get(col, _PROBE_NAMES.get(col, col)))
        ax.set_xlabel("edits so far")
    handles: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    what = "all facts edited so far" if phase == "all" else "each batch right after it"
    _title(fig, title or f"Sequential editing in batches of {batch_size}: scores of {what}", caption)
    _readable(fig, axes)
    _legend_off_data(fig, axes, spare, title="method", handles=list(handles.values()))
    return fig


def _one_at_a_time(method: str) -> bool:
    """Whether the registered method applies a batch's facts one after another (ROME, r-ROME,
    unified-ROME), so its one sequence serves every batch size; an unknown name: no."""
    from .editors.registry import METHODS

    cls = METHODS.get(str(method).split(" ")[0])
    return bool(cls is not None and cls.one_at_a_time)


def trace_heatmap(frame: pd.DataFrame, title: str | None = None, caption: str | None = None) -> plt.Figure:
    """The ROME-paper picture: P(true object) after restoring one (token, layer) site
    of a run with a corrupted subject; ``frame`` from :func:`editkit.tracing.causal_trace`."""
    grid = frame.pivot_table(index="token_index", columns="layer", values="score")
    labels = frame.drop_duplicates("token_index").set_index("token_index")["token"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * grid.shape[1], 0.8 + 0.3 * grid.shape[0]))
    sns.heatmap(grid, cmap="Purples", ax=ax, cbar_kws={"label": "P(true object)"},
                yticklabels=[f"{t}{'*' if s else ''}" for t, s in zip(labels.reindex(grid.index),
                             frame.drop_duplicates("token_index").set_index("token_index")["is_subject"]
                             .reindex(grid.index))])
    ax.set_xlabel("restored MLP output at layer" if frame.attrs.get("kind") == "mlp" else "restored layer")
    ax.set_ylabel("token (* = subject)")
    a = frame.attrs
    ax.set_title(title or f"{a.get('prompt', '')} → {a.get('target', '')}\n"
                          f"clean {a.get('clean', float('nan')):.2f}, corrupted {a.get('corrupted', float('nan')):.2f}"
                          + (f"\n{caption}" if caption else ""), fontsize=9)
    fig.tight_layout()
    return fig


def _importance(ax, frame: pd.DataFrame) -> None:
    for pos, style in (("subject_last", "-"), ("last", ":")):
        t = frame[frame["position"] == pos].sort_values("layer")
        sem = t["sem"].fillna(0)
        ax.plot(t["layer"], t["indirect_effect"], ls=style, marker="o", ms=3, color="k",
                label={"subject_last": "subject's last token", "last": "prompt's last token"}[pos])
        ax.fill_between(t["layer"], t["indirect_effect"] - 1.96 * sem, t["indirect_effect"] + 1.96 * sem,
                        alpha=0.15, color="k", linewidth=0)
    ax.set_xlabel("layer (MLP output restored)")
    ax.set_ylabel("indirect effect on P(true object)")
    ax.set_title("Causal tracing")
    _integer_ticks(ax)


def layer_importance(frame: pd.DataFrame, title: str | None = None, caption: str | None = None) -> plt.Figure:
    """Average indirect effect per layer at the subject's last token and at the last
    token; ``frame`` from :func:`editkit.tracing.layer_importance`."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    _importance(ax, frame)
    ax.set_title(title or "Where is the fact? (causal tracing)")
    if caption:
        fig.suptitle(caption, fontsize=_LABEL - 1)
    _readable(fig, [ax])
    _legend_off_data(fig, [ax])
    return fig


_NOTE: str | None = None


def set_note(note: str | None) -> None:
    """Stamp ``note`` under every figure :func:`save` writes from now on (``None``: stop);
    quick smoke-test runs use it so their figures cannot pass for results."""
    global _NOTE
    _NOTE = note


#: PDF metadata without a creation date: the same figure gives the same bytes on every run, so
#: re-running ``make figures`` changes no committed file unless a figure changed.
_PDF_METADATA = {"CreationDate": None, "ModDate": None, "Creator": "editkit", "Producer": "matplotlib"}


def save(fig: plt.Figure, name: str, outdir: str | os.PathLike = "figures") -> list[Path]:
    """Save ``fig`` as ``<outdir>/<name>.png`` and ``.pdf`` (with the :func:`set_note`
    stamp, if any); returns both paths. Both files depend only on the figure: no dates,
    no matplotlib version in the PDF, a fixed hash salt (saving the same figure twice gives
    identical bytes). Name figures with :func:`figure_name`."""
    if _NOTE and not getattr(fig, "_editkit_note", False):
        fig.text(0.5, 0.0, _NOTE, ha="center", va="top", color="crimson", fontsize=10, fontweight="bold")
        fig._editkit_note = True
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    with matplotlib.rc_context({"svg.hashsalt": "editkit", "pdf.compression": 6}):
        fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": "editkit/matplotlib"})
        fig.savefig(paths[1], bbox_inches="tight", metadata=_PDF_METADATA)
    return paths
