"""distilbert: the student's layers are the chosen teacher layers (official, every-other and
explicit maps, at several depths); it is a physically shallower encoder, so its MACs are exactly
the encoder's k/L share in every padding mode and match the FLOPs counter; the KD loss vanishes
only when student and teacher agree; a DistilBERT checkpoint converted to the BERT layout
computes the same hidden states; bad settings are one-line errors; smoke runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from test_model import features
from test_simple_baselines import counted_equals_schedule, method, tiny
from transformers import AutoModel, DistilBertModel
from transformers import DistilBertConfig as HFDistilBertConfig

from skimbench.backbone import resolve_backbone
from skimbench.errors import UsageError
from skimbench.evaluate import evaluate
from skimbench.features import collate
from skimbench.method import CHECKPOINT, Context
from skimbench.methods.distilbert import keep_layers, teacher_layers
from skimbench.model import REMOVED_LOGIT, TaskModel, additive_mask, distillation_loss
from skimbench.profiles import budget_for
from skimbench.records import read_json
from skimbench.runner import RunSpec, resolve, run
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, REGRESSION, get_task

# -- the layer map ------------------------------------------------------------------------------


def test_layer_maps():
    assert teacher_layers("official", 12) == [0, 2, 4, 7, 9, 11]  # extract_distilbert.py
    assert teacher_layers("official", 6) == [0, 2, 5]              # methods-spec 15 (MiniLM)
    assert teacher_layers("official", 4) == [0, 3]
    assert teacher_layers("official", 2) == [0]
    assert teacher_layers("official", 12, 4) == [0, 4, 7, 11]
    assert teacher_layers("official", 6, 6) == list(range(6))
    assert teacher_layers("every_other", 12) == [0, 2, 4, 6, 8, 10]
    assert teacher_layers("every_other", 6) == [0, 2, 4]
    assert teacher_layers("0:2:4:7:9:11", 12) == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize("layer_map, num_layers, depth, match", [
    ("official", 4, 5, "layers=5 but the backbone has only 4"),
    ("every_other", 6, 4, "every_other cannot take 4 of 6"),
    ("0:2:6", 6, None, "names layer 6 but the backbone has layers 0..5"),
])
def test_layer_maps_beyond_the_backbone_are_refused(layer_map, num_layers, depth, match):
    with pytest.raises(ValueError, match=match):
        teacher_layers(layer_map, num_layers, depth)


def backbone_dir(tmp_path, num_layers: int) -> str:
    """A local checkpoint of a tiny random BERT with `num_layers` layers."""
    config = resolve_backbone("random:tiny").config()
    config.num_hidden_layers = num_layers
    torch.manual_seed(1)
    path = tmp_path / f"bert-{num_layers}"
    AutoModel.from_config(config).save_pretrained(path)
    return str(path)


def context(backbone: str, task: str = "sst2", baseline=None) -> Context:
    return Context(resolve_backbone(backbone), get_task(task), budget_for("smoke", get_task(task)),
                   {} if baseline is None else {"baseline": baseline})


def save_baseline(model: TaskModel, run_dir):
    (run_dir / "checkpoint").mkdir(parents=True)
    torch.save(model.state_dict(), run_dir / CHECKPOINT)
    return run_dir


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("num_layers", [4, 6, 12])
@pytest.mark.parametrize("layer_map", ["official", "every_other"])
def test_student_layers_are_the_chosen_teacher_layers(tmp_path, num_layers, layer_map):
    """From the pre-trained backbone (default) and from the fine-tuned baseline, the teacher."""
    source = backbone_dir(tmp_path, num_layers)
    chosen = teacher_layers(layer_map, num_layers)
    pretrained = TaskModel(resolve_backbone(source).encoder(), CLASSIFICATION, 2)
    student = method("distilbert", layer_map=layer_map, distill=False).build(context(source))
    assert len(student.layers) == student.encoder.config.num_hidden_layers == num_layers // 2
    assert all(same_weights(mine, pretrained.layers[i])
               for mine, i in zip(student.layers, chosen, strict=True))
    assert same_weights(student.encoder.embeddings, pretrained.encoder.embeddings)

    fine_tuned = TaskModel(resolve_backbone(source).encoder(), CLASSIFICATION, 2)
    with torch.no_grad():
        for param in fine_tuned.parameters():
            param.add_(torch.randn_like(param))  # "fine-tuned": differs from the backbone
    student = method("distilbert", layer_map=layer_map, init="baseline").build(
        context(source, baseline=save_baseline(fine_tuned, tmp_path / "base")))
    assert all(same_weights(mine, fine_tuned.layers[i])
               for mine, i in zip(student.layers, chosen, strict=True))
    assert not same_weights(student.layers[0], pretrained.layers[0])
    assert same_weights(student.head, fine_tuned.head)


# -- compute --------------------------------------------------------------------------------------


class Example:
    def __init__(self, i):
        self.id, self.label = str(i), i % 2


def test_flops_are_the_encoders_share_in_every_padding_mode():
    """sum of method MACs minus heads = k/L of the baseline's, exactly; the counter agrees."""
    torch.manual_seed(0)
    config = resolve_backbone("random:tiny").config()
    config.num_hidden_layers = 6
    base = TaskModel(AutoModel.from_config(config), CLASSIFICATION, 2).eval()
    student = keep_layers(TaskModel(AutoModel.from_config(config), CLASSIFICATION, 2),
                          teacher_layers("official", 6)).eval()
    m, baseline = method("distilbert", distill=False), method("baseline")
    rows = features([6, 13, 20, 9, 31])
    examples = [Example(i) for i in range(len(rows))]
    head = base.head_macs(0) * len(rows)  # pooler + classifier, per example
    for padding in ("sequence", "batch", "none"):
        args = (get_task("sst2"), examples, rows, padding, 2, 32)
        ours, theirs = evaluate(m, student, *args), evaluate(baseline, base, *args)
        assert 6 * (ours.macs_sum - head) == 3 * (theirs.macs_sum - head)
    for pad_to in (None, 32):
        counted_equals_schedule(m, student, collate(rows, pad_to))
    counted_equals_schedule(m, student, collate(rows[:1], None))


# -- losses ---------------------------------------------------------------------------------------


def test_kd_loss_is_zero_only_when_student_and_teacher_agree():
    torch.manual_seed(0)
    batch = collate(features([5, 9]), 12)
    classes = torch.randn(2, 3)
    assert distillation_loss(CLASSIFICATION, classes, classes, batch, 2.0) == 0
    assert distillation_loss(CLASSIFICATION, classes, classes.flip(0), batch, 2.0) > 0
    scores = torch.randn(2, 1)
    assert distillation_loss(REGRESSION, scores, scores, batch, 2.0) == 0
    assert distillation_loss(REGRESSION, scores, scores + 1, batch, 2.0) == pytest.approx(1.0)
    spans = torch.randn(2, 12, 2)
    assert distillation_loss(EXTRACTIVE_QA, spans, spans, batch, 2.0) < 1e-6
    assert distillation_loss(EXTRACTIVE_QA, spans, spans.flip(1), batch, 2.0) > 0
    # pads (row 0 past 5) and removed positions are out of the span softmax
    changed = spans.clone()
    changed[0, 5:] = torch.randn(7, 2)
    removed = spans.clone()
    removed[1, 3] = REMOVED_LOGIT
    assert distillation_loss(EXTRACTIVE_QA, spans, changed, batch, 2.0) < 1e-6
    assert distillation_loss(EXTRACTIVE_QA, removed, changed, batch, 2.0) < 1e-6


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_losses_and_stages_follow_distill(tmp_path, kind):
    task = "sst2" if kind == CLASSIFICATION else "squad"
    fine_tuned = tiny(kind)
    with torch.no_grad():
        fine_tuned.head.weight.add_(torch.randn_like(fine_tuned.head.weight))  # decisive logits
    baseline = save_baseline(fine_tuned, tmp_path / "base")
    ctx = context("random:tiny", task, baseline)
    rows = features([6, 13])
    if kind == EXTRACTIVE_QA:
        rows = [{**{k: v for k, v in row.items() if k != "labels"}, "start_positions": 2,
                 "end_positions": 3} for row in rows]
    batch = collate(rows, None)
    # the whole baseline as the student: it agrees with its teacher, so no KD loss
    same = method("distilbert", init="baseline", layers=2)
    losses = same.losses(same.build(ctx).eval(), batch)
    assert set(losses) == {"task", "kd"} and losses["kd"] < 1e-6
    half = method("distilbert", init="baseline")
    assert half.losses(half.build(ctx).eval(), batch)["kd"] > 0
    assert half.stages(ctx)[0].losses == {"task": 0.5, "kd": 0.5}
    plain = method("distilbert", distill=False)
    assert set(plain.losses(plain.build(ctx), batch)) == {"task"}
    assert plain.stages(ctx)[0].losses == {"task": 1.0}


# -- DistilBERT checkpoints -------------------------------------------------------------------


def distilbert_dir(tmp_path, layers: int = 3) -> str:
    """A tiny random DistilBertModel saved as a local checkpoint (the tokenizer's vocabulary)."""
    torch.manual_seed(2)
    config = HFDistilBertConfig(vocab_size=30522, dim=32, n_layers=layers, n_heads=2,
                                hidden_dim=64)
    path = tmp_path / "distilbert"
    DistilBertModel(config).save_pretrained(path)
    return str(path)


def test_converted_distilbert_computes_the_same_hidden_states(tmp_path):
    source = distilbert_dir(tmp_path)
    reference = DistilBertModel.from_pretrained(source).eval()
    backbone = resolve_backbone(source)
    assert backbone.config().model_type == "bert" and backbone.config().num_hidden_layers == 3
    m = method("distilbert", student=source, distill=False)
    student = m.build(context("random:tiny"))
    batch = collate(features([7, 12]), None)
    batch["token_type_ids"][:, 4:] = 1  # DistilBERT has no token types: they change nothing
    with torch.inference_mode():
        expected = reference(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state
        for encoder in (backbone.encoder().eval(), student.encoder.eval()):
            got = encoder(**{k: batch[k] for k in ("input_ids", "token_type_ids",
                                                   "attention_mask")}).last_hidden_state
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        hidden = student.embed(batch)
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        for layer in student.layers:  # the harness's own layer loop
            hidden = layer(hidden, mask)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)
    assert student.forward(batch).trace.query_tokens.shape == (2, 3)


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    ({"layers": "0"}, "layers must be at least 1"),
    ({"layer_map": "spread"}, "layer_map must be official, every_other or teacher layers"),
    ({"layer_map": "3:1"}, "in increasing order"),
    ({"layer_map": "0:1", "layers": "1"}, "names 2 layers"),
    ({"layers": "3"}, "layers=3 but the backbone has only 2"),
    ({"layer_map": "0:2"}, "names layer 2 but the backbone has layers 0..1"),
    ({"student": "some/ready", "init": "baseline"}, "is a ready checkpoint: drop one"),
    ({"student": "some/ready", "layers": "1"}, "is a ready checkpoint: drop them"),
    ({"temperature": "0"}, "temperature must be > 0"),
    ({"alpha_ce": "0", "alpha_task": "0"}, "nothing trains"),
    ({"student": "no-such-org/no-such-student"}, "could not be loaded"),
])
def test_bad_settings_are_one_line_errors(overrides, match, monkeypatch):
    # hub clients imported before the offline fixture ran read its setting at import
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    spec = RunSpec(method="distilbert", task="sst2", profile="smoke", overrides=overrides)
    with pytest.raises(UsageError, match=match) as error:
        resolve(spec)
    assert "\n" not in str(error.value)


def test_a_student_with_another_vocabulary_is_refused(tmp_path):
    path = tmp_path / "small-vocab"
    DistilBertModel(HFDistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                       hidden_dim=64)).save_pretrained(path)
    spec = RunSpec(method="distilbert", task="sst2", profile="smoke",
                   overrides={"student": str(path)})
    with pytest.raises(UsageError, match="100-token vocabulary but the backbone has 30522"):
        resolve(spec)


# -- end to end -----------------------------------------------------------------------------


def test_sst2_runs_end_to_end_with_the_exact_flops_share(tiny_data, tmp_path):
    """Cut from the 2-layer tiny backbone: 1 layer; then a ready DistilBERT student."""
    run_dir = run(RunSpec(method="distilbert", task="sst2", profile="smoke", data_dir=tiny_data,
                          out=tmp_path, threads=1), lambda _line: None)
    record = read_json(run_dir / "record.json")
    assert record["status"] == "finished" and record["train"][0]["stage"] == "distilbert"
    assert record["notes"] and record["notes"][0].startswith("task distillation only")
    model = tiny()
    head = model.head_macs(0) * record["num_eval_features"]
    assert set(record["padding"]) == {"sequence", "batch", "none"}
    for mode in record["padding"].values():
        assert not mode["macs_mismatch"] and mode["counted_macs"] == mode["schedule_macs"]
        assert 2 * (mode["macs_sum"] - head) == mode["baseline_macs_sum"] - head

    ready = run(RunSpec(method="distilbert", task="sst2", profile="smoke", data_dir=tiny_data,
                        out=tmp_path, threads=1,
                        overrides={"student": distilbert_dir(tmp_path, layers=1)}),
                lambda _line: None)
    record = read_json(ready / "record.json")
    assert record["status"] == "finished" and record["notes"][0].startswith("ready student")
    assert all(not mode["macs_mismatch"] for mode in record["padding"].values())


@pytest.mark.parametrize("task", ["squad", "stsb"])
def test_qa_and_regression_run_end_to_end(tiny_data, tmp_path, task):
    run_dir = run(RunSpec(method="distilbert", task=task, profile="smoke", data_dir=tiny_data,
                          out=tmp_path, threads=1), lambda _line: None)
    record = read_json(run_dir / "record.json")
    assert record["status"] == "finished" and record["train"][0]["stage"] == "distilbert"
    for mode in record["padding"].values():
        assert not mode["macs_mismatch"] and mode["counted_macs"] == mode["schedule_macs"]
        assert mode["flops_speedup"] > 1.9  # 2 layers -> 1; the head is a sliver
    # in `none` both models run the same positions: the heads cost the same, the encoder half
    with (run_dir / "predictions.jsonl").open() as rows:
        head = sum(json.loads(row)["extra_macs"] for row in rows)
    none = record["padding"]["none"]
    assert 2 * (none["macs_sum"] - head) == none["baseline_macs_sum"] - head
