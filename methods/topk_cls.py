"""Top-k by attention to [CLS]: after one chosen layer, keep the k tokens the [CLS] query attends
to most and remove the rest for the remaining layers (methods-spec 2.4, 2.5).

A static, training-free reference point for every learned pruning method on the Pareto plots: the
fine-tuned baseline runs unchanged except that, after `layer` layers at full length, each row
keeps [CLS] and its real tokens with the highest head-averaged attention from [CLS] at that
layer, `keep` of them or `ceil(keep_ratio * n)` of its n real tokens ([CLS] counted). Pads are
never kept. The scoring layer runs with eager attention (`skim.attention_layer`) to read the
probabilities; every other layer keeps the backbone's attention. Removal is the shared gather
(`skim.Tokens.keep`): rows keep their own counts, aligned to the batch's largest with masked
filler slots, so a row's prediction never depends on its batch mates. For extractive QA the
removed tokens' states at the pruning point go to the output buffer, so the span head scores
every position.

No paper: the [CLS]-attention score is the one AdapLeR compares (its Table 2 re-fine-tunes BERT on
the top-k tokens of ERASER data, a different protocol, so no figure is re-made here).
Choices of this harness (methods-spec 2.4 leaves them open):
- one pruning point, not a cascade; `layer` defaults to half the depth (3 of MiniLM's 6, 6 of
  BERT-base's 12: TR-BERT's second selection point, past LTP's `topk` floor of 3 full layers), so
  the score comes from a layer whose [CLS] query has already mixed the sentence;
- `keep_ratio` defaults to 0.5: half the real tokens in the upper half of the layers, about 1.3x
  fewer encoder MACs; a sweep of `keep_ratio` (or `keep`) draws the curve;
- applied to the fine-tuned baseline without the optional re-fine-tuning pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from skimbench.method import Context, ControlSettings, Method, register
from skimbench.model import Output, Trace
from skimbench.skim import OutputBuffer, Tokens, attention_layer, decide_tokens
from skimbench.tasks import EXTRACTIVE_QA

DEFAULT_KEEP_RATIO = 0.5
# r * n in floating point can land just above an integer (0.3 * 10 = 3.0000000000000004), which
# ceil would round up a whole token
RATIO_SLACK = 1e-9


@dataclass
class TopKClsConfig(ControlSettings):
    keep_ratio: float | None = None  # kept share of each row's real tokens; None: 0.5 (no keep)
    keep: int | None = None          # or a fixed count per row, [CLS] included
    layer: int | None = None         # layers run at full length, the last one scores; None: L // 2

    def __post_init__(self):
        if self.keep is not None and self.keep_ratio is not None:
            raise ValueError("set keep (a count) or keep_ratio (a share), not both")
        if self.keep is None and self.keep_ratio is None:
            self.keep_ratio = DEFAULT_KEEP_RATIO
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep must be at least 1 ([CLS] is always kept), got {self.keep}")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.layer is not None and self.layer < 1:
            raise ValueError(f"layer must be at least 1 (the layer whose attention scores), "
                             f"got {self.layer}")


@register("topk-cls")
class TopKCls(Method):
    """Keep the top-k tokens by [CLS] attention after one layer (simple baseline; no training)."""

    Config = TopKClsConfig
    needs = ("baseline",)

    def check_backbone(self, config) -> None:
        layers = config.num_hidden_layers
        if layers < 2:
            raise ValueError("topk-cls prunes between layers: the backbone needs 2 layers or more")
        if self.config.layer is not None and self.config.layer >= layers:
            raise ValueError(f"layer={self.config.layer} leaves no layer to prune: the backbone "
                             f"has {layers} layers; use 1..{layers - 1}")

    def build(self, ctx: Context):
        return self.baseline_model(ctx)

    def stages(self, ctx: Context):
        return []

    def full_layers(self, model) -> int:
        """Layers run at full length; the last of them scores the tokens."""
        return len(model.layers) // 2 if self.config.layer is None else self.config.layer

    def kept_counts(self, real: torch.Tensor) -> torch.Tensor:
        """Tokens each row keeps, [CLS] included, from its number of real tokens (B,)."""
        if self.config.keep is not None:
            return real.clamp(max=self.config.keep)
        share = real.double() * self.config.keep_ratio - RATIO_SLACK
        return share.ceil().long().clamp(min=1)

    def select(self, probs: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """The slots (B, n) to keep: [CLS], then the real tokens by head-averaged attention
        from the [CLS] query (probs (B, A, n, n)), each row its own count."""
        score = probs[:, :, 0].mean(dim=1).masked_fill(~tokens.attend, -math.inf)
        score[:, 0] = math.inf
        counts = self.kept_counts(tokens.attend.sum(dim=1))
        width = int(counts.max())
        best = score.topk(width, dim=1).indices  # each row's best slots, best first
        chosen = torch.arange(width, device=score.device)[None, :] < counts[:, None]
        return torch.zeros_like(tokens.attend).scatter_(1, best, chosen)

    def forward(self, model, batch: dict) -> Output:
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        tokens = Tokens.start(hidden, batch["attention_mask"])
        buffer = OutputBuffer(hidden) if model.kind == EXTRACTIVE_QA else None
        full = self.full_layers(model)
        for layer in model.layers[:full - 1]:
            tokens = replace(tokens, hidden=layer(tokens.hidden, tokens.mask()))
        hidden, probs = attention_layer(model.layers[full - 1], tokens.hidden, tokens.mask())
        tokens = replace(tokens, hidden=hidden)
        keep = decide_tokens(self.select(probs, tokens), tokens, full - 1,
                             probs[:, :, 0].mean(dim=1))
        if buffer is not None:
            buffer.write(tokens, ~keep)
        tokens = tokens.keep(keep)
        for layer in model.layers[full:]:
            tokens = replace(tokens, hidden=layer(tokens.hidden, tokens.mask()))
        if buffer is not None:
            buffer.write(tokens)
            logits = model.logits(buffer.result())
        else:
            logits = model.logits(tokens.hidden)
        widths = [length] * full + [tokens.width] * (len(model.layers) - full)
        return Output(logits, Trace.of_widths(widths, batch_size, model.head_macs(length)))
