"""PoWER-BERT: progressive word-vector elimination (Goyal et al., ICML 2020, arXiv 2001.08950;
official code IBM/PoWER-BERT; methods-spec 8).

After the attention sub-layer of every layer j, only the `l_j` most significant tokens go on to
the FFN and later layers; significance is the head-averaged attention a token receives from the
other tokens. The retention configuration `l_1 >= ... >= l_L` is static (one per task) and learned
once: from the fine-tuned baseline, a configuration search multiplies the token of rank k by a
learned `r_j[k]` in [0, 1] under a depth-weighted L1 penalty `sum_j lambda * j * ||r_j||_1`; then
`l_j = max(1, floor(sum_k r_j[k]))`, made non-increasing, and the weights are re-trained with hard
extraction. Each layer therefore has two lengths in its trace: attention on `l_{j-1}`, FFN on `l_j`.

Where this file departs from the official code (methods-spec 8.4, 8.7):
- significance sums the rows of real queries only (`queries=real`, default), so a token's rank
  does not depend on how much padding its batch has; `queries=all` is the code's (pad query
  rows contribute);
- the configuration counts tokens, capped at the current length: an input shorter than `l_j`
  keeps all its real tokens (`min(l_j, n)`, as AdapLeR re-measured PoWER-BERT); pads always rank
  last and are the first to go, so in `sequence` mode the cap is the code's behaviour and in
  `batch`/`none` modes the speedup is smaller (fewer tokens to eliminate);
- extraction is a gather of the kept positions in input order, with the mask gathered too.
`retention_scale` multiplies the configuration at inference (1: as learned; smaller keeps
fewer): a cheap accuracy-speed sweep of one model; `penalty` is the setting that retrains.
"""

from __future__ import annotations

import math
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
from skimbench.tasks import CLASSIFICATION, REGRESSION, Task

QUERIES = ("real", "all")
RETENTION = "retention"  # parameter prefix of the soft-extract vectors r_j

# README per task: (LR_BERT, LR_SOFT_EXTRACT, lambda, batch); lengths are the tasks' own
PAPER_SETTINGS = {"cola": (2e-5, 1.5e-3, 7e-3, 32), "rte": (3e-5, 3e-3, 1e-3, 16),
                  "qqp": (3e-5, 1e-4, 3e-4, 64), "mrpc": (6e-5, 3e-3, 3e-3, 64),
                  "sst2": (3e-5, 5e-4, 2e-4, 64), "mnli": (3e-5, 2e-4, 1e-4, 64),
                  "qnli": (3e-5, 2e-4, 1.5e-4, 16), "stsb": (3e-5, 3e-3, 1e-3, 64)}
DEFAULT_TASK = "sst2"  # tasks without a README row take SST-2's settings


@dataclass
class PowerBertConfig(ControlSettings):
    penalty: float | None = None     # lambda of the L1 penalty; None: the README's for the task
    soft_lr: float | None = None     # LR_SOFT_EXTRACT; None: the README's for the task
    queries: str = "real"            # real | all: query rows summed into significance
    retention_scale: float = 1.0     # inference: multiplies every l_j (then floored, >= 1)

    def __post_init__(self):
        if self.queries not in QUERIES:
            raise ValueError(f"queries must be one of {', '.join(QUERIES)}, got {self.queries!r}")
        for name in ("penalty", "soft_lr"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.retention_scale <= 1:
            raise ValueError(f"retention_scale must be in (0, 1], got {self.retention_scale}")


@register("powerbert")
class PowerBert(Method):
    """Keep the top-l_j tokens by received attention after each layer's attention (ICML 2020)."""

    paper_names = ("PoWER-BERT", "POWER-BERT")
    Config = PowerBertConfig
    kinds = frozenset({CLASSIFICATION, REGRESSION})
    needs = ("baseline",)
    inference_settings = ("retention_scale",)
    # README: every step runs the same epochs (example 3) at LR_BERT with the task's batch
    paper_budgets = {key: dict(lr=lr, batch_size=batch, epochs=3)
                     for key, (lr, _, _, batch) in PAPER_SETTINGS.items()}

    def __init__(self, config: PowerBertConfig):
        super().__init__(config)
        self.soft = False  # the configuration search's forward; set by its on_step hook

    @classmethod
    def configure(cls, config: PowerBertConfig, task: Task) -> PowerBertConfig:
        _, soft_lr, penalty, _ = PAPER_SETTINGS.get(task.key, PAPER_SETTINGS[DEFAULT_TASK])
        return replace(config,
                       penalty=penalty if config.penalty is None else config.penalty,
                       soft_lr=soft_lr if config.soft_lr is None else config.soft_lr)

    def build(self, ctx: Context):
        model = self.baseline_model(ctx)
        length = ctx.budget.max_length or ctx.task.max_length
        model.retention = nn.Parameter(torch.ones(len(model.layers), length))
        return model

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)

        def search_step(model, step: int, total: int) -> None:
            self.soft = step < total
            with torch.no_grad():
                model.retention.clamp_(0.0, 1.0)

        def retrain_step(model, step: int, total: int) -> None:
            self.soft = False

        return [replace(stage, name="powerbert-search",
                        losses={"task": 1.0, "retention": self.config.penalty},
                        param_lrs={RETENTION: self.config.soft_lr}, on_step=search_step),
                replace(stage, name="powerbert-retrain", frozen=(RETENTION,),
                        on_step=retrain_step)]

    # -- configuration and significance -------------------------------------------------------

    def configuration(self, model) -> list[int]:
        """l_1..l_L from the retention vectors: floor of each sum (>= 1), non-increasing."""
        counts, previous = [], math.inf
        scale = 1.0 if model.training else self.config.retention_scale
        for row in model.retention.detach().clamp(0, 1):
            count = max(1, math.floor(float(row.sum()) * scale))
            previous = min(previous, count)
            counts.append(previous)
        return counts

    def significance(self, probs: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Attention received from the other tokens; slots that may not be attended (pads,
        filler) rank last."""
        queries = tokens.attend if self.config.queries == "real" else tokens.alive
        score = attention_received(probs, queries, exclude_self=True)
        return score.masked_fill(~tokens.attend, -1.0)

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, model, batch: dict) -> Output:
        if model.training and self.soft:
            return self._soft(model, batch)[0]
        return self._extracted(model, batch)

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        if self.soft:
            output, penalty = self._soft(model, batch)
        else:
            output, penalty = self._extracted(model, batch), torch.zeros(())
        return {"task": task_loss(model.kind, output.logits, batch), "retention": penalty}

    def _soft(self, model, batch: dict) -> tuple[Output, torch.Tensor]:
        """Configuration search: after each attention sub-layer the token of rank k is scaled
        by r_j[k]; nothing is removed."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        tokens = Tokens.start(hidden, batch["attention_mask"])
        for layer, retention in zip(model.layers, model.retention, strict=True):
            attended, probs = attention_block(layer, tokens.hidden, tokens.mask())
            rank = self.significance(probs, tokens).argsort(dim=1, descending=True).argsort(dim=1)
            attended = attended * retention[rank][..., None]
            tokens = replace(tokens, hidden=layer.feed_forward_chunk(attended))
        depth = torch.arange(1, len(model.layers) + 1, dtype=hidden.dtype)
        penalty = (depth * model.retention.abs().sum(dim=1)).sum()
        output = Output(model.logits(tokens.hidden),
                        Trace.dense(batch_size, length, len(model.layers),
                                    torch.full((batch_size,), model.head_macs(length))))
        return output, penalty

    def _extracted(self, model, batch: dict) -> Output:
        """Hard extraction: after each attention sub-layer keep [CLS] and the top
        min(l_j, n) - 1 other real tokens, in input order; the FFN runs on them only."""
        counts = self.configuration(model)

        def decide(index: int, probs: torch.Tensor, tokens: Tokens) -> torch.Tensor:
            score = self.significance(probs, tokens)
            score[:, 0] = math.inf  # [CLS]
            top = score.topk(min(counts[index], tokens.width), dim=1).indices
            keep = torch.zeros_like(tokens.attend).scatter_(1, top, True) & tokens.attend
            return decide_tokens(keep, tokens, index, score)

        return prune_after_attention(model, batch, decide)
