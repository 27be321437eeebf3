"""PoWER-BERT and LTP invariants (issue 6): pruning disabled gives the baseline; what is pruned
between attention and FFN is physically gone (schedule == FLOPs counter, two lengths per layer);
one row alone keeps what it keeps inside a padded batch; the search/soft stages train their
retention vectors and thresholds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_model import features
from test_simple_baselines import counted_equals_schedule, tiny

from skimbench.backbone import resolve_backbone
from skimbench.errors import UsageError
from skimbench.features import collate
from skimbench.method import CHECKPOINT, Context, check_supports, get_method
from skimbench.model import TaskModel
from skimbench.profiles import budget_for
from skimbench.skim import attention_received
from skimbench.tasks import CLASSIFICATION, get_task
from skimbench.trainer import save_state

LENGTHS = [40, 70, 100, 130]
TASK_LENGTH = 160


def build(key: str, tmp_path, baseline: TaskModel | None = None, **settings):
    """The method on a finished 'baseline run' holding `tiny()`'s weights."""
    save_state(baseline or tiny(), tmp_path / "baseline" / CHECKPOINT)
    cls = get_method(key)
    task = get_task("sst2")
    method = cls(cls.configure(cls.Config(**settings), task))
    budget = replace(budget_for("smoke", task), max_length=TASK_LENGTH)
    ctx = Context(resolve_backbone("random:tiny"), task, budget, {"baseline": tmp_path / "baseline"})
    return method, method.build(ctx).eval()


def with_settings(method, **settings):
    cls = type(method)
    return cls(cls.configure(cls.Config(**{**vars(method.config), **settings}),
                             get_task("sst2")))


def powerbert(tmp_path, counts=(60, 25), **settings):
    """PoWER-BERT whose retention vectors sum to `counts` (l_1, l_2)."""
    method, model = build("powerbert", tmp_path, **settings)
    with torch.no_grad():
        model.retention.zero_()
        for row, count in zip(model.retention, counts, strict=True):
            row[:count] = 1.0
    return method, model


def ltp(tmp_path, threshold=None, **settings):
    """LTP whose layer-1 threshold sits in the middle of the importances of a padded batch."""
    method, model = build("ltp", tmp_path, **settings)
    if threshold is None:
        batch = collate(features(LENGTHS), TASK_LENGTH)
        with torch.inference_mode():
            scores = importances(method, model, batch)
        threshold = float(scores.median())
    with torch.no_grad():
        model.token_thresholds.fill_(threshold - method.config.final_threshold / 2)
    return method, model


def assert_gives_the_baseline(method, model) -> None:
    """Pruning disabled: the baseline's logits, unpadded and padded to the task length."""
    for pad_to in (None, TASK_LENGTH):
        batch = collate(features(LENGTHS), pad_to)
        with torch.inference_mode():
            torch.testing.assert_close(method.forward(model, batch).logits, tiny()(batch).logits,
                                       atol=1e-5, rtol=1e-5)


def importances(method, model, batch):
    """Layer 1's importance of every real token (layer 0 never prunes)."""
    from skimbench.skim import Tokens, attention_block

    tokens = Tokens.start(model.embed(batch), batch["attention_mask"])
    hidden = model.layers[0](tokens.hidden, tokens.mask())
    tokens = replace(tokens, hidden=hidden)
    _, probs = attention_block(model.layers[1], tokens.hidden, tokens.mask())
    return method.importance(model, probs, tokens)[batch["attention_mask"].bool()]


# -- shared: significance ---------------------------------------------------------------------

def test_attention_received_sums_real_query_rows_and_can_skip_the_diagonal():
    probs = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4]]]])
    queries = torch.tensor([[True, True, False]])
    torch.testing.assert_close(attention_received(probs, queries),
                               torch.tensor([[0.7, 1.3, 0.0]]))
    torch.testing.assert_close(attention_received(probs, queries, exclude_self=True),
                               torch.tensor([[0.2, 0.5, 0.0]]))


# -- PoWER-BERT -------------------------------------------------------------------------------

def test_powerbert_retaining_the_whole_length_is_the_baseline(tmp_path):
    assert_gives_the_baseline(*build("powerbert", tmp_path))  # r = 1: l_j = 160 >= every n


@pytest.mark.parametrize("pad_to", [None, TASK_LENGTH])
def test_powerbert_extracts_between_attention_and_ffn(tmp_path, pad_to):
    method, model = powerbert(tmp_path)
    batch = collate(features(LENGTHS), pad_to)
    trace = method.forward(model, batch).trace
    width = batch["input_ids"].shape[1]
    # layer j: attention on l_{j-1} (l_0 = the batch width), FFN on l_j
    assert trace.query_tokens[0].tolist() == [width, 60]
    assert trace.ffn_tokens[0].tolist() == [60, 25]
    counted_equals_schedule(method, model, batch)


def test_powerbert_caps_the_configuration_at_the_input_length(tmp_path):
    method, model = powerbert(tmp_path)
    trace = method.forward(model, collate(features([40]), None)).trace
    assert trace.ffn_tokens[0].tolist() == [40, 25]  # min(60, 40) real tokens, then 25


def test_powerbert_one_row_keeps_what_it_keeps_in_a_padded_batch(tmp_path):
    method, model = powerbert(tmp_path)
    feats = features(LENGTHS)
    with torch.inference_mode():
        batched = method.forward(model, collate(feats, TASK_LENGTH)).logits
        for row in range(len(LENGTHS)):
            alone = method.forward(model, collate(feats[row:row + 1], None)).logits
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)


def test_powerbert_configuration_is_floored_monotone_and_at_least_one(tmp_path):
    method, model = build("powerbert", tmp_path)
    with torch.no_grad():
        model.retention.copy_(torch.stack([torch.full((TASK_LENGTH,), 0.26),
                                           torch.full((TASK_LENGTH,), 0.5)]))
    assert method.configuration(model) == [41, 41]  # floor(41.6); 80 clamped to 41
    with torch.no_grad():
        model.retention.zero_()
    assert method.configuration(model) == [1, 1]
    assert with_settings(method, retention_scale=0.5).configuration(model) == [1, 1]


def test_powerbert_search_trains_the_retention_under_the_depth_weighted_penalty(tmp_path):
    method, model = build("powerbert", tmp_path)
    stages = method.stages(Context(resolve_backbone("random:tiny"), get_task("sst2"),
                                   budget_for("smoke", get_task("sst2")), {}))
    assert [s.name for s in stages] == ["powerbert-search", "powerbert-retrain"]
    assert stages[0].param_lrs == {"retention": 5e-4} and stages[0].losses["retention"] == 2e-4
    assert stages[1].frozen == ("retention",)
    model.train()
    stages[0].on_step(model, 0, 10)
    losses = method.losses(model, collate(features(LENGTHS), None))
    assert losses["retention"].item() == TASK_LENGTH * (1 + 2)  # sum_j j * ||r_j||_1, r = 1
    (losses["task"] + losses["retention"]).backward()
    # the task loss reaches the ranks that real tokens occupy; the penalty every rank
    assert bool((model.retention.grad[:, :40] != 1.0 * torch.tensor([[1.0], [2.0]])).any())
    assert bool((model.retention.grad[:, 130:] == torch.tensor([[1.0], [2.0]])).all())
    stages[1].on_step(model, 0, 10)
    assert not method.soft


def test_powerbert_uses_the_readme_settings_per_task():
    cls = get_method("powerbert")
    mrpc = cls.configure(cls.Config(), get_task("mrpc"))
    assert (mrpc.soft_lr, mrpc.penalty) == (3e-3, 3e-3)
    assert cls.paper_budget(get_task("mrpc")) == dict(lr=6e-5, batch_size=64, epochs=3)
    with pytest.raises(ValueError, match="queries"):
        cls.Config(queries="pads")


# -- LTP --------------------------------------------------------------------------------------

def test_ltp_threshold_zero_is_the_baseline(tmp_path):
    assert_gives_the_baseline(*ltp(tmp_path, threshold_scale=0.0))


@pytest.mark.parametrize("pad_to", [None, TASK_LENGTH])
def test_ltp_prunes_physically_after_attention(tmp_path, pad_to):
    method, model = ltp(tmp_path)
    batch = collate(features(LENGTHS), pad_to)
    trace = method.forward(model, batch).trace
    width = batch["input_ids"].shape[1]
    assert trace.query_tokens[0, 0] == trace.ffn_tokens[0, 0] == width  # layer 0 never prunes
    assert trace.query_tokens[0, 1] == width and 0 < trace.ffn_tokens[0, 1] < 130
    counted_equals_schedule(method, model, batch)


def test_ltp_masked_and_removed_agree_and_padding_changes_nothing(tmp_path):
    method, model = ltp(tmp_path)
    feats = features(LENGTHS)
    with torch.inference_mode():
        removed = method.forward(model, collate(feats, TASK_LENGTH))
        masked = with_settings(method, simulate=True).forward(model, collate(feats, TASK_LENGTH))
        torch.testing.assert_close(masked.logits, removed.logits, atol=1e-5, rtol=1e-5)
        for row in range(len(LENGTHS)):
            alone = method.forward(model, collate(feats[row:row + 1], None)).logits
            torch.testing.assert_close(removed.logits[row], alone[0], atol=1e-5, rtol=1e-5)


def test_ltp_importance_normalisation_is_recorded_and_changes_the_scale(tmp_path):
    method, model = ltp(tmp_path)
    batch = collate(features([40]), None)
    with torch.inference_mode():
        by_task = importances(method, model, batch)
        by_alive = importances(with_settings(method, importance_length="alive"), model, batch)
    # the received attention sums to the number of query rows (40): / 160 or / 40
    torch.testing.assert_close(by_task.sum(), torch.tensor(40 / TASK_LENGTH))
    torch.testing.assert_close(by_alive.sum(), torch.tensor(1.0))


def test_ltp_soft_stage_trains_thresholds_then_the_hard_stage_freezes_them(tmp_path):
    method, model = ltp(tmp_path)
    stages = method.stages(Context(resolve_backbone("random:tiny"), get_task("sst2"),
                                   budget_for("smoke", get_task("sst2")), {}))
    assert [s.name for s in stages] == ["ltp-soft", "ltp-hard"]
    assert list(stages[0].param_lrs) == ["token_thresholds"]
    assert stages[1].frozen == ("token_thresholds",)
    assert stages[1].epochs == stages[0].epochs
    assert with_settings(method, hard_epochs=5.0).stages(
        Context(resolve_backbone("random:tiny"), get_task("sst2"),
                budget_for("smoke", get_task("sst2")), {}))[1].epochs == 5.0
    model.train()
    stages[0].on_step(model, 0, 10)
    losses = method.losses(model, collate(features(LENGTHS), None))
    assert 0 < losses["kept"].item() < 1  # one pruning layer: the kept fraction
    (losses["task"] + 0.1 * losses["kept"]).backward()
    assert model.token_thresholds.grad.abs().sum() > 0
    stages[1].on_step(model, 0, 10)
    assert method.losses(model, collate(features(LENGTHS), None))["kept"].item() == 0


def test_ltp_runs_on_a_roberta_backbone(tmp_path):
    """The paper's backbone family: RoBERTa layers and embeddings (pad id 1, no token types)."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=200, attn_implementation="eager")
    baseline = TaskModel(RobertaModel(config), CLASSIFICATION, 2).eval()
    method, model = build("ltp", tmp_path)
    model.encoder, model.head = baseline.encoder, baseline.head
    feats = [dict(f, input_ids=[0] + [i % 990 + 3 for i in f["input_ids"][1:-1]] + [2])
             for f in features(LENGTHS)]
    batch = collate(feats, None)
    with torch.inference_mode():
        torch.testing.assert_close(with_settings(method, threshold_scale=0.0)
                                   .forward(model, batch).logits, baseline(batch).logits,
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.token_thresholds.fill_(float(importances(method, model, batch).median()))
    assert method.forward(model, batch).trace.ffn_tokens[0, 1] < 130
    counted_equals_schedule(method, model, batch)


# -- both -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["powerbert", "ltp"])
def test_pruning_methods_refuse_qa(key):
    with pytest.raises(UsageError, match=f"{key}.*does not support extractive_qa"):
        check_supports(get_method(key), get_task("squad"))


def test_pruning_runs_write_per_mode_records(tiny_data, tmp_path):
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    for key in ("powerbert", "ltp"):
        run_dir = run(RunSpec(method=key, task="sst2", profile="smoke", data_dir=tiny_data,
                              out=tmp_path), lambda _line: None)
        record = read_json(run_dir / "record.json")
        assert [s["stage"] for s in record["train"]] == [f"{key}-search", f"{key}-retrain"] \
            if key == "powerbert" else ["ltp-soft", "ltp-hard"]
        for mode in record["padding"].values():
            assert not mode["macs_mismatch"] and mode["removal_efficiency"] > 0
        for line in (run_dir / "predictions.jsonl").open():
            tokens = json.loads(line)["tokens"]
            assert tokens == sorted(tokens, reverse=True)


@pytest.mark.parametrize("key", ["powerbert", "ltp", "adapler"])
def test_paper_profile_uses_the_methods_recipe_on_bert_base(tiny_data, tmp_path, key):
    """`--profile paper` runs the paper's recipe (PoWER-BERT's README row for SST-2, LTP's
    README, AdapLeR's run.sh); here for one step per stage on random:bert-base."""
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    cheap = {"max_steps": "1", "max_train_examples": "4", "max_eval_examples": "2",
             "time_examples": "1", "time_batches": "1", "time_min_seconds": "0",
             "time_min_iters": "1", "count_batches": "1", "eval_batch_size": "2"}
    run_dir = run(RunSpec(method=key, task="sst2", profile="paper", backbone="random:bert-base",
                          data_dir=tiny_data, out=tmp_path, padding="none", overrides=cheap),
                  lambda _line: None)
    budget = read_json(run_dir / "config.json")["budget"]
    expected = get_method(key).paper_budget(get_task("sst2"))
    assert expected and {k: budget[k] for k in expected} == expected
    assert not read_json(run_dir / "record.json")["padding"]["none"]["macs_mismatch"]
