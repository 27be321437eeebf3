"""truncate and layerdrop: with nothing removed they are the baseline; what they remove is
physically not computed (trace == FLOPs counter); their settings are validated."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_model import features

from skimbench.backbone import resolve_backbone
from skimbench.cli import main
from skimbench.features import collate
from skimbench.flops import count_macs
from skimbench.measure import _MethodForward
from skimbench.method import get_method
from skimbench.model import TaskModel
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA


def tiny(kind=CLASSIFICATION) -> TaskModel:
    torch.manual_seed(0)
    return TaskModel(resolve_backbone("random:tiny").encoder(), kind, 2).eval()


def method(key: str, **settings):
    cls = get_method(key)
    return cls(cls.Config(**settings))


def counted_equals_schedule(m, model, batch) -> None:
    trace = m.forward(model, batch).trace
    schedule = int(trace.macs(model.hidden_size, model.ffn_size).sum())
    assert count_macs(_MethodForward(m, model), batch) == schedule


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_truncate_keeping_everything_is_the_baseline(kind):
    model = tiny(kind)
    batch = collate(features([6, 13, 20]), None)
    with torch.inference_mode():
        expected = model(batch).logits
        got = method("truncate", keep_tokens=20).forward(model, batch).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("pad_to", [None, 32])
def test_truncate_removes_tokens_physically(pad_to):
    model = tiny()
    batch = collate(features([6, 13, 20]), pad_to)
    m = method("truncate", keep_tokens=8)
    out = m.forward(model, batch)
    assert out.trace.query_tokens.tolist() == [[8, 8]] * 3
    counted_equals_schedule(m, model, batch)
    # the first 8 tokens decide the output: changing a later token changes nothing
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 10] = 999
    torch.testing.assert_close(m.forward(model, changed).logits, out.logits)


def test_truncate_qa_gives_removed_positions_no_chance():
    model = tiny(EXTRACTIVE_QA)
    batch = collate(features([12, 30]), None)
    logits = method("truncate", keep_tokens=10).forward(model, batch).logits
    assert logits.shape == (2, 30, 2)
    assert bool((logits[:, 10:] == -1e4).all()) and bool((logits[:, :10] > -1e3).all())


def test_layerdrop_with_every_layer_is_the_baseline():
    model = tiny()
    batch = collate(features([6, 13]), None)
    with torch.inference_mode():
        torch.testing.assert_close(method("layerdrop", keep_layers=2).forward(model, batch)
                                   .logits, model(batch).logits)


def test_layerdrop_runs_only_k_layers():
    model = tiny()
    batch = collate(features([6, 13]), 16)
    m = method("layerdrop", keep_layers=1)
    trace = m.forward(model, batch).trace
    assert trace.query_tokens.tolist() == [[16, 0], [16, 0]]
    assert trace.exit_layer.tolist() == [1, 1]
    counted_equals_schedule(m, model, batch)


def test_layerdrop_stages_freeze_the_encoder_for_head_training():
    from skimbench.method import Context
    from skimbench.profiles import budget_for
    from skimbench.tasks import get_task

    task = get_task("sst2")
    ctx = Context(resolve_backbone("random:tiny"), task, budget_for("smoke", task), {})
    [stage] = method("layerdrop", train="head").stages(ctx)
    assert stage.frozen == ("encoder.embeddings.", "encoder.encoder.")
    assert method("layerdrop", train="all").stages(ctx)[0].frozen == ()
    assert method("layerdrop", train="none").stages(ctx) == []
    assert method("truncate").stages(ctx) == []
    assert len(method("truncate", finetune=True).stages(ctx)) == 1


@pytest.mark.parametrize("setting,message", [("keep_tokens=0", "keep_tokens must be at least 1"),
                                             ("train=some", "train must be one of")])
def test_invalid_settings_are_one_line_errors(setting, message):
    key = "truncate" if setting.startswith("keep_tokens") else "layerdrop"
    result = CliRunner().invoke(main, ["run", "-m", key, "-d", "sst2", "--set", setting])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
