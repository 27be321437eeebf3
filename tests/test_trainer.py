"""The shared trainer: schedule, freezing, clipping, determinism."""

from __future__ import annotations

import torch
from test_model import features

from skimbench.backbone import resolve_backbone
from skimbench.model import TaskModel, task_loss
from skimbench.profiles import budget_for
from skimbench.tasks import CLASSIFICATION, get_task
from skimbench.trainer import Stage, _batches, _linear_schedule, epoch_batches, train


def model():
    torch.manual_seed(0)
    return TaskModel(resolve_backbone("random:tiny").encoder(), CLASSIFICATION, 2)


def loss_fn(m, batch):
    return {"task": task_loss(CLASSIFICATION, m(batch).logits, batch)}


def test_stage_steps_from_epochs_or_cap():
    assert Stage("s", epochs=2, batch_size=32).steps(100) == 8
    assert Stage("s", epochs=0.5, batch_size=32).steps(100) == 2
    assert Stage("s", epochs=3, batch_size=32, max_steps=5).steps(100) == 5


def test_linear_warmup_then_decay():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    schedule = _linear_schedule(opt, warmup=4, total=10)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates[:4] == sorted(rates[:4]) and rates[0] < rates[3] < 1.0
    assert rates[4] == 1.0 and rates[4:] == sorted(rates[4:], reverse=True)
    assert rates[-1] > 0


def test_frozen_prefixes_stay_fixed_and_the_rest_moves():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, [Stage("head-only", max_steps=3, lr=1e-2, batch_size=4, frozen=("encoder.",))],
          features([5, 6, 7, 8, 9, 10]), loss_fn, seed=0, log=lambda _: None)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert all(p.requires_grad for p in m.parameters())  # unfrozen again after the stage


def test_training_is_deterministic_for_a_seed():
    runs = []
    for seed in (1, 1, 2):
        m = model()
        train(m, [Stage("s", max_steps=4, lr=1e-2, batch_size=2)], features([5, 6, 7, 8, 9]),
              loss_fn, seed=seed, log=lambda _: None)
        runs.append(m.head.weight.detach().clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_gradients_are_clipped_to_the_stage_norm(monkeypatch):
    """Every step clips the trainable gradients to the stage's max norm before stepping."""
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        norm = original(params, max_norm)
        seen.append((max_norm, float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])))))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(model(), [Stage("s", epochs=3, lr=1e-3, batch_size=4, grad_clip=0.01)],
          features([5, 6, 7, 8]), loss_fn, seed=0, log=lambda _: None)
    assert len(seen) == 3
    assert all(max_norm == 0.01 and after <= 0.01 * 1.001 for max_norm, after in seen)


def test_param_lrs_give_a_prefix_its_own_rate_and_on_step_sees_every_step():
    """A learned threshold trains at its own rate (here 0: it must not move while the head
    does); the hook runs before each of the 3 steps and once after the last."""
    m = model()
    before = m.head.bias.detach().clone()
    calls = []
    train(m, [Stage("own-lr", epochs=2, max_steps=3, lr=1e-2, batch_size=4, param_lrs={"head.bias": 0.0},
                    on_step=lambda _, step, total: calls.append((step, total)))],
          features([5, 6, 7, 8, 9, 10]), loss_fn, seed=0, log=lambda _: None)
    assert torch.equal(m.head.bias, before)
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_epoch_ends_include_a_partial_last_epoch():
    assert Stage("s", epochs=2, batch_size=32).epoch_ends(100) == [4, 8]
    assert Stage("s", epochs=2.5, batch_size=32).epoch_ends(100) == [4, 8, 10]
    assert Stage("s", epochs=0.5, batch_size=32).epoch_ends(100) == [2]
    assert Stage("s", epochs=3, batch_size=32, max_steps=5).epoch_ends(100) == [4, 5]


def test_save_epochs_keeps_each_epochs_weights_and_a_resume_names_them(tmp_path):
    """Two epochs of 2 steps: the files hold the weights after steps 2 and 4 (the last is the
    stage's final weights), the hook still runs once per step, and a resumed run lists the
    same files without training."""
    feats = features([5, 6, 7, 8])
    calls = []
    stage = Stage("e", epochs=2, lr=1e-2, batch_size=2, save_epochs=True,
                  on_step=lambda _, step, total: calls.append(step))
    first = model()
    [summary] = train(first, [stage], feats, loss_fn, seed=0, checkpoint_dir=tmp_path,
                      log=lambda _: None)
    assert calls == [0, 1, 2, 3, 4]
    paths = [tmp_path / "stage-0-e-epoch-1.pt", tmp_path / "stage-0-e-epoch-2.pt"]
    assert summary["epoch_checkpoints"] == [str(p) for p in paths]
    final = torch.load(paths[1])
    assert all(torch.equal(final[k], v) for k, v in first.state_dict().items())
    after_one, initial = torch.load(paths[0]), model().state_dict()
    assert not torch.equal(after_one["head.weight"], final["head.weight"])
    assert not torch.equal(after_one["head.weight"], initial["head.weight"])
    resumed = train(model(), [stage], feats, loss_fn, seed=0, checkpoint_dir=tmp_path,
                    log=lambda _: None)
    assert resumed[0]["resumed"] and resumed[0]["epoch_checkpoints"] == summary[
        "epoch_checkpoints"]


# length-grouped batches ----------------------------------------------------------------------

def random_lengths(count=1003, seed=0):
    """Lengths 8..384 (SQuAD-window-like range); 1003 = 62 batches of 16 and one of 11."""
    return torch.randint(8, 385, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def padding_waste(lengths, batches):
    """Pad positions computed: each batch padded to its longest member."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_grouped_epochs_hold_every_index_once_in_full_batches():
    lengths = random_lengths()
    generator = torch.Generator().manual_seed(0)
    epochs = [epoch_batches(lengths, 16, generator, group_by_length=True) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert sorted(len(b) for b in batches) == [11] + [16] * 62
    assert epochs[0] != epochs[1]  # each epoch draws a new order from the generator
    ungrouped = epoch_batches(lengths, 16, generator)
    assert sorted(i for b in ungrouped for i in b) == list(range(len(lengths)))
    assert [len(b) for b in ungrouped] == [16] * 62 + [11]


def test_grouped_order_is_seeded():
    lengths = random_lengths()
    for group in (True, False):
        first, again, other = (epoch_batches(lengths, 16, torch.Generator().manual_seed(s),
                                             group) for s in (3, 3, 4))
        assert first == again and first != other


def test_grouping_cuts_padding_waste():
    """Grouped batches pad about 3% of what random batches of the same data pad (measured
    0.025-0.026 over seeds 0-4); asserted below a tenth, for every seed."""
    lengths = random_lengths(2000)
    for seed in range(5):
        grouped = padding_waste(lengths, epoch_batches(
            lengths, 16, torch.Generator().manual_seed(seed), group_by_length=True))
        ungrouped = padding_waste(lengths, epoch_batches(
            lengths, 16, torch.Generator().manual_seed(seed)))
        assert ungrouped > 250_000 and grouped < 0.1 * ungrouped


def test_grouped_batches_come_in_shuffled_order():
    """Batches are not served longest first, nor sorted by length: the batch holding the
    longest feature lands at different places, and the batch maxima are not monotonic."""
    lengths = random_lengths()
    longest = max(lengths)
    positions = set()
    for seed in range(10):
        batches = epoch_batches(lengths, 16, torch.Generator().manual_seed(seed), True)
        maxima = [max(lengths[i] for i in b) for b in batches]
        positions.add(maxima.index(longest))
        assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)
    assert len(positions) >= 5 and positions != {0}


def test_trainer_batches_follow_the_grouped_epoch():
    """_batches (what train iterates) collates epoch_batches' grouped order, epoch after
    epoch, each batch padded only to its own longest member."""
    lengths = random_lengths(100)
    feats = features(lengths)
    generator = torch.Generator().manual_seed(5)
    expected = [b for _ in range(2)
                for b in epoch_batches(lengths, 8, generator, group_by_length=True)]
    batches = _batches(feats, 8, torch.Generator().manual_seed(5), group_by_length=True)
    for indices in expected:
        batch = next(batches)
        assert batch["example_index"].tolist() == indices
        assert batch["input_ids"].shape[1] == max(lengths[i] for i in indices)


def test_group_by_length_is_on_for_local_and_paper_off_for_ci_and_smoke():
    for key in ("sst2", "squad"):
        task = get_task(key)
        assert budget_for("local", task).group_by_length is True
        assert budget_for("paper", task).group_by_length is True
        assert budget_for("ci", task).group_by_length is False
        assert budget_for("smoke", task).group_by_length is False
