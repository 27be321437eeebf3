"""Report rendering (DESIGN 7) on a small synthetic report frame: tables, frontier, plots,
package data and the index."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from skimbench import report_render as rr

NAN = math.nan

# label -> method, metric, CI, FLOPs speedup per mode (none, batch, sequence), CPU speedup
RUNS = {
    "baseline": ("baseline", 91.2, (90.1, 92.3), (1.0, 1.0, 1.0), (1.0, 1.0)),
    "truncate k=32": ("truncate", 88.5, (87.2, 89.7), (1.4, 1.9, 2.2), (1.1, 1.5)),
    "truncate k=16": ("truncate", 84.0, (82.6, 85.3), (2.1, 3.3, 4.4), (1.2, 2.0)),
    "layerdrop keep_4": ("layerdrop", 86.1, (84.9, 87.4), (1.8, 1.8, 1.8), (1.5, 1.7)),
}


def make_frame(flag: str | None = "truncate k=16", modes=("sequence", "batch", "none")):
    rows = []
    for label, (method, metric, (low, high), flops, cpu) in RUNS.items():
        by_mode = dict(zip(("none", "batch", "sequence"), flops, strict=True))
        for mode in modes:
            rows.append({
                "task": "sst2", "task_title": "GLUE SST-2", "method": method, "label": label,
                "backbone": "minilm", "profile": "local", "seed": 42,
                "run_dir": f"results/runs/sst2/{method}/{label.replace(' ', '-')}",
                "main_metric": "accuracy", "metric": metric, "ci_low": low, "ci_high": high,
                "padding": mode, "macs_per_example": 1e9 / by_mode[mode],
                "flops_speedup": by_mode[mode],
                "padding_inflation": by_mode["sequence"] / by_mode["none"],
                "cpu_time_speedup": {"none": cpu[0], "batch": cpu[1]}.get(mode, NAN),
                "gpu_time_speedup": NAN, "oracle_speedup": NAN if mode == "sequence" else 1.3,
                "removal_efficiency": NAN, "latency_floor_ms": 5.1 if mode == "none" else None,
                "peak_rss_mb": 812.0, "cuda_peak_mb": None, "executed": True,
                "macs_mismatch": False,
                "load_flagged": label == flag and mode == "batch",
                "notes": "fewer layers than the paper" if method == "layerdrop" else "",
            })
    return pd.DataFrame(rows, columns=list(rr.FRAME_COLUMNS))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    frame = make_frame()
    files = rr.write_task_tables(frame, out) + rr.write_pareto(frame, out)
    return out, files, rr.write_index(out, files, frame)


def points(*pairs):
    return pd.DataFrame({"label": [f"p{i}" for i in range(len(pairs))],
                         "metric": [m for m, _ in pairs], "speedup": [s for _, s in pairs]})


def test_frontier_drops_dominated_points_and_keeps_ties():
    pts = points((90, 1.0), (85, 2.0), (84, 1.5), (85, 2.0), (80, 2.0), (70, 4.0), (91, 1.0))
    front = rr.pareto_frontier(pts)
    # p0 (90, 1.0) is beaten by p6 (91, 1.0); p2 by p1; p4 (same speedup, lower metric) by p1;
    # the two identical points p1 and p3 do not dominate each other.
    assert list(front["label"]) == ["p6", "p1", "p3", "p5"]
    assert list(front["speedup"]) == [1.0, 2.0, 2.0, 4.0]
    assert rr.pareto_frontier(points()).empty


def test_pareto_points_per_mode():
    pts = rr.pareto_points(make_frame(), "sequence")
    assert set(pts["label"]) == set(RUNS)
    kinds = dict(zip(pts["label"], pts["kind"], strict=True))
    assert kinds["baseline"] == "baseline" and kinds["layerdrop keep_4"] == "simple"
    assert dict(zip(pts["label"], pts["speedup"], strict=True))["truncate k=16"] == 4.4
    assert rr.pareto_points(make_frame(), "none", "gpu_time_speedup").empty


def test_table_baseline_first_sorted_and_formatted():
    table = rr.task_table(make_frame(flag=None))
    assert list(table["run"]) == ["baseline", "layerdrop keep_4", "truncate k=16",
                                  "truncate k=32"]
    base = table.iloc[0]
    for mode in ("none", "batch", "sequence"):
        assert base[f"FLOPs speedup ({mode})"] == "1.00x"
    assert base["accuracy [95% CI]"] == "91.2 [90.1, 92.3]"
    k16 = table.iloc[2]
    assert k16["FLOPs speedup (sequence)"] == "4.40x"
    assert k16["padding inflation"] == "2.10x"
    assert k16["CPU speedup bs1 (none)"] == "1.20x" and k16["CPU speedup (batch)"] == "2.00x"
    assert k16["GPU speedup bs1 (none)"] == "n/a" and k16["peak RSS MB"] == "812"
    assert table.attrs["footnotes"] == {}
    numeric = rr.task_table(make_frame(flag=None), numeric=True)
    assert numeric["flops_speedup_none"].iloc[0] == 1.0 and len(numeric) == 4
    assert numeric["executed"].tolist() == [True] * 4
    renamed = make_frame(flag=None).replace({"label": {"truncate k=16": "truncate k=8"}})
    assert list(rr.task_table(renamed)["run"])[2:] == ["truncate k=8", "truncate k=32"]


def test_run_caveats_are_listed_under_the_table(tmp_path):
    [markdown] = [p for p in rr.write_task_tables(make_frame(), tmp_path) if p.suffix == ".md"]
    caveats = [line for line in markdown.read_text().splitlines() if "Run caveats" in line]
    assert caveats == ["- Run caveats (recorded by the method): `layerdrop keep_4`: fewer "
                       "layers than the paper."]


def test_ci_formatting():
    assert rr.format_metric_ci(91.234, 90.06, 92.349) == "91.2 [90.1, 92.3]"
    assert rr.format_metric_ci(88.0, None, NAN) == "88.0"
    assert rr.format_metric_ci(None) == "n/a"


def test_footnote_only_when_a_row_is_flagged(tmp_path):
    dagger = rr.FLAGS["load_flagged"][0]
    flagged = rr.task_table(make_frame())
    assert flagged["run"].str.contains(dagger).tolist() == [False, False, True, False]
    assert list(flagged.attrs["footnotes"]) == [dagger]
    clean_md = rr.write_task_tables(make_frame(flag=None), tmp_path)[0].read_text()
    assert not any(marker in clean_md for marker, _ in rr.FLAGS.values())
    frame = make_frame(flag=None)
    frame.loc[frame["label"] == "baseline", "executed"] = False
    assert rr.FLAGS["not_executed"][0] in rr.task_table(frame)["run"].iloc[0]


def test_tables_written(written):
    out, files, _ = written
    md, csv, tex = (out / f"sst2.{ext}" for ext in ("md", "csv", "tex"))
    assert {md, csv, tex} <= set(files)
    assert all(path.stat().st_size > 0 for path in files)
    text = md.read_text()
    assert text.startswith("# GLUE SST-2")
    assert "`minilm`" in text and "`local`" in text and "seeds: 42" in text
    assert "MACs exclude embeddings, layer norms, softmax, activations and biases" in text
    assert "same padding mode" in text
    dagger = rr.FLAGS["load_flagged"][0]
    assert f"{dagger} other processes took more than 10%" in text
    assert "| baseline | minilm | local | 91.2 [90.1, 92.3] | 1.00x |" in text
    data = pd.read_csv(csv)
    assert data["run"].iloc[0] == "baseline" and data["load_flagged"].tolist()[2]
    latex = tex.read_text()
    assert "\\begin{tabular}" in latex and "\\end{tabular}" in latex
    assert "layerdrop keep\\_4" in latex and "95\\% CI" in latex
    assert "keep_4" not in latex and "$^{\\ddagger}$" in latex


def test_pareto_figures_written(written):
    out, files, _ = written
    png, svg = out / "pareto-sst2.png", out / "pareto-sst2.svg"
    assert png in files and svg in files
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_empty_panel_does_not_crash(tmp_path):
    frame = make_frame(modes=("none",))
    assert rr.pareto_points(frame, "sequence").empty
    png, svg = rr.write_pareto(frame, tmp_path, speedup_column="cpu_time_speedup")
    assert png.name == "pareto-sst2-cpu-time.png" and png.stat().st_size > 0
    assert "no runs measured" in svg.read_text()


def test_index_links_every_file_and_names_runs(written):
    out, files, index = written
    assert index == out / "README.md"
    text = index.read_text()
    for path in files:
        assert f"]({path.name})" in text
    assert "`local`" in text and "Produced by profile:" in text
    assert "`results/runs/sst2/truncate/truncate-k=32`" in text
    assert "| truncate k=32 | truncate | local | minilm | 42 |" in text
    assert f"{rr.FLAGS['load_flagged'][0]} other processes took" in text


def test_paper_numbers_from_package_data():
    table = rr.paper_numbers()
    assert len(table) == 990
    assert list(table.columns) == ["paper", "table", "backbone", "method", "dataset", "split",
                                   "metric", "value", "unit", "speedup_kind", "padding",
                                   "hardware", "batch_size", "note"]
    row = table[(table["paper"] == "Block-Skim") & (table["table"] == "Table 1")
                & (table["method"] == "baseline") & (table["dataset"] == "SQuAD 1.1")
                & (table["backbone"] == "BERT-base") & (table["metric"] == "EM")]
    assert row["value"].tolist() == ["81.14", "81.14"]  # Table 1 upper and lower half
    assert row["split"].tolist() == ["unknown", "unknown"] and row["note"].isna().iloc[0]


def test_paper_comparison_sets_our_best_point_within_a_point_beside_each_paper_figure(tmp_path):
    """truncate k=32 (88.5) is 2.7 points under the baseline and k=16 more: none is within a
    point, so the most accurate run is set beside the paper; its drop is from our baseline."""
    papers = pd.DataFrame([
        ("P", "Table 1", "BERT-base", "baseline", "SST-2", "accuracy", "93.0", "", "none"),
        ("P", "Table 1", "BERT-base", "Trunc", "SST-2", "accuracy", "92.0", "", "none"),
        ("P", "Table 1", "BERT-base", "Trunc", "SST-2", "speedup", "2.8", "flops", "none"),
        ("P", "Table 1", "BERT-base", "Trunc", "SST-2", "speedup", "4.0", "flops", "sequence"),
        ("P", "Table 1", "BERT-base", "Trunc", "MRPC", "speedup", "9.0", "flops", "none"),
    ], columns=["paper", "table", "backbone", "method", "dataset", "metric", "value",
                "speedup_kind", "padding"])
    compared = rr.paper_comparison(make_frame(), papers, "SST-2", {"truncate": ("Trunc",)})
    assert len(compared) == 2  # MRPC's figure is not this data set's
    none, sequence = compared.to_dict("records")
    assert none["paper metric (vs its baseline)"] == "accuracy 92.0 (-1.0)"
    assert none["our run"] == "truncate k=32"
    assert none["our metric (vs our baseline)"] == "88.5 (-2.7)"
    assert none["our FLOPs speedup"] == "1.40x" and none["ours / paper speedup"] == "0.50x"
    assert sequence["paper metric (vs its baseline)"] == "n/a"  # no sequence-mode metric row
    assert sequence["our FLOPs speedup"] == "2.20x"
    # within a point of the baseline, the fastest run in the paper's mode is chosen
    frame = make_frame()
    frame.loc[frame["label"] == "truncate k=16", "metric"] = 90.5
    compared = rr.paper_comparison(frame, papers, "SST-2", {"truncate": ("Trunc",)})
    assert compared["our run"].tolist() == ["truncate k=16"] * 2
    md = rr._task_markdown(frame, "sst2", rr.task_table(frame), None, compared)
    assert "## Paper figures beside ours" in md and "| P Table 1: Trunc |" in md


def test_a_paper_figure_without_a_speedup_is_set_beside_ours_on_our_metric():
    """BlockBERT-style tables report accuracy only: one row per table, on the metric named
    like ours, the speedup `not reported` and no ratio."""
    papers = pd.DataFrame([
        ("Q", "Table 3", "BERT-base", "Trunc", "SST-2", "F1", "90.0", "", "unknown"),
        ("Q", "Table 3", "BERT-base", "Trunc", "SST-2", "accuracy", "91.0", "", "unknown"),
    ], columns=["paper", "table", "backbone", "method", "dataset", "metric", "value",
                "speedup_kind", "padding"])
    [row] = rr.paper_comparison(make_frame(), papers, "SST-2",
                                {"truncate": ("Trunc",)}).to_dict("records")
    assert row["paper metric (vs its baseline)"] == "accuracy 91.0 (n/a)"
    assert row["paper speedup"] == "not reported" and row["ours / paper speedup"] == "n/a"
    assert row["our run"] == "truncate k=32" and row["our FLOPs speedup"] == "1.40x"


def test_a_crowded_panel_names_only_its_frontier_and_the_baseline():
    rows = []
    for i in range(rr.MAX_LABELLED + 2):  # a sweep of points that all lie on one line
        frame = make_frame(flag=None)
        run = frame[frame["label"] == "truncate k=32"].copy()
        run["label"] = f"truncate k={40 + i}"
        run["metric"] = 80.0 - i
        run["flops_speedup"] = 5.0 - 0.01 * i  # slower and worse than i=0: dominated
        rows.append(run)
    frame = pd.concat([make_frame(flag=None), *rows], ignore_index=True)
    fig = rr._pareto_figure(frame, "sst2", "flops_speedup")
    named = {t.get_text().split(" ")[0] + " " + t.get_text().split(" ")[1]
             for t in fig.axes[0].texts if t.get_text().startswith("truncate k=4")}
    assert named == {"truncate k=40"}  # the dominated sweep points are drawn, not named
    assert any(t.get_text() == "baseline" for t in fig.axes[0].texts)


def with_controls(frame: pd.DataFrame, label: str = "truncate k=16", lift=(2.314, 0.8, 3.9),
                  random_metric: float = 81.7) -> pd.DataFrame:
    """The frame with random controls on one run (every padding row of it)."""
    frame = frame.copy()
    rows = frame["label"] == label
    for column, value in zip(rr.LIFTS["random"], lift, strict=True):
        frame.loc[rows, column] = value
    for column, value in zip(rr.LIFTS["random-baseline"], (-1.0, -2.5, 0.5), strict=True):
        frame.loc[rows, column] = value
    frame.loc[rows, "random_metric"] = random_metric
    return frame


def test_lift_formatting():
    assert rr.format_lift(2.314, 0.8, 3.9) == "+2.31 [+0.80, +3.90]"
    assert rr.format_lift(-0.5, -1.25, 0.25) == "-0.50 [-1.25, +0.25]"
    assert rr.format_lift(1.0, None, 2.0) == "+1.00"
    assert rr.format_lift(None) == "" and rr.format_lift(NAN, 1, 2) == ""


def test_table_has_the_lift_over_each_control_where_a_run_has_controls(tmp_path):
    assert not any("lift" in c for c in rr.task_table(make_frame(flag=None)).columns)
    frame = with_controls(make_frame(flag=None))
    table = rr.task_table(frame).set_index("run")
    assert list(table.columns[3:5]) == ["lift over random", "lift over random-baseline"]
    assert table.loc["truncate k=16", "lift over random"] == "+2.31 [+0.80, +3.90]"
    assert table.loc["truncate k=16", "lift over random-baseline"] == "-1.00 [-2.50, +0.50]"
    assert (table.drop("truncate k=16")[["lift over random", "lift over random-baseline"]]
            == "").all().all()
    numeric = rr.task_table(frame, numeric=True).set_index("run")
    assert numeric.loc["truncate k=16", list(rr.LIFTS["random"])].tolist() == [2.314, 0.8, 3.9]
    assert numeric.drop("truncate k=16")["lift_random"].isna().all()
    md, csv, tex = rr.write_task_tables(frame, tmp_path)
    text = md.read_text()
    assert "| truncate k=16 | minilm | local | 84.0 [82.6, 85.3] | +2.31 [+0.80, +3.90] | " \
           "-1.00 [-2.50, +0.50] | 2.10x |" in text
    assert "| baseline | minilm | local | 91.2 [90.1, 92.3] |  |  | 1.00x |" in text
    assert rr.LIFT_NOTE in text
    assert "+2.31 [+0.80, +3.90] & -1.00 [-2.50, +0.50]" in tex.read_text()
    assert pd.read_csv(csv).set_index("run").loc["truncate k=16", "lift_random_high"] == 3.9


def test_pareto_draws_the_random_control_hollow_in_the_none_panel_only():
    frame = with_controls(make_frame(flag=None), label="truncate k=32", random_metric=83.5)
    assert rr.pareto_points(frame, "none").set_index("label").loc[
        "truncate k=32", "random_metric"] == 83.5
    fig = rr._pareto_figure(frame, "sst2", "flops_speedup")
    none, sequence = fig.axes[:2]

    from matplotlib.collections import PathCollection

    def hollow(ax):  # the markers of scatter calls with facecolors="none"
        return [c.get_offsets().tolist() for c in ax.collections
                if isinstance(c, PathCollection) and len(c.get_facecolors()) == 0]

    # at the run's FLOPs speedup in `none` (1.4x), at the control's metric
    assert hollow(none) == [[[1.4, 83.5]]] and hollow(sequence) == []
    assert "random control (hollow)" in [t.get_text() for t in fig.legends[0].get_texts()]
    # no control, no legend entry; a CPU-time plot does not draw the untimed controls
    plain = rr._pareto_figure(make_frame(flag=None), "sst2", "flops_speedup")
    assert "random control (hollow)" not in [t.get_text() for t in plain.legends[0].get_texts()]
    assert hollow(rr._pareto_figure(frame, "sst2", "cpu_time_speedup").axes[0]) == []


def diagnostics_entry(label: str, overrides: int, aucs: dict[int, float | None]) -> dict:
    layers = [{"layer": layer, "auc": auc, "important": 3, "other": 7,
               "edges": [i / 20 for i in range(21)], "important_hist": [0] * 17 + [1, 1, 1],
               "other_hist": [1] * 7 + [0] * 13} for layer, auc in aucs.items()]
    return {"task": "sst2", "task_title": "GLUE SST-2", "method": "ltp", "label": label,
            "backbone": "minilm", "profile": "local", "overrides": overrides,
            "diagnostics": {"reference": "baseline saliency, top 30% of real tokens",
                            "padding": "none", "layers": layers}}


def test_diagnostics_figure_per_task_and_method(tmp_path):
    entries = [diagnostics_entry("ltp final_threshold=0.05", 1, {0: 0.55, 3: 0.6}),
               diagnostics_entry("ltp final_threshold=0.01", 0, {0: 0.71, 3: None, 5: 0.9}),
               dict(diagnostics_entry("ltp x", 0, {}), method="other")]  # no layer: no figure
    assert rr.default_diagnostics_run(entries[:2])["label"] == "ltp final_threshold=0.01"
    png, svg = rr.write_diagnostics(entries, tmp_path)
    assert png == tmp_path / "diagnostics-sst2-ltp.png" and svg.suffix == ".svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and ET.parse(svg).getroot() is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics-sst2-ltp.png",
                                                           "diagnostics-sst2-ltp.svg"]
    fig = rr._diagnostics_figure(sorted(entries[:2], key=lambda e: e["label"]), "sst2", "ltp")
    auc, *histograms = fig.axes
    lines = {line.get_label(): line for line in auc.get_lines()}
    assert lines["ltp final_threshold=0.05"].get_xydata().tolist() == [[0, 0.55], [3, 0.6]]
    xy = lines["ltp final_threshold=0.01"].get_xydata()
    assert xy[:, 0].tolist() == [0, 3, 5] and math.isnan(xy[1, 1]) and xy[2, 1] == 0.9
    assert list(lines["chance (AUC 0.5)"].get_ydata()) == [0.5, 0.5]
    # the default-setting run's histograms: one panel per decision layer, both classes
    assert [ax.get_title() for ax in histograms] == ["layer 0: AUC 0.710", "layer 3: AUC n/a",
                                                     "layer 5: AUC 0.900"]
    assert len(histograms[0].patches) == 2
    index = rr.write_index(tmp_path, [png, svg], make_frame()).read_text()
    assert ("Predictor diagnostics (keep-score AUC by layer and score histograms against what "
            "matters): [diagnostics-sst2-ltp.png](diagnostics-sst2-ltp.png), "
            "[diagnostics-sst2-ltp.svg](diagnostics-sst2-ltp.svg)") in index
    assert "Pareto plots:" not in index
