"""Checkpoint selection: the held-out slice, the choice rule, and the runner's use of both."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import skimbench.selection as selection
from skimbench.selection import hold_out, select_checkpoint
from skimbench.tasks import get_task


def test_hold_out_is_a_seeded_disjoint_slice_in_data_order():
    examples = list(range(100))
    train, held = hold_out(examples, 10)
    assert len(held) == 10 and sorted(train + held) == examples
    assert train == sorted(train) and held == sorted(held)
    assert hold_out(examples, 10) == (train, held)
    # at least half stays for training
    assert len(hold_out(examples, 80)[1]) == 50


class Marked(nn.Module):
    """A stand-in model whose one parameter says which checkpoint is loaded."""

    def __init__(self, value: float):
        super().__init__()
        self.marker = nn.Parameter(torch.tensor(float(value)))


# (accuracy, MACs) of the baseline (marker -1) and of three epoch checkpoints
SCORES = {-1: (90.0, 100), 0: (89.5, 100 / 1.5), 1: (88.0, 100 / 2.5), 2: (89.2, 100 / 1.8)}


@pytest.fixture
def candidates(tmp_path, monkeypatch):
    def fake_evaluate(_method, model, *_args):
        accuracy, macs = SCORES[int(model.marker)]
        return SimpleNamespace(metrics={"accuracy": accuracy}, macs_sum=macs)

    monkeypatch.setattr(selection, "evaluate", fake_evaluate)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"epoch-{k + 1}.pt")
        torch.save(Marked(k).state_dict(), paths[-1])
    return paths


def choose(paths, tolerance):
    model = Marked(7)
    chosen, rows = select_checkpoint(None, model, paths, None, Marked(-1), get_task("sst2"),
                                     [], [], 8, 64, tolerance)
    return model, chosen, rows


def test_keeps_the_fastest_epoch_within_the_tolerance(candidates):
    model, chosen, rows = choose(candidates, 1.0)
    assert chosen == candidates[2] and int(model.marker) == 2  # 1.8x; 2.5x is 2 points down
    assert [r["within_tolerance"] for r in rows] == [True, False, True]
    assert [r["chosen"] for r in rows] == [False, False, True]
    assert rows[1]["flops_speedup"] == pytest.approx(2.5)
    assert rows[0]["baseline_accuracy"] == 90.0
    # a looser tolerance admits the fastest
    assert choose(candidates, 2.0)[1] == candidates[1]


def test_without_a_checkpoint_within_tolerance_the_most_accurate_is_kept(candidates):
    model, chosen, rows = choose(candidates, 0.1)
    assert chosen == candidates[0] and int(model.marker) == 0
    assert not any(r["within_tolerance"] for r in rows)


def test_adapler_run_selects_among_its_epochs_on_held_out_examples(tiny_data, tmp_path):
    """Two epochs: 16 of the 32 smoke examples are held out, both epochs are scored, one is
    kept and its weights are the run's; one epoch holds nothing out and selects nothing."""
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    lines = []
    run_dir = run(RunSpec(method="adapler", task="sst2", profile="smoke", data_dir=tiny_data,
                          out=tmp_path, padding="none",
                          overrides={"epochs": "2", "max_steps": "none"}), lines.append)
    record = read_json(run_dir / "record.json")
    adapler_stage, chosen = record["train"]
    assert adapler_stage["steps"] == 4 and record["num_train_examples"] == 16
    assert chosen["stage"] == "selection" and chosen["held_out_train_examples"] == 16
    assert len(chosen["candidates"]) == 2
    [kept] = [row for row in chosen["candidates"] if row["chosen"]]
    assert kept["checkpoint"] == chosen["kept"]
    assert sum("selection:" in line for line in lines) == 2
    assert not list((run_dir / "checkpoint").glob("stage-*"))
    single = run(RunSpec(method="adapler", task="sst2", profile="smoke", data_dir=tiny_data,
                         out=tmp_path, padding="none"), lines.append)
    record = read_json(single / "record.json")
    assert record["num_train_examples"] == 32 and len(record["train"]) == 1


def test_the_baseline_keeps_its_earlier_epochs(tiny_data, tmp_path):
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    run_dir = run(RunSpec(method="baseline", task="sst2", profile="smoke", data_dir=tiny_data,
                          out=tmp_path, padding="none",
                          overrides={"epochs": "3", "max_steps": "none"}), lambda _: None)
    kept = sorted(p.name for p in (run_dir / "checkpoint").glob("*.pt"))
    assert kept == ["epoch-1.pt", "epoch-2.pt", "model.pt"]
    [stage] = read_json(run_dir / "record.json")["train"]
    assert stage["earlier_epochs"] == ["checkpoint/epoch-1.pt", "checkpoint/epoch-2.pt"]
    assert "epoch_checkpoints" not in stage  # the stage files are gone: not named
    first, final = (torch.load(run_dir / "checkpoint" / name) for name in ("epoch-1.pt",
                                                                          "model.pt"))
    assert not torch.equal(first["head.weight"], final["head.weight"])
