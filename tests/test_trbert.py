"""TR-BERT invariants (methods-spec 10): a policy keeping every token is the baseline; dropped
tokens are physically gone (trace == FLOPs counter); a row's answer does not depend on its
batch; the teacher's heuristic scores and logits equal a direct computation and are cached;
the REINFORCE loss trains the policies (never the head) and vanishes when the K copies earn
the same reward; the runner trains and evaluates it end to end."""

from __future__ import annotations

import pytest
import torch
from test_model import features
from test_simple_baselines import counted_equals_schedule, tiny
from transformers import AutoModel

from skimbench.backbone import resolve_backbone
from skimbench.features import collate
from skimbench.method import CHECKPOINT, Context, get_method
from skimbench.methods.trbert import add_policies, compute_teacher, score_layer, selection_points
from skimbench.model import TaskModel, additive_mask
from skimbench.profiles import budget_for
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task

LENGTHS = [40, 70, 100, 130]
TASKS = {CLASSIFICATION: "sst2", EXTRACTIVE_QA: "squad"}


def deep(kind=CLASSIFICATION) -> TaskModel:
    """A 4-layer random:tiny: two selection points (before layers 1 and 2)."""
    torch.manual_seed(0)
    config = resolve_backbone("random:tiny").config()
    config.num_hidden_layers = 4
    return TaskModel(AutoModel.from_config(config, attn_implementation="sdpa"), kind, 2).eval()


def plain(kind, layers) -> TaskModel:
    return tiny(kind) if layers == 2 else deep(kind)


def method(kind=CLASSIFICATION, **settings):
    cls = get_method("trbert")
    return cls(cls.configure(cls.Config(**settings), get_task(TASKS[kind])))


def with_policies(model: TaskModel, keep_all: bool = False) -> TaskModel:
    """The model with policies: all keep (p ~ 1), or spread-out keep probabilities."""
    model = add_policies(model)
    torch.manual_seed(1)
    for policy in model.policies:
        first, last = policy.net[0], policy.net[2]
        if keep_all:
            last.bias.data.fill_(20.0)
        else:
            first.weight.data.normal_(0.0, 0.3)
            last.weight.data.normal_(0.0, 0.5)
            last.bias.data.fill_(2.0)
    return model.eval()


def labelled(lengths, kind=CLASSIFICATION):
    feats = features(lengths)
    for index, feature in enumerate(feats):
        if kind == CLASSIFICATION:
            feature["labels"] = index % 2
        else:
            del feature["labels"]
            feature["start_positions"], feature["end_positions"] = 1 + index % 3, 3 + index % 3
    return feats


def real_positions(logits, batch):
    """QA logits at the real (non-pad) positions of each row."""
    return [row[: int(n)] for row, n in zip(logits, batch["attention_mask"].sum(dim=1),
                                             strict=True)]


def context(kind=CLASSIFICATION, needs=None, run_dir=None) -> Context:
    task = get_task(TASKS[kind])
    return Context(resolve_backbone("random:tiny"), task, budget_for("smoke", task),
                   needs or {}, run_dir)


def test_points_and_score_layer_scale_with_depth():
    assert selection_points(12) == (1, 6) and score_layer(12) == 8  # BERT-base, the code's
    assert selection_points(6) == (1, 3) and score_layer(6) == 4    # MiniLM / DistilBERT-6
    assert selection_points(4) == (1, 2) and selection_points(2) == (1,)


# -- inference ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("pad_to", [None, 160])
def test_keeping_every_token_is_the_baseline(kind, layers, pad_to):
    model, reference = with_policies(plain(kind, layers), keep_all=True), plain(kind, layers)
    m = method(kind)
    batch = collate(features(LENGTHS), pad_to)
    with torch.inference_mode():
        got, expected = m.forward(model, batch).logits, reference(batch).logits
        zero = method(kind, keep_threshold=0.0).forward(with_policies(plain(kind, layers)),
                                                         batch).logits
    if kind == CLASSIFICATION:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(zero, expected, atol=1e-5, rtol=1e-5)
    else:  # pads leave at the first point; every real position equals the baseline's
        for ours, theirs in zip(real_positions(got, batch), real_positions(expected, batch),
                                strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("pad_to", [None, 160])
def test_removes_tokens_physically(kind, pad_to):
    model, m = with_policies(deep(kind)), method(kind)
    batch = collate(features(LENGTHS), pad_to)
    with torch.inference_mode():
        out = m.forward(model, batch)
    widths = out.trace.query_tokens[0].tolist()
    width = batch["input_ids"].shape[1]
    # layer 0 at n_0, layer 1 at k_1, layers 2-3 at k_2 (methods-spec 10.7)
    assert widths[0] == width and width > widths[1] > widths[2] == widths[3] > 0
    per_token = 32 * model.hidden_size + 32  # the policies score n_0, then k_1 slots
    assert out.trace.extra_macs[0] == model.head_macs(width) + (width + widths[1]) * per_token
    if kind == EXTRACTIVE_QA:  # the span head scores every position
        assert out.logits.shape == (4, width, 2) and bool((out.logits > -1e3).all())
    counted_equals_schedule(m, model, batch)
    single = collate(features([100]), None)
    assert m.forward(model, single).trace.query_tokens[0, -1] < 100
    counted_equals_schedule(m, model, single)


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_batched_removal_equals_one_row_at_a_time(kind):
    model, m = with_policies(deep(kind)), method(kind)
    feats = features(LENGTHS)
    batch = collate(feats, 160)
    widths = []
    with torch.inference_mode():
        batched = m.forward(model, batch).logits
        for row, feature in enumerate(feats):
            alone = m.forward(model, collate([feature], None))
            widths.append(tuple(alone.trace.query_tokens[0].tolist()))
            n = len(feature["input_ids"])
            torch.testing.assert_close(batched[row][:n] if kind == EXTRACTIVE_QA
                                       else batched[row], alone.logits[0], atol=1e-5,
                                       rtol=1e-5)
    assert len(set(widths)) > 1  # rows really kept different numbers of tokens


def test_faithful_batching_tops_every_row_up_to_the_batch_max():
    model = with_policies(deep())
    feats = features(LENGTHS)
    batch = collate(feats, 160)
    with torch.inference_mode():
        aligned = method().forward(model, batch)
        faithful = method(faithful_batching=True).forward(model, batch)
        alone = [method(faithful_batching=True).forward(model, collate([f], None))
                 for f in feats]
    # the same slot counts (the batch's largest), but short rows now compute extra tokens
    assert torch.equal(faithful.trace.query_tokens, aligned.trace.query_tokens)
    assert not torch.allclose(faithful.logits, aligned.logits, atol=1e-5)
    for row, single in enumerate(alone):  # at batch 1 the two rules agree
        torch.testing.assert_close(aligned.logits[row], single.logits[0], atol=1e-5,
                                   rtol=1e-5)


def test_keep_threshold_traces_the_speed_curve():
    model = with_policies(deep())
    batch = collate(features(LENGTHS), None)
    with torch.inference_mode():
        widths = [method(keep_threshold=t).forward(model, batch).trace.query_tokens[0, -1]
                  for t in (0.0, 0.3, 0.5, 0.7, 1.0)]
    assert widths[0] == 130 and widths[-1] == 1  # everything, then [CLS] alone
    assert all(a >= b for a, b in zip(widths, widths[1:], strict=False))
    assert widths[1] > widths[3]
    assert "keep_threshold" in get_method("trbert").inference_settings


# -- the teacher ----------------------------------------------------------------------------

def direct_teacher(model, feature):
    """Scores (points, n) and logits of one feature by plain autograd."""
    batch = collate([feature], None)
    hidden = model.embed(batch)
    outputs = []
    for layer in model.layers:
        hidden = layer(hidden, additive_mask(batch["attention_mask"], hidden.dtype))
        outputs.append(hidden)
    logits = model.logits(hidden)
    if model.kind == CLASSIFICATION:
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    else:
        loss = (torch.nn.functional.cross_entropy(logits[..., 0], batch["start_positions"])
                + torch.nn.functional.cross_entropy(logits[..., 1], batch["end_positions"])) / 2
    back = score_layer(len(model.layers))
    [grad] = torch.autograd.grad(loss, outputs[back])
    scores = [(grad * (outputs[back] - outputs[p - 1])).sum(-1).abs()[0]
              for p in selection_points(len(model.layers))]
    return torch.stack(scores).detach(), logits[0].detach()


@pytest.fixture
def baseline_run(tmp_path):
    """Finished baseline run directories holding `tiny()`'s weights, per task kind."""
    runs = {}
    for kind in (CLASSIFICATION, EXTRACTIVE_QA):
        path = tmp_path / f"baseline-{kind}"
        (path / CHECKPOINT).parent.mkdir(parents=True)
        torch.save(tiny(kind).state_dict(), path / CHECKPOINT)
        runs[kind] = path
    return runs


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_teacher_equals_autograd_and_is_cached(kind, baseline_run, tmp_path, monkeypatch):
    import skimbench.methods.trbert as trbert

    feats = labelled([12, 30, 7, 20], kind)[::-1]
    ctx = context(kind, {"baseline": baseline_run[kind]}, tmp_path / "run")
    m = method(kind)
    model = m.build(ctx)
    assert torch.equal(model.head.weight, tiny(kind).head.weight)  # starts from the baseline
    lines = []
    m.prepare(model, ctx, feats, lines.append)
    for feature in feats:
        scores, logits = direct_teacher(tiny(kind), feature)
        row = m._teacher.rows[trbert.feature_key(feature["example_index"],
                                                 feature["input_ids"])]
        torch.testing.assert_close(m._teacher.scores[row], scores, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(m._teacher.logits[row], logits, atol=1e-5, rtol=1e-5)
    cache = tmp_path / "run" / trbert.TEACHER_FILE
    stamp = cache.stat().st_mtime_ns

    def no_recompute(*_args, **_kwargs):
        raise AssertionError("teacher recomputed although cached")

    monkeypatch.setattr(trbert, "compute_teacher", no_recompute)
    again = method(kind)
    again.prepare(model, ctx, feats, lines.append)
    assert cache.stat().st_mtime_ns == stamp and "reusing" in lines[-1]
    assert again._teacher.rows == m._teacher.rows
    with pytest.raises(AssertionError, match="recomputed"):  # other features: no reuse
        again.prepare(model, ctx, feats[:2], lines.append)


# -- training -------------------------------------------------------------------------------

def trained(kind=CLASSIFICATION, **settings):
    """Method, 4-layer model in training mode, and a batch the teacher knows."""
    m, model = method(kind, **settings), with_policies(deep(kind))
    feats = labelled(LENGTHS, kind)
    m._teacher = compute_teacher(deep(kind), feats, 2)
    model.train()
    return m, model, collate(feats, None)


def grads(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("phase", ["policy", "joint"])
def test_reinforce_trains_the_policies_never_the_head(kind, phase):
    m, model, batch = trained(kind)
    m._phase, m._guided = phase, phase == "policy"
    losses = m.losses(model, batch)
    assert set(losses) == {"task", "distill", "reinforce"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["reinforce"].backward()
    assert grads(model.policies) > 0 and grads(model.head) == 0
    last = selection_points(len(model.layers))[-1]
    assert grads(model.layers[last:]) == 0  # only what feeds a policy
    model.zero_grad()
    losses = m.losses(model, batch)
    losses["distill"].backward()
    assert grads(model.policies) == 0 and grads(model.encoder) > 0 and grads(model.head) > 0


def test_reinforce_vanishes_when_every_copy_earns_the_same_reward():
    m, model, batch = trained(alpha_policy=0.0)
    with torch.no_grad():  # constant logits: every copy has the same loss
        model.head.weight.zero_()
    losses = m.losses(model, batch)
    assert losses["reinforce"].item() == 0.0
    losses["reinforce"].backward()
    assert grads(model.policies) == 0
    # with the length penalty, copies keeping more tokens earn less: a gradient again
    m, model, batch = trained(alpha_policy=1.0)
    with torch.no_grad():
        model.head.weight.zero_()
    m.losses(model, batch)["reinforce"].backward()
    assert grads(model.policies) > 0


def test_guided_copy_keeps_the_heuristics_best_tokens(monkeypatch):
    m, model, batch = trained()
    m._guided = True
    seen = []
    encode = m._encode

    def spy(model, batch, decide):
        def recording(point, logits, tokens):
            keep = decide(point, logits, tokens)
            seen.append((point, logits.sigmoid() * tokens.attend, tokens, keep))
            return keep
        return encode(model, batch, recording)

    monkeypatch.setattr(m, "_encode", spy)
    m.losses(model, batch)
    point, probs, tokens, keep = seen[0]
    assert point == 0
    for row in range(len(LENGTHS)):  # copy 0 of each example
        n = LENGTHS[row]
        count = int(probs[row].sum() + 0.5)
        best = m._teacher.scores[row][0, :n].argsort(descending=True)[:count].tolist()
        assert set(keep[row].nonzero().squeeze(1).tolist()) == set(best) | {0}


def test_stages_freeze_the_backbone_then_distil():
    cls = get_method("trbert")
    m = method()
    policy, joint = m.stages(context())
    assert (policy.name, policy.losses, policy.frozen) == ("policy", {"reinforce": 1.0},
                                                           ("encoder.", "head."))
    assert (joint.name, joint.losses, joint.frozen) == ("joint", {"distill": 1.0,
                                                                  "reinforce": 1.0}, ())
    model = with_policies(tiny())
    policy.on_step(model, 0, 10)
    assert m._phase == "policy" and m._guided
    policy.on_step(model, 5, 10)  # guide_rate 0.5 for classification
    assert not m._guided
    joint.on_step(model, 0, 10)
    assert m._phase == "joint" and not m._guided
    assert method(distill=False).stages(context())[1].losses == {"task": 1.0, "reinforce": 1.0}
    qa = cls.configure(cls.Config(), get_task("squad_v2"))
    assert (qa.alpha_policy, qa.alpha_joint, qa.guide_rate) == (5.0, 5.0, 0.2)
    yelp = cls.configure(cls.Config(alpha_joint=3.0), get_task("yelp"))
    assert (yelp.alpha_policy, yelp.alpha_joint, yelp.guide_rate) == (2.0, 3.0, 0.5)
    with pytest.raises(ValueError, match="samples"):
        cls.Config(samples=1)


# -- end to end through the runner -----------------------------------------------------------

@pytest.mark.parametrize("task", ["sst2", "squad"])
def test_smoke_run_end_to_end(task, tiny_data, tmp_path):
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    lines = []
    run_dir = run(RunSpec(method="trbert", task=task, profile="smoke", data_dir=tiny_data,
                          out=tmp_path), lines.append)
    record = read_json(run_dir / "record.json")
    assert set(record["padding"]) == {"sequence", "batch", "none"}
    for mode in record["padding"].values():
        assert mode["flops_speedup"] > 0 and not mode["macs_mismatch"]
    assert [s["stage"] for s in record["train"]] == ["policy", "joint"]
    assert (run_dir / "trbert-teacher.pt").is_file()
    assert any(line.startswith("teacher:") for line in lines)
    if task == "sst2":  # a threshold sweep reuses the trained weights
        lines.clear()
        run(RunSpec(method="trbert", task=task, profile="smoke", data_dir=tiny_data,
                    out=tmp_path, padding="none", overrides={"keep_threshold": "0.7"}),
            lines.append)
        assert any("training skipped" in line for line in lines)
