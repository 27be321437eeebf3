"""`skimbench report` (DESIGN 7): every finished record -> one frame -> tables, plots, index."""

from __future__ import annotations

import json
from pathlib import Path

from skimbench.errors import UsageError
from skimbench.records import read_json, status_of
from skimbench.tasks import TASKS


def finished_runs(results: Path) -> list[Path]:
    """Run directories under `results` whose record is finished."""
    return sorted(p.parent for p in Path(results).glob("**/record.json")
                  if status_of(p.parent) in (None, "finished"))


def run_label(config: dict) -> str:
    """The method, its main knob (first setting) and every other setting off its default,
    e.g. "truncate keep_tokens=16" or "layerdrop keep_layers=3 train=all"."""
    from dataclasses import fields, is_dataclass

    from skimbench.method import methods

    settings = config.get("method_config", {})
    cls = methods().get(config["method"])
    defaults = {f.name: f.default for f in fields(cls.Config)} if cls else {}
    # the main knob is the method's own first setting: the shared settings its config inherits
    # (InitSettings' `init`, SelectionSettings', ControlSettings'), which dataclasses put
    # first, are not what a method's curve varies
    inherited = {f.name for base in (cls.Config.__mro__[1:] if cls else ())
                 if is_dataclass(base) for f in fields(base)}
    main = next((k for k in settings if k not in inherited), None)
    shown = [f"{k}={v}" for k, v in settings.items() if k != main and defaults.get(k) != v]
    return " ".join([config["method"], *([f"{main}={settings[main]}"] if main else []), *shown])


def _latency_floor(latency_dir: Path, backbone_slug: str, batch: str) -> float | None:
    path = latency_dir / f"{backbone_slug}-cpu.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["fit"].get(batch, {}).get("t0_ms")


def _gpu(mode: dict, batch_size: int) -> tuple[float | None, float | None]:
    gpu = mode.get("gpu") or {}
    fp32 = gpu.get("float32", {})
    entry = fp32.get(str(batch_size)) or fp32.get(batch_size)
    peaks = [e["peak_mb"] for dtype in gpu.values() for e in dtype.values()]
    return (entry or {}).get("speedup"), (max(peaks) if peaks else None)


def _lift(controls: dict | None, control: str, main: str) -> tuple[float | None, ...]:
    """The method's lift over one control on the main metric: value, low, high (points)."""
    entry = (controls or {}).get(control) or {}
    value = (entry.get("lift") or {}).get(main)
    low, high = (entry.get("lift_ci") or {}).get(main) or (None, None)
    return value, low, high


def records_frame(results: Path, latency_dir: Path | None = None):
    """One row per finished run and padding mode, in report_render's FRAME_COLUMNS."""
    import pandas as pd

    from skimbench.backbone import backbone_slug
    from skimbench.report_render import FRAME_COLUMNS

    latency_dir = latency_dir or Path(results) / "latency"
    rows = []
    for run_dir in finished_runs(results):
        record = read_json(run_dir / "record.json")
        config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {
            "method": record["method"]}
        modes = record["padding"]
        inflation = (modes["sequence"]["flops_speedup"] / modes["none"]["flops_speedup"]
                     if "sequence" in modes and "none" in modes else None)
        slug = backbone_slug(record["backbone"])
        main = record["main_metric"]
        # older records have no controls, control or diagnostics keys: same as None
        controls = record.get("controls")
        lifts = {name: _lift(controls, name, main) for name in ("random", "random-baseline")}
        random_metric = (((controls or {}).get("random") or {}).get("metrics") or {}).get(main)
        for padding, m in modes.items():
            # dynamic methods score differently per mode; older records hold one metric
            metric = m.get("metrics", record["metrics"])[main]
            ci = m.get("metric_ci", record["metric_ci"]).get(main, (None, None))
            gpu_speedup, cuda_peak = _gpu(m, 1 if padding == "none" else 32)
            rows.append({
                "task": record["task"], "task_title": TASKS[record["task"]].title,
                "method": record["method"], "label": run_label(config),
                "backbone": record["backbone"], "profile": record["profile"],
                "seed": record["seed"], "run_dir": str(run_dir),
                "main_metric": main, "metric": metric,
                "ci_low": ci[0], "ci_high": ci[1], "padding": padding,
                "macs_per_example": m["macs_per_example"], "flops_speedup": m["flops_speedup"],
                "padding_inflation": inflation, "cpu_time_speedup": m.get("cpu_time_speedup"),
                "gpu_time_speedup": gpu_speedup, "oracle_speedup": m.get("oracle_speedup"),
                "removal_efficiency": m.get("removal_efficiency"),
                "total_flops_speedup": m.get("total_flops_speedup"),
                "total_cpu_time_speedup": m.get("total_cpu_time_speedup"),
                "latency_floor_ms": _latency_floor(latency_dir, slug,
                                                   "1" if padding == "none" else "32"),
                "peak_rss_mb": m.get("peak_rss_mb"), "cuda_peak_mb": cuda_peak,
                "executed": record["executed"], "macs_mismatch": m.get("macs_mismatch", False),
                "load_flagged": bool((m.get("cpu") or {}).get("load_flagged", False)),
                "notes": "; ".join(record.get("notes", [])),
                "control": record.get("control"),
                "lift_random": lifts["random"][0], "lift_random_low": lifts["random"][1],
                "lift_random_high": lifts["random"][2],
                "lift_random_baseline": lifts["random-baseline"][0],
                "lift_random_baseline_low": lifts["random-baseline"][1],
                "lift_random_baseline_high": lifts["random-baseline"][2],
                "random_metric": random_metric,
            })
    if not rows:
        raise UsageError(f"no finished run records under {results}: run `skimbench run` first "
                         "or point --results at a folder of run directories")
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def records_diagnostics(results: Path) -> list[dict]:
    """The predictor diagnostics of every finished run that has them (control runs have none):
    task, task_title, method, label, backbone, profile, `overrides` (how many method settings
    the run set with --set: 0 for the method's default-setting run) and the record's
    `diagnostics`."""
    entries = []
    for run_dir in finished_runs(results):
        record = read_json(run_dir / "record.json")
        if not record.get("diagnostics") or record.get("control"):
            continue
        config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {
            "method": record["method"]}
        settings = config.get("method_config", {})
        entries.append({
            "task": record["task"], "task_title": TASKS[record["task"]].title,
            "method": record["method"], "label": run_label(config),
            "backbone": record["backbone"], "profile": record["profile"],
            "overrides": sum(key in settings for key in config.get("overrides", {})),
            "diagnostics": record["diagnostics"]})
    return entries


def write_report(results: Path, out: Path) -> list[Path]:
    from skimbench.method import methods
    from skimbench.report_render import (
        paper_comparison,
        paper_numbers,
        published_baselines,
        write_diagnostics,
        write_index,
        write_pareto,
        write_task_tables,
    )

    frame = records_frame(results)
    papers = paper_numbers()
    published = {task: published_baselines(papers, TASKS[task].paper_name)
                 for task in frame["task"].unique()}
    names = {key: cls.paper_names for key, cls in methods().items() if cls.paper_names}
    # a control run (--set control=...) is listed in the tables, but it is no point of the
    # method's curve: the plots and the paper re-make take the methods' own runs only
    own = frame[frame["control"].isna()]
    compared = {task: paper_comparison(own[own["task"] == task], papers,
                                       TASKS[task].paper_name, names)
                for task in own["task"].unique()}
    files = (write_task_tables(frame, out, published, compared) + write_pareto(own, out)
             + write_diagnostics(records_diagnostics(results), out))
    return [*files, write_index(out, files, frame)]
