"""Transkimmer and Block-Skim invariants (issue 5): a predictor that keeps everything gives the
baseline; what a predictor skims is physically gone (trace == FLOPs counter); masking and
removal give the same answers; the padding mode changes cost, not answers; training signals
reach the predictors."""

from __future__ import annotations

import json

import pytest
import torch
from test_model import features
from test_simple_baselines import counted_equals_schedule, tiny

from skimbench.backbone import resolve_backbone
from skimbench.errors import UsageError
from skimbench.features import collate
from skimbench.method import Context, check_supports, get_method
from skimbench.profiles import budget_for
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task

LENGTHS = [40, 70, 100, 130]


def build(key: str, kind: str, **settings):
    """Method and model on random:tiny, the task weights equal to `tiny(kind)`'s."""
    cls = get_method(key)
    task = get_task("squad" if kind == EXTRACTIVE_QA else "sst2")
    method = cls(cls.configure(cls.Config(**settings), task))
    ctx = Context(resolve_backbone("random:tiny"), task, budget_for("smoke", task), {})
    model = method.build(ctx)
    missing = model.load_state_dict(tiny(kind).state_dict(), strict=False).missing_keys
    assert all(k.startswith(("skim_predictors", "block_predictors")) for k in missing)
    return method, model.eval()


def with_settings(method, **settings):
    cls = type(method)
    return cls(cls.configure(cls.Config(**{**vars(method.config), **settings}),
                             get_task("sst2")))


# -- Transkimmer ------------------------------------------------------------------------------

def mixed_transkimmer(kind: str, **settings):
    """Predictors that keep about half the tokens at each layer."""
    method, model = build("transkimmer", kind, **settings)
    torch.manual_seed(1)
    for predictor in model.skim_predictors:
        predictor.net[4].weight.data.normal_(0.0, 1.0)
        predictor.net[4].bias.data.zero_()
    return method, model


def skims_some(trace, full: int) -> bool:
    widths = trace.query_tokens[0].tolist()
    return widths[-1] < full and widths[-1] > 0


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_transkimmer_keeping_everything_is_the_baseline(kind):
    method, model = build("transkimmer", kind, keep_threshold=0.0)
    batch = collate(features(LENGTHS), None)
    with torch.inference_mode():
        torch.testing.assert_close(method.forward(model, batch).logits,
                                   tiny(kind)(batch).logits, atol=1e-5, rtol=1e-5)


def test_transkimmer_starts_keeping_every_token():
    """Unbalanced init (mu0 = 5): before training nothing is skimmed."""
    method, model = build("transkimmer", CLASSIFICATION)
    trace = method.forward(model, collate(features(LENGTHS), None)).trace
    assert trace.query_tokens.tolist() == [[130, 130]] * 4


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("pad_to", [None, 160])
def test_transkimmer_removes_tokens_physically(kind, pad_to):
    method, model = mixed_transkimmer(kind)
    batch = collate(features(LENGTHS), pad_to)
    trace = method.forward(model, batch).trace
    assert skims_some(trace, batch["input_ids"].shape[1])
    counted_equals_schedule(method, model, batch)


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_transkimmer_masked_and_removed_inference_agree(kind):
    """The training forward (keys masked, renormalised) with argmax decisions == the gather."""
    method, model = mixed_transkimmer(kind)
    batch = collate(features(LENGTHS), None)
    with torch.inference_mode():
        removed = method.forward(model, batch)
        masked = with_settings(method, simulate=True).forward(model, batch)
    assert skims_some(removed.trace, 130)
    torch.testing.assert_close(masked.logits, removed.logits, atol=1e-5, rtol=1e-5)
    assert masked.trace.query_tokens.tolist() == [[130, 130]] * 4  # masking computes it all


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_transkimmer_answers_do_not_depend_on_padding_mode(kind):
    method, model = mixed_transkimmer(kind)
    feats = features(LENGTHS)
    with torch.inference_mode():
        batched = method.forward(model, collate(feats, 160)).logits
        for row, n in enumerate(LENGTHS):
            alone = method.forward(model, collate(feats[row:row + 1], None)).logits
            got = batched[row, :n] if kind == EXTRACTIVE_QA else batched[row]
            torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)


def test_transkimmer_never_skims_cls_and_forwards_skimmed_states():
    method, model = mixed_transkimmer(EXTRACTIVE_QA)
    batch = collate(features([130]), None)
    with torch.inference_mode():
        logits = method.forward(model, batch).logits
    assert logits.shape == (1, 130, 2)
    assert bool((logits.abs() < 1e3).all())  # every position gets a real span score


def test_transkimmer_training_loss_reaches_the_predictors():
    method, model = mixed_transkimmer(CLASSIFICATION)
    model.train()
    batch = collate(features(LENGTHS), None)
    losses = method.losses(model, batch)
    assert 0 < losses["skim"].item() < 1
    (losses["task"] + losses["skim"]).backward()
    for predictor in model.skim_predictors:
        assert predictor.net[1].weight.grad.abs().sum() > 0


def test_transkimmer_lambda_follows_the_scripts_or_the_paper_table():
    cls = get_method("transkimmer")
    assert cls.configure(cls.Config(), get_task("sst2")).skim_coefficient == 0.5
    assert cls.configure(cls.Config(), get_task("squad")).skim_coefficient == 0.3
    paper = cls.configure(cls.Config(preset="paper"), get_task("sst2"))
    assert paper.skim_coefficient == 0.3 and paper.gumbel_tau == 0.1
    assert cls.configure(cls.Config(skim_coefficient=0.9), get_task("sst2")
                         ).skim_coefficient == 0.9
    with pytest.raises(ValueError, match="keep_threshold"):
        cls.Config(keep_threshold=1.0)


# -- Block-Skim -------------------------------------------------------------------------------

@pytest.fixture
def blockskim_mixed():
    """Random block predictors with tau in the widest gap of the first layer's p_keep: about
    half the blocks go, and no decision sits near the threshold."""
    from skimbench.methods.blockskim import pad_to_blocks
    from skimbench.skim import Tokens, attention_layer_diagonal

    method, model = build("blockskim", EXTRACTIVE_QA)
    torch.manual_seed(1)
    for predictor in model.block_predictors.values():
        predictor.classifier.weight.data.normal_(0.0, 1.0)
    # the last layer's predictor keeps everything, so each row's answer span stays scorable
    model.block_predictors["1"].classifier.bias.data = torch.tensor([-1e3, 1e3])
    batch = pad_to_blocks(collate(features(LENGTHS), None), 32)
    with torch.inference_mode():
        tokens = Tokens.start(model.embed(batch), batch["attention_mask"])
        _, diagonal, _ = attention_layer_diagonal(model.layers[0], tokens.hidden,
                                                  tokens.mask(), 32)
        p_keep = model.block_predictors["0"](diagonal).softmax(-1)[..., 1].flatten().sort().values
    gaps = p_keep[1:] - p_keep[:-1]
    middle = slice(len(gaps) // 4, 3 * len(gaps) // 4)
    at = gaps[middle].argmax() + middle.start
    tau = float((p_keep[at] + p_keep[at + 1]) / 2)
    return with_settings(method, threshold=tau), model


def test_blockskim_keeping_everything_is_the_baseline():
    method, model = build("blockskim", EXTRACTIVE_QA, threshold=0.0)
    batch = collate(features(LENGTHS), None)
    with torch.inference_mode():
        torch.testing.assert_close(method.forward(model, batch).logits,
                                   tiny(EXTRACTIVE_QA)(batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad_to", [None, 160, 150])
def test_blockskim_removes_blocks_physically(blockskim_mixed, pad_to):
    method, model = blockskim_mixed
    batch = collate(features(LENGTHS), pad_to)
    trace = method.forward(model, batch).trace
    widths = trace.query_tokens[0].tolist()
    assert widths[0] == 160 and 0 < widths[1] < 160 and widths[1] % 32 == 0
    counted_equals_schedule(method, model, batch)


def test_blockskim_masked_and_removed_inference_agree(blockskim_mixed):
    method, model = blockskim_mixed
    batch = collate(features(LENGTHS), None)
    with torch.inference_mode():
        removed = method.forward(model, batch)
        masked = with_settings(method, simulate=True).forward(model, batch)
    assert removed.trace.query_tokens[0, 1] < 160
    for row, n in enumerate(LENGTHS):  # the real positions (pads' scores are never read)
        torch.testing.assert_close(masked.logits[row, :n], removed.logits[row, :n],
                                   atol=1e-5, rtol=1e-5)
    assert masked.trace.query_tokens[0].tolist() == [160, 160]


def test_blockskim_answers_do_not_depend_on_padding_mode(blockskim_mixed):
    """Filler alignment: a row's kept blocks and logits are those it gets alone."""
    method, model = blockskim_mixed
    feats = features(LENGTHS)
    with torch.inference_mode():
        batched = method.forward(model, collate(feats, 160)).logits
        widths = []
        for row, n in enumerate(LENGTHS):
            alone = method.forward(model, collate(feats[row:row + 1], None))
            widths.append(alone.trace.query_tokens[0, 1].item())
            torch.testing.assert_close(batched[row, :n], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert len(set(widths)) > 1  # rows really kept different numbers of blocks


def test_blockskim_faithful_batching_fills_with_next_best_blocks(blockskim_mixed):
    method, model = blockskim_mixed
    batch = collate(features(LENGTHS), 160)
    faithful = with_settings(method, faithful_batching=True)
    with torch.inference_mode():
        ours, theirs = method.forward(model, batch), faithful.forward(model, batch)
    assert ours.trace.query_tokens.tolist() == theirs.trace.query_tokens.tolist()  # same cost
    real = lambda logits: (logits > -1e3).all(-1).sum(-1)  # noqa: E731
    assert (real(theirs.logits) >= real(ours.logits)).all()  # more positions still scored
    assert (real(theirs.logits) > real(ours.logits)).any()


def test_blockskim_predictor_macs_match_the_spec():
    """methods-spec 3.2: 1,660,416 MACs per block for A = 12, b = 32."""
    from skimbench.methods.blockskim import BlockPredictor

    assert BlockPredictor.macs(12, 32) == 1_660_416


def test_blockskim_block_labels_follow_the_label_rule():
    from skimbench.methods.blockskim import IGNORE, BlockSkimConfig, block_labels

    batch = {"input_ids": torch.zeros(3, 96, dtype=torch.long),
             "attention_mask": torch.ones(3, 96, dtype=torch.long),
             "token_type_ids": torch.cat([torch.zeros(3, 40), torch.ones(3, 56)], 1).long(),
             "start_positions": torch.tensor([33, 63, 0]),
             "end_positions": torch.tensor([35, 64, 0])}
    code = block_labels(batch, BlockSkimConfig())
    assert code.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]   # one token per block: skip
    paper = block_labels(batch, BlockSkimConfig(label_rule="ge1"))
    assert paper.tolist() == [[0, 1, 0], [0, 1, 1], [0, 0, 0]]  # [CLS] answer: no block
    passage = block_labels(batch, BlockSkimConfig(label_rule="ge1", loss_blocks="passage_only"))
    assert passage.tolist() == [[IGNORE, IGNORE, 0], [IGNORE, IGNORE, 1], [IGNORE] * 2 + [0]]


def test_blockskim_training_runs_unskimmed_and_trains_the_predictors():
    method, model = build("blockskim", EXTRACTIVE_QA, threshold=1.0)
    model.train()
    batch = collate(features(LENGTHS), None)
    batch["start_positions"] = torch.tensor([5, 40, 70, 0])
    batch["end_positions"] = torch.tensor([8, 45, 72, 0])
    assert method.forward(model, batch).trace.query_tokens[0].tolist() == [160, 160]
    losses = method.losses(model, batch)
    (losses["task"] + losses["skim"]).backward()
    assert float(losses["skim"]) > 0
    for predictor in model.block_predictors.values():
        assert predictor.classifier.weight.grad.abs().sum() > 0


def test_blockskim_iclr_preset_is_one_layer_and_the_papers_weights():
    method, model = build("blockskim", EXTRACTIVE_QA, preset="iclr2021")
    c = method.config
    assert (c.skim_factor, c.balance_factor, c.loss_blocks, c.removed_policy) == (
        1.0, 4.0, "passage_only", "forward_states")
    assert list(model.block_predictors) == ["0"]  # layer L/3 of random:tiny's 2 layers
    assert c.augmented(12) == [3] and c.augmented(6) == [1]  # BERT-base layer 4, MiniLM 2


def test_blockskim_refuses_classification():
    with pytest.raises(UsageError, match="blockskim.*does not support classification"):
        check_supports(get_method("blockskim"), get_task("sst2"))


# -- end to end through the runner -----------------------------------------------------------

def test_blockskim_and_transkimmer_runs_write_per_mode_records(tiny_data, tmp_path):
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    for key, task in (("blockskim", "squad"), ("transkimmer", "sst2")):
        run_dir = run(RunSpec(method=key, task=task, profile="smoke", data_dir=tiny_data,
                              out=tmp_path), lambda _line: None)
        record = read_json(run_dir / "record.json")
        assert set(record["padding"]) == {"sequence", "batch", "none"}
        for mode in record["padding"].values():
            assert set(mode["metrics"]) == set(record["metrics"])
            assert not mode["macs_mismatch"] and mode["removal_efficiency"] > 0
        assert record["metrics"] == record["padding"]["none"]["metrics"]  # headline: none
        # the per-example trace: kept tokens per layer and the predictors' (and head's) MACs
        rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").open()]
        for row in rows:
            windows = row["tokens"] if key == "blockskim" else [row["tokens"]]  # QA: per window
            assert all(w == sorted(w, reverse=True) for w in windows)  # removed stays removed
            assert 0 < row["extra_macs"] < row["macs"]


def test_an_inference_setting_sweep_reuses_the_trained_weights(tiny_data, tmp_path):
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    spec = dict(method="blockskim", task="squad", profile="smoke", data_dir=tiny_data,
                out=tmp_path, padding="none")
    first = run(RunSpec(**spec), lambda _line: None)
    lines = []
    swept = run(RunSpec(**spec, overrides={"threshold": "0.9"}), lines.append)
    assert any("training skipped" in line for line in lines)
    record = read_json(swept / "record.json")
    assert record["needs"]["trained_weights"] == str(first)
    assert torch.equal(torch.load(first / "checkpoint/model.pt")["head.weight"],
                       torch.load(swept / "checkpoint/model.pt")["head.weight"])
    # a training setting is not an inference setting: that run trains
    lines.clear()
    run(RunSpec(**spec, overrides={"skim_factor": "1.0"}), lines.append)
    assert not any("training skipped" in line for line in lines)


@pytest.mark.parametrize("key,task", [("blockskim", "squad"), ("transkimmer", "sst2")])
def test_paper_profile_uses_the_methods_recipe_on_bert_base(tiny_data, tmp_path, key, task):
    """`--profile paper` runs the paper's recipe; here for one step on random:bert-base."""
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    cheap = {"max_steps": "1", "max_train_examples": "4", "max_eval_examples": "2",
             "time_examples": "1", "time_batches": "1", "time_min_seconds": "0",
             "time_min_iters": "1", "count_batches": "1", "eval_batch_size": "2"}
    run_dir = run(RunSpec(method=key, task=task, profile="paper", backbone="random:bert-base",
                          data_dir=tiny_data, out=tmp_path, padding="none", overrides=cheap),
                  lambda _line: None)
    budget = read_json(run_dir / "config.json")["budget"]
    expected = get_method(key).paper_budget(get_task(task))
    assert {k: budget[k] for k in expected} == expected
    assert read_json(run_dir / "record.json")["backbone"] == "random:bert-base"


@pytest.mark.parametrize("key,task,setting,message", [
    ("blockskim", "squad", "skim_layers=9", "skim_layers=9 but the backbone has 2 layers"),
    ("layerdrop", "sst2", "keep_layers=9", "keep_layers=9 but the backbone has only 2"),
])
def test_settings_the_backbone_cannot_take_fail_before_anything_runs(tiny_data, tmp_path, key,
                                                                     task, setting, message):
    from click.testing import CliRunner

    from skimbench.cli import main

    result = CliRunner().invoke(main, ["run", "-m", key, "-d", task, "--profile", "smoke",
                                       "--set", setting, "--data-dir", str(tiny_data),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_blockskim_protect_question_keeps_the_question_blocks():
    method, model = build("blockskim", EXTRACTIVE_QA, threshold=1.0, protect_question=True)
    feats = features([130])
    feats[0]["token_type_ids"] = [0] * 40 + [1] * 90  # [CLS] question [SEP] in 0..39
    batch = collate(feats, None)
    with torch.inference_mode():
        out = method.forward(model, batch)
        unprotected = with_settings(method, protect_question=False).forward(model, batch)
    assert out.trace.query_tokens[0].tolist() == [160, 64]  # blocks 0-1 hold the question
    assert bool((out.logits[0, :40] > -1e3).all()) and bool((out.logits[0, 64:] < -1e3).all())
    assert unprotected.trace.query_tokens[0].tolist() == [160, 0]
