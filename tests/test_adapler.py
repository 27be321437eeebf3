"""AdapLeR invariants (methods-spec 5): eta_scale 0 is the baseline; what the CPs drop is
physically gone (trace == FLOPs counter); a row's answer does not depend on its batch, and
masking equals removal; the soft mask at lambda -> infinity is the hard removal; the saliency
teacher equals a direct autograd computation and is cached; each loss reaches only what its
optimiser trains in the official code."""

from __future__ import annotations

import pytest
import torch
from test_model import features
from test_simple_baselines import counted_equals_schedule, tiny

from skimbench.backbone import resolve_backbone
from skimbench.errors import UsageError
from skimbench.features import collate
from skimbench.method import CHECKPOINT, Context, check_supports, get_method
from skimbench.model import additive_mask
from skimbench.profiles import budget_for
from skimbench.tasks import get_task

LENGTHS = [40, 70, 100, 130]


def context(needs=None, run_dir=None) -> Context:
    task = get_task("sst2")
    return Context(resolve_backbone("random:tiny"), task, budget_for("smoke", task),
                   needs or {}, run_dir)


def build(**settings):
    """Method and model on random:tiny, the task weights equal to `tiny()`'s."""
    cls = get_method("adapler")
    method = cls(cls.configure(cls.Config(**{"init": "pretrained", **settings}),
                               get_task("sst2")))
    model = method.build(context())
    missing = model.load_state_dict(tiny().state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("contribution_predictors", "length_reduction"))
                           for k in missing)
    return method, model.eval()


def mixed(**settings):
    """Predictors with spread-out scores: a good share of the tokens goes at each layer."""
    method, model = build(**settings)
    torch.manual_seed(1)
    for predictor in model.contribution_predictors:
        predictor.net[0].weight.data.normal_(0.0, 1.0)
        predictor.net[2].weight.data.normal_(0.0, 0.1)
    return method, model


def with_settings(method, **settings):
    cls = type(method)
    return cls(cls.Config(**{**vars(method.config), **settings}))


def labelled(lengths):
    feats = features(lengths)
    for index, feature in enumerate(feats):
        feature["labels"] = index % 2
    return feats


# -- inference ------------------------------------------------------------------------------

@pytest.mark.parametrize("pad_to", [None, 160])
def test_eta_scale_zero_is_the_baseline(pad_to):
    method, model = mixed(eta_scale=0.0)
    feats = features(LENGTHS)
    reference = tiny()
    with torch.inference_mode():
        batch = collate(feats, pad_to)
        out = method.forward(model, batch)
        assert torch.equal(out.logits, reference(batch).logits)
        width = batch["input_ids"].shape[1]
        assert out.trace.query_tokens.tolist() == [[width, width]] * len(feats)
        for feature in feats:
            single = collate([feature], None)
            assert torch.equal(method.forward(model, single).logits, reference(single).logits)


def test_fresh_predictors_keep_every_token():
    """Init N(0, 0.02): shares close to uniform, far above eta_init / n."""
    method, model = build()
    with torch.inference_mode():
        trace = method.forward(model, collate(features(LENGTHS), None)).trace
    assert trace.query_tokens.tolist() == [[130, 130]] * 4


@pytest.mark.parametrize("pad_to", [None, 160])
def test_removes_tokens_physically(pad_to):
    method, model = mixed()
    batch = collate(features(LENGTHS), pad_to)
    with torch.inference_mode():
        trace = method.forward(model, batch).trace
    widths = trace.query_tokens[0].tolist()
    assert 0 < widths[1] < widths[0] < 130  # fewer tokens in later layers
    counted_equals_schedule(method, model, batch)
    single = collate(features([100]), None)
    assert method.forward(model, single).trace.query_tokens[0, 0] < 100
    counted_equals_schedule(method, model, single)


def test_trace_counts_the_predictors_and_the_head():
    method, model = mixed()
    batch = collate(features([100]), None)
    with torch.inference_mode():
        trace = method.forward(model, batch).trace
    widths = trace.query_tokens[0].tolist()
    per_token = 32 * model.hidden_size + 32
    # CP_0 scores all 100 tokens, CP_1 the survivors of layer 0
    assert trace.extra_macs.item() == model.head_macs(100) + (100 + widths[0]) * per_token
    assert trace.pairs[0].tolist() == [w * w for w in widths]


def test_batched_removal_equals_one_row_at_a_time():
    method, model = mixed()
    feats = features(LENGTHS)
    with torch.inference_mode():
        kept = []
        batched = method._hard(model, collate(feats, 160), kept=kept)
        simulated_kept = []
        simulated = method._hard(model, collate(feats, 160), simulate=True,
                                 kept=simulated_kept)
        counts = []
        for row, feature in enumerate(feats):
            alone = method.forward(model, collate([feature], None))
            counts.append(alone.trace.query_tokens[0].tolist())
            torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5,
                                       rtol=1e-5)
    assert torch.stack(kept, dim=1).tolist() == counts
    assert torch.stack(simulated_kept, dim=1).tolist() == counts
    assert len({tuple(c) for c in counts}) > 1  # rows really kept different numbers
    torch.testing.assert_close(simulated.logits, batched.logits, atol=1e-5, rtol=1e-5)
    assert simulated.trace.query_tokens.tolist() == [[160, 160]] * 4  # masking computes all
    assert with_settings(method, simulate=True).forward(model, collate(feats, 160)
                                                        ).trace.query_tokens[0, 0] == 160


def test_larger_eta_scale_drops_more():
    method, model = mixed()
    batch = collate(features(LENGTHS), None)
    with torch.inference_mode():
        base = method.forward(model, batch).trace.query_tokens[0]
        more = with_settings(method, eta_scale=2.0).forward(model, batch).trace.query_tokens[0]
    assert (more <= base).all() and (more < base).any()


def test_soft_mask_at_huge_lambda_is_the_hard_removal():
    """methods-spec 5.9: the lambda -> infinity limit of the training mask is the gather."""
    method, model = mixed()
    batch = collate(features(LENGTHS), None)
    kept = []
    with torch.inference_mode():
        hard = method._hard(model, batch, kept=kept)
        soft = method._soft(model, batch, 1e20)
    for alive, counts in zip(soft.alive, kept, strict=True):
        assert ((alive > 0.5) | (alive < 1e-6)).all()  # decided: 1 or 0
        assert (alive > 0.5).sum(dim=1).tolist() == counts.tolist()
    torch.testing.assert_close(soft.output.logits, hard.logits, atol=1e-4, rtol=1e-4)


# -- the saliency teacher -------------------------------------------------------------------

def direct_saliency(model, feature) -> torch.Tensor:
    batch = collate([feature], None)
    embedded = model.embed(batch).detach().requires_grad_(True)
    hidden = embedded
    for layer in model.layers:
        hidden = layer(hidden, additive_mask(batch["attention_mask"], hidden.dtype))
    logit = model.logits(hidden)[0, feature["labels"]]
    [grad] = torch.autograd.grad(logit, embedded)
    return (grad * embedded).norm(dim=-1)[0]


@pytest.fixture
def baseline_run(tmp_path):
    """A finished baseline run directory holding `tiny()`'s weights."""
    path = tmp_path / "baseline"
    (path / CHECKPOINT).parent.mkdir(parents=True)
    torch.save(tiny().state_dict(), path / CHECKPOINT)
    return path


def test_saliency_equals_autograd_and_is_cached(baseline_run, tmp_path, monkeypatch):
    import skimbench.methods.adapler as adapler

    feats = labelled([12, 30, 7, 20])[::-1]  # training order differs from example_index
    ctx = context({"baseline": baseline_run}, tmp_path / "run")
    method, model = build()
    lines = []
    method.prepare(model, ctx, feats, lines.append)
    saliency = method._saliency
    assert saliency.shape == (4, 30)
    teacher = tiny()
    for feature in feats:
        n, row = len(feature["input_ids"]), saliency[feature["example_index"]]
        torch.testing.assert_close(row[:n], direct_saliency(teacher, feature), atol=1e-6,
                                   rtol=1e-4)
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
    cache = tmp_path / "run" / "saliency.pt"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns

    def no_recompute(*_args, **_kwargs):
        raise AssertionError("saliency recomputed although cached")

    monkeypatch.setattr(adapler, "compute_saliency", no_recompute)
    again, _ = build()
    again.prepare(model, ctx, feats, lines.append)
    assert torch.equal(again._saliency, saliency)
    assert cache.stat().st_mtime_ns == stamp and "reusing" in lines[-1]
    # other training features: the cache does not match and is not used
    with pytest.raises(AssertionError, match="recomputed"):
        again.prepare(model, ctx, labelled([12, 30, 7]), lines.append)


def test_saliency_averages_the_baselines_last_epochs(baseline_run, tmp_path):
    """saliency_epochs=2 averages the final weights' map with the epoch before's; the cache
    made from the final weights alone is not reused; a third epoch the run lacks is refused."""
    earlier = tiny()
    with torch.no_grad():
        for param in earlier.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.save(earlier.state_dict(), baseline_run / "checkpoint" / "epoch-1.pt")
    feats = labelled([12, 30, 7])
    ctx = context({"baseline": baseline_run}, tmp_path / "run")
    method, model = build()
    method.prepare(model, ctx, feats, lambda _: None)
    final_only = method._saliency
    method, _ = build(saliency_epochs=2)
    method.prepare(model, ctx, feats, lambda _: None)
    for feature in feats:
        n = len(feature["input_ids"])
        mean = (direct_saliency(tiny(), feature) + direct_saliency(earlier, feature)) / 2
        torch.testing.assert_close(method._saliency[feature["example_index"], :n], mean,
                                   atol=1e-6, rtol=1e-4)
    assert not torch.allclose(method._saliency, final_only)
    method, _ = build(saliency_epochs=3)
    with pytest.raises(UsageError, match="saliency_epochs=3 needs the baseline's last 3"):
        method.prepare(model, ctx, feats, lambda _: None)


def test_init_baseline_starts_from_the_fine_tuned_weights(baseline_run):
    cls = get_method("adapler")
    model = cls(cls.Config()).build(context({"baseline": baseline_run}))
    assert torch.equal(model.head.weight, tiny().head.weight)
    with pytest.raises(ValueError, match="init=pretrained"):
        cls(cls.Config()).build(context())


# -- training -------------------------------------------------------------------------------

def training_batch(method, model):
    feats = labelled(LENGTHS)
    method._saliency = torch.rand(len(feats), 130)
    model.train()
    return collate(feats, None)


def grads(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("loss", ["task", "saliency", "length"])
def test_each_loss_reaches_only_what_its_optimiser_trains(loss):
    """Network loss (CE + gamma KL): encoder and CPs; threshold loss (CE + phi length): eta and
    theta. CE reaches both; the KL never eta/theta; the length loss never the network."""
    method, model = mixed()
    batch = training_batch(method, model)
    method._lambda = 100.0
    losses = method.losses(model, batch)
    assert set(losses) == {"task", "saliency", "length"}
    assert all(torch.isfinite(value) for value in losses.values())
    assert 0 < losses["length"].item() < 2 * 130  # at most every real token in both layers
    losses[loss].backward()
    lengths = model.length_reduction
    cps = grads(model.contribution_predictors)
    encoder = grads(model.encoder)
    eta = lengths.eta.grad.abs().sum() if lengths.eta.grad is not None else 0
    theta = lengths.theta.grad.abs().sum() if lengths.theta.grad is not None else 0
    if loss == "task":
        assert cps > 0 and encoder > 0 and eta > 0 and theta > 0
    elif loss == "saliency":
        assert cps > 0 and encoder == 0 and eta == 0 and theta == 0
    else:
        assert cps == 0 and encoder == 0 and eta > 0 and theta > 0


def test_saliency_to_encoder_lets_the_kl_train_the_encoder():
    method, model = mixed(saliency_to_encoder=True)
    batch = training_batch(method, model)
    method.losses(model, batch)["saliency"].backward()
    assert grads(model.encoder) > 0 and grads(model.contribution_predictors) > 0


def test_theta_gradient_is_the_dummy_gradient_over_theta():
    """Appendix B: d/dtheta = d/dtheta_d / theta, with theta_d = 1 in the forward."""
    method, model = mixed()
    batch = training_batch(method, model)
    model.eval()  # no dropout: the two forwards are the same function
    method._lambda = 100.0
    method.losses(model, batch)["length"].backward()
    at_one = model.length_reduction.theta.grad.clone()
    model.zero_grad()
    with torch.no_grad():
        model.length_reduction.theta.fill_(2.0)
    losses = method.losses(model, batch)
    losses["length"].backward()
    torch.testing.assert_close(model.length_reduction.theta.grad, at_one / 2)


def test_stage_weights_the_losses_and_anneals_lambda():
    from skimbench.methods.adapler import annealed_lambda

    method, model = build()
    [stage] = method.stages(context())
    assert stage.name == "adapler"
    assert stage.losses == {"task": 1.0, "saliency": 5e-3, "length": 5e-4}
    assert stage.param_lrs == {"length_reduction.": 5e-4, "contribution_predictors.": 1e-3}
    [paper] = with_settings(method, predictor_lr=None).stages(context())
    assert paper.param_lrs == {"length_reduction.": 5e-4}  # the CPs at the network's rate
    with torch.no_grad():
        model.length_reduction.eta.copy_(torch.tensor([-1.0, 3.0]))
        model.length_reduction.theta.fill_(-1.0)
    stage.on_step(model, 0, 10)
    assert model.length_reduction.eta.tolist() == pytest.approx([0.01, 1.0])
    assert model.length_reduction.theta.min().item() > 0
    assert method._lambda == 1000.0
    stage.on_step(model, 9, 10)  # the smoke stage (1 epoch): 5 parts of 10 * 10^k
    assert method._lambda == 1e5
    assert [annealed_lambda(s, 50, 5) for s in (0, 1, 10, 49)] == [1000, 10, 100, 1e5]
    assert [annealed_lambda(s, 30, 3) for s in (1, 10, 29)] == [50, 2500, 125000]
    assert annealed_lambda(99, 100, 10) == 10 * 3 ** 9
    assert annealed_lambda(99, 100, 2) == 1e5  # other counts: the 5-epoch branch


def test_gamma_and_phi_follow_table_4():
    cls = get_method("adapler")
    config = cls.configure(cls.Config(), get_task("agnews"))
    assert (config.gamma, config.phi) == (1e-1, 1e-1)
    config = cls.configure(cls.Config(), get_task("qnli"))
    assert (config.gamma, config.phi) == (5e-3, 1e-4)
    config = cls.configure(cls.Config(), get_task("qqp"))  # not in the table: SST-2's
    assert (config.gamma, config.phi) == (5e-3, 5e-4)
    assert cls.configure(cls.Config(gamma=0.7), get_task("sst2")).gamma == 0.7
    with pytest.raises(ValueError, match="init"):
        cls.Config(init="scratch")


@pytest.mark.parametrize("task", ["squad", "stsb"])
def test_refuses_qa_and_regression(task):
    with pytest.raises(UsageError, match="adapler.*does not support"):
        check_supports(get_method("adapler"), get_task(task))


# -- end to end through the runner -----------------------------------------------------------

def test_smoke_run_end_to_end(tiny_data, tmp_path):
    from skimbench.records import read_json
    from skimbench.runner import RunSpec, run

    lines = []
    run_dir = run(RunSpec(method="adapler", task="sst2", profile="smoke", data_dir=tiny_data,
                          out=tmp_path), lines.append)
    record = read_json(run_dir / "record.json")
    assert set(record["padding"]) == {"sequence", "batch", "none"}
    for mode in record["padding"].values():
        assert mode["flops_speedup"] > 0 and not mode["macs_mismatch"]
    assert (run_dir / "saliency.pt").is_file()
    assert any(line.startswith("saliency:") for line in lines)
    # a threshold sweep reuses the trained weights
    lines.clear()
    run(RunSpec(method="adapler", task="sst2", profile="smoke", data_dir=tiny_data,
                out=tmp_path, padding="none", overrides={"eta_scale": "2"}), lines.append)
    assert any("training skipped" in line for line in lines)
