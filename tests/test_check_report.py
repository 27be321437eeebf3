"""`skimbench check` passes on unchanged records and fails on degraded ones; `skimbench report`
and `skimbench latency` write what they promise from real (smoke) runs."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from skimbench.cli import main
from skimbench.records import read_json, write_json
from skimbench.runner import RunSpec, run


@pytest.fixture
def smoke_runs(tiny_data, tmp_path):
    """baseline, truncate and layerdrop smoke runs in all padding modes, under tmp/results."""
    out = tmp_path / "results"
    dirs = [run(RunSpec(method, "sst2", profile="smoke", padding="all", data_dir=tiny_data,
                        out=out, overrides=settings), lambda _: None)
            for method, settings in (("baseline", {}), ("truncate", {"keep_tokens": "6"}),
                                     ("layerdrop", {"keep_layers": "1"}))]
    return out, dirs


def make_reference(dirs, reference):
    for run_dir in dirs:
        target = reference / run_dir.relative_to(run_dir.parents[2])
        target.mkdir(parents=True)
        for name in ("config.json", "record.json"):
            shutil.copy(run_dir / name, target / name)


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_check_passes_then_catches_each_kind_of_regression(smoke_runs, tmp_path, tiny_data):
    out, dirs = smoke_runs
    reference = tmp_path / "reference"
    make_reference(dirs, reference)
    ok = invoke("check", "--against", str(reference), "--results", str(out), "--reuse",
                "--profile", "smoke")
    assert ok.exit_code == 0 and "check passed" in ok.output
    truncate = dirs[1] / "record.json"
    record = read_json(truncate)
    low, high = record["metric_ci"]["accuracy"]
    record["metrics"]["accuracy"] -= max(1.0, (high - low) / 2) + 0.5
    record["padding"]["none"]["flops_speedup"] *= 0.9
    record["padding"]["batch"]["cpu_time_speedup"] *= 0.5
    write_json(truncate, record)
    bad = invoke("check", "--against", str(reference), "--results", str(out), "--reuse",
                 "--profile", "smoke")
    assert bad.exit_code == 1
    breaches = [line for line in bad.output.splitlines() if line.startswith("BREACH")]
    assert len(breaches) == 3 and all("sst2/truncate" in line for line in breaches)
    assert any("accuracy" in b for b in breaches) and any("flops_speedup [none]" in b
                                                          for b in breaches)
    # re-running (no --reuse) the reference configurations reproduces metrics and MACs exactly
    # (smoke timings are too short to compare, so time breaches are not asserted either way)
    rerun = invoke("check", "--against", str(reference), "--results", str(tmp_path / "again"),
                   "--profile", "smoke", "--data-dir", str(tiny_data))
    breaches = [line for line in rerun.output.splitlines() if line.startswith("BREACH")]
    assert not [b for b in breaches if "accuracy" in b or "flops_speedup" in b], breaches
    assert (tmp_path / "again/runs/sst2/layerdrop").is_dir()


def test_check_without_references_or_with_another_profile(smoke_runs, tmp_path):
    out, dirs = smoke_runs
    empty = tmp_path / "none"
    empty.mkdir()
    result = invoke("check", "--against", str(empty), "--results", str(out), "--reuse")
    assert result.exit_code == 2 and "no reference records" in result.output
    reference = tmp_path / "reference"
    make_reference(dirs[:1], reference)
    result = invoke("check", "--against", str(reference), "--results", str(out), "--reuse")
    assert result.exit_code == 2 and "profile(s) smoke" in result.output


def test_report_writes_tables_plots_and_index(smoke_runs, tmp_path):
    out, _ = smoke_runs
    reports = tmp_path / "reports"
    result = invoke("report", "--results", str(out), "--out", str(reports))
    assert result.exit_code == 0, result.output
    for name in ("sst2.md", "sst2.csv", "sst2.tex", "pareto-sst2.png", "pareto-sst2.svg",
                 "README.md"):
        assert (reports / name).stat().st_size > 0, name
    table = (reports / "sst2.md").read_text()
    assert "truncate keep_tokens=6" in table and "layerdrop keep_layers=1" in table
    assert "finetune=" not in table  # settings at their defaults are not repeated
    # the papers' baselines for SST-2, read from the packaged paper-numbers.csv
    published = table.split("## Published baseline figures")[1]
    assert "| Transkimmer | Table 3 | BERT-base | accuracy | 93.0 |" in published
    assert "| AdapLeR | Table 1 | BERT-base-uncased | accuracy | 92.7 |" in published
    assert (reports / "pareto-sst2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (reports / "README.md").read_text()
    assert "sst2.md" in index and "pareto-sst2.png" in index and "smoke" in index


def test_report_without_records_is_one_line(tmp_path):
    result = invoke("report", "--results", str(tmp_path), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "no finished run records" in result.output


def test_latency_curve_command(tmp_path):
    result = invoke("latency", "--backbone", "random:tiny", "--lengths", "8,16,32",
                    "--batch", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    curve = json.loads((tmp_path / "random-tiny-cpu.json").read_text())
    assert [p["length"] for p in curve["points"]] == [8, 16, 32]
    assert curve["fit"]["1"]["t0_ms"] >= 0
    bad = invoke("latency", "--backbone", "random:tiny", "--lengths", "8,-1")
    assert bad.exit_code == 2 and "positive integers" in bad.output


def test_report_index_links_resolve_with_a_relative_out_dir(smoke_runs, tmp_path, monkeypatch):
    import re

    out, _ = smoke_runs
    monkeypatch.chdir(tmp_path)
    assert invoke("report", "--results", str(out), "--out", "reports").exit_code == 0
    links = re.findall(r"\]\(<?([^)>]+)>?\)", (tmp_path / "reports/README.md").read_text())
    assert links and all((tmp_path / "reports" / link).is_file() for link in links), links


@pytest.mark.parametrize("method,settings,label", [
    ("truncate", {"keep_tokens": 16}, "truncate keep_tokens=16"),
    # the first setting leads, except `init` (InitSettings, first in every such config)
    ("blockbert", {"init": "pretrained", "blocks": 2, "heads": None}, "blockbert blocks=2"),
    ("blockbert", {"init": "baseline", "blocks": 3, "heads": None},
     "blockbert blocks=3 init=baseline"),
])
def test_run_label_names_the_main_knob_and_settings_off_default(method, settings, label):
    from skimbench.report import run_label

    assert run_label({"method": method, "method_config": settings}) == label


@pytest.mark.parametrize("method,settings,label", [
    # ControlSettings' control/controls lead every controlled method's config: never the knob
    ("ltp", {"control": "none", "controls": True, "final_threshold": 0.02},
     "ltp final_threshold=0.02"),
    ("ltp", {"control": "random", "controls": True, "final_threshold": 0.01},
     "ltp final_threshold=0.01 control=random"),
])
def test_run_label_skips_the_control_settings(method, settings, label):
    from skimbench.report import run_label

    assert run_label({"method": method, "method_config": settings}) == label


def controls_entry(lift: float, low: float, high: float, metric: float = 80.0) -> dict:
    """A record's `controls` (skimbench.controls.run_controls) with one lift on accuracy."""
    def control(shift: float) -> dict:
        return {"metrics": {"accuracy": metric - shift}, "metric_ci": {"accuracy": [70.0, 90.0]},
                "macs_sum": 1000, "method_macs_sum": 1000, "flops_speedup": 2.0,
                "lift": {"accuracy": lift + shift}, "lift_ci": {"accuracy": [low + shift,
                                                                             high + shift]}}
    return {"padding": "none", "seed": 42, "unit": "token", "random": control(0.0),
            "random-baseline": control(1.0)}


def small_record(controls: dict | None = None, **extra) -> dict:
    record = {"main_metric": "accuracy", "metrics": {"accuracy": 80.0},
              "metric_ci": {"accuracy": [78.0, 82.0]},
              "padding": {"none": {"flops_speedup": 2.0, "cpu_time_speedup": None}}, **extra}
    if controls is not None:
        record["controls"] = controls
    return record


def test_check_breaches_when_the_method_loses_to_random_removal():
    from skimbench.check import compare

    reference = small_record(controls_entry(2.0, 0.5, 3.5))
    assert compare(reference, reference) == []
    # the interval straddles 0: the predictor is not shown to be worse than random
    assert compare(reference, small_record(controls_entry(-0.4, -1.9, 1.1))) == []
    assert compare(reference, small_record(controls_entry(-2.0, -3.5, -0.5))) == [
        "lift over random removal -2.00 below 0 beyond its interval [-3.50, -0.50] "
        "(accuracy points)"]
    # only the `random` control counts: random-baseline is 1 point higher here, still < 0
    assert len(compare(reference, small_record(controls_entry(-2.5, -3.5, -1.5)))) == 1
    # the reference has controls, the current record none (the key missing, as in older
    # records, or None)
    missing = ["no random controls recorded (the reference has them)"]
    assert compare(reference, small_record()) == missing
    assert compare(reference, small_record() | {"controls": None}) == missing
    # neither has controls: the older rules only
    assert compare(small_record(), small_record()) == []
    assert compare(small_record(), small_record(controls_entry(-2.0, -3.5, -0.5))) != []


def test_report_shows_lift_and_diagnostics_of_records_with_controls(smoke_runs, tmp_path):
    """A record with controls and diagnostics gets its lift in the table and a diagnostics
    figure; records without (None, or the keys missing as in older records) get nothing."""
    import pandas as pd

    out, dirs = smoke_runs
    truncate, layerdrop = dirs[1] / "record.json", dirs[2] / "record.json"
    record = read_json(truncate)
    record["controls"] = controls_entry(2.31, 0.8, 3.9)
    record["diagnostics"] = {"reference": "baseline saliency, top 30% of real tokens",
                             "padding": "none", "layers": [
                                 {"layer": layer, "auc": auc, "important": 3, "other": 7,
                                  "edges": [i / 20 for i in range(21)],
                                  "important_hist": [0] * 17 + [1, 1, 1],
                                  "other_hist": [1] * 7 + [0] * 13}
                                 for layer, auc in ((0, 0.71), (2, None))]}
    write_json(truncate, record)
    older = read_json(layerdrop)
    for key in ("control", "controls", "diagnostics"):
        older.pop(key, None)
    write_json(layerdrop, older)
    reports = tmp_path / "reports"
    result = invoke("report", "--results", str(out), "--out", str(reports))
    assert result.exit_code == 0, result.output
    rows = {line.split(" | ")[0].lstrip("| ").split(" ")[0]: line.split(" | ")
            for line in (reports / "sst2.md").read_text().splitlines()
            if line.startswith("| ") and "random:tiny" in line}
    header = next(line for line in (reports / "sst2.md").read_text().splitlines()
                  if line.startswith("| run |")).split(" | ")
    lift, baseline_lift = header.index("lift over random"), header.index(
        "lift over random-baseline")
    assert rows["truncate"][lift] == "+2.31 [+0.80, +3.90]"
    assert rows["truncate"][baseline_lift] == "+3.31 [+1.80, +4.90]"
    assert rows["layerdrop"][lift].strip() == "" and rows["baseline"][lift].strip() == ""
    csv = pd.read_csv(reports / "sst2.csv").set_index("method")
    assert csv.loc["truncate", ["lift_random", "lift_random_low", "lift_random_high"]
                   ].tolist() == [2.31, 0.8, 3.9]
    assert csv.loc["truncate", "lift_random_baseline_high"] == 4.9
    assert csv.loc[["baseline", "layerdrop"], "lift_random"].isna().all()
    assert "lift over random" in (reports / "sst2.tex").read_text()
    figure = reports / "diagnostics-sst2-truncate.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (reports / "diagnostics-sst2-truncate.svg").stat().st_size > 0
    assert sorted(p.name for p in reports.glob("diagnostics-*")) == [
        "diagnostics-sst2-truncate.png", "diagnostics-sst2-truncate.svg"]
    index = (reports / "README.md").read_text()
    line = next(x for x in index.splitlines() if x.startswith("Predictor diagnostics"))
    assert "[diagnostics-sst2-truncate.png](diagnostics-sst2-truncate.png)" in line
