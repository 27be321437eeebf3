"""Run directories: records, provenance, reuse, failure and interruption, prerequisites."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from skimbench.errors import UsageError
from skimbench.method import Method, register
from skimbench.records import read_json, status_of
from skimbench.runner import RunSpec, run
from skimbench.trainer import Stage


def smoke(tiny_data, out, **kwargs) -> RunSpec:
    return RunSpec(**{"method": "baseline", "task": "sst2", "profile": "smoke",
                      "data_dir": tiny_data, "out": out, **kwargs})


def quiet(_line):
    pass


def test_run_writes_a_complete_run_directory(tiny_data, tmp_path):
    run_dir = run(smoke(tiny_data, tmp_path, padding="all"), quiet)
    assert run_dir == tmp_path / "runs/sst2/baseline/smoke-random-tiny-s42"
    record = read_json(run_dir / "record.json")
    assert record["status"] == "finished" and status_of(run_dir) == "finished"
    assert record["num_eval_examples"] == 8 and set(record["padding"]) == {
        "sequence", "batch", "none"}
    low, high = record["metric_ci"]["accuracy"]
    assert low <= record["metrics"]["accuracy"] <= high
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"id", "prediction", "gold", "exit_layer", "tokens", "macs",
                               "macs_by_padding"} <= set(rows[0])
    assert sum(r["macs_by_padding"]["none"] for r in rows) == record["padding"]["none"][
        "macs_sum"]
    config = read_json(run_dir / "config.json")
    assert config["budget"]["backbone"] == "random:tiny" and config["seed"] == 42
    env = read_json(run_dir / "env.json")
    train_file = tiny_data / "glue/SST-2/train.tsv.gz"
    assert env["data_sha256"][str(train_file)] == hashlib.sha256(
        gzip.decompress(train_file.read_bytes())).hexdigest()
    assert env["packages"]["torch"] and env["torch_threads"] >= 1
    assert (run_dir / "checkpoint/model.pt").is_file()
    assert not list((run_dir / "checkpoint").glob("stage-*.pt"))


def test_padding_modes_compute_the_prescribed_positions(tiny_data, tmp_path):
    run_dir = run(smoke(tiny_data, tmp_path, padding="all", overrides={"max_length": "16"}),
                  quiet)
    record = read_json(run_dir / "record.json")
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    # `none` computes each example's own length; `sequence` always the task length (16 here).
    assert record["padding"]["sequence"]["positions"] == 16 * 8
    lengths = [r["length"] for r in rows]
    assert min(lengths) < max(lengths) < 16
    assert record["padding"]["none"]["positions"] == sum(lengths)
    assert record["padding"]["batch"]["positions"] == max(lengths) * 8  # one batch of 8
    assert all(r["macs_by_padding"]["none"] < r["macs_by_padding"]["batch"]
               < r["macs_by_padding"]["sequence"] for r in rows if r["length"] < max(lengths))


def test_same_config_is_reused_and_a_different_one_refused(tiny_data, tmp_path):
    run_dir = run(smoke(tiny_data, tmp_path), quiet)
    before = (run_dir / "record.json").read_bytes()
    stamp = (run_dir / "record.json").stat().st_mtime_ns
    lines = []
    assert run(smoke(tiny_data, tmp_path), lines.append) == run_dir
    assert "already finished" in lines[0]
    assert (run_dir / "record.json").stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match="exists with a different config.*budget.lr"):
        run(smoke(tiny_data, tmp_path, overrides={"lr": "0.5"}, run_id=run_dir.name), quiet)
    assert (run_dir / "record.json").read_bytes() == before  # nothing lost


def test_runs_are_reproducible_for_a_seed(tiny_data, tmp_path):
    first = read_json(run(smoke(tiny_data, tmp_path / "a"), quiet) / "record.json")
    again = read_json(run(smoke(tiny_data, tmp_path / "b"), quiet) / "record.json")
    other = read_json(run(smoke(tiny_data, tmp_path / "c", seed=7), quiet) / "record.json")
    assert first["train"] == [{**s, "seconds": first["train"][i]["seconds"]}
                              for i, s in enumerate(again["train"])]
    assert first["metrics"] == again["metrics"]
    assert other["train"][0]["loss"] != first["train"][0]["loss"]


@register("test-two-stage")
class TwoStage(Method):
    """A two-stage method for tests; the second stage can be made to fail or be interrupted."""

    fail_in: str | None = None
    error: type[BaseException] = RuntimeError

    def stages(self, ctx):
        return [Stage("first", max_steps=2, lr=1e-3, batch_size=4),
                Stage("second", max_steps=2, lr=1e-3, batch_size=4, frozen=("encoder.",))]

    def losses(self, model, batch):
        if TwoStage.fail_in and model.training and self._stage_seen(model):
            raise TwoStage.error("boom in stage two")
        return super().losses(model, batch)

    def _stage_seen(self, model) -> bool:
        """True once the encoder is frozen, i.e. in the second stage."""
        return not next(model.encoder.parameters()).requires_grad


@pytest.mark.parametrize("error,status", [(RuntimeError, "failed"), (KeyboardInterrupt,
                                                                      "partial")])
def test_failed_or_interrupted_run_is_marked_and_resumes(tiny_data, tmp_path, monkeypatch,
                                                          error, status):
    monkeypatch.setattr(TwoStage, "fail_in", "second")
    monkeypatch.setattr(TwoStage, "error", error)
    spec = smoke(tiny_data, tmp_path, method="test-two-stage")
    with pytest.raises(error):
        run(spec, quiet)
    run_dir = tmp_path / "runs/sst2/test-two-stage/smoke-random-tiny-s42"
    assert status_of(run_dir) == status
    assert not (run_dir / "record.json").exists()
    assert (run_dir / "checkpoint/stage-0-first.pt").is_file()  # the finished stage is kept
    monkeypatch.setattr(TwoStage, "fail_in", None)
    lines = []
    run(spec, lines.append)
    assert any("stage first: resumed" in line for line in lines)
    assert status_of(run_dir) == "finished"


@register("test-needs-baseline")
class NeedsBaseline(Method):
    """A method for tests that starts from the fine-tuned baseline."""

    needs = ("baseline",)


def test_needs_trains_the_baseline_first_then_reuses_it(tiny_data, tmp_path):
    run_dir = run(smoke(tiny_data, tmp_path, method="test-needs-baseline"), quiet)
    baseline = tmp_path / "runs/sst2/baseline/smoke-random-tiny-s42"
    assert status_of(baseline) == "finished"
    assert read_json(run_dir / "record.json")["needs"] == {"baseline": str(baseline)}
    stamp = (baseline / "record.json").stat().st_mtime_ns
    lines = []
    run(smoke(tiny_data, tmp_path, method="test-needs-baseline", seed=42, run_id="again"),
        lines.append)
    assert any("already finished" in line for line in lines)
    assert (baseline / "record.json").stat().st_mtime_ns == stamp


def test_regression_task_runs(tiny_data, tmp_path):
    record = read_json(run(smoke(tiny_data, tmp_path, task="stsb"), quiet) / "record.json")
    assert set(record["metrics"]) == {"pearson", "spearman"}


def test_qa_task_runs_end_to_end(tiny_data, tmp_path):
    run_dir = run(smoke(tiny_data, tmp_path, task="squad"), quiet)
    record = read_json(run_dir / "record.json")
    assert set(record["metrics"]) == {"exact_match", "f1"}
    assert record["split"].startswith("offline: squad_v1.1/dev-v1.1.json articles 1-38")
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == record["num_eval_examples"]
    assert all(isinstance(r["prediction"], str) and r["windows"] >= 1 for r in rows)


def test_a_single_mode_run_reuses_the_full_baseline(tiny_data, tmp_path):
    baseline = run(smoke(tiny_data, tmp_path), quiet)
    stamp = (baseline / "record.json").stat().st_mtime_ns
    truncate = run(smoke(tiny_data, tmp_path, method="truncate", padding="none"), quiet)
    assert truncate.name == "smoke-random-tiny-s42-none"
    assert (baseline / "record.json").stat().st_mtime_ns == stamp
    record = read_json(truncate / "record.json")
    assert set(record["padding"]) == {"none"} and record["needs"]["baseline"] == str(baseline)


def test_another_counter_is_recorded_but_not_held_to_one_percent(tiny_data, tmp_path):
    threads = torch.get_num_threads()
    try:
        run_dir = run(smoke(tiny_data, tmp_path, padding="batch", counter="ptflops",
                            threads=1), quiet)
    finally:
        torch.set_num_threads(threads)
    assert read_json(run_dir / "config.json")["counter"] == "ptflops"
    mode = read_json(run_dir / "record.json")["padding"]["batch"]
    assert mode["counter"] == "ptflops" and not mode["macs_mismatch"]
    assert mode["counted_macs"] != mode["schedule_macs"]  # ptflops counts biases and norms too
    assert read_json(run_dir / "env.json")["torch_threads"] == 1
    default = run(smoke(tiny_data, tmp_path / "default", padding="batch"), quiet)
    assert "counter" not in read_json(default / "config.json")
    assert read_json(default / "record.json")["padding"]["batch"]["counter"] == "flop_counter"


def test_prerequisites_share_the_data_overrides_but_not_the_recipe(tiny_data, tmp_path):
    run_dir = run(smoke(tiny_data, tmp_path, method="truncate", padding="none",
                        overrides={"lr": "0.01", "max_train_examples": "16"}), quiet)
    baseline = Path(read_json(run_dir / "record.json")["needs"]["baseline"])
    config = read_json(baseline / "config.json")
    assert config["overrides"] == {"max_train_examples": "16"}
    assert config["budget"]["lr"] != 0.01 and config["budget"]["max_train_examples"] == 16


def test_a_method_run_reads_the_baselines_own_evaluation_back(tiny_data, tmp_path):
    """The baseline run's recorded metrics and MACs per mode equal evaluating it again (what
    every method run did before); a different eval set is not read back."""
    from dataclasses import replace

    from skimbench.data import FileLog
    from skimbench.evaluate import evaluate
    from skimbench.features import encode
    from skimbench.method import Context, get_method, load_checkpoint
    from skimbench.runner import _subset, recorded_evaluation, resolve
    from skimbench.tasks import load_task_data

    run_dir = run(smoke(tiny_data, tmp_path), quiet)
    resolved = resolve(smoke(tiny_data, tmp_path))
    budget, task = resolved.budget, resolved.task
    data = load_task_data(task, tiny_data, FileLog())
    examples = _subset(data.eval, budget.max_eval_examples)
    features = encode(task, examples, resolved.backbone.tokenizer(),
                      max_length=budget.max_length)
    method = get_method("baseline")(get_method("baseline").Config())
    model = load_checkpoint(method.build(Context(resolved.backbone, task, budget, {})), run_dir)
    for padding in ("sequence", "batch", "none"):
        fresh = evaluate(method, model, task, examples, features, padding,
                         budget.eval_batch_size, budget.max_length)
        read = recorded_evaluation(run_dir, padding, budget, data.split, len(features))
        assert read.metrics == fresh.metrics and read.macs_sum == fresh.macs_sum
    assert recorded_evaluation(run_dir, "none", replace(budget, max_length=16), data.split,
                               len(features)) is None
    assert recorded_evaluation(run_dir, "none", budget, "another split", len(features)) is None
    # a record from before per-mode metrics were kept is evaluated again
    record = read_json(run_dir / "record.json")
    del record["padding"]["none"]["metrics"]
    (run_dir / "record.json").write_text(json.dumps(record))
    assert recorded_evaluation(run_dir, "none", budget, data.split, len(features)) is None


def test_a_method_run_does_not_evaluate_the_baseline_again(tiny_data, tmp_path, monkeypatch):
    import skimbench.runner as runner

    baseline = run(smoke(tiny_data, tmp_path), quiet)
    evaluated = []
    real = runner.evaluate

    def counting(method, *args):
        evaluated.append(method.key)
        return real(method, *args)

    monkeypatch.setattr(runner, "evaluate", counting)
    truncate = run(smoke(tiny_data, tmp_path, method="truncate"), quiet)
    assert evaluated == ["truncate"] * 3
    record, base_record = (read_json(d / "record.json") for d in (truncate, baseline))
    assert record["baseline_metrics"] == base_record["metrics"]


def test_a_run_that_fails_after_training_resumes_at_evaluation(tiny_data, tmp_path,
                                                                monkeypatch):
    import skimbench.runner as runner

    def broken(*_args, **_kwargs):
        raise RuntimeError("measurement broke")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "measure_mode", broken)
        with pytest.raises(RuntimeError, match="measurement broke"):
            run(smoke(tiny_data, tmp_path), quiet)
    run_dir = tmp_path / "runs/sst2/baseline/smoke-random-tiny-s42"
    assert status_of(run_dir) == "failed" and (run_dir / "checkpoint/trained.json").is_file()
    weights = torch.load(run_dir / "checkpoint/model.pt")
    lines = []
    run(smoke(tiny_data, tmp_path), lines.append)
    assert status_of(run_dir) == "finished"
    assert any("earlier attempt of this run trained" in line for line in lines)
    assert not any(line.startswith("stage ") for line in lines)  # nothing trained again
    [stage] = read_json(run_dir / "record.json")["train"]
    assert stage["stage"] == "finetune" and stage["steps"] == 4
    again = torch.load(run_dir / "checkpoint/model.pt")
    assert all(torch.equal(again[k], v) for k, v in weights.items())
