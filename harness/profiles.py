"""Budget profiles (DESIGN 2): how big a run is, per task.

`smoke` is a tiny random model on a few examples (seconds; unit tests). `ci` is MiniLM on small
real subsets, about 2 minutes a run on 2 cores (the CI regression set and the README demo).
`local` is MiniLM on the full local training data (hours on one CPU machine). `paper` is the
papers' backbone and hyper-parameters (BERT-base; a GPU and the hub).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from skimbench.errors import did_you_mean
from skimbench.tasks import Task


@dataclass(frozen=True)
class Budget:
    backbone: str
    epochs: float
    lr: float
    batch_size: int
    eval_batch_size: int = 32
    max_steps: int | None = None          # caps each training stage when set
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_train_examples: int | None = None  # a seeded sample of the training split
    max_eval_examples: int | None = None   # the first N evaluation examples (questions for QA)
    max_length: int | None = None          # None: the task's length
    doc_stride: int = 128                  # QA window step
    max_query_length: int = 64
    time_examples: int = 16                # `none` mode: examples timed one at a time
    time_batches: int = 2                  # `batch`/`sequence` modes: batches timed
    time_min_seconds: float = 1.0          # per A/B measurement, at least this long ...
    time_min_iters: int = 5                # ... and this many alternations
    count_batches: int = 2                 # batches checked with the FLOPs counter
    # training batches of similar lengths (trainer.epoch_batches): less padding, same data
    group_by_length: bool = False

    def __post_init__(self):
        """Reject settings no run could use (they arrive through --set)."""
        positive = ("epochs", "lr", "batch_size", "eval_batch_size", "doc_stride",
                    "max_query_length", "time_examples", "time_batches", "time_min_iters",
                    "count_batches")
        bad = [name for name in positive if not getattr(self, name) > 0]
        bad += [name for name in ("max_steps", "max_train_examples", "max_eval_examples")
                if getattr(self, name) is not None and getattr(self, name) < 1]
        if self.max_length is not None and not 8 <= self.max_length <= 512:
            bad.append("max_length (8 to 512)")
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")


PROFILES = ("smoke", "ci", "local", "paper")
BUDGET_KEYS = tuple(f.name for f in fields(Budget))

BASE_BUDGETS = {
    "smoke": Budget("random:tiny", epochs=1, lr=1e-3, batch_size=8, eval_batch_size=8,
                    max_steps=4, max_train_examples=32, max_eval_examples=16, max_length=32,
                    doc_stride=16, max_query_length=16, time_examples=2, time_batches=1,
                    time_min_seconds=0.0, time_min_iters=2, count_batches=1),
    "ci": Budget("minilm", epochs=1, lr=1.5e-4, batch_size=32, max_train_examples=3000,
                 max_eval_examples=2000),
    "local": Budget("minilm", epochs=3, lr=5e-5, batch_size=32, group_by_length=True),
    "paper": Budget("bert-base-uncased", epochs=3, lr=2e-5, batch_size=32,
                    group_by_length=True),
}

# Per-task departures from the profile's base (the papers' recipes for `paper`:
# Transkimmer Table 2 lengths, AdapLeR Table 3 epochs/lr/batch, BERT's SQuAD recipe).
TASK_BUDGETS = {
    "smoke": {"squad": dict(max_length=64), "squad_v2": dict(max_length=64)},
    "ci": {
        "sst2": dict(max_train_examples=5000),
        "squad": dict(max_train_examples=400, max_eval_examples=300, batch_size=8, lr=2e-4),
        "squad_v2": dict(max_train_examples=400, max_eval_examples=300, batch_size=8, lr=2e-4),
        "imdb": dict(max_train_examples=300, max_eval_examples=300, batch_size=16),
        "yelp": dict(max_train_examples=300, max_eval_examples=300, batch_size=16),
        "20news": dict(max_train_examples=300, max_eval_examples=300, batch_size=16),
        "rte": dict(max_train_examples=1000, batch_size=16),
    },
    "local": {
        "sst2": dict(epochs=2), "qnli": dict(epochs=2), "mnli": dict(epochs=2),
        "qqp": dict(epochs=1), "yelp": dict(epochs=1), "dbpedia": dict(epochs=1),
        "agnews": dict(epochs=2), "imdb": dict(epochs=2, batch_size=16),
        "20news": dict(epochs=3, batch_size=16),
        "squad": dict(epochs=1, batch_size=16, lr=1e-4),
        "squad_v2": dict(epochs=1, batch_size=16, lr=1e-4),
    },
    "paper": {
        "sst2": dict(epochs=5), "mrpc": dict(epochs=5), "qnli": dict(epochs=5),
        "imdb": dict(epochs=5, batch_size=16), "agnews": dict(epochs=5),
        "hatexplain": dict(epochs=5, lr=3e-5), "dbpedia": dict(epochs=3),
        "squad": dict(epochs=2, lr=3e-5, batch_size=12),
        "squad_v2": dict(epochs=2, lr=3e-5, batch_size=12),
    },
}


def budget_for(profile: str, task: Task) -> Budget:
    if profile not in PROFILES:
        raise did_you_mean("profile", profile, PROFILES, "profiles")
    return replace(BASE_BUDGETS[profile], **TASK_BUDGETS[profile].get(task.key, {}))
