"""Static layer drop: run only the first k encoder layers (methods-spec 2.3).

The static counterpart of early exit (DeeBERT) and of a shallower student (DistilBERT). It starts
from the fine-tuned baseline and, by default, fine-tunes the k-layer model (`train=all`) with the
baseline's recipe; `train=head` re-trains only the task head (pooler + classifier, or the span
head) on layer k's output with the encoder frozen, `train=none` only evaluates. Measured on
MiniLM/SST-2 (`local`, k=3): the head alone at the recipe's learning rate stays at chance (50.9),
so the default trains everything. Cost is k/L of the encoder in every padding mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from skimbench.method import Context, Method, MethodConfig, register
from skimbench.model import Output, Trace, additive_mask

TRAIN_CHOICES = ("all", "head", "none")
FROZEN_ENCODER = ("encoder.embeddings.", "encoder.encoder.")


@dataclass
class LayerDropConfig(MethodConfig):
    keep_layers: int = 3         # k of the backbone's L layers (MiniLM: 6)
    train: str = "all"           # all | head | none

    def __post_init__(self):
        if self.keep_layers < 1:
            raise ValueError(f"keep_layers must be at least 1, got {self.keep_layers}")
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got "
                             f"{self.train!r}")


@register("layerdrop")
class LayerDrop(Method):
    """Keep the first k layers and fine-tune them (simple baseline; static)."""

    Config = LayerDropConfig
    needs = ("baseline",)

    def check_backbone(self, config) -> None:
        if self.config.keep_layers > config.num_hidden_layers:
            raise ValueError(f"keep_layers={self.config.keep_layers} but the backbone has only "
                             f"{config.num_hidden_layers} layers")

    def build(self, ctx: Context):
        return self.baseline_model(ctx)

    def stages(self, ctx: Context):
        if self.config.train == "none":
            return []
        [stage] = super().stages(ctx)
        return [replace(stage, name=f"layerdrop-{self.config.train}",
                        frozen=FROZEN_ENCODER if self.config.train == "head" else ())]

    def forward(self, model, batch: dict) -> Output:
        hidden = model.embed(batch)
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        k = self.config.keep_layers
        for layer in model.layers[:k]:
            hidden = layer(hidden, mask)
        batch_size, length = batch["input_ids"].shape
        extra = torch.full((batch_size,), model.head_macs(length), dtype=torch.long)
        trace = Trace.dense(batch_size, length, len(model.layers), extra)
        for counts in (trace.query_tokens, trace.key_tokens, trace.ffn_tokens, trace.pairs):
            counts[:, k:] = 0
        trace.exit_layer[:] = k
        return Output(model.logits(hidden), trace)
