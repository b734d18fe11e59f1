"""ResultsExplorer: browse a run by metric, method, batch size and layer, with the study's own figure."""
from __future__ import annotations

import html
import logging
import re
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from .common import _ALL, _close, _error_html, _fig_png

log = logging.getLogger("editkit.widgets")


#: Columns a summary is grouped by, when the frame has them (the runners' design columns).
_GROUPS = ("phase", "method", "layer", "reg", "batch_size", "edits_so_far", "n_edits")
_SUMMARY_COLS = ("metric", "value")


def load_results(frame_or_run_dir: Any) -> Any:
    """A results frame from a DataFrame, a run directory or a CSV/Parquet file.

    A run directory goes through ``editkit.experiments.load_run``, so the explorer
    reads runs exactly as the figure notebooks do (with the run's parameters in
    ``.attrs["run"]``); a plain folder of tables falls back to reading every
    CSV/Parquet file under it.
    """
    import pandas as pd

    if isinstance(frame_or_run_dir, pd.DataFrame):
        return frame_or_run_dir.copy()
    path = Path(frame_or_run_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist; pass a DataFrame or a run directory")
    if path.is_dir() and (path / "units").is_dir():
        from ..runstore import load_run

        return load_run(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no CSV or Parquet files under {str(path)!r}")
    return pd.concat([pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f) for f in files],
                     ignore_index=True)


def _figure_of(obj: Any) -> Any:
    """A matplotlib Figure from what a plotting function returns (Figure, Axes, FacetGrid, tuple)."""
    from matplotlib.figure import Figure

    if isinstance(obj, tuple) and obj:
        obj = obj[0]
    if isinstance(obj, Figure):
        return obj
    fig = getattr(obj, "figure", None) or getattr(obj, "fig", None)
    if fig is None and hasattr(obj, "flat"):  # an array of Axes
        fig = obj.flat[0].figure
    if fig is None:
        raise TypeError(f"cannot get a figure from {type(obj).__name__}")
    return fig


class ResultsExplorer:
    """Browse an experiment run: filter by metric, method, batch size and layer; the
    figure (the same ``editkit.plots`` function the study notebooks use) and the
    table of numbers follow the filters.

    ``frame_or_run_dir`` is a run directory, a runner's raw frame (one row per record
    × prompt, with ``phase``; summarized with ``editkit.plots.summary``), or an
    already summarized long-form frame (``metric``, ``value``, ``ci_low``, ``ci_high``, ``n``).
    """

    FILTERS = ("metric", "method", "batch_size", "layer")
    KINDS = ("auto", "layer_sweep", "batch_sweep", "sequential", "line")

    def __init__(self, frame_or_run_dir: Any, *, n_boot: int = 200, max_rows: int = 200) -> None:
        self.frame = load_results(frame_or_run_dir)
        self.n_boot = n_boot
        self.max_rows = max_rows
        self.raw = not set(_SUMMARY_COLS) <= set(self.frame.columns)
        self.summary_error: str | None = None
        summary = self._summarize(self.frame)
        self.dropdowns: dict[str, widgets.Dropdown] = {}
        for col in self.FILTERS:
            src = summary if col == "metric" and summary is not None else self.frame
            present = col in src.columns
            values = src[col].dropna().unique().tolist() if present else []
            if col == "method":
                values = [v for v in values if v != "none"]  # the unedited baseline rows
            values = sorted(values, key=_sort_key)
            dd = widgets.Dropdown(options=[(_ALL, _ALL)] + [(str(v), v) for v in values], value=_ALL,
                                  description=col.replace("_", " "), disabled=not present,
                                  layout=widgets.Layout(width="220px"))
            dd.observe(self.redraw, names="value")
            self.dropdowns[col] = dd
        self.metric, self.method = self.dropdowns["metric"], self.dropdowns["method"]
        self.batch_size, self.layer = self.dropdowns["batch_size"], self.dropdowns["layer"]
        self.kind = widgets.Dropdown(options=list(self.KINDS), value="auto", description="figure",
                                     layout=widgets.Layout(width="220px"))
        self.kind.observe(self.redraw, names="value")
        self.figure = widgets.Image(format="png")
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        self.drawn_with: str | None = None
        self.summary: Any = None
        self.ui = widgets.VBox([widgets.HBox([*self.dropdowns.values(), self.kind]), self.status,
                                widgets.Tab(children=[self.figure, self.table], titles=("Figure", "Table"))])
        self.redraw()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)

    # ---- data -------------------------------------------------------------
    def _summarize(self, rows: Any) -> Any:
        """Per-group scores of a raw frame (None when editkit.metrics is unavailable)."""
        if not self.raw:
            return rows
        if rows.empty:
            return rows.iloc[:0]
        try:
            from ..plots import summary
        except ImportError as exc:
            self.summary_error = f"{type(exc).__name__}: {exc}"
            return None
        by = [c for c in _GROUPS if c in rows.columns]
        try:
            return summary(rows, by, self.n_boot)
        except Exception as exc:  # e.g. editkit.metrics not installed, or a frame without scores
            log.warning("could not summarize the frame", exc_info=True)
            self.summary_error = f"{type(exc).__name__}: {exc}"
            return None

    def filtered(self) -> Any:
        """The rows the method / batch size / layer dropdowns select (the metric is a column of the summary)."""
        df = self.frame
        for col in ("method", "batch_size", "layer"):
            value = self.dropdowns[col].value
            if value != _ALL and col in df.columns:
                keep = df[col] == value
                if col == "method" and "phase" in df.columns:
                    keep |= df["phase"] == "pre"  # keep the unedited baseline beside the chosen method
                df = df[keep]
        if not self.raw and self.metric.value != _ALL:
            df = df[df["metric"] == self.metric.value]
        return df

    def figure_kind(self, df: Any) -> str:
        """Which study the frame comes from: the run's recorded kind, else which column varies."""
        if self.kind.value != "auto":
            return self.kind.value
        if not self.raw:
            return "line"
        run_kind = (self.frame.attrs.get("run") or {}).get("kind")
        if run_kind in ("layer_sweep", "batch_sweep"):
            return run_kind
        if run_kind == "sequential_batched" or "edits_so_far" in df.columns:
            return "sequential"
        if "batch_size" in df.columns and df["batch_size"].nunique() > 1:
            return "batch_sweep"
        return "layer_sweep" if "layer" in df.columns else "line"

    # ---- drawing ----------------------------------------------------------
    def redraw(self, _change: Any = None) -> None:
        """Refilter, resummarize, redraw the figure and refresh the table. Never raises."""
        df = self.filtered()
        self.summary_error = None
        summary = self._summarize(df)
        if summary is not None and self.raw and self.metric.value != _ALL:
            summary = summary[summary["metric"] == self.metric.value]
        self.summary = summary
        shown = summary if summary is not None else df
        fmt = lambda x: f"{x:.4g}"  # noqa: E731
        self.table.value = (f"<div style='max-height:420px;overflow:auto'>"
                            f"{shown.to_html(index=False, max_rows=self.max_rows, float_format=fmt)}</div>")
        if df.empty or (summary is not None and summary.empty):
            self.figure.value, self.drawn_with = b"", None
            self.status.value = _error_html("no rows match these filters")
            return
        kind = self.figure_kind(df)
        note = f" (no summary: {self.summary_error}; the table shows raw rows)" if self.summary_error else ""
        try:
            fig, self.drawn_with = self._draw(kind, df, summary)
        except Exception as exc:
            log.warning("figure %s failed", kind, exc_info=True)
            self.figure.value, self.drawn_with = b"", None
            self.status.value = _error_html(f"cannot draw {kind}: {type(exc).__name__}: {exc}{note}")
            return
        self.figure.value = _fig_png(fig)
        _close(fig)
        self.status.value = f"{len(df)} rows · figure: {html.escape(self.drawn_with)}{html.escape(note)}"

    def _draw(self, kind: str, df: Any, summary: Any) -> tuple[Any, str]:
        if kind == "line" or not self.raw:
            if summary is None:
                raise ValueError("a line plot needs metric/value columns")
            return _line_figure(summary), "line"
        from .. import plots

        metrics = (self.metric.value,) if self.metric.value != _ALL else ("ES", "PS", "NS", "S")
        if kind == "sequential":
            methods = [m for m in df["method"].unique() if m != "none"]
            method = self.method.value if self.method.value != _ALL else methods[0]
            fig = plots.sequential(df, method, metrics=metrics, n_boot=self.n_boot)
        else:
            fig = getattr(plots, kind)(df, metrics=metrics, n_boot=self.n_boot)
        return _figure_of(fig), f"editkit.plots.{kind}"


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


#: Metrics that are not percentages (update norms, perplexity): drawn on their own panel,
#: never on the score axis.
_NOT_PERCENT = re.compile(r"norm|perplexity|loss|nll|seconds", re.I)


def _line_figure(df: Any) -> Any:
    """Summarized scores against whichever of edits / batch size / layer varies: one line per
    metric, method and stage. Before/after rows (``when`` or ``phase``) are separate lines
    (solid: before, dashed: after; for a single edit before → after is the x axis), never
    averaged together; norms and other non-percent metrics get
    their own panel; layer and edit-count axes have integer ticks."""
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = df.reset_index(drop=True)
    x = next((c for c in ("n_edits", "edits_so_far", "batch_size", "layer")
              if c in data.columns and data[c].nunique() > 1),
             next((c for c in ("layer", "batch_size", "n_edits", "edits_so_far") if c in data.columns), None))
    if x is None:
        data = data.assign(row=range(len(data)))
        x = "row"
    stage = next((c for c in ("when", "phase") if c in data.columns and data[c].nunique() > 1), None)
    stages = None
    if stage:
        data = data.assign(**{stage: data[stage].replace({"pre": "before", "post": "after"})})
    if stage and data[x].nunique() == 1:  # one edit / one setting: before → after is the x axis
        stages = sorted(data[stage].astype(str).unique(), key=lambda v: (v != "before", v))
        data = data.assign(**{stage: data[stage].astype(str)})
        data = data.assign(_stage_x=data[stage].map({v: i for i, v in enumerate(stages)}))
        x, stage = "_stage_x", None
    varying = [c for c in ("method", stage) if c and c in data.columns and data[c].nunique() > 1]
    if varying:  # one line style per method × stage (pre dashed, post solid when only the stage varies)
        data = data.assign(stage=data[varying].astype(str).agg(" · ".join, axis=1))
    other = data["metric"].astype(str).str.contains(_NOT_PERCENT)
    parts = [("score (%)", data[~other]), ("", data[other])]
    parts = [(label, part) for label, part in parts if len(part)]
    fig = Figure(figsize=(6.5 * len(parts), 4))
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, (label, part) in zip(axes, parts):
        hue = "metric" if label or part["metric"].nunique() > 1 else ("layer" if "layer" in part and
                                                                      part["layer"].nunique() > 1 else None)
        style = "stage" if varying and part["stage"].nunique() > 1 else None
        style_order = sorted(part["stage"].unique(), key=lambda v: ("before" not in v, v)) if style else None
        sns.lineplot(data=part, x=x, y="value", hue=hue, style=style, style_order=style_order, marker="o", ax=ax,
                     errorbar=None)
        if label:
            ax.set_ylabel(label)
            ax.set_ylim(-2, 102)
        else:
            names = sorted(part["metric"].astype(str).unique())
            ax.set_ylabel(", ".join(names))
            ax.set_title("update norm" if all("norm" in n for n in names) else "not in percent")
        if stages is not None:
            ax.set_xticks(range(len(stages)), stages)
            ax.set_xlim(-0.3, len(stages) - 0.7)
            ax.set_xlabel("")
        elif data[x].nunique() == 1:
            ax.set_xticks([data[x].iloc[0]])
        elif x in ("batch_size", "n_edits", "edits_so_far") and (part[x] > 0).all() and part[x].max() > 8:
            ax.set_xscale("log", base=2)
        if stages is None and x in ("layer", "n_edits", "edits_so_far", "row"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    fig.tight_layout()
    return fig
