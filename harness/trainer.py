"""The one training loop every method uses: stages of AdamW with linear warm-up and decay.

A method describes its schedule as a list of Stage (epochs or steps, learning rate, which of its
named losses to weight, which parameters to freeze); the trainer runs them in order with a seeded
data order, gradient clipping and a progress bar, and checkpoints after each stage so that an
interrupted run resumes from the last finished stage. A stage may give some parameters their own
learning rate (learned thresholds) and a per-step hook (annealing, clipping a parameter's range),
and may keep its weights at every epoch's end (model selection, a teacher averaged over epochs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import get_length_grouped_indices

from skimbench.features import collate

# batches are drawn from "mega-batches" of this many batches sorted by length (HF Trainer's
# `group_by_length` uses the same factor)
MEGA_BATCHES = 50


@dataclass
class Stage:
    name: str
    epochs: float = 1.0
    max_steps: int | None = None           # caps the stage when set
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    losses: dict[str, float] = field(default_factory=lambda: {"task": 1.0})
    frozen: tuple[str, ...] = ()           # parameter-name prefixes held fixed in this stage
    # parameter-name prefix -> its own learning rate (no weight decay; same warm-up and decay)
    param_lrs: dict[str, float] = field(default_factory=dict)
    # called as on_step(model, step, total) before each step (0..total-1) and once after the
    # last (step == total): annealing schedules, clipping a parameter to its range
    on_step: Callable[[nn.Module, int, int], None] | None = None
    # keep the weights at the end of every epoch (the last one may be partial) as
    # stage-<i>-<name>-epoch-<k>.pt beside the stage checkpoint
    save_epochs: bool = False

    def steps(self, num_examples: int) -> int:
        per_epoch = math.ceil(num_examples / self.batch_size)
        total = max(1, math.ceil(per_epoch * self.epochs))
        return min(total, self.max_steps) if self.max_steps else total

    def epoch_ends(self, num_examples: int) -> list[int]:
        """The step counts at which each epoch ends; the last is the stage's end."""
        per_epoch, total = math.ceil(num_examples / self.batch_size), self.steps(num_examples)
        return [*range(per_epoch, total, per_epoch), total]


LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


def _optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    """AdamW over the unfrozen parameters; no decay on biases and LayerNorm weights; the
    stage's `param_lrs` prefixes in groups of their own."""
    decay, no_decay = [], []
    own: dict[str, list] = {prefix: [] for prefix in stage.param_lrs}
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(stage.frozen) if stage.frozen else True)
        if not param.requires_grad:
            continue
        prefix = next((p for p in stage.param_lrs if name.startswith(p)), None)
        if prefix is not None:
            own[prefix].append(param)
        else:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": params, "weight_decay": 0.0, "lr": stage.param_lrs[prefix]}
               for prefix, params in own.items() if params]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr)


def _linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                  group_by_length: bool = False) -> list[list[int]]:
    """One epoch's batches of feature indices in a seeded random order. `group_by_length`:
    shuffle, sort by length within mega-batches of 50 batches, then shuffle the batches, so a
    batch holds features of similar length and pads (and computes) far less."""
    if not group_by_length:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=MEGA_BATCHES,
                                       generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _batches(features: list[dict], batch_size: int, generator: torch.Generator,
             group_by_length: bool = False):
    """Endless seeded epochs of the training set, padded to each batch's longest member."""
    lengths = [len(f["input_ids"]) for f in features]
    while True:
        for batch in epoch_batches(lengths, batch_size, generator, group_by_length):
            yield collate([features[i] for i in batch], None)


def _epoch_file(saved: Path, k: int) -> Path:
    return saved.with_name(f"{saved.stem}-epoch-{k}.pt")


def train(model: nn.Module, stages: list[Stage], features: list[dict], loss_fn: LossFn,
          seed: int, checkpoint_dir: Path | None = None, log: Callable[[str], None] = print,
          group_by_length: bool = False) -> list[dict]:
    """Run every stage; returns per-stage summaries (steps, final loss, seconds, and the
    epoch checkpoints of a stage that keeps them). `group_by_length`: see `epoch_batches`."""
    if checkpoint_dir is None and any(stage.save_epochs for stage in stages):
        raise ValueError("a stage that keeps its epochs needs a checkpoint directory")
    summaries = []
    for index, stage in enumerate(stages):
        saved = checkpoint_dir / f"stage-{index}-{stage.name}.pt" if checkpoint_dir else None
        if saved is not None and saved.is_file():
            model.load_state_dict(torch.load(saved, map_location="cpu"))
            log(f"stage {stage.name}: resumed from {saved.name}")
            summaries.append({"stage": stage.name, "resumed": True})
            if stage.save_epochs:
                summaries[-1]["epoch_checkpoints"] = [
                    str(_epoch_file(saved, k))
                    for k in range(1, len(stage.epoch_ends(len(features))) + 1)]
            continue
        summary = _run_stage(model, stage, features, loss_fn, seed + index, saved,
                             group_by_length)
        log(f"stage {stage.name}: {summary['steps']} steps, loss {summary['loss']:.4f}, "
            f"{summary['seconds']:.1f}s")
        summaries.append(summary)
        if saved is not None:
            save_state(model, saved)
    model.eval()
    return summaries


def _run_stage(model: nn.Module, stage: Stage, features: list[dict], loss_fn: LossFn,
               seed: int, saved: Path | None, group_by_length: bool) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    total = stage.steps(len(features))
    optimizer = _optimizer(model, stage)
    scheduler = _linear_schedule(optimizer, int(stage.warmup_ratio * total), total)
    model.train()
    started, running = time.perf_counter(), None
    bar = tqdm(total=total, desc=f"train {stage.name}", unit="step", leave=False)
    batches = _batches(features, stage.batch_size, generator, group_by_length)
    epoch_ends = stage.epoch_ends(len(features)) if stage.save_epochs else []
    epoch_files: list[Path] = []
    hooked = -1  # the last step on_step was called for

    def hook(step: int) -> None:
        nonlocal hooked
        if stage.on_step is not None and hooked < step:
            stage.on_step(model, step, total)
            hooked = step

    for step in range(total):
        hook(step)
        losses = loss_fn(model, next(batches))
        loss = sum(stage.losses[name] * losses[name] for name in stage.losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if stage.grad_clip:
            nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], stage.grad_clip)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.update()
        bar.set_postfix(loss=f"{running:.4f}")
        if step + 1 in epoch_ends:  # saved as the next step would see it (clipped ranges)
            hook(step + 1)
            epoch_files.append(_epoch_file(saved, len(epoch_files) + 1))
            save_state(model, epoch_files[-1])
    bar.close()
    hook(total)
    for param in model.parameters():
        param.requires_grad_(True)
    return {"stage": stage.name, "steps": total, "loss": running,
            "seconds": time.perf_counter() - started,
            **({"epoch_checkpoints": [str(p) for p in epoch_files]} if stage.save_epochs
               else {})}


def save_state(model: nn.Module, path: Path) -> None:
    """Save weights atomically: a crash mid-save never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
