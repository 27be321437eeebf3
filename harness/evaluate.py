"""Evaluation under one padding mode: predictions, metrics with bootstrap intervals, MACs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from skimbench import metrics as M
from skimbench.features import eval_batches
from skimbench.qa import decode_predictions
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, Task


@dataclass
class Evaluation:
    padding: str
    metrics: dict[str, float]
    metric_ci: dict[str, tuple[float, float]]
    predictions: list[dict]         # per example: id, prediction, gold, exit layer, tokens, MACs
    macs_sum: int                   # over every example (QA: every window) of the eval set
    positions: int                  # token positions computed at layer 0, summed
    seconds: float
    precomputed_macs_sum: int = 0   # cached work (Trace.precomputed_macs), once per key


def run_model(method, model, features: list[dict], padding: str, batch_size: int,
              max_length: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Logits and trace rows per feature, in feature order."""
    hidden, ffn = model.hidden_size, model.ffn_size
    logits, traces = [], []
    batches = eval_batches(features, padding, batch_size, max_length)
    total = len(features) if padding == "none" else -(-len(features) // batch_size)
    with torch.inference_mode():
        for batch in tqdm(batches, total=total, desc=f"eval {padding}", unit="batch",
                          leave=False):
            out = method.forward(model, batch)
            macs = out.trace.macs(hidden, ffn)
            lengths = batch["attention_mask"].sum(dim=1)
            for row in range(len(batch["input_ids"])):
                logit = out.logits[row]
                if logit.dim() == 2:  # QA: keep the real positions only
                    logit = logit[: int(lengths[row])]
                logits.append(logit.float())
                traces.append({"length": int(lengths[row]),
                               "exit_layer": int(out.trace.exit_layer[row]),
                               "tokens": out.trace.query_tokens[row].tolist(),
                               "extra_macs": int(out.trace.extra_macs[row]),
                               "macs": int(macs[row])})
                if out.trace.precomputed_key is not None:
                    traces[-1]["precomputed_macs"] = int(out.trace.precomputed_macs[row])
                    traces[-1]["precomputed_key"] = int(out.trace.precomputed_key[row])
    return logits, traces


def _mean_points(values: np.ndarray) -> float:
    return 100.0 * float(np.mean(values))


def metric_samples(task: Task, rows: list[dict]) -> dict[str, tuple]:
    """Each metric as (statistic, per-example arrays) from an evaluation's prediction rows:
    what a bootstrap resamples, and what two evaluations of the same examples are paired on."""
    if task.kind == EXTRACTIVE_QA:
        predictions = {row["id"]: row["prediction"] for row in rows}
        refs = {row["id"]: row["gold"] for row in rows}
        if task.key == "squad_v2":
            names, (em, f1) = ("exact", "f1"), M.squad_v2_per_example(predictions, refs)
        else:
            names, (em, f1) = ("exact_match", "f1"), M.squad_v1_per_example(predictions, refs)
        return {names[0]: (_mean_points, (em,)), names[1]: (_mean_points, (f1,))}
    preds = np.asarray([row["prediction"] for row in rows])
    golds = np.asarray([row["gold"] for row in rows])
    return {name: (M.METRICS[name], (preds, golds)) for name in task.metrics}


def _intervals(task: Task, rows: list[dict]) -> dict[str, tuple[float, float]]:
    return {name: M.bootstrap_ci(fn, arrays)
            for name, (fn, arrays) in metric_samples(task, rows).items()}


def _score_qa(task: Task, examples, predictions: dict) -> dict:
    refs = {ex.id: ex.answers for ex in examples}
    values = (M.squad_v2 if task.key == "squad_v2" else M.squad_v1)(predictions, refs)
    return {k: v for k, v in values.items() if k != "total"}


def evaluate(method, model, task: Task, examples: list, features: list[dict], padding: str,
             batch_size: int, max_length: int) -> Evaluation:
    model.eval()
    started = time.perf_counter()
    logits, traces = run_model(method, model, features, padding, batch_size, max_length)
    seconds = time.perf_counter() - started
    positions = sum(t["tokens"][0] for t in traces)
    macs_sum = sum(t["macs"] for t in traces)
    shared = {t["precomputed_key"]: t["precomputed_macs"] for t in traces
              if "precomputed_key" in t}
    if task.kind == EXTRACTIVE_QA:
        predictions, null_odds = decode_predictions(
            examples, [f["window"] for f in features], [lg[:, 0] for lg in logits], [lg[:, 1] for lg in logits],
            with_null=task.key == "squad_v2")
        values = _score_qa(task, examples, predictions)
        per_example: dict[int, dict] = {}
        for feature, trace in zip(features, traces, strict=True):
            entry = per_example.setdefault(feature["example_index"], {
                "windows": 0, "length": [], "exit_layer": [], "tokens": [], "extra_macs": 0,
                "macs": 0})
            entry["windows"] += 1
            entry["length"].append(trace["length"])
            entry["exit_layer"].append(trace["exit_layer"])
            entry["tokens"].append(trace["tokens"])
            entry["extra_macs"] += trace["extra_macs"]
            entry["macs"] += trace["macs"]
        rows = [{"id": ex.id, "prediction": predictions.get(ex.id, ""), "gold": ex.answers,
                 "null_odds": null_odds.get(ex.id), **per_example[i]}
                for i, ex in enumerate(examples)]
    else:
        stacked = torch.stack(logits)
        preds = (stacked.argmax(-1).tolist() if task.kind == CLASSIFICATION
                 else stacked.squeeze(-1).tolist())
        rows = [{"id": ex.id, "prediction": p, "gold": ex.label, **t}
                for ex, p, t in zip(examples, preds, traces, strict=True)]
        values = {name: fn(*arrays) for name, (fn, arrays) in metric_samples(task, rows).items()}
    intervals = _intervals(task, rows)
    return Evaluation(padding, values, intervals, rows, macs_sum, positions, seconds,
                      sum(shared.values()))

