"""CLI behaviour: help with examples, listings, and one-line errors with the right exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from skimbench.cli import main
from skimbench.method import Method, register
from skimbench.tasks import CLASSIFICATION


@register("test-classification-only")
class ClassificationOnly(Method):
    """A method for tests that supports classification only."""

    kinds = frozenset({CLASSIFICATION})


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("command", [[], ["list"], ["run"], ["show"]])
def test_every_command_has_help_with_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_help_does_not_import_torch():
    """`skimbench --help` must stay fast: the CLI module imports no heavy library."""
    code = ("import sys; import skimbench.cli; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_list_methods_shows_kinds():
    result = invoke("list", "methods")
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if line.startswith("baseline "))
    assert "classification" in row and "extractive_qa" in row and "regression" in row


def test_list_tasks_and_backbones(tiny_data, monkeypatch):
    monkeypatch.setenv("SKIMBENCH_DATA_DIR", str(tiny_data))
    tasks = invoke("list", "tasks").output
    assert all(key in tasks for key in ("sst2", "squad_v2", "hatexplain", "stsb", "20news"))
    sst2 = next(line for line in tasks.splitlines() if line.startswith("sst2 "))
    assert sst2.rstrip().endswith("yes")
    assert "random:bert-base" in invoke("list", "backbones").output


def test_unknown_method_suggests_close_names(tmp_path):
    line = one_line_error(invoke("run", "-m", "baselin", "-d", "sst2", "--out",
                                 str(tmp_path)), 2)
    assert "'baselin'" in line and "'baseline'" in line and "skimbench list methods" in line


def test_unknown_task_suggests_close_names(tmp_path):
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst-2", "--out",
                                 str(tmp_path)), 2)
    assert "'sst2'" in line and "skimbench list tasks" in line


def test_unknown_profile_and_padding(tmp_path):
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "-p", "cii"), 2)
    assert "'ci'" in line
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--padding", "max"), 2)
    assert "sequence, batch, none" in line


def test_unknown_counter_and_bad_threads():
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--counter", "fvcore"), 2)
    assert "flop_counter, torchprofile, ptflops" in line
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--threads", "0"), 2)
    assert "--threads must be at least 1" in line


def test_method_that_does_not_support_the_task(tmp_path):
    line = one_line_error(invoke("run", "-m", "test-classification-only", "-d", "squad",
                                 "--out", str(tmp_path)), 2)
    assert "does not support extractive_qa" in line and "'squad'" in line


def test_model_path_that_does_not_exist(tmp_path):
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "-b",
                                 str(tmp_path / "nowhere")), 2)
    assert "does not exist" in line and "nowhere" in line


def test_hub_backbone_that_cannot_load_writes_nothing(tmp_path, tiny_data):
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "-b", "no-such-model",
                                 "--data-dir", str(tiny_data), "--out", str(tmp_path / "r")), 2)
    assert "'no-such-model' could not be loaded" in line and "--backbone minilm" in line
    assert not (tmp_path / "r").exists()


def test_unknown_random_config():
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "-b",
                                 "random:bert-bse"), 2)
    assert "'bert-base'" in line


def test_invalid_set_names_valid_keys(tmp_path):
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--set", "learning=1",
                                 "--out", str(tmp_path)), 2)
    assert "'learning'" in line and "lr" in line and "epochs" in line
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--set", "lr=fast"), 2)
    assert "lr takes float" in line
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--set", "lr"), 2)
    assert "key=value" in line
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--set", "max_length=0",
                                 "--set", "batch_size=-1"), 2)
    assert "out of range: batch_size, max_length (8 to 512)" in line


def test_missing_data_names_the_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--profile", "smoke",
                                 "--data-dir", str(empty), "--out", str(tmp_path)), 1)
    assert "glue/SST-2/train.tsv" in line and "SKIMBENCH_DATA_DIR" in line


def test_missing_data_dir(tmp_path):
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--profile", "smoke",
                                 "--data-dir", str(tmp_path / "nope")), 1)
    assert "does not exist" in line


def test_malformed_data_names_file_and_line(tiny_data, tmp_path):
    bad = tiny_data / "glue/SST-2/dev.tsv"
    bad.write_text("sentence\tlabel\ngood one\t1\nno label column here\n")
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--profile", "smoke",
                                 "--data-dir", str(tiny_data), "--out", str(tmp_path)), 1)
    assert str(bad) in line and "line 3" in line
    bad.write_text("sentence\tlabel\ngood one\tmaybe\n")
    line = one_line_error(invoke("run", "-m", "baseline", "-d", "sst2", "--profile", "smoke",
                                 "--data-dir", str(tiny_data), "--out", str(tmp_path)), 1)
    assert "row 2" in line and "'maybe'" in line


def test_show_rejects_a_directory_without_record(tmp_path):
    line = one_line_error(invoke("show", str(tmp_path)), 2)
    assert "no record.json" in line


def test_run_then_show(tiny_data, tmp_path):
    result = invoke("run", "-m", "baseline", "-d", "sst2", "--profile", "smoke",
                    "--data-dir", str(tiny_data), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs/sst2/baseline/smoke-random-tiny-s42"
    shown = invoke("show", str(run_dir)).output
    assert "accuracy" in shown and "smoke" in shown and "MACs/example [batch]" in shown


def small_record(**extra) -> dict:
    """The fields `skimbench show` prints, as a record.json holds them."""
    return {"method": "ltp", "task": "sst2", "task_kind": "classification",
            "backbone": "random:tiny", "profile": "smoke", "seed": 42, "split": "dev",
            "num_train_examples": 32, "num_eval_examples": 16, "num_eval_features": 16,
            "main_metric": "accuracy", "metrics": {"accuracy": 80.0},
            "metric_ci": {"accuracy": [70.0, 90.0]}, "baseline_metrics": {"accuracy": 81.0},
            "padding": {"none": {"macs_per_example": 5e5, "flops_speedup": 1.5,
                                 "cpu_time_speedup": None}},
            "train_seconds": 1.0, **extra}


def test_show_prints_lifts_diagnostics_and_the_control(tmp_path):
    from skimbench.records import write_json

    def control(lift, low, high):
        return {"metrics": {"accuracy": 80.0 - lift}, "lift": {"accuracy": lift},
                "lift_ci": {"accuracy": [low, high]}}

    layers = [{"layer": 0, "auc": 0.73456, "important": 5, "other": 11},
              {"layer": 2, "auc": None, "important": 0, "other": 16}]
    write_json(tmp_path / "method/record.json", small_record(
        controls={"padding": "none", "seed": 42, "unit": "token",
                  "random": control(2.314, 0.8, 3.9),
                  "random-baseline": control(-1.0, -2.5, 0.5)},
        diagnostics={"reference": "method labels", "padding": "none", "layers": layers}))
    lines = invoke("show", str(tmp_path / "method")).output.splitlines()
    assert "lift over random: accuracy +2.31 [+0.80, +3.90] (points, paired bootstrap 95%; " \
           "padding none, unit: token)" in lines
    assert any(line.startswith("lift over random-baseline: accuracy -1.00 [-2.50, +0.50]")
               for line in lines)
    assert lines[-2:] == ["layer 0: AUC 0.735 (5 important / 11 other)",
                          "layer 2: AUC n/a (0 important / 16 other)"]
    assert not any("control:" in line for line in lines)
    write_json(tmp_path / "control/record.json", small_record(control="random", controls=None,
                                                              diagnostics=None))
    lines = invoke("show", str(tmp_path / "control")).output.splitlines()
    assert lines[-1].startswith("this run is the random control")
    assert not any(line.startswith(("lift over", "layer ")) for line in lines)
    # an older record: none of the keys
    write_json(tmp_path / "older/record.json", small_record())
    older = invoke("show", str(tmp_path / "older"))
    assert older.exit_code == 0 and older.output.splitlines()[-1].startswith("train time")
