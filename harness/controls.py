"""Did the predictor learn? Random-removal controls and predictor diagnostics.

A learned token-removal method's accuracy at some speedup says nothing on its own: removing
the same number of tokens at random might do as well. So every run of such a method (its config
takes `ControlSettings`) is evaluated three times on the same examples without padding:

- the method itself, with every keep decision recorded (`decisions.Recorder`);
- `random`: the same model, each decision replaced by a uniform random choice of as many
  candidates per example and layer (`decisions.RandomReplay`), so the trace, and the MACs, are
  the method's; tokens the method never removes stay (DeeBERT: the recorded exit schedules are
  shuffled between examples, so the exit-layer histogram is the method's);
- `random-baseline`: the same random schedule on the fine-tuned baseline's weights (what
  removal alone costs, without the method's training).

The lift over a control is the method's metric minus the control's, with a paired bootstrap
interval over examples. The diagnostics rank each decision layer's keep scores against a
reference of what matters (ROC AUC, and score histograms): the method's own labels where it
has them (Block-Skim's answer blocks), otherwise the top 30% of each example's real tokens by
the fine-tuned baseline's gradient x input saliency.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from skimbench import metrics as M
from skimbench.decisions import Observed, RandomReplay, Recorder
from skimbench.evaluate import Evaluation, evaluate, metric_samples
from skimbench.method import CONTROLS, Method
from skimbench.saliency import compute_saliency
from skimbench.tasks import REGRESSION, Task

CONTROL_PADDING = "none"   # every removed candidate is a real token; one example per pass
IMPORTANT_SHARE = 0.3      # the top 30% of an example's real tokens by saliency are important
HISTOGRAM_BINS = 20


def check_control(method: Method, padding: tuple[str, ...]) -> str | None:
    """The control a run evaluates (None: the method itself), or why it cannot."""
    if not method.controlled:
        return None
    control = method.config.control
    if control == "none":
        return None
    if control not in CONTROLS:
        raise ValueError(f"control must be none or one of {', '.join(CONTROLS)}, got "
                         f"{control!r}")
    if method.control_unit == "example" and padding != (CONTROL_PADDING,):
        raise ValueError(f"{method.key}'s control shuffles whole examples' schedules: run it "
                         f"with --padding {CONTROL_PADDING}")
    return control


def baseline_weights(model: nn.Module, base_model: nn.Module) -> nn.Module:
    """A copy of the method's model holding the fine-tuned baseline's weights wherever the
    baseline has them (the encoder and task head); the method's own modules stay."""
    clone = copy.deepcopy(model)
    own = clone.state_dict()
    state = base_model.state_dict()
    foreign = [key for key in state if key not in own or own[key].shape != state[key].shape]
    if foreign:
        raise ValueError(f"the method's model does not hold the baseline's weights under the "
                         f"same names ({', '.join(foreign[:3])}): no random-baseline control")
    clone.load_state_dict(state, strict=False)
    return clone.eval()


def replay_order(method: Method, passes: int, seed: int) -> list[int]:
    """Which recorded pass each replayed pass takes its counts from."""
    if method.control_unit == "example":
        return torch.randperm(passes, generator=torch.Generator().manual_seed(seed)).tolist()
    return list(range(passes))


def evaluate_control(control: str, method: Method, model: nn.Module, base_model: nn.Module,
                     recorder: Recorder, seed: int, task: Task, examples: list,
                     features: list[dict], padding: str, batch_size: int, max_length: int
                     ) -> Evaluation:
    """One control's evaluation, replaying the counts `recorder` took from the method's own
    evaluation on exactly these features, batches and padding mode."""
    chosen = model if control == "random" else baseline_weights(model, base_model)
    replay = RandomReplay(recorder.counts, seed,
                          replay_order(method, len(recorder.counts), seed))
    return evaluate(Observed(method, replay), chosen, task, examples, features, padding,
                    batch_size, max_length)


@dataclass
class ControlResult:
    """One control beside the method, on the same examples (the record's `controls`)."""

    metrics: dict[str, float]
    metric_ci: dict[str, tuple[float, float]]
    macs_sum: int
    method_macs_sum: int
    flops_speedup: float            # the baseline's MACs over the control's, no padding
    lift: dict[str, float]          # method metric - control metric, points
    lift_ci: dict[str, tuple[float, float]]  # paired bootstrap 95% interval


def lift(task: Task, ours: Evaluation, theirs: Evaluation) -> tuple[dict, dict]:
    """Metric differences (ours - theirs) with paired bootstrap intervals over examples."""
    mine, other = metric_samples(task, ours.predictions), metric_samples(task, theirs.predictions)
    values, intervals = {}, {}
    for name, (statistic, arrays) in mine.items():
        values[name], intervals[name] = M.paired_difference(statistic, arrays, other[name][1])
    return values, intervals


def run_controls(method: Method, model: nn.Module, base_model: nn.Module, own: Evaluation,
                 recorder: Recorder, baseline_macs: int, seed: int, task: Task, examples: list,
                 features: list[dict], batch_size: int, max_length: int) -> dict:
    """Both controls beside the method's own `none` evaluation (recorded by `recorder`)."""
    out = {"padding": CONTROL_PADDING, "seed": seed, "unit": method.control_unit}
    for control in CONTROLS:
        e = evaluate_control(control, method, model, base_model, recorder, seed, task,
                             examples, features, CONTROL_PADDING, batch_size, max_length)
        values, intervals = lift(task, own, e)
        out[control] = asdict(ControlResult(
            e.metrics, e.metric_ci, e.macs_sum, own.macs_sum, baseline_macs / e.macs_sum,
            values, intervals))
    return out


# -- predictor diagnostics -----------------------------------------------------------------------


def important_tokens(saliency: torch.Tensor, features: list[dict],
                     share: float = IMPORTANT_SHARE) -> list[torch.Tensor]:
    """Per feature, a bool per input position: among its top `share` of real tokens by
    saliency (at least one)."""
    marks = []
    for row, feature in zip(saliency, features, strict=True):
        n = len(feature["input_ids"])
        top = row[:n].topk(max(1, math.ceil(share * n))).indices
        marks.append(torch.zeros(n, dtype=torch.bool).scatter_(0, top, True))
    return marks


def layer_diagnostics(layer: int, scores: np.ndarray, important: np.ndarray,
                      examples: np.ndarray) -> dict:
    """ROC AUC of the keep scores against the reference, and both classes' histograms.

    `auc` ranks within each example (a keep decision ranks an example's own tokens) and
    averages over the examples that have both classes; `pooled_auc` ranks every candidate of
    the eval set together (what one global threshold sees)."""
    finite = np.isfinite(scores)
    scores, important, examples = scores[finite], important[finite], examples[finite]
    per_example = [M.roc_auc(scores[examples == e], important[examples == e])
                   for e in np.unique(examples)]
    per_example = [auc for auc in per_example if auc is not None]
    low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    edges = np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)
    return {"layer": layer, "auc": float(np.mean(per_example)) if per_example else None,
            "examples": len(per_example), "pooled_auc": M.roc_auc(scores, important),
            "important": int(important.sum()), "other": int((~important).sum()),
            "edges": edges.tolist(),
            "important_hist": np.histogram(scores[important], edges)[0].tolist(),
            "other_hist": np.histogram(scores[~important], edges)[0].tolist()}


def diagnostics(recorder: Recorder, base_model: nn.Module, task: Task, features: list[dict],
                batch_size: int) -> dict | None:
    """Per decision layer, how well the method's keep scores separate what matters (the
    record's `diagnostics`); None when the method scored nothing."""
    if not recorder.scored:
        return None
    own_labels = all(slots.reference is not None for slots in recorder.scored)
    marks = None
    if not own_labels:
        if task.kind == REGRESSION:  # no gold class to take a gradient of
            return None
        marks = important_tokens(compute_saliency(base_model, features, batch_size), features)
    by_layer: dict[int, tuple[list, list, list]] = {}
    for slots in recorder.scored:
        scores, labels, examples = by_layer.setdefault(slots.layer, ([], [], []))
        scores.append(slots.scores.numpy())
        labels.append((slots.reference if own_labels
                       else marks[slots.feature][slots.positions]).numpy())
        examples.append(np.full(len(slots.scores), slots.feature))
    layers = [layer_diagnostics(layer, *(np.concatenate(part) for part in parts))
              for layer, parts in sorted(by_layer.items())]
    return {"reference": "method labels" if own_labels else
            f"baseline saliency, top {IMPORTANT_SHARE:.0%} of real tokens",
            "padding": CONTROL_PADDING, "layers": layers}
