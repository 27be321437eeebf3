"""Truncation: keep only the first k tokens of every input (methods-spec 2.2).

The simplest way to compute less, and a point every Pareto plot needs: the tokens past k are
physically removed before the embeddings, so time should track FLOPs exactly. By default the
fine-tuned baseline is evaluated truncated (no training); `finetune=true` re-fine-tunes it with
truncation active. For QA, start/end logits of removed positions are set to a large negative
value so no answer is decoded there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skimbench.method import Context, Method, MethodConfig, register
from skimbench.model import Output, Trace, additive_mask
from skimbench.skim import REMOVED_LOGIT
from skimbench.tasks import EXTRACTIVE_QA


@dataclass
class TruncateConfig(MethodConfig):
    keep_tokens: int = 32        # k: positions kept, [CLS] included
    finetune: bool = False       # re-fine-tune the baseline with truncation active

    def __post_init__(self):
        if self.keep_tokens < 1:
            raise ValueError(f"keep_tokens must be at least 1, got {self.keep_tokens}")


@register("truncate")
class Truncate(Method):
    """Keep the first k tokens (simple baseline; static, no predictor)."""

    Config = TruncateConfig
    needs = ("baseline",)

    def build(self, ctx: Context):
        return self.baseline_model(ctx)

    def stages(self, ctx: Context):
        return super().stages(ctx) if self.config.finetune else []

    def forward(self, model, batch: dict) -> Output:
        full = batch["input_ids"].shape[1]
        k = min(full, self.config.keep_tokens)
        kept = {key: batch[key][:, :k] for key in ("input_ids", "token_type_ids",
                                                   "attention_mask")}
        hidden = model.embed(kept)
        mask = additive_mask(kept["attention_mask"], hidden.dtype)
        for layer in model.layers:
            hidden = layer(hidden, mask)
        logits = model.logits(hidden)
        if model.kind == EXTRACTIVE_QA and k < full:
            removed = torch.full((logits.shape[0], full - k, 2), REMOVED_LOGIT,
                                 dtype=logits.dtype, device=logits.device)
            logits = torch.cat([logits, removed], dim=1)
        extra = torch.full((len(hidden),), model.head_macs(k), dtype=torch.long)
        return Output(logits, Trace.dense(len(hidden), k, len(model.layers), extra))
