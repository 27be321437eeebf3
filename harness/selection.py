"""Checkpoint selection by speed within an accuracy tolerance (AdapLeR's model selection).

A method whose config derives from `SelectionSettings` keeps its weights after every epoch of
its last stage; the runner then scores each epoch's weights on a selection set and keeps the
fastest one whose metric is within `select_tolerance` points of the fine-tuned baseline's on
the same set. The selection set is a seeded slice of the training split held out from the
method's training (never the evaluation set, which is what the record reports); the baseline
has trained on it, so its metric there is optimistic and the tolerance is strict rather than
loose. With a single epoch there is nothing to choose and nothing is held out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from skimbench.evaluate import evaluate
from skimbench.method import MethodConfig

SELECT_MODES = ("speedup", "final")
SELECTION_SEED = 1234  # the held-out slice is the same for every run seed


@dataclass
class SelectionSettings(MethodConfig):
    """The settings of checkpoint selection, shared by the methods that select."""

    select: str = "speedup"          # speedup: fastest epoch within tolerance; final: last epoch
    select_tolerance: float = 1.0    # points below the baseline's metric on the selection set
    select_examples: int = 1000      # training examples held out to select on

    def __post_init__(self):
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, got "
                             f"{self.select!r}")
        if self.select_tolerance < 0:
            raise ValueError(f"select_tolerance must be >= 0, got {self.select_tolerance}")
        if self.select_examples < 1:
            raise ValueError(f"select_examples must be >= 1, got {self.select_examples}")


def selects(config: MethodConfig) -> bool:
    return isinstance(config, SelectionSettings) and config.select == "speedup"


def hold_out(examples: list, count: int) -> tuple[list, list]:
    """(training examples, selection examples): a seeded slice of `count` examples, both
    parts kept in data set order. At least half of the examples stay for training."""
    count = min(count, len(examples) // 2)
    chosen = set(random.Random(SELECTION_SEED).sample(range(len(examples)), count))
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


def select_checkpoint(method, model, candidates: list[Path], baseline, base_model, task,
                      examples: list, features: list[dict], batch_size: int, max_length: int,
                      tolerance: float) -> tuple[Path, list[dict]]:
    """Score every candidate on the selection set without padding (the reference schedule);
    return the fastest within `tolerance` of the baseline's metric (the most accurate when
    none is), and one row per candidate for the record."""
    metric = task.main_metric
    args = (task, examples, features, "none", batch_size, max_length)
    base = evaluate(baseline, base_model, *args)
    rows = []
    for path in candidates:
        model.load_state_dict(torch.load(path, map_location="cpu"))
        scored = evaluate(method, model, *args)
        rows.append({"checkpoint": path.name, metric: scored.metrics[metric],
                     "baseline_" + metric: base.metrics[metric],
                     "flops_speedup": base.macs_sum / scored.macs_sum})
    within = [i for i, row in enumerate(rows)
              if row[metric] >= base.metrics[metric] - tolerance]
    if within:
        best = max(within, key=lambda i: (rows[i]["flops_speedup"], i))
    else:
        best = max(range(len(rows)), key=lambda i: (rows[i][metric], i))
    for i, row in enumerate(rows):
        row["chosen"] = i == best
        row["within_tolerance"] = i in within
    model.load_state_dict(torch.load(candidates[best], map_location="cpu"))
    return candidates[best], rows
