"""LTP, Learned Token Pruning (Kim et al., KDD 2022, arXiv 2107.00910; official code
kssteven418/LTP; methods-spec 9).

After each layer's attention, a token's importance is the mean attention it receives; a token
under the layer's learned threshold is pruned for all later layers. Thresholds grow linearly with
depth, `theta_l = final_threshold * l / L + delta_l` (0-indexed l, `delta_l` learned, init 0;
layer 0 never prunes). Two stages from the fine-tuned baseline: a soft stage that multiplies each
layer's output by `sigmoid((s - theta) / T)` and penalises the kept mass (thresholds on their own
learning rate), then a hard stage that fine-tunes the weights with the thresholds frozen.

Where this file departs from the official code (methods-spec 9.6, 9.7):
- tokens are **physically removed** between layer l's attention and its FFN (the code only masks,
  so its executed FLOPs equal the baseline's); the hard stage trains through the same removal;
- [CLS] is never pruned (the code can mask it as a key while computing it as a query);
- importance is normalised by `importance_length`: `task` (default) divides by the task's length
  whatever the padding, the paper's calibration (it pads every input to 128) made independent of
  the padding mode, so `none`, `batch` and `sequence` prune the same tokens; `alive` divides by
  the tokens still alive. Query rows of pads and pruned tokens are left out in both;
- the soft stage's penalty averages the kept mass over real tokens (the code includes pads);
- the backbone is any BERT-family encoder (the paper's is RoBERTa-base).
`threshold_scale` multiplies every threshold at inference (0 disables pruning): the cheap
accuracy-speed sweep of one trained model; `penalty` is the one that retrains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from skimbench.method import Context, ControlSettings, Method, register
from skimbench.model import Output, Trace, task_loss
from skimbench.skim import (
    Tokens,
    attention_block,
    attention_received,
    decide_tokens,
    prune_after_attention,
)
from skimbench.tasks import CLASSIFICATION, REGRESSION

IMPORTANCE_LENGTHS = ("task", "alive")
MIN_THRESHOLD = 1e-5  # the code prunes under max(1e-5, theta)
THRESHOLDS = "token_thresholds"  # parameter prefix of the learned deltas


@dataclass
class LTPConfig(ControlSettings):
    final_threshold: float = 0.01   # the last layer's base threshold (README)
    penalty: float = 0.1            # lambda of the soft stage's kept-mass penalty (README 0.01-0.2)
    temperature: float = 1e-3       # T of the soft mask (TrainingArguments default)
    threshold_lr: float | None = None  # None: the model's learning rate (the code's default)
    importance_length: str = "task"    # task | alive: what the received attention is divided by
    hard_epochs: float | None = None  # the hard stage's epochs; None: the budget's
    threshold_scale: float = 1.0    # inference: multiplies every threshold (0: no pruning)
    simulate: bool = False          # infer by masking instead of removing (dense cost)

    def __post_init__(self):
        if self.importance_length not in IMPORTANCE_LENGTHS:
            raise ValueError(f"importance_length must be one of {', '.join(IMPORTANCE_LENGTHS)}, "
                             f"got {self.importance_length!r}")
        for name in ("final_threshold", "penalty", "threshold_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.hard_epochs is not None and self.hard_epochs <= 0:
            raise ValueError(f"hard_epochs must be positive, got {self.hard_epochs}")


@register("ltp")
class LTP(Method):
    """Learned per-layer thresholds on received attention; pruned tokens removed (KDD 2022)."""

    paper_names = ("LTP",)
    Config = LTPConfig
    kinds = frozenset({CLASSIFICATION, REGRESSION})
    needs = ("baseline",)
    inference_settings = ("threshold_scale", "simulate")
    # README: batch 64; soft stage lr 2e-5 (1 epoch on the larger sets, 10 on RTE/MRPC), hard
    # stage 5 epochs at lr in {0.5, 1, 2}e-5 (`--set hard_epochs=5`; by default both stages
    # run the budget's epochs)
    paper_budgets = {"*": dict(lr=2e-5, batch_size=64, epochs=1),
                     "rte": dict(lr=2e-5, batch_size=64, epochs=10),
                     "mrpc": dict(lr=2e-5, batch_size=64, epochs=10)}

    def __init__(self, config: LTPConfig):
        super().__init__(config)
        self.soft = False  # the soft stage's forward; set by its on_step hook

    def build(self, ctx: Context):
        model = self.baseline_model(ctx)
        # layer 0's threshold is 0 and never learned: deltas for layers 1..L-1
        model.token_thresholds = nn.Parameter(torch.zeros(len(model.layers) - 1))
        model.task_length = ctx.budget.max_length or ctx.task.max_length  # `task` normaliser
        return model

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)
        lr = self.config.threshold_lr if self.config.threshold_lr is not None else stage.lr

        def mode(soft: bool):
            def on_step(model, step: int, total: int) -> None:
                self.soft = soft and step < total
            return on_step

        return [replace(stage, name="ltp-soft", losses={"task": 1.0, "kept": self.config.penalty},
                        param_lrs={THRESHOLDS: lr}, on_step=mode(True)),
                replace(stage, name="ltp-hard", frozen=(THRESHOLDS,), on_step=mode(False),
                        epochs=self.config.hard_epochs or stage.epochs)]

    # -- thresholds and importance ------------------------------------------------------------

    def thresholds(self, model) -> torch.Tensor:
        """theta_l for layers 1..L-1, scaled by `threshold_scale` outside training."""
        layers = len(model.layers)
        base = self.config.final_threshold * torch.arange(1, layers) / layers
        theta = base.to(model.token_thresholds.dtype) + model.token_thresholds
        return theta if model.training else theta * self.config.threshold_scale

    def importance(self, model, probs: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        received = attention_received(probs, tokens.attend)
        if self.config.importance_length == "task":
            return received / model.task_length
        return received / tokens.attend.sum(dim=1, keepdim=True).clamp_min(1)

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, model, batch: dict) -> Output:
        if model.training and self.soft:
            return self._soft(model, batch)[0]
        return self._pruned(model, batch, masked=self.config.simulate and not model.training)

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        if self.soft:
            output, kept = self._soft(model, batch)
        else:
            output, kept = self._pruned(model, batch), torch.zeros(())
        return {"task": task_loss(model.kind, output.logits, batch), "kept": kept}

    def _soft(self, model, batch: dict) -> tuple[Output, torch.Tensor]:
        """Soft stage: nothing is pruned; each layer's output is scaled per token by
        sigmoid((s - theta) / T); the penalty is the kept mass summed over layers."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        tokens = Tokens.start(hidden, batch["attention_mask"])
        real = batch["attention_mask"].to(hidden.dtype)
        thresholds = self.thresholds(model)
        kept_mass = []
        for index, layer in enumerate(model.layers):
            attended, probs = attention_block(layer, tokens.hidden, tokens.mask())
            hidden = layer.feed_forward_chunk(attended)
            if index > 0:
                scores = self.importance(model, probs, tokens)
                soft = torch.sigmoid((scores - thresholds[index - 1]) / self.config.temperature)
                soft = torch.cat([soft.new_ones(batch_size, 1), soft[:, 1:]], dim=1)  # [CLS]
                hidden = hidden * soft[..., None]
                kept_mass.append((soft * real).sum() / real.sum())
            tokens = replace(tokens, hidden=hidden)
        layers = len(model.layers)
        output = Output(model.logits(tokens.hidden),
                        Trace.dense(batch_size, length, layers,
                                    torch.full((batch_size,), model.head_macs(length))))
        return output, torch.stack(kept_mass).sum() if kept_mass else hidden.new_zeros(())

    def _pruned(self, model, batch: dict, masked: bool = False) -> Output:
        """Hard pruning: after each layer's attention, tokens under the threshold leave the
        tensor (or, `masked`, stay as non-attended slots) before the FFN."""
        thresholds = self.thresholds(model)
        disabled = self.config.threshold_scale == 0 and not model.training

        def decide(index: int, probs: torch.Tensor, tokens: Tokens) -> torch.Tensor | None:
            if index == 0 or disabled:  # layer 0 never prunes
                return None
            scores = self.importance(model, probs, tokens)
            keep = scores >= torch.clamp(thresholds[index - 1], min=MIN_THRESHOLD)
            keep[:, 0] = True  # [CLS]
            return decide_tokens(keep, tokens, index, scores)

        return prune_after_attention(model, batch, decide, masked)
