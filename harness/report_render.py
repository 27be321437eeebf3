"""Render reports (DESIGN 7) from the flat report frame: cross-method tables per task (Markdown,
CSV, LaTeX), Pareto plots (PNG, SVG), the papers' numbers as package data, and the index
`reports/README.md`.

Input: one row per run x padding mode with the columns in `FRAME_COLUMNS` (NaN/None where not
measured). Within a task a run is identified by (label, backbone, profile); `label` is unique per
run within a task and backbone/profile. Speedups in a row are against the baseline in the same
padding mode (DESIGN 3).

Only the `report` command imports this module, so pandas and numpy are imported at the top;
matplotlib is imported inside the plotting code and always draws through an explicit Agg canvas
(no pyplot, no global backend switch).
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from skimbench.errors import SkimbenchError
from skimbench.records import write_atomic

FRAME_COLUMNS = (
    "task", "task_title", "method", "label", "backbone", "profile", "seed", "run_dir",
    "main_metric", "metric", "ci_low", "ci_high", "padding",
    "macs_per_example", "flops_speedup", "padding_inflation",
    "cpu_time_speedup", "gpu_time_speedup", "oracle_speedup", "removal_efficiency",
    "latency_floor_ms", "peak_rss_mb", "cuda_peak_mb",
    "executed", "macs_mismatch", "load_flagged",
    # precomputed (cached) work charged once per entry; NaN for methods without a cache
    "total_flops_speedup", "total_cpu_time_speedup",
    "notes",  # the method's caveats for the run (Method.record_notes), "; "-joined
    # random-removal controls (skimbench.controls), the same on every row of a run; NaN/None
    # for runs without them. `control`: the control this run itself evaluates, if any
    "control", "lift_random", "lift_random_low", "lift_random_high", "lift_random_baseline",
    "lift_random_baseline_low", "lift_random_baseline_high",
    "random_metric",  # the `random` control's main metric (no padding)
)
# the lift columns per control: (value, low, high) frame/CSV columns and the table's heading
LIFTS = {"random": ("lift_random", "lift_random_low", "lift_random_high"),
         "random-baseline": ("lift_random_baseline", "lift_random_baseline_low",
                             "lift_random_baseline_high")}
PADDING_MODES = ("none", "batch", "sequence")
RUN_KEY = ("label", "backbone", "profile")
BASELINE = "baseline"
SIMPLE_BASELINES = ("truncate", "layerdrop", "topk-cls")
MISSING = "n/a"

# Footnote markers for flagged rows, in the order they are printed after a label.
FLAGS = {
    "macs_mismatch": ("\u2020", "counted MACs differ from the trace's schedule MACs by more than "
                                "1% (DESIGN 4.2): the FLOPs speedup of this row is not reliable."),
    "load_flagged": ("\u2021", "other processes took more than 10% of the CPU while this run was "
                               "timed: its time speedups are noisy."),
    "not_executed": ("\u00a7", "not executed: tokens are masked, not physically removed, so the "
                               "FLOPs saving is not realised in time."),
}

SPEEDUP_KINDS = {
    "flops_speedup": "FLOPs speedup",
    "cpu_time_speedup": "CPU time speedup",
    "gpu_time_speedup": "GPU time speedup",
    "oracle_speedup": "oracle time speedup",
}

PROFILE_NOTES = {
    "smoke": "tiny random model on tiny data, checks the machinery only: the numbers mean nothing",
    "ci": "MiniLM on small real-data subsets, the CI regression set: rough numbers",
    "local": "MiniLM on the full local training data, the published CPU results",
    "paper": "the papers' backbones, data and hyper-parameters",
}

LIFT_NOTE = ("Lift over random = the run's metric minus that of the same model with every keep "
             "decision replaced by a uniform random one at the method's own per-example, "
             "per-layer counts (same MACs), without padding; lift over random-baseline = the "
             "same random removal on the fine-tuned baseline's weights. In brackets, the paired "
             "bootstrap 95% interval over examples; empty where the run has no controls.")
MACS_NOTE = ("MACs exclude embeddings, layer norms, softmax, activations and biases, and include "
             "task heads, poolers and every predictor a method adds (DESIGN 4.1); FLOPs = 2 x "
             "MACs, so MAC and FLOP ratios are equal.")
SPEEDUP_NOTE = ("Every speedup is against the baseline (same backbone and profile) in the same "
                "padding mode (DESIGN 3). FLOPs speedup = sum of baseline MACs / sum of method "
                "MACs over the eval set, never a mean of per-example ratios.")


# --------------------------------------------------------------------------------------------
# small helpers


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _num(value) -> float:
    """A float, NaN where missing or not a number."""
    if _is_missing(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _flag(value) -> bool:
    """True only for an explicit true value; missing means not flagged."""
    return False if _is_missing(value) else bool(value)


def _first(values: Iterable):
    for value in values:
        if not _is_missing(value):
            return value
    return None


def _max(values: Iterable) -> float:
    numbers = [v for v in (_num(v) for v in values) if not math.isnan(v)]
    return max(numbers) if numbers else math.nan


def _natural(text: str) -> tuple:
    """Sort key that puts 'k=8' before 'k=32'."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def _text(value) -> str:
    return "" if _is_missing(value) else str(value)


def _seed_text(value) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _times(value, digits: int = 2) -> str:
    value = _num(value)
    return MISSING if math.isnan(value) else f"{value:.{digits}f}x"


def _plain(value, digits: int = 2) -> str:
    value = _num(value)
    return MISSING if math.isnan(value) else f"{value:.{digits}f}"


def format_metric_ci(metric, ci_low=None, ci_high=None, digits: int = 1) -> str:
    """'91.2 [90.1, 92.3]'; the interval is left out when either bound is missing."""
    value = _num(metric)
    if math.isnan(value):
        return MISSING
    low, high = _num(ci_low), _num(ci_high)
    if math.isnan(low) or math.isnan(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_lift(value, low=None, high=None, digits: int = 2) -> str:
    """'+2.31 [+0.80, +3.90]' (signed points); '' where the value is missing, the interval left
    out where either bound is."""
    value = _num(value)
    if math.isnan(value):
        return ""
    low, high = _num(low), _num(high)
    if math.isnan(low) or math.isnan(high):
        return f"{value:+.{digits}f}"
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _check_columns(frame: pd.DataFrame) -> None:
    missing = [c for c in FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise SkimbenchError(f"report frame lacks columns: {', '.join(missing)}")


def _single_task(frame_task: pd.DataFrame) -> str:
    _check_columns(frame_task)
    tasks = sorted({str(t) for t in frame_task["task"].dropna()})
    if len(tasks) > 1:
        raise SkimbenchError(f"expected the rows of one task, got {', '.join(tasks)}")
    return tasks[0] if tasks else ""


def _tasks(frame: pd.DataFrame) -> list[str]:
    _check_columns(frame)
    return sorted({str(t) for t in frame["task"].dropna()})


def _task_rows(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    return frame[frame["task"].astype(str) == task]


def _task_title(frame_task: pd.DataFrame, task: str) -> str:
    return _text(_first(frame_task["task_title"])) or task


def _main_metric(frame_task: pd.DataFrame) -> str:
    names = sorted({str(m) for m in frame_task["main_metric"].dropna()})
    return names[0] if len(names) == 1 else "metric"


def _runs(frame_task: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """(key, rows) per run, keyed by RUN_KEY; each padding mode at most once per run."""
    runs = []
    for key, rows in frame_task.groupby(list(RUN_KEY), dropna=False, sort=False):
        modes = rows["padding"].astype(str)
        repeated = sorted(set(modes[modes.duplicated()]))
        if repeated:
            raise SkimbenchError(
                f"run {key[0]!r} ({key[1]}, {key[2]}) has several rows for padding "
                f"{', '.join(repeated)}: labels must be unique per run within a task")
        runs.append((key, rows))
    return runs


def _run_flags(rows: pd.DataFrame) -> list[str]:
    flags = []
    if any(_flag(v) for v in rows["macs_mismatch"]):
        flags.append("macs_mismatch")
    if any(_flag(v) for v in rows["load_flagged"]):
        flags.append("load_flagged")
    if any(not _is_missing(v) and not bool(v) for v in rows["executed"]):
        flags.append("not_executed")
    return flags


def _markers(flags: Iterable[str]) -> str:
    return "".join(FLAGS[f][0] for f in flags)


def _is_baseline(method) -> bool:
    return _text(method) == BASELINE


# --------------------------------------------------------------------------------------------
# 1-2. tables

_NUMERIC_COLUMNS = (
    "run", "method", "backbone", "profile", "seed", "run_dir", "main_metric", "metric",
    "ci_low", "ci_high", *LIFTS["random"], *LIFTS["random-baseline"],
    "flops_speedup_none", "flops_speedup_batch", "flops_speedup_sequence",
    "padding_inflation", "cpu_time_speedup_none", "cpu_time_speedup_batch",
    "gpu_time_speedup_none", "gpu_time_speedup_batch", "oracle_speedup_none",
    "removal_efficiency_none", "removal_efficiency_batch", "peak_rss_mb", "cuda_peak_mb",
    "executed", "macs_mismatch",
    "load_flagged", "markers", "total_flops_speedup_none", "total_cpu_time_speedup_none",
    "notes",
)


def _numeric_table(frame_task: pd.DataFrame) -> pd.DataFrame:
    records = []
    for (label, backbone, profile), rows in _runs(frame_task):
        by_mode = {str(r["padding"]): r for _, r in rows.iterrows()}
        # The headline mode first: metric and CI come from `none` where present.
        ordered = [by_mode[m] for m in PADDING_MODES if m in by_mode]
        ordered += [r for m, r in by_mode.items() if m not in PADDING_MODES]

        def mode(name: str, column: str, by_mode=by_mode) -> float:
            return _num(by_mode[name][column]) if name in by_mode else math.nan

        def first(column: str, ordered=ordered):
            return _first(r[column] for r in ordered)

        inflation = _num(first("padding_inflation"))
        if math.isnan(inflation):
            seq, none = mode("sequence", "flops_speedup"), mode("none", "flops_speedup")
            inflation = seq / none if none and not math.isnan(none) else math.nan
        flags = _run_flags(rows)
        executed = None if all(_is_missing(v) for v in rows["executed"]) else \
            "not_executed" not in flags
        records.append({
            "run": _text(label), "method": _text(first("method")), "backbone": _text(backbone),
            "profile": _text(profile), "seed": _seed_text(first("seed")),
            "run_dir": _text(first("run_dir")), "main_metric": _text(first("main_metric")),
            "metric": _num(first("metric")), "ci_low": _num(first("ci_low")),
            "ci_high": _num(first("ci_high")),
            **{column: _num(first(column)) for columns in LIFTS.values() for column in columns},
            **{f"flops_speedup_{m}": mode(m, "flops_speedup") for m in
               ("none", "batch", "sequence")},
            "padding_inflation": inflation,
            "cpu_time_speedup_none": mode("none", "cpu_time_speedup"),
            "cpu_time_speedup_batch": mode("batch", "cpu_time_speedup"),
            "gpu_time_speedup_none": mode("none", "gpu_time_speedup"),
            "gpu_time_speedup_batch": mode("batch", "gpu_time_speedup"),
            "oracle_speedup_none": mode("none", "oracle_speedup"),
            "removal_efficiency_none": mode("none", "removal_efficiency"),
            "removal_efficiency_batch": mode("batch", "removal_efficiency"),
            "peak_rss_mb": _max(rows["peak_rss_mb"]),
            "cuda_peak_mb": _max(rows["cuda_peak_mb"]),
            "executed": executed,
            "macs_mismatch": "macs_mismatch" in flags,
            "load_flagged": "load_flagged" in flags,
            "markers": _markers(flags),
            "total_flops_speedup_none": mode("none", "total_flops_speedup"),
            "total_cpu_time_speedup_none": mode("none", "total_cpu_time_speedup"),
            "notes": _text(first("notes")) if "notes" in rows else "",
        })
    records.sort(key=lambda r: (not _is_baseline(r["method"]), _natural(r["run"]),
                                r["backbone"], r["profile"]))
    return pd.DataFrame.from_records(records, columns=list(_NUMERIC_COLUMNS))


def _display_columns(metric_name: str) -> list[str]:
    return ["run", "backbone", "profile", f"{metric_name} [95% CI]",
            "FLOPs speedup (none)", "FLOPs speedup (batch)", "FLOPs speedup (sequence)",
            "padding inflation", "CPU speedup bs1 (none)", "CPU speedup (batch)",
            "GPU speedup bs1 (none)", "GPU speedup (batch)", "oracle speedup (none)",
            "removal efficiency (none)", "removal efficiency (batch)", "peak RSS MB",
            "CUDA peak MB"]


def task_table(frame_task: pd.DataFrame, numeric: bool = False) -> pd.DataFrame:
    """One row per run (label, backbone, profile) of one task: baseline first, then by label.

    By default every cell is formatted text: metric with CI ("91.2 [90.1, 92.3]"), speedups
    with an `x` suffix, `n/a` where not measured; where any run has random controls, the lift
    over each after the metric ("+2.31 [+0.80, +3.90]", empty for a run without). Flagged
    runs carry a footnote marker after their label, and `table.attrs["footnotes"]` maps each
    marker used to its meaning.
    `numeric=True` gives the same rows with raw numbers (metric, CI bounds, one column per
    quantity and mode, the flags as booleans), as written to `<task>.csv`.
    """
    _single_task(frame_task)
    table = _numeric_table(frame_task)
    used = set("".join(table["markers"]))
    footnotes = {marker: meaning for marker, meaning in FLAGS.values() if marker in used}
    if numeric:
        table.attrs["footnotes"] = footnotes
        return table
    columns = _display_columns(_main_metric(frame_task))
    shown = pd.DataFrame({
        columns[0]: [f"{r} {m}" if m else r for r, m in zip(table["run"], table["markers"],
                                                            strict=True)],
        columns[1]: table["backbone"],
        columns[2]: table["profile"],
        columns[3]: [format_metric_ci(m, lo, hi) for m, lo, hi in
                     zip(table["metric"], table["ci_low"], table["ci_high"], strict=True)],
        columns[4]: table["flops_speedup_none"].map(_times),
        columns[5]: table["flops_speedup_batch"].map(_times),
        columns[6]: table["flops_speedup_sequence"].map(_times),
        columns[7]: table["padding_inflation"].map(_times),
        columns[8]: table["cpu_time_speedup_none"].map(_times),
        columns[9]: table["cpu_time_speedup_batch"].map(_times),
        columns[10]: table["gpu_time_speedup_none"].map(_times),
        columns[11]: table["gpu_time_speedup_batch"].map(_times),
        columns[12]: table["oracle_speedup_none"].map(_times),
        columns[13]: table["removal_efficiency_none"].map(_plain),
        columns[14]: table["removal_efficiency_batch"].map(_plain),
        columns[15]: table["peak_rss_mb"].map(lambda v: _plain(v, 0)),
        columns[16]: table["cuda_peak_mb"].map(lambda v: _plain(v, 0)),
    }, columns=columns)
    if table["total_flops_speedup_none"].notna().any():
        # a method with a cache (DeFormer): the cost with each cached entry built and shared
        # by the examples reading it, beside the online columns above
        shown.insert(5, "FLOPs speedup total (none)",
                     table["total_flops_speedup_none"].map(_times))
        shown.insert(10, "CPU speedup total bs1 (none)",
                     table["total_cpu_time_speedup_none"].map(_times))
    if any(table[columns[0]].notna().any() for columns in LIFTS.values()):
        # learned token removal against random removal at the same counts (skimbench.controls)
        for at, (control, columns) in enumerate(LIFTS.items(), start=4):
            shown.insert(at, f"lift over {control}",
                         [format_lift(*values) for values in
                          zip(*(table[c] for c in columns), strict=True)])
    shown.attrs["footnotes"] = footnotes
    return shown


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; text columns left-aligned, the rest right-aligned."""
    left = {"run", "backbone", "profile"}
    head = "| " + " | ".join(_md_cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join(":---" if c in left else "---:" for c in table.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "\u2020": r"$^{\dagger}$", "\u2021": r"$^{\ddagger}$", "\u00a7": r"\S{}",
    "\u2013": "--", "\u2014": "---", "\u00d7": r"$\times$", "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def latex_escape(text) -> str:
    """Escape LaTeX's special characters (and the footnote markers) in plain text."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in " ".join(str(text).splitlines()))
    # `\\` followed by `[` would read the cell as an optional argument of the row end.
    return "{}" + out if out.startswith("[") else out


def latex_table(table: pd.DataFrame, footnotes: dict[str, str] | None = None) -> str:
    """A self-contained `tabular` (no packages needed), footnotes after it."""
    left = {"run", "backbone", "profile"}
    spec = "".join("l" if c in left else "r" for c in table.columns)
    lines = ["% generated by skimbench report: do not edit",
             f"\\begin{{tabular}}{{{spec}}}", "\\hline",
             " & ".join(latex_escape(c) for c in table.columns) + " \\\\", "\\hline"]
    for row in table.itertuples(index=False):
        lines.append(" & ".join(latex_escape(v) for v in row) + " \\\\")
    lines += ["\\hline", "\\end{tabular}"]
    for marker, meaning in (footnotes or {}).items():
        lines.append(f"\\par\\noindent{{\\footnotesize {latex_escape(marker)} "
                     f"{latex_escape(meaning)}}}")
    return "\n".join(lines) + "\n"


def _latency_floors(frame_task: pd.DataFrame) -> list[str]:
    notes = []
    for backbone, rows in frame_task.groupby("backbone", dropna=False, sort=True):
        parts = []
        for mode in PADDING_MODES:
            value = _num(_first(rows.loc[rows["padding"].astype(str) == mode,
                                         "latency_floor_ms"]))
            if not math.isnan(value):
                parts.append(f"{value:.1f} ms ({mode})")
        if parts:
            notes.append(f"`{_text(backbone)}`: {', '.join(parts)}")
    return notes


def published_baselines(papers: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The papers' own baseline figures for one data set (paper-numbers.csv rows)."""
    rows = papers[(papers["method"] == "baseline") & (papers["dataset"] == dataset)
                  & (papers["metric"].str.lower() != "speedup")]
    return rows[["paper", "table", "backbone", "metric", "value", "split"]].fillna("")


PAPER_BASELINES = ("baseline", "baseline (no skimming)")
WITHIN_POINTS = 1.0  # the operating point compared with a paper: within this of our baseline
PAPER_COLUMNS = ("paper figure", "paper backbone", "padding", "paper metric (vs its baseline)",
                 "paper speedup", "our run", "our metric (vs our baseline)",
                 "our FLOPs speedup", "ours / paper speedup")


def _signed(value: float) -> str:
    return MISSING if math.isnan(value) else f"{value:+.1f}"


def _our_point(table: pd.DataFrame, method: str, mode: str) -> pd.Series | None:
    """Our run of `method` to set beside a paper's: the one with the highest FLOPs speedup in
    `mode` among those within WITHIN_POINTS of our baseline, else the most accurate."""
    runs = table[table["method"] == method]
    base = table[table["method"].map(_is_baseline)]
    if runs.empty:
        return None
    speed = f"flops_speedup_{mode}"
    if not base.empty:
        close = runs[runs["metric"] >= float(base["metric"].iloc[0]) - WITHIN_POINTS]
        if not close.empty:
            return close.loc[close[speed].astype(float).idxmax()]
    return runs.loc[runs["metric"].astype(float).idxmax()]


def _paper_metric(papers: pd.DataFrame, metric: pd.Series, dataset: str) -> tuple[str, float]:
    """A paper's metric cell and its difference from that paper's own baseline (same table,
    backbone and metric), NaN when the table has no row named baseline."""
    their_base = papers[(papers["paper"] == metric["paper"])
                        & (papers["table"] == metric["table"])
                        & (papers["backbone"] == metric["backbone"])
                        & (papers["dataset"] == dataset)
                        & papers["method"].isin(PAPER_BASELINES)
                        & (papers["metric"] == metric["metric"])]
    drop = math.nan
    if not their_base.empty:
        drop = (pd.to_numeric(metric["value"], errors="coerce")
                - pd.to_numeric(their_base["value"].iloc[0], errors="coerce"))
    return f"{metric['metric']} {metric['value']} ({_signed(drop)})", drop


def paper_comparison(frame_task: pd.DataFrame, papers: pd.DataFrame, dataset: str,
                     paper_names: dict[str, tuple[str, ...]]) -> pd.DataFrame:
    """The paper-table re-make: each figure a paper reports for a method we ran on this data
    set, its speedup (or `not reported`) and its metric with the drop from its own baseline,
    beside our run's (same padding mode; our FLOPs speedup whatever the paper's speedup kind,
    which the cell names). A figure without a speedup gives one row per paper table, on the
    paper's metric named like ours where it has one."""
    table = _numeric_table(frame_task)
    base = table[table["method"].map(_is_baseline)]
    our_base = float(base["metric"].iloc[0]) if not base.empty else math.nan
    main = _main_metric(frame_task).lower()
    group = ["paper", "table", "backbone", "method", "padding"]
    rows = []
    for method, names in paper_names.items():
        if method not in set(table["method"]):
            continue
        mine = papers[(papers["dataset"] == dataset) & papers["method"].isin(names)]
        for _, figures in mine.groupby(group, dropna=False, sort=False):
            speeds = figures[figures["metric"].str.lower() == "speedup"]
            metrics = figures[figures["metric"].str.lower() != "speedup"]
            named = metrics[metrics["metric"].str.lower() == main]
            metric = (named if not named.empty else metrics).head(1)
            for _, speed in (speeds.iterrows() if not speeds.empty
                             else metric.iterrows()):
                rows.append(_comparison_row(papers, table, dataset, method, our_base, speed,
                                            None if metric.empty else metric.iloc[0],
                                            has_speed=not speeds.empty))
    return pd.DataFrame(rows, columns=list(PAPER_COLUMNS))


def _comparison_row(papers: pd.DataFrame, table: pd.DataFrame, dataset: str, method: str,
                    our_base: float, figure: pd.Series, metric: pd.Series | None,
                    has_speed: bool) -> dict:
    metric_text = MISSING if metric is None else _paper_metric(papers, metric, dataset)[0]
    mode = figure["padding"] if figure["padding"] in PADDING_MODES else "none"
    ours = _our_point(table, method, mode)
    paper_speed = pd.to_numeric(figure["value"], errors="coerce") if has_speed else math.nan
    our_speed = _num(ours[f"flops_speedup_{mode}"]) if ours is not None else math.nan
    return {
        PAPER_COLUMNS[0]: f"{figure['paper']} {figure['table']}: {figure['method']}",
        PAPER_COLUMNS[1]: _text(figure["backbone"]),
        PAPER_COLUMNS[2]: f"{figure['padding']}" + ("" if mode == figure["padding"]
                                                    else " (ours: none)"),
        PAPER_COLUMNS[3]: metric_text,
        PAPER_COLUMNS[4]: (f"{_times(paper_speed)} ({_text(figure['speedup_kind'])})"
                           if has_speed else "not reported"),
        PAPER_COLUMNS[5]: _text(ours["run"]) if ours is not None else MISSING,
        PAPER_COLUMNS[6]: (f"{_plain(ours['metric'], 1)} "
                           f"({_signed(_num(ours['metric']) - our_base)})"
                           if ours is not None else MISSING),
        PAPER_COLUMNS[7]: _times(our_speed),
        PAPER_COLUMNS[8]: _times(our_speed / paper_speed) if has_speed else MISSING,
    }


def _task_markdown(frame_task: pd.DataFrame, task: str, table: pd.DataFrame,
                   published: pd.DataFrame | None = None,
                   compared: pd.DataFrame | None = None) -> str:
    numeric = _numeric_table(frame_task)
    title = _task_title(frame_task, task)
    backbones = sorted(set(numeric["backbone"]))
    profiles = sorted(set(numeric["profile"]))
    seeds = sorted(set(numeric["seed"]) - {""}, key=lambda s: (len(s), s))
    lines = [
        f"# {title} (`{task}`): methods compared", "",
        f"Backbone: {', '.join(f'`{b}`' for b in backbones) or MISSING}; "
        f"profile: {', '.join(f'`{p}`' for p in profiles) or MISSING}; "
        f"seeds: {', '.join(seeds) or MISSING}; runs: {len(numeric)}.",
        f"Metric: {_main_metric(frame_task)} in points, with its bootstrap 95% interval.", "",
        markdown_table(table), "",
    ]
    footnotes = table.attrs.get("footnotes", {})
    if footnotes:
        lines += [f"{marker} {meaning}  " for marker, meaning in footnotes.items()]
        lines[-1] = lines[-1].rstrip()
        lines.append("")
    lines += [
        "Notes:", "",
        f"- {SPEEDUP_NOTE}",
        f"- {MACS_NOTE}",
        "- Padding modes (DESIGN 3): `none` = no pad token computed (batch 1, the headline); "
        "`batch` = padded to the longest example of each batch; `sequence` = padded to the "
        "task's max length. Padding inflation = FLOPs speedup (sequence) / FLOPs speedup "
        "(none): the share of a speedup that comes from not computing pad tokens.",
        "- CPU speedup bs1 (none) = batch-1 latency, CPU speedup (batch) = throughput at the "
        "configured batch; both measured A/B interleaved with the baseline, ratio of medians. "
        "Oracle speedup = the method's token schedule replayed through the plain encoder; "
        "removal efficiency = CPU speedup / oracle speedup (DESIGN 4.4).",
        f"- `{MISSING}` = not measured.",
    ]
    if any(str(c).startswith("lift over ") for c in table.columns):
        lines.append(f"- {LIFT_NOTE}")
    noted = [(run, note) for run, note in zip(numeric["run"], numeric["notes"], strict=True)
             if note]
    if noted:
        lines.append("- Run caveats (recorded by the method): " + "; ".join(
            f"`{run}`: {note}" for run, note in noted) + ".")
    floors = _latency_floors(frame_task)
    if floors:
        lines.append("- Fitted latency floor t0 of the backbone (time that no token removal "
                     "can save, DESIGN 4.4): " + "; ".join(floors) + ".")
    if compared is not None and len(compared):
        lines += ["", "## Paper figures beside ours", "",
                  "Each speedup a paper reports for a method run here, on this data set "
                  "(`paper-numbers.csv`; a table that reports accuracy only gives one row with "
                  "its speedup `not reported`), with the paper's metric and its difference from that "
                  "paper's own baseline, beside our run in the same padding mode (`unknown` is "
                  f"set beside our `none`). Our run is the one with the highest FLOPs speedup "
                  f"within {WITHIN_POINTS:g} point of our baseline (the most accurate when none "
                  "is), and its difference is from our baseline. The papers mostly use "
                  "BERT-base at their own lengths and report some speedups as wall-clock "
                  "times (the kind is named); ours are FLOPs on this report's backbone, so the "
                  "last column says how much of the paper's saving our protocol measures, not "
                  "a like-for-like ratio.", "", markdown_table(compared)]
    if published is not None and len(published):
        lines += ["", "## Published baseline figures", "",
                  "The papers' own baselines for this data set (`paper-numbers.csv`). They are "
                  "mostly BERT-base on the papers' splits: a MiniLM run above is not comparable "
                  "with them; a method's paper-table re-make puts paper and ours side by side.",
                  "", markdown_table(published)]
    return "\n".join(lines) + "\n"


def write_task_tables(frame: pd.DataFrame, out_dir,
                      published: dict[str, pd.DataFrame] | None = None,
                      compared: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """Write `<task>.md`, `<task>.csv` (raw numbers) and `<task>.tex` per task; their paths."""
    out_dir = Path(out_dir)
    written = []
    for task in _tasks(frame):
        rows = _task_rows(frame, task)
        table = task_table(rows)
        md, csv, tex = (out_dir / f"{task}.{ext}" for ext in ("md", "csv", "tex"))
        write_atomic(md, _task_markdown(rows, task, table, (published or {}).get(task),
                                        (compared or {}).get(task)))
        write_atomic(csv, task_table(rows, numeric=True).to_csv(index=False))
        write_atomic(tex, latex_table(table, table.attrs.get("footnotes")))
        written += [md, csv, tex]
    return written


# --------------------------------------------------------------------------------------------
# 3-4. Pareto frontier and plots


def pareto_points(frame_task: pd.DataFrame, padding: str,
                  speedup_column: str = "flops_speedup") -> pd.DataFrame:
    """One point per run measured in `padding`: columns label, method, backbone, profile, kind
    ('baseline', 'simple' or 'method'), markers, metric, ci_low, ci_high, speedup and
    random_metric (the run's random control, NaN without one). Rows without a finite metric or
    a positive speedup are left out."""
    _single_task(frame_task)
    if speedup_column not in frame_task.columns:
        raise SkimbenchError(f"no column {speedup_column!r} in the report frame")
    records = []
    for (label, backbone, profile), rows in _runs(frame_task):
        here = rows[rows["padding"].astype(str) == padding]
        if here.empty:
            continue
        row = here.iloc[0]
        metric, speedup = _num(row["metric"]), _num(row[speedup_column])
        if not (math.isfinite(metric) and math.isfinite(speedup) and speedup > 0):
            continue
        method = _text(row["method"])
        kind = ("baseline" if method == BASELINE else
                "simple" if method in SIMPLE_BASELINES else "method")
        records.append({
            "label": _text(label), "method": method, "backbone": _text(backbone),
            "profile": _text(profile), "kind": kind, "markers": _markers(_run_flags(rows)),
            "metric": metric, "ci_low": _num(row["ci_low"]), "ci_high": _num(row["ci_high"]),
            "speedup": speedup, "random_metric": _num(row["random_metric"]),
        })
    columns = ["label", "method", "backbone", "profile", "kind", "markers", "metric", "ci_low",
               "ci_high", "speedup", "random_metric"]
    points = pd.DataFrame.from_records(records, columns=columns)
    return points.astype({"metric": float, "ci_low": float, "ci_high": float, "speedup": float,
                          "random_metric": float})


def pareto_frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The points no other point dominates (higher metric and higher speedup are better; to
    dominate, a point must be at least as good in both and better in one). Identical points
    do not dominate each other, so all of them stay. Sorted by speedup, then metric (desc)."""
    if points.empty:
        return points.iloc[0:0].reset_index(drop=True)
    metric = points["metric"].to_numpy(dtype=float)
    speedup = points["speedup"].to_numpy(dtype=float)
    at_least = (metric[:, None] >= metric[None, :]) & (speedup[:, None] >= speedup[None, :])
    better = (metric[:, None] > metric[None, :]) | (speedup[:, None] > speedup[None, :])
    dominated = (at_least & better).any(axis=0)  # column j: some row i dominates j
    frontier = points[~dominated]
    order = np.lexsort((-frontier["metric"].to_numpy(dtype=float),
                        frontier["speedup"].to_numpy(dtype=float)))
    return frontier.iloc[order].reset_index(drop=True)


CONTROL_PADDING = "none"  # the padding mode the random controls are measured in
_PANELS = (("none", "padding none: no pad token computed"),
           ("sequence", "padding sequence: padded to the task's max length"))
MAX_LABELLED = 10  # points per panel that all get a label
_METHOD_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">")
_SIMPLE_MARKERS = {"truncate": "o", "layerdrop": "s", "topk-cls": "^"}
_NEUTRAL = "#7f7f7f"
_LOG_TICKS = tuple(m * 10.0 ** e for e in range(-2, 4) for m in (1, 1.5, 2, 3, 5, 7))
_LABEL_OFFSETS = ((6, 4, "left", "bottom"), (6, -4, "left", "top"),
                  (-6, 4, "right", "bottom"), (-6, -4, "right", "top"),
                  (0, 9, "center", "bottom"), (0, -9, "center", "top"),
                  (10, 14, "left", "bottom"), (10, -14, "left", "top"),
                  (-10, 14, "right", "bottom"), (-10, -14, "right", "top"),
                  (0, 22, "center", "bottom"), (0, -22, "center", "top"))


def _styles(methods: Iterable[str]) -> dict[str, dict]:
    """Marker style per method, the same in both panels."""
    styles = {BASELINE: dict(marker="*", s=220, facecolor="black", edgecolor="black",
                             label="baseline", zorder=5)}
    for method in SIMPLE_BASELINES:
        styles[method] = dict(marker=_SIMPLE_MARKERS[method], s=55, facecolor="white",
                              edgecolor=_NEUTRAL, linewidths=1.4, label=f"{method} (simple)",
                              zorder=3)
    others = sorted(set(methods) - set(styles))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
              "#17becf", "#bcbd22"]
    for i, method in enumerate(others):
        color = colors[i % len(colors)]
        styles[method] = dict(marker=_METHOD_MARKERS[i % len(_METHOD_MARKERS)], s=60,
                              facecolor=color, edgecolor=color, label=method, zorder=4)
    return styles


def _place_labels(ax, renderer, points: pd.DataFrame, texts: list[str],
                  obstacles: np.ndarray | None = None) -> None:
    """Label each marker at the first nearby offset that overlaps no label or marker placed so
    far (nor an unlabelled marker at data coordinates `obstacles`, (n, 2)) and stays inside the
    axes (else at the offset with the fewest overlaps)."""
    from matplotlib.transforms import Bbox

    frame_box = ax.get_window_extent(renderer)
    xy = ax.transData.transform(points[["speedup", "metric"]].to_numpy(dtype=float))
    scale = renderer.points_to_pixels(1.0)
    taken = [Bbox.from_bounds(x - 6 * scale, y - 6 * scale, 12 * scale, 12 * scale)
             for x, y in xy]
    if obstacles is not None and len(obstacles):
        taken += [Bbox.from_bounds(x - 6 * scale, y - 6 * scale, 12 * scale, 12 * scale)
                  for x, y in ax.transData.transform(obstacles)]
    for (x, y), text, (px, py) in zip(points[["speedup", "metric"]].to_numpy(dtype=float),
                                      texts, xy, strict=True):
        own = Bbox.from_bounds(px - 6 * scale, py - 6 * scale, 12 * scale, 12 * scale)
        others = [b for b in taken if b is not own and not np.allclose(b.bounds, own.bounds)]
        best = None
        for dx, dy, ha, va in _LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=8, zorder=6, annotation_clip=False,
                               bbox=dict(boxstyle="square,pad=0.1", facecolor="white",
                                         edgecolor="none", alpha=0.75))
            box = note.get_window_extent(renderer)
            inside = (box.x0 >= frame_box.x0 and box.x1 <= frame_box.x1
                      and box.y0 >= frame_box.y0 and box.y1 <= frame_box.y1)
            clashes = sum(box.overlaps(b) for b in others) + (0 if inside else 100)
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, note, box)
            else:
                note.remove()
            if clashes == 0:
                break
        taken.append(best[2])


def _control_points(points: pd.DataFrame) -> pd.DataFrame:
    """The runs of a panel that have a random control (finite `random_metric`)."""
    if "random_metric" not in points:
        return points.iloc[0:0]
    return points[np.isfinite(points["random_metric"].to_numpy(dtype=float))]


def _draw_controls(ax, points: pd.DataFrame, styles: dict) -> np.ndarray:
    """Each run's random control as a hollow marker in the run's colour and shape, at the
    run's speedup (same MACs), dotted to the run's own marker; the controls' (x, y)."""
    controls = _control_points(points)
    for method, rows in controls.groupby("method", sort=True):
        style = styles[method]
        # a run drawn hollow itself (the simple baselines) gets a dashed outline for its control
        hollow = style["facecolor"] != style["edgecolor"]
        ax.vlines(rows["speedup"], rows["random_metric"], rows["metric"],
                  color=style["edgecolor"], linewidth=0.9, linestyle=":", zorder=2)
        ax.scatter(rows["speedup"], rows["random_metric"], marker=style["marker"],
                   s=style["s"] * (1.4 if hollow else 1.0), facecolors="none",
                   edgecolors=style["edgecolor"], linewidths=1.4,
                   linestyles=(0, (2, 1)) if hollow else "solid", zorder=style["zorder"])
    return controls[["speedup", "random_metric"]].to_numpy(dtype=float)


def _draw_panel(ax, renderer, points: pd.DataFrame, styles: dict, mode: str, title: str,
                kind: str, controls: bool = False) -> None:
    """One panel; `controls`: also draw each run's random control (see _draw_controls)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"{kind} vs baseline, padding {mode}")
    ax.grid(True, which="major", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    if points.empty:
        ax.text(0.5, 0.5, f"no runs measured in padding mode '{mode}'", ha="center",
                va="center", transform=ax.transAxes, fontsize=10, color=_NEUTRAL)
        ax.set_xticks([])
        return
    speedup = points["speedup"].to_numpy(dtype=float)
    low, high = float(min(speedup.min(), 1.0)), float(max(speedup.max(), 1.0))
    if high / low > 4:
        ax.set_xscale("log")
        pad = (high / low) ** 0.08
        ax.set_xlim(low / pad, high * pad)
        ticks = [t for t in _LOG_TICKS if low / pad <= t <= high * pad]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = max((high - low) * 0.12, 0.08)
        ax.set_xlim(low - pad, high + pad)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="#bbbbbb", linewidth=0.8, linestyle=":", zorder=1)

    has_ci = points["ci_low"].notna() & points["ci_high"].notna()
    if has_ci.any():
        sub = points[has_ci]
        ax.vlines(sub["speedup"], sub["ci_low"], sub["ci_high"], color="#c8c8c8",
                  linewidth=1.2, zorder=2)
    frontier = pareto_frontier(points)
    if len(frontier) > 0:
        ax.step(frontier["speedup"], frontier["metric"], where="pre", color="#444444",
                linewidth=1.1, linestyle="--", zorder=2)
    for method, rows in points.groupby("method", sort=True):
        style = dict(styles[method])
        style.pop("label")
        ax.scatter(rows["speedup"], rows["metric"], **style)
    obstacles = _draw_controls(ax, points, styles) if controls else None
    many = points["backbone"].nunique() > 1 or points["profile"].nunique() > 1
    # a crowded panel names only its frontier and the baseline; the table names the rest
    named = points if len(points) <= MAX_LABELLED else points[
        points["label"].isin(frontier["label"]) | points["method"].map(_is_baseline)]
    texts = [f"{r.label}{' ' + r.markers if r.markers else ''}"
             f"{f' ({r.backbone}, {r.profile})' if many else ''}"
             for r in named.itertuples(index=False)]
    _place_labels(ax, renderer, named, texts, obstacles)


def _pareto_figure(frame_task: pd.DataFrame, task: str, speedup_column: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    kind = SPEEDUP_KINDS.get(speedup_column, speedup_column.replace("_", " "))
    panels = [(mode, title, pareto_points(frame_task, mode, speedup_column))
              for mode, title in _PANELS]
    # the random controls are measured without padding and not timed: drawn in the `none`
    # panel of a FLOPs plot only, at their run's speedup (the control has the run's MACs)
    with_controls = {mode: speedup_column == "flops_speedup" and mode == CONTROL_PADDING
                     and not _control_points(points).empty for mode, _, points in panels}
    styles = _styles(set().union(*(set(p["method"]) for _, _, p in panels)))
    fig = Figure(figsize=(12, 5.6))
    canvas = FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.84, bottom=0.2, wspace=0.12)
    axes = fig.subplots(1, 2, sharey=True)
    metric_name = _main_metric(frame_task)
    axes[0].set_ylabel(f"{metric_name} (points)")
    # one y-range for both panels, from every point and CI bound, with room for labels
    values = [v for mode, _, p in panels
              for c in ("metric", "ci_low", "ci_high", "random_metric")
              if c != "random_metric" or with_controls[mode]
              for v in p[c].to_numpy(dtype=float) if math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.12, 0.5)
        axes[0].set_ylim(lo - pad, hi + pad)
    renderer = canvas.get_renderer()
    for ax, (mode, title, points) in zip(axes, panels, strict=True):
        _draw_panel(ax, renderer, points, styles, mode, title, kind, with_controls[mode])
    numeric = _numeric_table(frame_task)
    fig.suptitle(f"{_task_title(frame_task, task)}: {metric_name} vs {kind}", fontsize=13)
    subtitle = (f"backbone {', '.join(sorted(set(numeric['backbone'])))}; profile "
                f"{', '.join(sorted(set(numeric['profile'])))}; dashed step = Pareto frontier; "
                "grey bars = bootstrap 95% CI"
                + ("; hollow = random removal at the run's own counts, dotted to its run"
                   if any(with_controls.values()) else "")
                + (f"; panels with more than {MAX_LABELLED} runs name the frontier only"
                   if any(len(p) > MAX_LABELLED for _, _, p in panels) else ""))
    fig.text(0.5, 0.94, "\n".join(textwrap.wrap(subtitle, 150)), ha="center", va="top",
             fontsize=9, color="#555555")
    used = [m for m in styles if any(m in set(p["method"]) for _, _, p in panels)]
    handles = []
    for method in used:
        style = styles[method]
        handles.append(Line2D([], [], linestyle="none", marker=style["marker"],
                              markersize=13 if method == BASELINE else 7,
                              markerfacecolor=style["facecolor"],
                              markeredgecolor=style["edgecolor"], label=style["label"]))
    if any(with_controls.values()):
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=7,
                              markerfacecolor="none", markeredgecolor="#444444",
                              markeredgewidth=1.4, label="random control (hollow)"))
    handles.append(Line2D([], [], color="#444444", linestyle="--", label="Pareto frontier"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.035),
               ncol=min(len(handles), 6), frameon=False, fontsize=9)
    flagged = sorted({m for _, _, p in panels for ms in p["markers"] for m in ms})
    if flagged:
        notes = {marker: meaning for marker, meaning in FLAGS.values()}
        fig.text(0.5, 0.012, "   ".join(f"{m} {notes[m].split(':')[0]}" for m in flagged),
                 ha="center", fontsize=8, color="#555555")
    return fig


def _pareto_stem(task: str, speedup_column: str) -> str:
    if speedup_column == "flops_speedup":
        return f"pareto-{task}"
    return f"pareto-{task}-{speedup_column.removesuffix('_speedup').replace('_', '-')}"


def write_pareto(frame: pd.DataFrame, out_dir, speedup_column: str = "flops_speedup"
                 ) -> list[Path]:
    """Per task one figure, panels `none` (left) and `sequence` (right): metric vs speedup, one
    labelled marker per run, the frontier as a dashed step. Saved as `pareto-<task>.png` and
    `.svg` (for another speedup column: `pareto-<task>-<kind>.*`, e.g. `-cpu-time`)."""
    import matplotlib

    out_dir = Path(out_dir)
    written = []
    # Reproducible SVGs: fixed ids, no date.
    with matplotlib.rc_context({"svg.hashsalt": "skimbench", "font.size": 10}):
        for task in _tasks(frame):
            fig = _pareto_figure(_task_rows(frame, task), task, speedup_column)
            written += _save_figure(fig, out_dir, _pareto_stem(task, speedup_column))
    return written


def _save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """`stem`.png and `stem`.svg, reproducible (fixed svg ids, no dates), written atomically."""
    written = []
    for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150, metadata=metadata)
        path = out_dir / f"{stem}.{ext}"
        write_atomic(path, buffer.getvalue())
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# 4b. predictor diagnostics

_IMPORTANT_COLOR, _OTHER_COLOR = "#d62728", "#1f77b4"
MAX_HISTOGRAM_COLUMNS = 3


def default_diagnostics_run(runs: list[dict]) -> dict:
    """The run whose histograms a diagnostics figure shows: the method's default-setting run
    (fewest method settings set off their defaults), the first by label among equals."""
    return min(runs, key=lambda r: (r.get("overrides", 0), _natural(str(r["label"]))))


def _auc_panel(ax, runs: list[dict], many: bool) -> None:
    layers = sorted({row["layer"] for r in runs for row in r["diagnostics"]["layers"]})
    for run in runs:
        rows = sorted(run["diagnostics"]["layers"], key=lambda row: row["layer"])
        ax.plot([row["layer"] for row in rows], [_num(row["auc"]) for row in rows], marker="o",
                markersize=4, linewidth=1.3,
                label=run["label"] + (f" ({run['backbone']}, {run['profile']})" if many else ""))
    ax.axhline(0.5, color="#888888", linestyle="--", linewidth=1.0, label="chance (AUC 0.5)")
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(layers)
    if layers:
        ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.set_xlabel("layer the keep decision is made at")
    ax.set_ylabel("ROC AUC of the keep scores")
    ax.set_title("keep-score AUC by layer, per run", fontsize=10)
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(fontsize=7, loc="lower left", frameon=False)


def _histogram_panel(ax, row: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    edges = np.asarray(row["edges"], dtype=float)
    for name, color, style in (("important", _IMPORTANT_COLOR, "-"),
                               ("other", _OTHER_COLOR, "--")):
        counts = np.asarray(row[f"{name}_hist"], dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        ax.stairs(share, edges, color=color, linestyle=style, linewidth=1.3,
                  label=f"{name} (n={row[name]})")
    auc = _num(row.get("auc"))
    ax.set_title(f"layer {row['layer']}: AUC " + ("n/a" if math.isnan(auc) else f"{auc:.3f}"),
                 fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    # keep scores often sit in a narrow band (sigmoids near 1): plain ticks, no offset text
    # that would collide with the axis label
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.tick_params(labelsize=7)
    ax.grid(True, color="#eeeeee", linewidth=0.6)


def _diagnostics_figure(runs: list[dict], task: str, method: str):

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    default = default_diagnostics_run(runs)
    layers = sorted(default["diagnostics"]["layers"], key=lambda row: row["layer"])
    columns = max(1, min(MAX_HISTOGRAM_COLUMNS, len(layers)))
    rows = max(1, math.ceil(len(layers) / columns))
    width, height = 5.5 + 3.0 * columns, max(4.4, 2.3 * rows + 2.0)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 1 + columns, width_ratios=[1.9] + [1] * columns,
                            left=0.6 / width, right=1 - 0.2 / width, top=1 - 1.15 / height,
                            bottom=1.0 / height, wspace=0.3, hspace=0.6)
    many = len({(r["backbone"], r["profile"]) for r in runs}) > 1
    _auc_panel(fig.add_subplot(grid[:, 0]), runs, many)
    for i, row in enumerate(layers):
        ax = fig.add_subplot(grid[i // columns, 1 + i % columns])
        _histogram_panel(ax, row)
        if i + columns >= len(layers):  # the lowest panel of its column
            ax.set_xlabel("keep score", fontsize=8)
        if i % columns == 0:
            ax.set_ylabel("share of the class", fontsize=8)
    if not layers:
        ax = fig.add_subplot(grid[0, 1:])
        ax.axis("off")
        ax.text(0.5, 0.5, "no decision layer scored", ha="center", va="center")
    title = _text(default.get("task_title")) or task
    fig.suptitle(f"{title}: {method}, does the predictor keep what matters?", fontsize=12,
                 y=1 - 0.12 / height, va="top")
    note = (f"Reference of what matters: {default['diagnostics'].get('reference', MISSING)} "
            f"(padding {default['diagnostics'].get('padding', MISSING)}). Right: keep-score "
            f"histograms per decision layer of run '{default['label']}', as the share of each "
            "class.")
    fig.text(0.5, 1 - 0.45 / height, "\n".join(textwrap.wrap(note, int(width * 15))),
             ha="center", va="top", fontsize=8.5, color="#555555")
    fig.legend(handles=[Line2D([], [], color=_IMPORTANT_COLOR, linestyle="-",
                               label="important (the reference keeps it)"),
                        Line2D([], [], color=_OTHER_COLOR, linestyle="--", label="other")],
               loc="lower center", bbox_to_anchor=(0.5, 0.0),
               ncol=2, frameon=False, fontsize=8)
    return fig


def diagnostics_stem(task: str, method: str) -> str:
    return f"diagnostics-{task}-{method}"


def write_diagnostics(entries: list[dict], out_dir) -> list[Path]:
    """Per task and method with predictor diagnostics, one figure: left the keep-score ROC AUC
    by layer (one line per run, chance dashed), right the default-setting run's keep-score
    histograms of both classes (important vs other) per decision layer. `entries`: one dict
    per run with task, method, label, backbone, profile, overrides (method settings off their
    defaults) and the record's `diagnostics` (report.records_diagnostics). Saved as
    `diagnostics-<task>-<method>.png` and `.svg`."""
    import matplotlib

    out_dir = Path(out_dir)
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:
        if (entry.get("diagnostics") or {}).get("layers"):
            groups.setdefault((str(entry["task"]), str(entry["method"])), []).append(entry)
    written = []
    with matplotlib.rc_context({"svg.hashsalt": "skimbench", "font.size": 10}):
        for (task, method), runs in sorted(groups.items()):
            runs = sorted(runs, key=lambda r: _natural(str(r["label"])))
            written += _save_figure(_diagnostics_figure(runs, task, method), out_dir,
                                    diagnostics_stem(task, method))
    return written


# --------------------------------------------------------------------------------------------
# 5. the papers' numbers


def paper_numbers() -> pd.DataFrame:
    """The papers' reported numbers (package data `skimbench/data/paper-numbers.csv`, a copy of
    shared/docs/paper-numbers.csv), one row per number, with the CSV's columns. Every column
    is text as written (`value` holds entries like 'OOM'; convert with
    `pandas.to_numeric(..., errors="coerce")`); empty fields are missing (NaN)."""
    source = resources.files("skimbench").joinpath("data", "paper-numbers.csv")
    with source.open("rb") as handle:
        return pd.read_csv(handle, dtype=str, keep_default_na=False, na_values=[""])


# --------------------------------------------------------------------------------------------
# 6. index


def _link(path: Path, out_dir: Path) -> str:
    rel = Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
    target = f"<{rel}>" if any(c in rel for c in " ()") else rel
    return f"[{Path(path).name}]({target})"


def _belongs(path: Path, task: str) -> bool:
    name = Path(path).name
    return Path(path).stem == task or name.startswith(f"pareto-{task}.") or \
        name.startswith(f"pareto-{task}-") or name.startswith(f"diagnostics-{task}-")


def write_index(out_dir, files: list[Path], frame: pd.DataFrame) -> Path:
    """Write `<out_dir>/README.md`: every table and plot linked (relative links), per task the
    runs behind it, and the profile(s) that produced the report. Returns its path."""
    out_dir = Path(out_dir)
    index = out_dir / "README.md"
    files = [Path(f) for f in files]  # as written: absolute, or relative to the working dir
    files = [f for f in files if f.resolve() != index.resolve()]
    tasks = _tasks(frame)
    profiles = frame["profile"].dropna().astype(str)
    counts = {p: 0 for p in sorted(set(profiles))}
    for task in tasks:
        for (_, _, profile), _rows in _runs(_task_rows(frame, task)):
            if _text(profile) in counts:
                counts[_text(profile)] += 1
    lines = ["# skimbench reports", "",
             "Generated by `skimbench report` from the finished run records; do not edit by "
             "hand.", ""]
    if counts:
        described = [f"`{p}` ({n} run{'s' if n != 1 else ''}; "
                     f"{PROFILE_NOTES.get(p, 'custom profile')})" for p, n in counts.items()]
        lines.append(f"Produced by profile{'s' if len(counts) > 1 else ''}: "
                     + "; ".join(described) + ".")
        if len(counts) > 1:
            lines.append("Runs of different profiles are not comparable with each other: "
                         "each table names the profile of every row.")
    else:
        lines.append("No finished runs were found.")
    lines += ["", f"{SPEEDUP_NOTE} {MACS_NOTE}", ""]

    listed: set[Path] = set()
    for task in tasks:
        rows = _task_rows(frame, task)
        mine = [f for f in files if _belongs(f, task)]
        listed.update(mine)
        lines += [f"## {_task_title(rows, task)} (`{task}`)", ""]
        tables = [f for f in mine if f.suffix in (".md", ".csv", ".tex")]
        figures = [f for f in mine if f.suffix in (".png", ".svg", ".pdf")]
        plots = [f for f in figures if not f.name.startswith("diagnostics-")]
        diagnostics = [f for f in figures if f.name.startswith("diagnostics-")]
        if tables:
            lines.append("Tables: " + ", ".join(_link(f, out_dir) for f in tables))
        if plots:
            lines.append("Pareto plots: " + ", ".join(_link(f, out_dir) for f in plots))
        if diagnostics:
            lines.append("Predictor diagnostics (keep-score AUC by layer and score histograms "
                         "against what matters): "
                         + ", ".join(_link(f, out_dir) for f in diagnostics))
        rest = [f for f in mine if f not in tables and f not in figures]
        if rest:
            lines.append("Other: " + ", ".join(_link(f, out_dir) for f in rest))
        if not mine:
            lines.append("No files were written for this task.")
        numeric = _numeric_table(rows)
        lines += ["", "Runs:", "",
                  "| run | method | profile | backbone | seed | run dir |",
                  "|:---|:---|:---|:---|---:|:---|"]
        for r in numeric.itertuples(index=False):
            run_dir = f"`{r.run_dir}`" if r.run_dir else MISSING
            lines.append("| " + " | ".join(_md_cell(v) for v in (
                f"{r.run} {r.markers}".strip(), r.method, r.profile, r.backbone,
                r.seed or MISSING, run_dir)) + " |")
        footnotes = task_table(rows).attrs["footnotes"]
        if footnotes:
            lines += [""] + [f"{marker} {meaning}  " for marker, meaning in footnotes.items()]
            lines[-1] = lines[-1].rstrip()
        lines.append("")
    other = [f for f in files if f not in listed]
    if other:
        lines += ["## Other files", ""]
        lines += [f"- {_link(f, out_dir)}" for f in other]
        lines.append("")
    write_atomic(index, "\n".join(lines).rstrip("\n") + "\n")
    return index
