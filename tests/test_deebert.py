"""DeeBERT invariants (methods-spec 12): a threshold that never exits is the final classifier;
one above ln C exits every row at layer 1; a row's exit and logits do not depend on its batch;
exited rows physically leave the batch (trace == FLOPs counter, and the oracle replays the rows
that ran); stage 2 trains the off-ramps only; the runner trains and sweeps it end to end."""

from __future__ import annotations

import math

import pytest
import torch
from test_simple_baselines import counted_equals_schedule, method
from transformers import AutoModel

from skimbench.backbone import resolve_backbone
from skimbench.errors import UsageError
from skimbench.features import collate
from skimbench.measure import replay_all
from skimbench.method import CHECKPOINT, Context, Method, get_method
from skimbench.methods.deebert import add_offramps, entropy
from skimbench.model import TaskModel, additive_mask
from skimbench.profiles import budget_for
from skimbench.records import read_json
from skimbench.runner import RunSpec, resolve, run
from skimbench.tasks import get_task
from skimbench.trainer import train

LENGTHS = [5, 9, 14, 20, 7, 30, 11, 3]
MIXED = 0.5  # with `spread()`, rows exit at layers 1, 3 and 4 (the final classifier)


def deep(layers: int = 4) -> TaskModel:
    """A random:tiny of `layers` layers with untrained off-ramps."""
    torch.manual_seed(0)
    config = resolve_backbone("random:tiny").config()
    config.num_hidden_layers = layers
    model = TaskModel(AutoModel.from_config(config, attn_implementation="sdpa"),
                      "classification", 2)
    return add_offramps(model, model.encoder.pooler).eval()


def spread() -> TaskModel:
    """Off-ramps with larger classifier weights: their entropies differ from row to row."""
    model = deep()
    torch.manual_seed(1)
    for ramp in model.offramps:
        ramp.classifier.weight.data.normal_(0.0, 1.0)
    return model


def rows(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """Random token ids, the first one too: the [CLS] states (what the off-ramps read) of a
    random model then differ between rows."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 30000, (n,), generator=g).tolist(),
             "token_type_ids": [0] * n, "labels": i % 2, "example_index": i}
            for i, n in enumerate(lengths)]


def ramp_entropies(model, batch) -> torch.Tensor:
    """(B, L-1): every off-ramp's entropy, every row through every layer."""
    hidden = model.embed(batch)
    mask = additive_mask(batch["attention_mask"], hidden.dtype)
    out = []
    with torch.inference_mode():
        for layer, ramp in zip(model.layers, model.offramps, strict=False):
            hidden = layer(hidden, mask)
            out.append(entropy(ramp(hidden[:, 0])))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("threshold", [-1.0, 0.0])
@pytest.mark.parametrize("pad_to", [None, 40])
def test_never_exiting_is_the_final_classifier(threshold, pad_to):
    model, m = spread(), method("deebert", entropy=threshold)
    batch = collate(rows(), pad_to)
    with torch.inference_mode():
        out, expected = m.forward(model, batch), model(batch)
    torch.testing.assert_close(out.logits, expected.logits)
    assert out.trace.exit_layer.tolist() == [4] * len(LENGTHS)
    for name in ("query_tokens", "key_tokens", "ffn_tokens", "pairs", "extra_macs"):
        assert torch.equal(getattr(out.trace, name), getattr(expected.trace, name)), name
    counted_equals_schedule(m, model, batch)


@pytest.mark.parametrize("pad_to", [None, 40])
def test_a_threshold_above_ln_c_exits_every_row_at_layer_1(pad_to):
    model, m = spread(), method("deebert", entropy=math.log(2) + 0.01)
    batch = collate(rows(), pad_to)
    with torch.inference_mode():
        out = m.forward(model, batch)
        hidden = model.layers[0](model.embed(batch),
                                 additive_mask(batch["attention_mask"], torch.float32))
        first = model.offramps[0](hidden[:, 0])
    torch.testing.assert_close(out.logits, first)
    width = batch["input_ids"].shape[1]
    assert out.trace.exit_layer.tolist() == [1] * len(LENGTHS)
    assert out.trace.query_tokens.tolist() == [[width, 0, 0, 0]] * len(LENGTHS)
    assert out.trace.extra_macs.tolist() == [model.offramps[0].macs()] * len(LENGTHS)
    counted_equals_schedule(m, model, batch)


def test_mixed_threshold_is_clear_of_every_entropy():
    """The test threshold is no coin toss: no row's entropy is within 0.005 of it."""
    model = spread()
    for feature in rows():
        assert bool(((ramp_entropies(model, collate([feature], None)) - MIXED).abs()
                     > 0.005).all())


@pytest.mark.parametrize("pad_to", [None, 40])
def test_batched_exits_equal_one_row_at_a_time(pad_to):
    model, m = spread(), method("deebert", entropy=MIXED)
    features = rows()
    with torch.inference_mode():
        batched = m.forward(model, collate(features, pad_to))
        alone = [m.forward(model, collate([f], None)) for f in features]
    assert batched.trace.exit_layer.tolist() == [int(a.trace.exit_layer) for a in alone]
    assert set(batched.trace.exit_layer.tolist()) == {1, 3, 4}
    torch.testing.assert_close(batched.logits, torch.cat([a.logits for a in alone]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad_to", [None, 40])
def test_mixed_exits_are_counted_as_they_ran(pad_to):
    """Each row pays its layers up to its exit, the off-ramps it ran and, at the end, the
    final head; a FLOPs counter sees exactly that (exited rows are not computed)."""
    model, m = spread(), method("deebert", entropy=MIXED)
    batch = collate(rows(), pad_to)
    with torch.inference_mode():
        trace = m.forward(model, batch).trace
    width, ramp = batch["input_ids"].shape[1], model.offramps[0].macs()
    for exit_layer, tokens, extra in zip(trace.exit_layer.tolist(), trace.query_tokens.tolist(),
                                         trace.extra_macs.tolist(), strict=True):
        assert tokens == [width] * exit_layer + [0] * (4 - exit_layer)
        assert extra == min(exit_layer, 3) * ramp + (model.head_macs(width)
                                                     if exit_layer == 4 else 0)
    counted_equals_schedule(m, model, batch)


@pytest.mark.parametrize("pad_to", [None, 40])
def test_mean_input_offramps_ignore_padding_and_count_as_they_ran(pad_to):
    """offramp_input=mean: an off-ramp reads the mean of the row's real tokens, so padding
    changes nothing; rows still exit batched as alone, and the counter agrees."""
    model = spread()
    features = rows()
    m = method("deebert", entropy=0.5, offramp_input="mean")
    with torch.inference_mode():
        batched = m.forward(model, collate(features, pad_to))
        alone = [m.forward(model, collate([f], None)) for f in features]
        hidden = model.layers[0](model.embed(collate(features[:1], None)), None)
    assert batched.trace.exit_layer.tolist() == [int(a.trace.exit_layer) for a in alone]
    assert set(batched.trace.exit_layer.tolist()) == {1, 4}
    torch.testing.assert_close(batched.logits, torch.cat([a.logits for a in alone]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m._ramp_input(hidden, torch.ones(1, LENGTHS[0])),
                               hidden.mean(dim=1))
    counted_equals_schedule(m, model, collate(features, pad_to))


def test_exited_rows_leave_the_batch_and_the_oracle_replays_that():
    model, m = spread(), method("deebert", entropy=MIXED)
    batch = collate(rows(), None)
    seen: list[int] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
             for layer in model.layers]
    with torch.inference_mode():
        exits = m.forward(model, batch).trace.exit_layer
    running = [int((exits > layer).sum()) for layer in range(4)]
    assert seen == running and running[0] > running[1] > running[3] > 0
    seen.clear()
    replay_all(model, m, [batch])()
    for hook in hooks:
        hook.remove()
    assert seen[-4:] == running


def context(needs=None) -> Context:
    task = get_task("sst2")
    return Context(resolve_backbone("random:tiny"), task, budget_for("smoke", task),
                   needs or {})


def test_offramp_stage_trains_the_offramps_only():
    model, m = spread(), method("deebert")
    batch = collate(rows(), None)
    with torch.inference_mode():  # the loss is the sum of the off-ramps' cross-entropies
        hidden, expected = model.embed(batch), 0.0
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        for layer, ramp in zip(model.layers, model.offramps, strict=False):
            hidden = layer(hidden, mask)
            expected += torch.nn.functional.cross_entropy(ramp(hidden[:, 0]), batch["labels"])
        torch.testing.assert_close(m.losses(model, batch)["offramps"], expected)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    [stage] = m.stages(context())
    train(model, [stage], rows(), m.losses, seed=0, log=lambda _line: None)
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value) != name.startswith("offramps."), name


@pytest.mark.parametrize("source", ["pretrained", "baseline"])
def test_offramp_poolers_start_as_the_chosen_pooler(tmp_path, source):
    """`pretrained` (the code's) copies the pre-trained pooler, `baseline` the fine-tuned one;
    backbone and head are the baseline's either way."""
    ctx = context({"baseline": tmp_path})
    baseline = Method.build(method("deebert"), ctx)
    baseline.encoder.pooler.dense.weight.data.add_(1.0)  # "fine-tuned"
    (tmp_path / CHECKPOINT).parent.mkdir(parents=True)
    torch.save(baseline.state_dict(), tmp_path / CHECKPOINT)
    pretrained = Method.build(method("deebert"), ctx).encoder.pooler.dense.weight
    model = method("deebert", offramp_pooler=source).build(ctx)
    wanted = baseline.encoder.pooler.dense.weight if source == "baseline" else pretrained
    assert len(model.offramps) == len(model.layers) - 1
    for ramp in model.offramps:
        assert torch.equal(ramp.pooler.weight, wanted)
    assert torch.equal(model.encoder.pooler.dense.weight, baseline.encoder.pooler.dense.weight)
    assert torch.equal(model.head.weight, baseline.head.weight)


def test_bad_settings_are_one_line_errors():
    cls = get_method("deebert")
    with pytest.raises(ValueError, match="entropy must be a finite number"):
        cls.Config(entropy=float("nan"))
    with pytest.raises(ValueError, match="offramp_pooler must be one of pretrained, baseline"):
        cls.Config(offramp_pooler="finetuned")
    with pytest.raises(UsageError, match="invalid --set for method 'deebert': offramp_pooler"):
        resolve(RunSpec(method="deebert", task="sst2", profile="smoke",
                        overrides={"offramp_pooler": "x"}))
    config = resolve_backbone("random:tiny").config()
    config.num_hidden_layers = 1
    with pytest.raises(ValueError, match="2 layers or more"):
        method("deebert").check_backbone(config)


@pytest.mark.parametrize("task, kind", [("squad", "extractive_qa"), ("stsb", "regression")])
def test_other_task_kinds_are_refused(task, kind):
    with pytest.raises(UsageError, match=f"'deebert' does not support {kind} tasks"):
        resolve(RunSpec(method="deebert", task=task, profile="smoke"))


def test_smoke_run_trains_once_and_sweeps_the_threshold(tiny_data, tmp_path):
    def go(overrides):
        return run(RunSpec(method="deebert", task="sst2", profile="smoke", data_dir=tiny_data,
                           out=tmp_path, overrides=overrides, threads=1), lambda _line: None)

    trained = go({})
    record = read_json(trained / "record.json")
    assert [s["stage"] for s in record["train"]] == ["offramps"]
    assert not any(mode["macs_mismatch"] for mode in record["padding"].values())
    swept = go({"entropy": "1.0"})  # above ln 2: every example leaves at layer 1
    record = read_json(swept / "record.json")
    assert record["train"] == [{"stage": "reused", "weights_from": str(trained)}]
    for mode in record["padding"].values():
        assert not mode["macs_mismatch"] and mode["flops_speedup"] > 1.5
    lines = (swept / "predictions.jsonl").read_text().splitlines()
    assert lines and all('"exit_layer": 1' in line for line in lines)
