"""BlockBERT: one block is the baseline; the blockwise kernel equals dense attention under the
paper's block mask; what runs is 1/n of the attention matmuls (trace == FLOPs counter); the head
split scales to the backbone; bad settings are one clear error; runs go end to end."""

from __future__ import annotations

import pytest
import torch
from test_model import features
from test_simple_baselines import counted_equals_schedule, method, tiny
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from skimbench.backbone import resolve_backbone
from skimbench.errors import UsageError
from skimbench.features import collate
from skimbench.flops import SDPA_CPU_FLOPS
from skimbench.measure import _MethodForward
from skimbench.method import CHECKPOINT, Context, Method
from skimbench.methods.blockbert import (
    FIRST_WORD_ID,
    MASK_TOKEN_ID,
    block_layout,
    mask_tokens,
    scale_split,
)
from skimbench.profiles import budget_for
from skimbench.runner import RunSpec, resolve, run
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task

LENGTHS = [4, 11, 23, 7]


def sharp(kind=CLASSIFICATION):
    """The tiny model with peaked attention and a large head (random init attends almost
    uniformly and its head is small, which would hide which keys a query sees)."""
    model = tiny(kind)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.self.query.weight.mul_(8.0)
        model.head.weight.mul_(100.0)
    return model


def dense_reference(m, model, batch: dict) -> torch.Tensor:
    """Dense eager attention under the paper's mask: M[p, q] = 1 iff pi_h(block(p)) =
    block(q), with block(p) = floor(p n / len) (`real`: each row's length; `tensor`: the
    padded length, here already a multiple of n). A row with no visible key gets a zero
    context."""
    n = m.config.blocks
    hidden = model.embed(batch)
    size, length = batch["input_ids"].shape
    real = batch["attention_mask"].bool()
    position = torch.arange(length)
    if m.config.partition == "real":
        block_of = position * n // real.sum(dim=1, keepdim=True)
    else:
        assert length % n == 0
        block_of = (position // (length // n)).expand(size, length)
    split = m.head_split(model.encoder.config.num_attention_heads)
    shifts = torch.repeat_interleave(torch.arange(n), torch.tensor(split))
    wanted = (block_of[:, None, :, None] + shifts[None, :, None, None]) % n
    allowed = (block_of[:, None, None, :] == wanted) & real[:, None, None, :]
    for layer in model.layers:
        attention = layer.attention.self
        shape = (size, length, attention.num_attention_heads, attention.attention_head_size)
        q, k, v = (p(hidden).view(shape).transpose(1, 2)
                   for p in (attention.query, attention.key, attention.value))
        scores = (q @ k.transpose(2, 3) * attention.scaling).masked_fill(~allowed, -torch.inf)
        context = (F.softmax(scores, dim=-1).nan_to_num(0.0) @ v).transpose(1, 2)
        hidden = layer.feed_forward_chunk(
            layer.attention.output(context.reshape(size, length, -1), hidden))
    return model.logits(hidden)


def real_part(logits: torch.Tensor, batch: dict, kind: str) -> torch.Tensor:
    return logits[batch["attention_mask"].bool()] if kind == EXTRACTIVE_QA else logits


# -- equivalences ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("partition", ["real", "tensor"])
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_one_block_is_the_baseline(kind, partition, kernel):
    model = sharp(kind)
    m = method("blockbert", blocks=1, partition=partition, kernel=kernel)
    feats = features(LENGTHS)
    with torch.inference_mode():
        for batch in [collate(feats, None), collate(feats, 40)] + [collate([f], None)
                                                                   for f in feats]:
            out = m.forward(model, batch)
            torch.testing.assert_close(out.logits, model(batch).logits, atol=1e-5, rtol=1e-5)
            assert out.trace.pairs.tolist() == model(batch).trace.pairs.tolist()


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("blocks,heads", [(2, None), (3, None), (3, "0:1:1")])
@pytest.mark.parametrize("partition", ["real", "tensor"])
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_blockwise_attention_equals_dense_attention_under_the_block_mask(
        kind, blocks, heads, partition, kernel):
    model = sharp(kind)
    m = method("blockbert", blocks=blocks, heads=heads, partition=partition, kernel=kernel)
    # `tensor` blocks are fixed positions: a length that is a multiple of n, pads in the blocks
    batch = collate(features(LENGTHS), 24 if partition == "tensor" else None)
    with torch.inference_mode():
        got = real_part(m.forward(model, batch).logits, batch, kind)
        expected = real_part(dense_reference(m, model, batch), batch, kind)
        dense = real_part(model(batch).logits, batch, kind)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)  # the mask matters on this model


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("blocks", [2, 3])
def test_real_partition_predicts_the_same_in_every_padding_mode(kind, blocks):
    model = sharp(kind)
    m = method("blockbert", blocks=blocks)
    feats = features(LENGTHS)
    with torch.inference_mode():
        alone = [m.forward(model, collate([f], None)).logits[0] for f in feats]
        for pad_to in (None, 40):
            batched = m.forward(model, collate(feats, pad_to)).logits
            for row, single in enumerate(alone):
                got = batched[row][: single.shape[0]] if kind == EXTRACTIVE_QA else batched[row]
                torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)


def test_a_key_block_without_tokens_gives_no_nan():
    """[CLS] [SEP] in three blocks: one block is empty, and in `tensor` partition at length 24
    the shifted heads of the first block see only padding."""
    model = sharp()
    batch = collate(features([2, 5]), 24)
    for partition in ("real", "tensor"):
        m = method("blockbert", blocks=3, heads="0:1:1", partition=partition)
        with torch.inference_mode():
            got = m.forward(model, batch).logits
            torch.testing.assert_close(got, dense_reference(m, model, batch), atol=1e-5,
                                       rtol=1e-5)
        assert bool(torch.isfinite(got).all())


def test_real_layout_follows_the_papers_block_formula():
    # length 7 in 3 blocks: floor(3p / 7) = 0,0,0,1,1,2,2; 4 slots per block; pads fill the rest
    layout = block_layout(torch.tensor([[1] * 7 + [0] * 3, [1] * 10]), 3, "real")
    assert (layout.width, layout.block) == (12, 4)
    assert layout.position_of[0].tolist() == [0, 1, 2, 7, 3, 4, 8, 9, 5, 6, 10, 11]
    assert layout.valid[0].int().tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    assert layout.position_of[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 7, 8, 9, 11]
    slot = layout.slot_of
    assert bool((layout.position_of.gather(1, slot) == torch.arange(12)).all())
    # an unpadded row whose length n divides keeps its order: no gather at all
    assert block_layout(torch.ones(1, 12, dtype=torch.long), 3, "real").slot_of is None


# -- cost -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,pad_to", [(CLASSIFICATION, None), (EXTRACTIVE_QA, 40)])
@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("partition", ["real", "tensor"])
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_counted_macs_equal_the_schedule(kind, pad_to, blocks, partition, kernel):
    model = tiny(kind)
    m = method("blockbert", blocks=blocks, partition=partition, kernel=kernel)
    batch = collate(features(LENGTHS), pad_to)
    trace = m.forward(model, batch).trace
    width = -(-batch["input_ids"].shape[1] // blocks) * blocks  # padded to a multiple of n
    assert trace.query_tokens.unique().tolist() == [width]
    assert trace.ffn_tokens.unique().tolist() == [width]
    assert trace.pairs.unique().tolist() == [width * width // blocks]
    counted_equals_schedule(m, model, batch)


def attention_macs(forward, batch: dict) -> int:
    """MACs of the attention matmuls alone: the sdpa kernels and batched matmuls (the
    projections and FFN are mm/addmm)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as mode:
        forward(batch)
    counts = mode.get_flop_counts()["Global"]
    attention = [op for op in counts if "attention" in str(op) or str(op).endswith("bmm")]
    return sum(counts[op] for op in attention) // 2


@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_attention_costs_one_nth_of_dense(blocks, kernel):
    """What runs is the blockwise kernel, not a dense masked softmax: the counted attention
    matmuls are 2 N^2 H / n per layer and example (dense: 2 N^2 H)."""
    model = tiny()
    m = method("blockbert", blocks=blocks, kernel=kernel)
    length, size, hidden, layers = 24, 3, model.hidden_size, len(model.layers)
    batch = collate(features([24, 20, 9]), length)
    dense = attention_macs(model, batch)
    assert dense == size * layers * 2 * length * length * hidden
    assert attention_macs(_MethodForward(m, model).eval(), batch) == dense // blocks


# -- settings -------------------------------------------------------------------------------

def test_paper_head_splits_scale_to_the_backbone():
    assert scale_split((10, 2), 12) == (10, 2) and scale_split((8, 2, 2), 12) == (8, 2, 2)
    assert scale_split((10, 2), 6) == (5, 1) and scale_split((8, 2, 2), 6) == (4, 1, 1)
    assert scale_split((10, 2), 16) == (13, 3) and scale_split((8, 2, 2), 16) == (11, 3, 2)
    assert scale_split((10, 2), 2) == (1, 1)       # the shifted heads keep one head
    assert scale_split((8, 2, 2), 2) == (1, 1, 0)  # ... while the identity keeps one
    assert scale_split((12,), 7) == (7,)
    assert method("blockbert").head_split(12) == (10, 2)
    assert method("blockbert", blocks=3).head_split(2) == (1, 1, 0)
    assert method("blockbert", blocks=2, heads="9:3").head_split(12) == (9, 3)


@pytest.mark.parametrize("settings,match", [
    (dict(blocks=0), "blocks must be at least 1"),
    (dict(blocks=2, heads="10:1:1"), "heads=10:1:1 gives 3 counts but blocks=2"),
    (dict(blocks=2, heads="0:0"), "gives no head at all"),
    (dict(blocks=2, heads="10,2"), "separated by ':'"),
    (dict(blocks=2, heads="10:-2"), "head counts >= 0"),
    (dict(blocks=4), "no head split for blocks=4"),
    (dict(partition="padded"), "partition must be one of real, tensor"),
    (dict(kernel="flash"), "kernel must be one of sdpa, matmul"),
    (dict(init="bert"), "init must be one of pretrained, baseline"),
    (dict(mlm_epochs=-1), "mlm_epochs must be >= 0"),
])
def test_bad_settings_are_rejected(settings, match):
    with pytest.raises(ValueError, match=match):
        method("blockbert", **settings)


@pytest.mark.parametrize("overrides,match", [
    ({"heads": "3:1"}, "heads=3:1 counts 4 heads but the backbone has 2"),
    ({"blocks": "4"}, "no head split for blocks=4"),
    ({"blocks": "3", "heads": "1:1"}, "heads=1:1 gives 2 counts but blocks=3"),
])
def test_bad_settings_are_one_usage_error(overrides, match):
    spec = RunSpec(method="blockbert", task="sst2", profile="smoke", overrides=overrides)
    with pytest.raises(UsageError, match=match) as error:
        resolve(spec)
    assert "\n" not in str(error.value)


def test_heads_mismatch_in_forward_is_a_value_error():
    with pytest.raises(ValueError, match="backbone has 2"):
        method("blockbert", heads="2:1").forward(tiny(), collate(features([5]), None))


@pytest.mark.parametrize("init", ["pretrained", "baseline"])
def test_init_starts_from_the_backbone_or_the_fine_tuned_baseline(tmp_path, init):
    baseline = tiny()
    with torch.no_grad():
        baseline.head.weight.add_(1.0)  # "fine-tuned": differs from a fresh build
    (tmp_path / "checkpoint").mkdir()
    torch.save(baseline.state_dict(), tmp_path / CHECKPOINT)
    ctx = Context(resolve_backbone("random:tiny"), get_task("sst2"), budget_for("smoke",
                  get_task("sst2")), {"baseline": tmp_path})
    built = method("blockbert", init=init).build(ctx).state_dict()
    fresh = Method.build(method("blockbert"), ctx).state_dict()
    expected = baseline.state_dict() if init == "baseline" else fresh
    assert built.keys() == expected.keys()
    assert all(torch.equal(built[k], expected[k]) for k in built)
    assert init == "pretrained" or not torch.equal(built["head.weight"], fresh["head.weight"])


def test_mlm_masking_follows_bert_on_word_tokens_only():
    torch.manual_seed(0)
    batch = collate(features([40] * 64 + [7]), None)
    inputs, labels = mask_tokens(batch, 30522, MASK_TOKEN_ID)
    chosen = labels >= 0
    words = batch["attention_mask"].bool() & (batch["input_ids"] >= FIRST_WORD_ID)
    assert bool((chosen <= words).all())  # never [CLS], [SEP] or a pad
    assert torch.equal(labels[chosen], batch["input_ids"][chosen])
    assert torch.equal(inputs[~chosen], batch["input_ids"][~chosen])
    assert 0.12 < chosen.sum() / words.sum() < 0.18
    assert 0.75 < (inputs[chosen] == MASK_TOKEN_ID).float().mean() < 0.85
    one = collate(features([3]), None)  # one word token: still one prediction
    assert int((mask_tokens(one, 30522, MASK_TOKEN_ID)[1] >= 0).sum()) == 1


def test_mlm_stage_trains_the_encoder_on_block_attention_not_the_task_head(tmp_path):
    m = method("blockbert", mlm_epochs=1.0)
    ctx = Context(resolve_backbone("random:tiny"), get_task("sst2"),
                  budget_for("smoke", get_task("sst2")), {})
    model = m.build(ctx)
    names = [stage.name for stage in m.stages(ctx)]
    assert names == ["mlm", "finetune"]
    mlm, finetune = m.stages(ctx)
    assert mlm.losses == {"mlm": 1.0} and mlm.frozen == ("head.",)
    mlm.on_step(model, 0, 1)
    loss = m.losses(model, collate(features(LENGTHS), None))["mlm"]
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert model.layers[0].attention.self.query.weight.grad is not None
    assert model.mlm_head.words is model.encoder.embeddings.word_embeddings
    finetune.on_step(model, 0, 1)
    assert set(m.losses(model, collate(features(LENGTHS), None))) == {"task"}
    assert method("blockbert").stages(ctx)[0].name == "finetune"
    assert not hasattr(method("blockbert").build(ctx), "mlm_head")


# -- end to end ---# -- end to end -----------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["sst2", "squad"])
def test_runs_end_to_end(tiny_data, tmp_path, task):
    from skimbench.records import read_json

    spec = RunSpec(method="blockbert", task=task, profile="smoke", data_dir=tiny_data,
                   out=tmp_path, overrides={"blocks": "3", "heads": "1:0:1"})
    run_dir = run(spec, lambda _line: None)
    record = read_json(run_dir / "record.json")
    assert record["status"] == "finished" and record["executed"]
    assert record["notes"] == ["pre-training not reproduced: the pre-trained dense backbone "
                               "fine-tuned with block attention"]
    assert set(record["padding"]) == {"sequence", "batch", "none"}
    for mode in record["padding"].values():
        assert not mode["macs_mismatch"] and mode["flops_speedup"] > 0
    lines = []  # the same settings again: the finished run is reused
    assert run(spec, lines.append) == run_dir and "already finished" in lines[-1]


def test_mlm_continuation_runs_before_fine_tuning_end_to_end(tiny_data, tmp_path):
    from skimbench.records import read_json

    spec = RunSpec(method="blockbert", task="sst2", profile="smoke", data_dir=tiny_data,
                   out=tmp_path, padding="none", overrides={"mlm_epochs": "1"})
    record = read_json(run(spec, lambda _line: None) / "record.json")
    assert [stage["stage"] for stage in record["train"]] == ["mlm", "finetune"]
    assert record["train"][0]["steps"] > 0 and not record["padding"]["none"]["macs_mismatch"]
