"""The protocol's measurements for one padding mode (DESIGN 3, 4): MACs against the baseline,
the FLOPs-counter cross-check, A/B CPU timing, trace replay (oracle) and peak memory.

A method that reuses precomputed work (a cache, Trace.precomputed_macs) gets two costs: the
online one (the cache assumed, what `flops_speedup` and `cpu_time_speedup` measure, timed with
the cache warm from the evaluation) and the total one (`total_*`: each cached entry charged
once, i.e. amortised over the examples sharing it; timed with the cache emptied before every
pass over the timing sample, so each pass also builds the entries that sample reads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import islice

import torch
from torch import nn

from skimbench.features import collate, eval_batches
from skimbench.flops import DEFAULT_COUNTER, count_macs
from skimbench.profiles import Budget
from skimbench.timing import ABTiming, TimingConfig, time_ab, time_cuda, time_one

MACS_TOLERANCE = 0.01  # DESIGN 4.2: schedule vs counted MACs may differ by at most 1%


@dataclass
class ModeMeasurement:
    """What one padding mode measured, beside the metric (stored in the record)."""

    macs_sum: int
    macs_per_example: float
    positions: int                  # token positions entering layer 1, summed over the eval set
    eval_seconds: float
    baseline_macs_sum: int
    flops_speedup: float            # baseline MACs sum / method MACs sum, same examples and mode
    counter: str                    # which FLOPs counter checked the trace
    counted_macs: int               # that counter on the timing sample
    schedule_macs: int              # the trace's MACs on the same sample
    macs_mismatch: bool             # flop_counter disagrees with the trace by more than 1%
    time_unit: str                  # what one timed sample is
    time_examples: int              # examples per timed sample
    cpu: dict | None                # ABTiming (baseline vs method), or the baseline alone
    cpu_time_speedup: float | None
    oracle_speedup: float | None    # the method's schedule replayed through the plain encoder
    removal_efficiency: float | None
    gpu: dict | None                # {dtype: {batch size: speedup and medians}} when a GPU is there
    peak_rss_mb: float | None
    # precomputed (cached) work, charged once per entry; absent from records written before
    precomputed_macs_sum: int = 0
    precomputed_size: dict | None = None       # the cache after the evaluation: entries, bytes
    total_flops_speedup: float | None = None   # baseline MACs / (online + precomputed MACs)
    total_cpu_time_speedup: float | None = None  # A/B, the cache emptied before each pass


def timing_batches(features: list[dict], padding: str, budget: Budget, max_length: int
                   ) -> list[dict]:
    """The fixed sample every timing in this mode uses: the first examples or batches."""
    if padding == "none":
        return [collate([f], None) for f in features[: budget.time_examples]]
    return list(islice(eval_batches(features, padding, budget.eval_batch_size, max_length),
                       budget.time_batches))


def forward_all(method, model: nn.Module, batches: list[dict], cold: bool = False
                ) -> Callable[[], None]:
    """One pass over the batches; `cold` empties the method's cache first (the total cost)."""
    def call() -> None:
        if cold:
            method.clear_precomputed()
        with torch.inference_mode():
            for batch in batches:
                method.forward(model, batch)

    return call


def replay_all(model: nn.Module, method, batches: list[dict]) -> Callable[[], None]:
    """The oracle: the plain encoder run at exactly the method's per-layer token counts.

    No predictor, no gather, no mask: per batch, layer l's attention gets the largest
    query-token count the method had in that layer and its FFN the largest FFN-token count
    (fewer where a method removes tokens in between), on as many rows as ran that layer (rows
    that exited early leave the batch); layers past the latest exit are not run.
    """
    hidden_size = model.hidden_size
    plans = []
    with torch.inference_mode():
        for batch in batches:
            trace = method.forward(model, batch).trace
            exit_layer = int(trace.exit_layer.max())
            lengths = trace.query_tokens[:, :exit_layer].max(dim=0).values.tolist()
            ffn_lengths = trace.ffn_tokens[:, :exit_layer].max(dim=0).values.tolist()
            rows = (trace.query_tokens[:, :exit_layer] > 0).sum(dim=0).tolist()
            start = torch.randn(len(batch["input_ids"]), max(lengths, default=1), hidden_size)
            plans.append((start, list(zip(rows, lengths, ffn_lengths, strict=True))))

    def call() -> None:
        with torch.inference_mode():
            for start, counts in plans:
                hidden, previous = start, start.shape[1]
                for layer, (rows, n, ffn) in zip(model.layers, counts, strict=False):
                    if n > previous:  # the schedule grows again (DeFormer's segments joined)
                        hidden = torch.cat([hidden, start[:len(hidden), hidden.shape[1]:n]],
                                           dim=1)
                    hidden, previous = hidden[:rows, :n], n
                    if n == 0:  # every token was removed: nothing more runs
                        break
                    if ffn == n:
                        hidden = layer(hidden, None)
                    else:
                        attended, _ = layer.attention(hidden, None)
                        hidden = layer.feed_forward_chunk(attended[:, :ffn])
                model.logits(hidden)

    return call


class _MethodForward(nn.Module):
    """method.forward(model, batch) as a module, for FLOPs counters that want one."""

    def __init__(self, method, model: nn.Module):
        super().__init__()
        self.method, self.model = method, model

    def forward(self, batch: dict):
        return self.method.forward(self.model, batch)


def counted_vs_schedule(method, model: nn.Module, batches: list[dict],
                        counter: str = DEFAULT_COUNTER) -> tuple[int, int]:
    """FLOPs-counter MACs and trace MACs of the same forward passes."""
    counted = schedule = 0
    wrapper = _MethodForward(method, model).eval()
    with torch.inference_mode():
        for batch in batches:
            counted += count_macs(wrapper, batch, counter)
            trace = method.forward(model, batch).trace
            schedule += int(trace.macs(model.hidden_size, model.ffn_size).sum())
    return counted, schedule


def gpu_speedups(method, model, baseline, base_model, features: list[dict], padding: str,
                 max_length: int, config: TimingConfig) -> dict:
    """CUDA-event timing, fp32 and bf16, batch 1/8/32/128 (DESIGN 4.3); GPU machines only.

    Each batch is the first examples of the eval set, padded to the longest (to the task length
    in `sequence` mode): at batch > 1 there is no pad-free `none` on a GPU."""
    results: dict = {}
    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model.to(device, dtype)
        base_model.to(device, dtype)
        for size in (1, 8, 32, 128):
            pad_to = max_length if padding == "sequence" else None
            batch = {k: v.to(device) for k, v in collate(features[:size], pad_to).items()}
            base = time_cuda(forward_all(baseline, base_model, [batch]), config)
            ours = time_cuda(forward_all(method, model, [batch]), config)
            results.setdefault(name, {})[size] = {
                "baseline_median_s": base.median_s, "method_median_s": ours.median_s,
                "speedup": base.median_s / ours.median_s,
                "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
            torch.cuda.reset_peak_memory_stats()
    model.to("cpu", torch.float32)
    base_model.to("cpu", torch.float32)
    return results


def measure_mode(method, model, baseline, base_model, features: list[dict], padding: str,
                 budget: Budget, max_length: int, evaluation, base_evaluation,
                 peak_rss_mb: float | None, counter: str = DEFAULT_COUNTER,
                 timed: bool = True) -> ModeMeasurement:
    """Compare the method with the baseline in one padding mode. For the baseline run itself,
    `base_model` is None: it is timed alone and its speedups are 1 by definition. `timed=False`
    (a random control, whose decisions are replayed from the method's) measures no time.

    Only flop_counter is held to the 1% agreement: torchprofile and ptflops count other ops by
    design (see skimbench.flops), so with them the difference is recorded, not flagged."""
    batches = timing_batches(features, padding, budget, max_length)
    config = TimingConfig(min_iters=budget.time_min_iters, min_seconds=budget.time_min_seconds,
                          warmup=1 if budget.time_min_seconds == 0 else 2)
    examples = sum(len(b["input_ids"]) for b in batches)
    counted, schedule = counted_vs_schedule(method, model, batches[: budget.count_batches],
                                            counter)
    mismatch = (counter == DEFAULT_COUNTER
                and abs(counted - schedule) > MACS_TOLERANCE * max(schedule, 1))
    gpu = total_time = None
    precomputed = evaluation.precomputed_macs_sum
    size = method.precomputed_size() if precomputed else None
    if not timed:
        cpu = speedup = oracle = efficiency = None
        base_macs = base_evaluation.macs_sum
    elif base_model is None:
        stats = time_one(forward_all(method, model, batches), config)
        cpu, speedup, oracle, efficiency = {"method": asdict(stats)}, 1.0, None, None
        base_macs = evaluation.macs_sum
    else:
        ab: ABTiming = time_ab(forward_all(baseline, base_model, batches),
                               forward_all(method, model, batches), config)
        replay = time_ab(forward_all(baseline, base_model, batches),
                         replay_all(model, method, batches), config)
        cpu, speedup = ab.to_json(), ab.speedup
        oracle, efficiency = replay.speedup, ab.speedup / replay.speedup
        base_macs = base_evaluation.macs_sum
        if precomputed:  # after the warm timings: this empties the cache
            total_time = time_ab(forward_all(baseline, base_model, batches),
                                 forward_all(method, model, batches, cold=True), config).speedup
        if torch.cuda.is_available():
            gpu = gpu_speedups(method, model, baseline, base_model, features, padding,
                               max_length, config)
    unit = ("seconds for the sample, one example at a time (batch 1)" if padding == "none"
            else f"seconds for the sample in batches of {budget.eval_batch_size}")
    return ModeMeasurement(
        macs_sum=evaluation.macs_sum, macs_per_example=evaluation.macs_sum / max(
            1, len(evaluation.predictions)), positions=evaluation.positions,
        eval_seconds=evaluation.seconds, baseline_macs_sum=base_macs,
        flops_speedup=base_macs / evaluation.macs_sum, counter=counter, counted_macs=counted,
        schedule_macs=schedule, macs_mismatch=mismatch, time_unit=unit,
        time_examples=examples, cpu=cpu, cpu_time_speedup=speedup, oracle_speedup=oracle,
        removal_efficiency=efficiency, gpu=gpu, peak_rss_mb=peak_rss_mb,
        precomputed_macs_sum=precomputed, precomputed_size=size,
        total_flops_speedup=(base_macs / (evaluation.macs_sum + precomputed)
                             if precomputed else None),
        total_cpu_time_speedup=total_time)
