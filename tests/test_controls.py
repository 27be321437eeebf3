"""Random-removal controls and predictor diagnostics (skimbench.decisions, skimbench.controls):
a control keeps the method's per-example, per-layer counts (hence its MACs) but other tokens,
never a protected one; keeping everything replays the method exactly; DeeBERT's control keeps
the exit-layer histogram; the AUC ranks a saliency-perfect predictor 1.0 and a constant 0.5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_deebert import MIXED, rows, spread
from test_model import features
from test_simple_baselines import tiny
from test_skimming_methods import (  # noqa: F401 (a fixture)
    LENGTHS,
    blockskim_mixed,
    build,
    mixed_transkimmer,
    with_settings,
)

from skimbench.controls import baseline_weights, diagnostics, important_tokens, replay_order
from skimbench.decisions import Observed, Observer, RandomReplay, Recorder, random_choice
from skimbench.features import collate
from skimbench.method import get_method
from skimbench.metrics import paired_difference, roc_auc
from skimbench.model import Output, Trace
from skimbench.saliency import compute_saliency
from skimbench.skim import Tokens, decide_tokens
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task


class Spy(Observer):
    """Passes every decision to `inner` and keeps what it returned, with the candidates."""

    def __init__(self, inner: Observer):
        self.inner, self.seen = inner, []

    def begin(self, index):
        self.inner.begin(index)

    def decide(self, keep, candidates, layer, scores, positions, reference):
        out = self.inner.decide(keep, candidates, layer, scores, positions, reference)
        self.seen.append((out, candidates, positions))
        return out


def own_and_random(method, model, batches, replay_model=None, seed=0):
    """The method's outputs with its decisions recorded, then the random control's."""
    recorder = Recorder()
    own_spy = Spy(recorder)
    random_spy = Spy(RandomReplay(recorder.counts, seed))
    observed_own, observed_random = Observed(method, own_spy), Observed(method, random_spy)
    with torch.inference_mode():
        own = [observed_own.forward(model, b) for b in batches]
        control = [observed_random.forward(replay_model or model, b) for b in batches]
    return own, control, own_spy.seen, random_spy.seen


def test_random_choice_draws_the_counts_among_candidates_only():
    candidates = torch.tensor([[False, True, True, True, False, True],
                               [False, True, False, True, True, True]])
    counts = torch.tensor([2, 3])
    draws = [random_choice(candidates, counts, torch.Generator().manual_seed(s))
             for s in range(40)]
    for chosen in draws:
        assert chosen.sum(dim=1).tolist() == [2, 3]
        assert not bool((chosen & ~candidates).any())
    # uniform: every candidate of row 0 is drawn sometimes, and not always
    hits = torch.stack(draws)[:, 0].sum(dim=0)
    assert hits[candidates[0]].min() > 0 and hits[candidates[0]].max() < 40
    same = random_choice(candidates, counts, torch.Generator().manual_seed(3))
    assert torch.equal(same, draws[3])
    with pytest.raises(RuntimeError, match="fewer candidates"):
        random_choice(candidates, torch.tensor([5, 0]), torch.Generator())


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_transkimmer_control_keeps_counts_and_macs_but_other_tokens(kind):
    method, model = mixed_transkimmer(kind)
    batches = [collate([f], None) for f in features(LENGTHS)] + [collate(features(LENGTHS),
                                                                         None)]
    own, control, own_seen, random_seen = own_and_random(method, model, batches)
    for a, b in zip(own, control, strict=True):
        assert torch.equal(a.trace.query_tokens, b.trace.query_tokens)
        assert torch.equal(a.trace.macs(model.hidden_size, model.ffn_size),
                           b.trace.macs(model.hidden_size, model.ffn_size))
    differs = 0
    for (mine, candidates, _), (theirs, same_candidates, _) in zip(own_seen, random_seen,
                                                                    strict=True):
        assert torch.equal((mine & candidates).sum(1), (theirs & same_candidates).sum(1))
        assert bool(theirs[:, 0].all())  # [CLS] is never a candidate: always kept
        differs += int(not torch.equal(mine & candidates, theirs & same_candidates))
    assert differs >= len(own_seen) // 2  # other tokens, not the method's
    assert any(not torch.allclose(a.logits, b.logits) for a, b in zip(own, control,
                                                                      strict=True))


def test_a_control_of_a_method_that_keeps_everything_is_the_method():
    method, model = build("transkimmer", CLASSIFICATION, keep_threshold=0.0)
    batches = [collate([f], None) for f in features(LENGTHS)]
    own, control, _, _ = own_and_random(method, model, batches)
    for a, b in zip(own, control, strict=True):
        torch.testing.assert_close(a.logits, b.logits)


def test_topk_control_keeps_cls_and_the_kept_share():
    method = get_method("topk-cls")(get_method("topk-cls").Config(keep_ratio=0.5))
    model = tiny(CLASSIFICATION)  # top-k runs on the fine-tuned baseline as it is
    batches = [collate([f], None) for f in features(LENGTHS)]
    own, control, own_seen, random_seen = own_and_random(method, model, batches, seed=7)
    for a, b in zip(own, control, strict=True):
        assert torch.equal(a.trace.query_tokens, b.trace.query_tokens)
    assert any(not torch.equal(m, t) for (m, _, _), (t, _, _) in zip(own_seen, random_seen,
                                                                     strict=True))
    assert all(bool(t[:, 0].all()) for t, _, _ in random_seen)


def test_blockskim_control_removes_whole_blocks_and_spares_the_question(request):
    method, model = request.getfixturevalue("blockskim_mixed")
    method = with_settings(method, protect_question=True)
    feats = features(LENGTHS)
    for f in feats:
        f["token_type_ids"] = [0] * 40 + [1] * (len(f["input_ids"]) - 40)  # question 0..39
    batches = [collate([f], None) for f in feats]
    own, control, own_seen, random_seen = own_and_random(method, model, batches, seed=2)
    for a, b in zip(own, control, strict=True):
        assert torch.equal(a.trace.query_tokens, b.trace.query_tokens)
    for theirs, candidates, _ in random_seen:
        assert not bool(candidates[:, :2].any())  # blocks 0-1 hold the question
        assert bool(theirs[:, :2].all())
    assert any(not torch.equal(m & c, t & c)
               for (m, c, _), (t, _, _) in zip(own_seen, random_seen, strict=True))
    # the block keep decision acts on whole blocks: every width is a multiple of 32
    assert all(w % 32 == 0 for b in control for w in b.trace.query_tokens[0].tolist())


def test_deebert_control_shuffles_exit_layers_between_examples():
    model = spread()
    method = get_method("deebert")(get_method("deebert").Config(entropy=MIXED))
    batches = [collate([f], None) for f in rows()]
    recorder = Recorder()
    with torch.inference_mode():
        observed = Observed(method, recorder)
        own = [observed.forward(model, b) for b in batches]
        order = replay_order(method, len(batches), seed=1)
        replay = Observed(method, RandomReplay(recorder.counts, 1, order))
        control = [replay.forward(model, b) for b in batches]
    exits = [int(o.trace.exit_layer) for o in own]
    shuffled = [int(c.trace.exit_layer) for c in control]
    assert sorted(exits) == sorted(shuffled) and set(exits) == {1, 3, 4}
    assert shuffled == [exits[i] for i in order] and shuffled != exits


def test_random_baseline_control_holds_the_baselines_weights():
    method, model = mixed_transkimmer(CLASSIFICATION)
    base = tiny(CLASSIFICATION)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.01)
    clone = baseline_weights(model, base)
    for name, value in base.state_dict().items():
        assert torch.equal(clone.state_dict()[name], value)
    for name, value in model.state_dict().items():
        if name.startswith("skim_predictors"):
            assert torch.equal(clone.state_dict()[name], value)
    assert not torch.equal(model.state_dict()["head.weight"], base.state_dict()["head.weight"])


def test_roc_auc_and_paired_difference_by_hand():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5)
    assert roc_auc([0.2, 0.9], [1, 1]) is None
    accuracy = lambda p, g: 100.0 * float(np.mean(p == g))  # noqa: E731
    gold = np.array([1, 0, 1, 1, 0, 1, 0, 0])
    ours, theirs = gold.copy(), gold.copy()
    theirs[:2] = 1 - theirs[:2]  # the control misses two of eight
    value, (low, high) = paired_difference(accuracy, (ours, gold), (theirs, gold))
    assert value == pytest.approx(25.0)
    # paired: every resample's difference is 100 * (misses drawn) / 8, between 0 and 100
    assert 0.0 <= low < 25.0 < high <= 100.0
    same, interval = paired_difference(accuracy, (ours, gold), (ours, gold))
    assert same == 0.0 and interval == (0.0, 0.0)


class SaliencyScorer:
    """A one-decision method whose keep score is given per input position: with the baseline's
    own saliency, a perfect predictor of what matters; with a constant, an uninformed one."""

    def __init__(self, scores: list[torch.Tensor]):
        self.scores, self.calls = scores, 0

    def forward(self, model, batch):
        hidden = model.embed(batch)
        tokens = Tokens.start(hidden, batch["attention_mask"])
        score = self.scores[self.calls][None, : tokens.width]
        self.calls += 1
        decide_tokens(torch.ones_like(tokens.attend), tokens, 0, score)
        trace = Trace.dense(1, tokens.width, len(model.layers), torch.zeros(1))
        return Output(model(batch).logits, trace)


@pytest.mark.parametrize("constant, expected", [(False, 1.0), (True, 0.5)])
def test_diagnostics_rank_a_saliency_predictor_1_and_a_constant_one_half(constant, expected):
    base = tiny(CLASSIFICATION)
    feats = features(LENGTHS)
    saliency = compute_saliency(base, feats, batch_size=2)
    scores = [torch.ones(len(f["input_ids"])) if constant else saliency[i, :len(f["input_ids"])]
              for i, f in enumerate(feats)]
    recorder = Recorder()
    scorer = Observed(SaliencyScorer(scores), recorder)
    with torch.inference_mode():
        for f in feats:
            scorer.forward(base, collate([f], None))
    result = diagnostics(recorder, base, get_task("sst2"), feats, batch_size=2)
    [layer] = result["layers"]
    assert layer["auc"] == pytest.approx(expected)
    # every real token but [CLS] is a candidate; 30% of each example's tokens are important
    assert layer["important"] + layer["other"] == sum(n - 1 for n in LENGTHS)
    marks = important_tokens(saliency, feats)
    assert [int(m.sum()) for m in marks] == [12, 21, 30, 39]
    assert sum(layer["important_hist"]) == layer["important"]


def test_a_control_run_records_the_control_and_no_time(tiny_data, tmp_path):
    from skimbench.runner import RunSpec, run

    common = dict(method="transkimmer", task="sst2", profile="smoke", padding="none",
                  out=tmp_path, data_dir=tiny_data)
    own = json.loads((run(RunSpec(**common), echo=lambda _: None) / "record.json").read_text())
    control_dir = run(RunSpec(**common, overrides={"control": "random"}), echo=lambda _: None)
    control = json.loads((control_dir / "record.json").read_text())
    assert control["control"] == "random" and control["controls"] is None
    assert control["train"][0]["stage"] == "reused"  # an inference setting: same weights
    assert control["padding"]["none"]["macs_sum"] == own["padding"]["none"]["macs_sum"]
    assert control["padding"]["none"]["cpu_time_speedup"] is None
    assert own["controls"]["random"]["macs_sum"] == own["padding"]["none"]["macs_sum"]
    assert own["controls"]["random"]["metrics"] == control["metrics"]
    assert own["diagnostics"]["layers"][0]["layer"] == 0


@pytest.mark.parametrize("method, settings, message", [
    ("ltp", {"control": "bogus"}, "control must be none or one of random, random-baseline"),
    ("deebert", {"control": "random"}, "run it with --padding none"),
])
def test_a_control_that_cannot_run_is_one_usage_error(tiny_data, tmp_path, method, settings,
                                                      message):
    from skimbench.errors import UsageError
    from skimbench.runner import RunSpec, run

    with pytest.raises(UsageError, match=message):
        run(RunSpec(method=method, task="sst2", profile="smoke", out=tmp_path,
                    data_dir=tiny_data, overrides=settings), echo=lambda _: None)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
