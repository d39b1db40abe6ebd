"""Run reports: a self-contained ``report.html`` next to a machine-readable ``metrics.json``.

The HTML file embeds its plots as base64 PNGs (matplotlib's Agg canvas, no pyplot state),
so it can be mailed or archived alone. Both files are written atomically.

Building blocks are reusable by plugins: :class:`Table` (``from_nested`` for
``{row: {column: value}}`` such as ablation results or retrieval metrics per variant,
values may be lists of per-seed results shown as mean ± std), :class:`Figure`,
:class:`Section`, :func:`plot_learning_curves` and :func:`plot_slice_bars`.

Example::

    write_report(
        "out/demo",
        metrics={"auc": 0.71, "gauc": 0.66, "slices": sliced_ranking_metrics(...)},
        curves={"base": [{"step": 10, "train_loss": 0.62}, {"step": 100, "eval_auc": 0.7}]},
        title="QARM on synthetic data",
        config={"dataset": "synth", "epochs": 2},
        slice_metrics={"base": [seed0_slices, seed1_slices], "+VQ&RQ": [...]},
        sections=[Section("Ablation", tables=[Table.from_nested("AUC", ablation)])],
    )
"""

import base64
import datetime
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torchrec_mm.utils.io import write_json, write_text

__all__ = [
    "Figure",
    "Section",
    "Table",
    "load_metrics",
    "mean_std",
    "metrics_tables",
    "plot_learning_curves",
    "plot_slice_bars",
    "slice_values",
    "write_report",
]

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"

Number = Union[int, float]
#: one value, or one value per seed
SeedValues = Union[Number, Sequence[Number]]


# ------------------------------------------------------------------------ values


def _scalar(v: Any) -> Any:
    """Unwraps 0-d tensors / numpy scalars."""
    if hasattr(v, "item") and not isinstance(v, (int, float, str, bool)):
        try:
            return v.item()
        except (ValueError, RuntimeError):  # not a 0-d / 1-element array
            return v.tolist() if hasattr(v, "tolist") else v
    return v


def _is_seq_of_numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(_scalar(x), (int, float)) and not isinstance(_scalar(x), bool) for x in v
    )


def mean_std(values: SeedValues) -> Tuple[float, float, int]:
    """``(mean, sample std (0 for one value), n)`` of the finite values; NaN mean if none."""
    if isinstance(values, (list, tuple)):
        xs = [float(_scalar(x)) for x in values]
    else:
        xs = [float(_scalar(values))]
    xs = [x for x in xs if math.isfinite(x)]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd, n


def _fmt(v: Any) -> str:
    v = _scalar(v)
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—" if math.isnan(v) else str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.4g}"
        return f"{v:.4f}"
    if _is_seq_of_numbers(v):
        m, sd, n = mean_std(v)
        if n > 1:
            return f"{_fmt(m)} ± {_fmt(sd)} (n={n})"
        return _fmt(m)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _sanitise(obj: Any) -> Any:
    """JSON-safe copy: tensors → lists, non-finite floats → None (strict JSON has no NaN)."""
    obj = _scalar(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _sanitise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitise(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _sanitise(obj.tolist())
    return obj


# ------------------------------------------------------------------------ blocks


@dataclass
class Table:
    """A titled table. Cells may be numbers, strings, or lists of per-seed numbers
    (rendered as mean ± std)."""

    title: str
    columns: List[str]
    rows: List[List[Any]]
    note: str = ""

    @staticmethod
    def from_nested(
        title: str,
        data: Mapping[str, Mapping[str, Any]],
        columns: Optional[Sequence[str]] = None,
        row_header: str = "",
        note: str = "",
    ) -> "Table":
        """``{row: {column: value}}`` → table; columns default to their first-seen order."""
        if columns is None:
            seen: Dict[str, None] = {}
            for r in data.values():
                for c in r:
                    seen.setdefault(str(c), None)
            columns = list(seen)
        rows = [[str(name)] + [r.get(c) for c in columns] for name, r in data.items()]
        return Table(title, [row_header] + list(columns), rows, note)

    @staticmethod
    def from_runs(
        title: str,
        runs: Mapping[str, Any],
        columns: Optional[Sequence[str]] = None,
        row_header: str = "variant",
        note: str = "",
    ) -> "Table":
        """``{variant: {metric: value}}`` or ``{variant: [per-seed {metric: value}]}`` →
        one row per variant, per-seed values collected into lists (mean ± std cells).
        E.g. an ablation table, or retrieval metrics of several variants and seeds."""
        data: Dict[str, Dict[str, Any]] = {}
        for variant, r in runs.items():
            seeds = list(r) if isinstance(r, (list, tuple)) else [r]
            row: Dict[str, List[Any]] = {}
            for seed in seeds:
                for k, v in seed.items():
                    row.setdefault(str(k), []).append(_scalar(v))
            data[str(variant)] = {k: (v[0] if len(v) == 1 else v) for k, v in row.items()}
        return Table.from_nested(title, data, columns, row_header, note)

    @staticmethod
    def from_flat(title: str, data: Mapping[str, Any], note: str = "") -> "Table":
        """``{key: value}`` → a two-column table."""
        return Table(title, ["", "value"], [[str(k), v] for k, v in data.items()], note)

    def to_json(self) -> Dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows,
                "note": self.note}

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = []
        for row in self.rows:
            cells = []
            for i, v in enumerate(row):
                tag = "th" if i == 0 and isinstance(v, str) else "td"
                cls = ' class="num"' if tag == "td" and not isinstance(_scalar(v), str) else ""
                cells.append(f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return (f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>{note}")


@dataclass
class Figure:
    """A PNG image (bytes) with a title and caption."""

    title: str
    png: bytes
    caption: str = ""

    def to_html(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        cap = f"<figcaption>{html.escape(self.caption)}</figcaption>" if self.caption else ""
        return (f"<figure><h3>{html.escape(self.title)}</h3>"
                f'<img alt="{html.escape(self.title)}" src="data:image/png;base64,{data}"/>'
                f"{cap}</figure>")


@dataclass
class Section:
    """A report section: free text (plain, escaped), tables, figures."""

    title: str
    text: str = ""
    tables: List[Table] = field(default_factory=list)
    figures: List[Figure] = field(default_factory=list)

    def to_html(self) -> str:
        parts = [f"<section><h2>{html.escape(self.title)}</h2>"]
        if self.text:
            parts += [f"<p>{html.escape(p)}</p>" for p in self.text.split("\n\n")]
        parts += [t.to_html() for t in self.tables]
        parts += [f.to_html() for f in self.figures]
        parts.append("</section>")
        return "".join(parts)

    def to_json(self) -> Dict[str, Any]:
        return {"title": self.title, "text": self.text,
                "tables": [t.to_json() for t in self.tables],
                "figures": [f.title for f in self.figures]}


# ------------------------------------------------------------------------ plots


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def plot_learning_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    keys: Optional[Sequence[str]] = None,
    x: str = "step",
) -> bytes:
    """Learning curves of one or several runs as a PNG.

    Args:
        curves: ``{run name: [record, ...]}``; a record is a dict such as
            ``{"step": 100, "train_loss": 0.61}`` or ``{"step": 500, "eval_auc": 0.70}``
            (records may carry different keys).
        keys: metrics to plot (one panel each); default every numeric key but ``x``,
            ``"epoch"`` and ``"time"``.
        x: the x-axis key (the record index when a record lacks it).

    Returns:
        PNG bytes.
    """
    if keys is None:
        seen: Dict[str, None] = {}
        for recs in curves.values():
            for r in recs:
                for k, v in r.items():
                    if k not in (x, "epoch", "time") and isinstance(_scalar(v), (int, float)) \
                            and not isinstance(v, bool):
                        seen.setdefault(k, None)
        keys = list(seen)
    if not keys:
        raise ValueError("plot_learning_curves: no numeric metric in the curves")
    ncols = min(2, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(5.2 * ncols, 3.4 * nrows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for run, recs in curves.items():
            pts = [(float(_scalar(r.get(x, j))), float(_scalar(r[key])))
                   for j, r in enumerate(recs) if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=run)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def slice_values(
    slice_metrics: Mapping[str, Any], metric: str
) -> Dict[str, Dict[str, List[float]]]:
    """Extracts ``{variant: {slice: [value per seed]}}`` for one metric.

    Args:
        slice_metrics: ``{variant: {slice: {metric: value}}}`` (one seed) or
            ``{variant: [{slice: {metric: value}}, ...]}`` (one entry per seed), e.g.
            the output of :func:`torchrec_mm.metrics.sliced_ranking_metrics`.
    """
    out: Dict[str, Dict[str, List[float]]] = {}
    for variant, runs in slice_metrics.items():
        runs_list = list(runs) if isinstance(runs, (list, tuple)) else [runs]
        per_slice: Dict[str, List[float]] = {}
        for run in runs_list:
            for sl, ms in run.items():
                if metric in ms and ms[metric] is not None:
                    per_slice.setdefault(str(sl), []).append(float(_scalar(ms[metric])))
        out[str(variant)] = per_slice
    return out


def plot_slice_bars(
    values: Mapping[str, Mapping[str, SeedValues]],
    metric: str,
    slices: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> bytes:
    """Grouped bar chart of one metric by slice for one or several variants.

    Args:
        values: ``{variant: {slice: value or [value per seed]}}`` (see
            :func:`slice_values`); with several seeds the bar is the mean and the error
            bar the sample standard deviation.
        metric: y-axis label.
        slices: slice order (default: first-seen order).

    Returns:
        PNG bytes.
    """
    if slices is None:
        seen: Dict[str, None] = {}
        for per_slice in values.values():
            for s in per_slice:
                seen.setdefault(s, None)
        slices = list(seen)
    variants = list(values)
    if not slices or not variants:
        raise ValueError("plot_slice_bars: nothing to plot")
    fig = _new_figure(min(11.0, max(5.0, 0.7 * len(slices) * len(variants) ** 0.5 + 2)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(variants)
    lows: List[float] = []
    highs: List[float] = []
    for i, var in enumerate(variants):
        stats = [mean_std(values[var].get(s, [])) for s in slices]
        means = [m for m, _, _ in stats]
        errs = [sd if n > 1 else 0.0 for _, sd, n in stats]
        pos = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(slices))]
        has_err = any(n > 1 for _, _, n in stats)
        ax.bar(pos, [0.0 if math.isnan(m) else m for m in means], width,
               yerr=errs if has_err else None, capsize=3, label=var)
        for m, e in zip(means, errs):
            if math.isfinite(m):
                lows.append(m - e)
                highs.append(m + e)
    ax.set_xticks(range(len(slices)))
    ax.set_xticklabels(slices)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by slice")
    if lows:
        lo, hi = min(lows), max(highs)
        pad = max(0.02, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    ax.grid(True, axis="y", alpha=0.3)
    if len(variants) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------ metrics tables


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _is_leaf(v: Any) -> bool:
    return not isinstance(v, Mapping)


def metrics_tables(metrics: Mapping[str, Any]) -> List[Table]:
    """Tables for a metrics dict: top-level scalars in one "Summary" table; a
    ``{row: {column: scalar}}`` entry as a matrix; deeper nesting flattened to paths."""
    tables: List[Table] = []
    summary = {k: v for k, v in metrics.items() if _is_leaf(v)}
    if summary:
        tables.append(Table.from_flat("Summary", summary))
    for k, v in metrics.items():
        if _is_leaf(v):
            continue
        if v and all(_is_leaf(x) for x in v.values()):
            tables.append(Table.from_flat(str(k), v))
        elif v and all(isinstance(x, Mapping) and all(_is_leaf(y) for y in x.values())
                       for x in v.values()):
            tables.append(Table.from_nested(str(k), v))
        else:
            tables.append(Table.from_flat(str(k), _flatten(v)))
    return tables


# ------------------------------------------------------------------------ report

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:1.6em;color:#333}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f0f0f0}figure{margin:1em 0}img{max-width:100%}
.note,.meta{color:#666;font-size:.9em}
"""


def write_report(
    out_dir: str,
    metrics: Mapping[str, Any],
    curves: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None,
    title: str = "torchrec-mm report",
    sections: Sequence[Section] = (),
    config: Optional[Mapping[str, Any]] = None,
    slice_metrics: Optional[Mapping[str, Any]] = None,
    slice_plot_metrics: Sequence[str] = ("auc", "gauc"),
    slice_order: Optional[Sequence[str]] = None,
) -> str:
    """Writes ``out_dir/report.html`` and ``out_dir/metrics.json`` (both atomically).

    Args:
        out_dir: output directory (created if missing).
        metrics: the run's metrics, any nesting of dicts / numbers / lists (tensors are
            converted). Rendered by :func:`metrics_tables`.
        curves: optional learning curves ``{run: [record, ...]}`` (see
            :func:`plot_learning_curves`).
        title: report title.
        sections: extra :class:`Section` s (ablation tables, retrieval metrics, …).
        config: run configuration shown in the header.
        slice_metrics: optional ``{variant: {slice: {metric: v}}}`` or
            ``{variant: [per-seed {slice: {metric: v}}]}``: a table and a bar chart per
            metric in ``slice_plot_metrics`` (error bars over seeds).
        slice_order: order of slices in the charts (default: first seen).

    Returns:
        The path of ``report.html``.

    ``metrics.json`` holds ``{"title", "created", "config", "metrics", "curves",
    "slice_metrics", "sections"}`` (section tables without images); NaN/Inf become null.
    """
    from torchrec_mm import __version__

    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    body: List[str] = [f"<h1>{html.escape(title)}</h1>",
                       f'<p class="meta">torchrec-mm {html.escape(__version__)} · '
                       f"{html.escape(created)}</p>"]
    if config:
        cfg = {k: v if isinstance(v, str) else json.dumps(_sanitise(v))
               for k, v in _flatten(config).items()}
        body.append(Section("Run configuration", tables=[
            Table.from_flat("Config", cfg)]).to_html())
    body.append(Section("Metrics", tables=metrics_tables(metrics)).to_html())

    all_sections: List[Section] = []
    if curves:
        all_sections.append(Section("Learning curves", figures=[
            Figure("Learning curves", plot_learning_curves(curves),
                   caption=f"{len(curves)} run(s)")]))
    if slice_metrics:
        figs, tables = [], []
        for m in slice_plot_metrics:
            vals = slice_values(slice_metrics, m)
            if not any(vals.values()):
                continue
            seeds = max((len(v) for per in vals.values() for v in per.values()), default=1)
            caption = (f"mean ± sample std over {seeds} seeds" if seeds > 1 else "")
            figs.append(Figure(f"{m.upper()} by slice", plot_slice_bars(
                vals, m.upper(), slices=slice_order), caption=caption))
            tables.append(Table.from_nested(f"{m.upper()} by slice", vals,
                                            columns=slice_order, row_header="variant"))
        all_sections.append(Section("Slices", tables=tables, figures=figs))
    all_sections.extend(sections)
    body.extend(s.to_html() for s in all_sections)

    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           + "\n".join(body) + "</body></html>\n")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, METRICS_FILE), _sanitise({
        "title": title,
        "created": created,
        "config": dict(config or {}),
        "metrics": metrics,
        "curves": curves or {},
        "slice_metrics": slice_metrics or {},
        "sections": [s.to_json() for s in sections],
    }))
    path = os.path.join(out_dir, REPORT_FILE)
    write_text(path, doc)
    return path


def load_metrics(out_dir: str) -> Dict[str, Any]:
    """Reads ``out_dir/metrics.json`` as written by :func:`write_report`."""
    path = os.path.join(out_dir, METRICS_FILE)
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: record line {e.lineno}: invalid JSON: {e.msg}") from None
