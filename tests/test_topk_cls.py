"""topk-cls invariants (methods-spec 2.4): keeping every token is the baseline; the kept tokens
are exactly [CLS] and the top-k by [CLS] attention of an independent eager encoder; pads are
never kept; what is removed is physically gone (schedule == FLOPs counter) in every padding
layout; a row's prediction does not depend on its batch mates; settings are validated; the
runner evaluates it end to end without training anything."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from test_model import features
from test_simple_baselines import counted_equals_schedule, method, tiny
from test_trbert import deep
from transformers import AutoModel

from skimbench.backbone import resolve_backbone
from skimbench.cli import main
from skimbench.features import collate
from skimbench.method import Context, get_method
from skimbench.profiles import budget_for
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task

LENGTHS = [40, 70, 100, 130]
PADDINGS = [None, 160]  # padded to the batch's longest (`batch`), or to a task length (`sequence`)


def real_positions(logits, batch):
    """QA logits at the real (non-pad) positions of each row: the ones evaluation decodes."""
    return [row[: int(n)] for row, n in zip(logits, batch["attention_mask"].sum(dim=1),
                                             strict=True)]


def assert_same_predictions(got, expected, batch, kind) -> None:
    if kind == CLASSIFICATION:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return
    for ours, theirs in zip(real_positions(got, batch), real_positions(expected, batch),
                            strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def recording(m):
    """The method with its keep decisions (B, n) recorded, one per forward."""
    decisions = []
    select = m.select

    def spy(probs, tokens):
        decisions.append(select(probs, tokens))
        return decisions[-1]

    m.select = spy
    return m, decisions


def cls_attention(model, batch, layer: int) -> torch.Tensor:
    """Head-averaged attention from [CLS] to every key at `layer` (1-based), from the HF
    encoder with eager attention and the same weights: (B, N)."""
    config = resolve_backbone("random:tiny").config()
    config.num_hidden_layers = len(model.layers)
    eager = AutoModel.from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(model.encoder.state_dict())
    with torch.inference_mode():
        out = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], output_attentions=True)
    return out.attentions[layer - 1][:, :, 0].mean(dim=1)


# -- keeping everything ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("pad_to", PADDINGS)
@pytest.mark.parametrize("settings", [dict(keep=160), dict(keep_ratio=1.0, layer=1),
                                      dict(keep=130, layer=3)])
def test_keeping_every_token_is_the_baseline(kind, pad_to, settings):
    model = deep(kind)
    batch = collate(features(LENGTHS), pad_to)
    with torch.inference_mode():
        expected = model(batch).logits
        got = method("topk-cls", **settings).forward(model, batch).logits
    assert_same_predictions(got, expected, batch, kind)


# -- what is kept ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("settings", [dict(keep=17), dict(keep_ratio=0.3)])
def test_kept_tokens_are_cls_and_the_top_k_by_cls_attention(layer, settings):
    model = deep()
    batch = collate(features(LENGTHS), 160)
    m, decisions = recording(method("topk-cls", layer=layer, **settings))
    with torch.inference_mode():
        m.forward(model, batch)
    [keep] = decisions
    attention = cls_attention(model, batch, layer)
    for row, n in enumerate(LENGTHS):
        k = settings.get("keep") or math.ceil(round(settings["keep_ratio"] * n, 6))
        best = attention[row, 1:n].topk(k - 1).indices + 1
        assert keep[row].nonzero().squeeze(1).tolist() == sorted([0, *best.tolist()])
        assert not bool(keep[row, n:].any())  # pads never


def test_keep_counts_per_row():
    real = torch.tensor([1, 2, 7, 10, 130])
    assert method("topk-cls", keep=3).kept_counts(real).tolist() == [1, 2, 3, 3, 3]
    # ceil(r * n): 0.3 * 10 is 3 exactly, not 3.0000000000000004 rounded up
    assert method("topk-cls", keep_ratio=0.3).kept_counts(real).tolist() == [1, 1, 3, 3, 39]
    assert method("topk-cls", keep_ratio=0.5).kept_counts(real).tolist() == [1, 1, 4, 5, 65]
    assert method("topk-cls", keep_ratio=1.0).kept_counts(real).tolist() == real.tolist()


def test_cls_is_kept_even_when_it_gets_the_least_attention():
    model = deep()
    batch = collate(features(LENGTHS), None)
    m, decisions = recording(method("topk-cls", keep=1))
    with torch.inference_mode():
        out = m.forward(model, batch)
    assert decisions[0].sum(dim=1).tolist() == [1] * 4 and bool(decisions[0][:, 0].all())
    assert out.trace.query_tokens[0].tolist() == [130, 130, 1, 1]


# -- removal and cost -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("pad_to", PADDINGS)
def test_removal_is_physical_in_every_padding_layout(kind, pad_to):
    model = deep(kind)
    m = method("topk-cls")  # keep_ratio 0.5 after layer 2 of 4
    batch = collate(features(LENGTHS), pad_to)
    with torch.inference_mode():
        out = m.forward(model, batch)
    width = batch["input_ids"].shape[1]
    # rows keep 20, 35, 50, 65 tokens, aligned to the largest
    assert out.trace.query_tokens.tolist() == [[width, width, 65, 65]] * 4
    assert out.trace.extra_macs.tolist() == [model.head_macs(width)] * 4
    if kind == EXTRACTIVE_QA:  # the span head scores every position
        assert out.logits.shape == (4, width, 2)
    counted_equals_schedule(m, model, batch)
    single = collate(features([41]), None)  # `none`: one row, 21 kept
    assert m.forward(model, single).trace.query_tokens.tolist() == [[41, 41, 21, 21]]
    counted_equals_schedule(m, model, single)


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("settings", [dict(keep=30), dict(keep_ratio=0.4)])
def test_a_row_alone_predicts_what_it_predicts_in_a_padded_batch(kind, settings):
    model, m = deep(kind), method("topk-cls", **settings)
    feats = features(LENGTHS)
    with torch.inference_mode():
        batched = m.forward(model, collate(feats, 160)).logits
        for row, feature in enumerate(feats):
            alone = m.forward(model, collate([feature], None)).logits[0]
            n = len(feature["input_ids"])
            torch.testing.assert_close(batched[row][:n] if kind == EXTRACTIVE_QA
                                       else batched[row], alone, atol=1e-5, rtol=1e-5)


def test_qa_removed_tokens_keep_the_state_they_left_with():
    """A removed position's span logits come from its state after the scoring layer."""
    model = deep(EXTRACTIVE_QA)
    batch = collate(features([60]), None)
    m, decisions = recording(method("topk-cls", keep=10))
    with torch.inference_mode():
        logits = m.forward(model, batch).logits
        hidden = model.embed(batch)
        for layer in model.layers[:2]:
            hidden = layer(hidden, None)
        removed = ~decisions[0][0]
        torch.testing.assert_close(logits[0, removed], model.head(hidden[0, removed]),
                                   atol=1e-5, rtol=1e-5)


# -- settings -------------------------------------------------------------------------------

def test_defaults_and_no_training():
    config = get_method("topk-cls").Config()
    assert (config.keep_ratio, config.keep, config.layer) == (0.5, None, None)
    assert get_method("topk-cls").Config(keep=8).keep_ratio is None
    assert method("topk-cls").full_layers(deep()) == 2 and method("topk-cls").full_layers(
        tiny()) == 1
    task = get_task("sst2")
    ctx = Context(resolve_backbone("random:tiny"), task, budget_for("smoke", task), {})
    assert method("topk-cls").stages(ctx) == []


@pytest.mark.parametrize("settings,message", [
    (["keep=0"], "keep must be at least 1"),
    (["keep_ratio=0"], "keep_ratio must be in (0, 1]"),
    (["keep_ratio=1.5"], "keep_ratio must be in (0, 1]"),
    (["keep=8", "keep_ratio=0.3"], "set keep (a count) or keep_ratio (a share), not both"),
    (["layer=0"], "layer must be at least 1"),
    (["layer=2"], "layer=2 leaves no layer to prune: the backbone has 2 layers; use 1..1"),
])
def test_invalid_settings_are_one_line_errors(settings, message):
    args = ["run", "-m", "topk-cls", "-d", "sst2", "--profile", "smoke"]
    for setting in settings:
        args += ["--set", setting]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- end to end -----------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["sst2", "squad"])
def test_smoke_run_end_to_end_trains_nothing(task, tiny_data, tmp_path):
    import json

    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    sweep = [{}, {"keep_ratio": "0.3"}] if task == "sst2" else [{}]
    for overrides in sweep:  # every sweep point evaluates the baseline's weights, untouched
        run_dir = run(RunSpec(method="topk-cls", task=task, profile="smoke",
                              data_dir=tiny_data, out=tmp_path, overrides=overrides),
                      lambda _line: None)
        record = read_json(run_dir / "record.json")
        assert record["train"] == [] and set(record["needs"]) == {"baseline"}
        assert set(record["padding"]) == {"sequence", "batch", "none"}
        for mode in record["padding"].values():
            assert mode["flops_speedup"] > 1 and not mode["macs_mismatch"]
        for line in (run_dir / "predictions.jsonl").open():
            tokens = json.loads(line)["tokens"]  # per layer; QA: per window, per layer
            for window in tokens if task == "squad" else [tokens]:
                assert window[0] > window[1] > 0  # layer 1 at full length, layer 2 pruned
