"""Integration: the `ci` profile on real data with the packaged MiniLM (minutes each).

With SKIMBENCH_INTEGRATION_RESULTS set (CI does), the runs go to that folder, where the
regression check that follows finds these `ci` baselines finished and reuses them instead of
training them a second time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skimbench.records import read_json
from skimbench.runner import RunSpec, run

pytestmark = pytest.mark.integration

# Floors: measured on this 2-core machine minus a margin (see README "Measured").
SST2_CI_ACCURACY_FLOOR = 80.0
SQUAD_CI_F1_FLOOR = 9.0


@pytest.fixture
def out(tmp_path) -> Path:
    shared = os.environ.get("SKIMBENCH_INTEGRATION_RESULTS")
    return Path(shared) if shared else tmp_path


def test_ci_baseline_on_real_sst2(shared_data, out):
    record = read_json(run(RunSpec("baseline", "sst2", profile="ci", data_dir=shared_data,
                                   out=out), print) / "record.json")
    assert record["num_eval_examples"] == 872 and record["backbone"] == "minilm"
    assert record["metrics"]["accuracy"] >= SST2_CI_ACCURACY_FLOOR


def test_ci_qa_pipeline_on_real_squad(shared_data, out):
    run_dir = run(RunSpec("baseline", "squad", profile="ci", data_dir=shared_data,
                          out=out), print)
    record = read_json(run_dir / "record.json")
    assert record["split"].startswith("offline: squad_v1.1/dev-v1.1.json articles 1-38")
    assert record["num_eval_features"] >= record["num_eval_examples"] == 300
    assert record["metrics"]["f1"] >= SQUAD_CI_F1_FLOOR
    assert record["metrics"]["exact_match"] <= record["metrics"]["f1"]
