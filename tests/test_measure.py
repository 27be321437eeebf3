"""Protocol measurements: MACs against the baseline, the counter cross-check that catches a
trace that lies, the oracle replay, and the timer's A/B arithmetic."""

from __future__ import annotations

import time

import pytest
import torch
from test_model import features
from test_simple_baselines import method, tiny

from skimbench.evaluate import evaluate
from skimbench.features import collate
from skimbench.latency import fit_floor
from skimbench.measure import measure_mode, replay_all, timing_batches
from skimbench.method import Method
from skimbench.model import Output, Trace
from skimbench.profiles import budget_for
from skimbench.tasks import TextExample, get_task
from skimbench.timing import LoadMeter, TimeStats, TimingConfig, time_ab


class MaskingOnly(Method):
    """Claims to drop half the tokens but computes all of them (a masking 'speedup')."""

    def forward(self, model, batch):
        out = model(batch)
        lengths = out.trace.query_tokens // 2
        trace = Trace(lengths, lengths, lengths, lengths * lengths, out.trace.exit_layer,
                      out.trace.extra_macs)
        return Output(out.logits, trace)


def setup(lengths=(5, 9, 14, 7)):
    task = get_task("sst2")
    budget = budget_for("smoke", task)
    feats = features(list(lengths))
    examples = [TextExample(str(i), "x", None, 0) for i in range(len(feats))]
    return task, budget, feats, examples


@pytest.mark.parametrize("padding", ["sequence", "batch", "none"])
def test_flops_speedup_is_the_ratio_of_macs_sums(padding):
    task, budget, feats, examples = setup()
    base_model, baseline = tiny(), Method(Method.Config())
    trunc = method("truncate", keep_tokens=6)
    args = (task, examples, feats, padding, 2, 16)
    e = evaluate(trunc, base_model, *args)
    b = evaluate(baseline, base_model, *args)
    m = measure_mode(trunc, base_model, baseline, base_model, feats, padding, budget, 16, e, b,
                     None)
    assert m.flops_speedup == pytest.approx(b.macs_sum / e.macs_sum)
    assert m.counted_macs == m.schedule_macs and not m.macs_mismatch
    assert m.cpu_time_speedup > 0 and m.oracle_speedup > 0
    assert m.removal_efficiency == pytest.approx(m.cpu_time_speedup / m.oracle_speedup)


def test_a_trace_that_claims_less_than_was_computed_is_flagged():
    task, budget, feats, examples = setup()
    model, liar = tiny(), MaskingOnly(Method.Config())
    e = evaluate(liar, model, task, examples, feats, "batch", 2, 16)
    m = measure_mode(liar, model, None, None, feats, "batch", budget, 16, e, None, None)
    assert m.macs_mismatch and m.counted_macs > 1.5 * m.schedule_macs


def test_replay_runs_the_method_schedule():
    model = tiny()
    batches = [collate(features([6, 13, 20]), None)]
    calls = []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
    replay_all(model, method("truncate", keep_tokens=8), batches)()
    assert calls[-2:] == [8, 8]


class ShrinksBeforeFFN(Method):
    """Claims its FFNs ran on 4 tokens while attention saw them all (PoWER-BERT's shape)."""

    def forward(self, model, batch):
        out = model(batch)
        out.trace.ffn_tokens[:] = 4
        return out


def test_replay_runs_the_ffn_at_its_own_count():
    model = tiny()
    batches = [collate(features([6, 13, 20]), None)]
    attention, ffn = [], []
    for layer in model.layers:
        layer.attention.register_forward_hook(lambda m, a, o: attention.append(a[0].shape[1]))
        layer.intermediate.register_forward_hook(lambda m, a, o: ffn.append(a[0].shape[1]))
    replay_all(model, ShrinksBeforeFFN(Method.Config()), batches)()
    assert attention[-2:] == [20, 4] and ffn[-2:] == [4, 4]  # the replay, after the plan


def test_timing_sample_is_fixed_per_mode():
    _, budget, feats, _ = setup()
    assert [len(b["input_ids"]) for b in timing_batches(feats, "none", budget, 16)] == [1, 1]
    assert timing_batches(feats, "sequence", budget, 16)[0]["input_ids"].shape[1] == 16


def test_time_stats_and_ab_ratio():
    stats = TimeStats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median_s, stats.p10_s, stats.p90_s, stats.samples) == (3.0, 1.0, 5.0, 5)
    ab = time_ab(lambda: time.sleep(0.004), lambda: time.sleep(0.001),
                 TimingConfig(warmup=1, min_iters=8, min_seconds=0.0))
    assert ab.baseline.samples == ab.method.samples >= 8
    assert 1.5 < ab.speedup < 6  # sleeps: a correctness check of the ratio, not a speed target


def test_load_meter_counts_only_other_processes(monkeypatch):
    readings = iter([(100, 1000), (300, 1400)])  # (busy, total) jiffies at 100 per second
    monkeypatch.setattr("skimbench.timing._cpu_jiffies", lambda: next(readings))
    own = iter([0.0, 1.0])
    monkeypatch.setattr("skimbench.timing._own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    with LoadMeter() as load:
        pass
    # machine busy 2.0 s of 4.0 s capacity, 1.0 s of it ours -> others used 1.0 / 4.0
    assert load.other_load == pytest.approx(0.25)


def test_latency_floor_fit_recovers_t0_and_rate():
    macs = [1e9, 2e9, 4e9, 8e9]
    seconds = [0.005 + m / 5e10 for m in macs]
    t0, rate = fit_floor(macs, seconds)
    assert t0 == pytest.approx(0.005) and rate == pytest.approx(5e10)


def test_baseline_run_is_timed_alone():
    task, budget, feats, examples = setup()
    model, baseline = tiny(), Method(Method.Config())
    e = evaluate(baseline, model, task, examples, feats, "none", 2, 16)
    m = measure_mode(baseline, model, None, None, feats, "none", budget, 16, e, None, 12.5)
    assert m.flops_speedup == 1.0 and m.cpu_time_speedup == 1.0 and m.oracle_speedup is None
    assert m.cpu["method"]["samples"] >= 2 and m.peak_rss_mb == 12.5
    assert torch.get_num_threads() >= 1
