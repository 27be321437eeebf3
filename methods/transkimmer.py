"""Transkimmer: the transformer learns to skim tokens layer by layer (Guan et al., ACL 2022,
arXiv 2205.07324; official code ChandlerGuan/Transkimmer; methods-spec 4).

Before every layer a small MLP predicts, per token, whether to keep computing it. A skimmed token
never returns; its current state is forwarded to the final output, so span heads still see every
position and [CLS] (always kept) carries the classification. Training is one stage from the
pre-trained backbone: straight-through Gumbel-softmax decisions, and a skim loss (the kept
fraction, averaged over layers) weighted by the harmony coefficient lambda.

Where this file departs from the official code (methods-spec 4.4, 4.8):
- inference is deterministic (keep iff p_keep > `keep_threshold`, 0.5 = argmax) and physically
  removes skimmed tokens before each layer; `gumbel_eval=true` samples as the code does;
- training renormalises attention over the kept keys (`training_mask=renormalised`), so the
  masked training forward and the gather at inference compute the same function;
  `training_mask=multiplied` is the code's post-softmax product without renormalisation.
`simulate=true` evaluates by masking instead of removing (the same decisions, dense cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.method import Context, ControlSettings, Method, register
from skimbench.model import Output, Trace, additive_mask, task_loss
from skimbench.skim import OutputBuffer, Tokens, attention_layer, decide_tokens
from skimbench.tasks import EXTRACTIVE_QA, Task

# lambda of the released scripts (GLUE and IMDB 0.5, SQuAD 0.3, 20News and Yelp 0.2; the model's
# own default 1.0 elsewhere) and of the paper's Table 2 (grid-searched per task).
SCRIPT_COEFFICIENTS = {"squad": 0.3, "squad_v2": 0.3, "20news": 0.2, "yelp": 0.2, "imdb": 0.5,
                       **dict.fromkeys(("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli",
                                        "rte", "wnli"), 0.5)}
PAPER_COEFFICIENTS = {"cola": 0.3, "rte": 0.8, "qqp": 0.2, "mrpc": 0.5, "sst2": 0.3, "mnli": 0.2,
                      "wnli": 0.5, "qnli": 0.1, "stsb": 0.3, "squad": 0.8, "squad_v2": 0.8,
                      "imdb": 0.5, "yelp": 0.5, "20news": 0.5}
DEFAULT_COEFFICIENT = 1.0
PRESETS = ("scripts", "paper")
TRAINING_MASKS = ("renormalised", "multiplied")
GUMBEL_TAU = {"scripts": 1.0, "paper": 0.1}
KEEP, SKIM = 1, 0  # predictor output columns


@dataclass
class TranskimmerConfig(ControlSettings):
    skim_coefficient: float | None = None  # lambda; None: the preset's value for the task
    keep_threshold: float = 0.5      # inference: keep a token iff p_keep > this
    preset: str = "scripts"          # scripts (released code) | paper (Table 2 lambda, tau 0.1)
    gumbel_tau: float | None = None  # None: 1 (scripts) or 0.1 (paper); only the gradient uses it
    bias_init: float = 5.0           # mu0: keep/skim biases start at +mu0/-mu0 (all kept)
    training_mask: str = "renormalised"  # renormalised | multiplied (the code's)
    gumbel_eval: bool = False        # sample decisions at inference, as the code does
    simulate: bool = False           # infer by masking instead of removing (dense cost)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.training_mask not in TRAINING_MASKS:
            raise ValueError(f"training_mask must be one of {', '.join(TRAINING_MASKS)}, got "
                             f"{self.training_mask!r}")
        if not 0.0 <= self.keep_threshold < 1.0:
            raise ValueError(f"keep_threshold must be in [0, 1), got {self.keep_threshold}")
        if self.skim_coefficient is not None and self.skim_coefficient < 0:
            raise ValueError(f"skim_coefficient must be >= 0, got {self.skim_coefficient}")
        if self.gumbel_tau is None:
            self.gumbel_tau = GUMBEL_TAU[self.preset]
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be positive, got {self.gumbel_tau}")


class SkimPredictor(nn.Module):
    """LayerNorm -> Linear(H, H) -> LayerNorm -> GELU -> Linear(H, 2); column 1 = keep."""

    def __init__(self, hidden: int, init_range: float, bias_init: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden),
                                 nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 2))
        first, last = self.net[1], self.net[4]
        first.weight.data.normal_(0.0, init_range)
        first.bias.data.zero_()
        # unbalanced init: every token starts kept with probability close to 1
        last.weight.data.normal_(0.0, init_range)
        last.bias.data[KEEP].normal_(bias_init, init_range)
        last.bias.data[SKIM].normal_(-bias_init, init_range)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


def predictor_macs(hidden: int) -> int:
    """MACs per scored token: the two Linear layers (norms and GELU are element-wise)."""
    return hidden * hidden + 2 * hidden


@register("transkimmer")
class Transkimmer(Method):
    """Skim predictor before every layer; skimmed tokens are removed and forwarded (ACL 2022)."""

    paper_names = ("Transkimmer",)
    Config = TranskimmerConfig
    inference_settings = ("keep_threshold", "gumbel_eval", "simulate")
    # the released scripts' recipes (methods-spec 4.3), for `--profile paper`
    paper_budgets = {
        "*": dict(lr=2e-5, batch_size=64, epochs=3, warmup_ratio=0.0),
        "mrpc": dict(lr=2e-5, batch_size=64, epochs=5, warmup_ratio=0.0),
        "wnli": dict(lr=2e-5, batch_size=64, epochs=5, warmup_ratio=0.0),
        "squad_v2": dict(lr=3e-5, batch_size=64, epochs=5, warmup_ratio=0.0),
        "squad": dict(lr=3e-5, batch_size=64, epochs=5, warmup_ratio=0.0),
        "20news": dict(lr=3e-5, batch_size=32, epochs=5, warmup_ratio=0.0),
        "yelp": dict(lr=3e-5, batch_size=32, epochs=2, warmup_ratio=0.0),
        "imdb": dict(lr=3e-5, batch_size=32, epochs=2, warmup_ratio=0.0),
    }

    @classmethod
    def configure(cls, config: TranskimmerConfig, task: Task) -> TranskimmerConfig:
        """Fill lambda in from the preset's value for this task."""
        if config.skim_coefficient is not None:
            return config
        table = PAPER_COEFFICIENTS if config.preset == "paper" else SCRIPT_COEFFICIENTS
        return replace(config, skim_coefficient=table.get(task.key, DEFAULT_COEFFICIENT))

    def build(self, ctx: Context):
        model = super().build(ctx)
        config = model.encoder.config
        model.skim_predictors = nn.ModuleList(
            SkimPredictor(config.hidden_size, config.initializer_range, self.config.bias_init)
            for _ in model.layers)
        return model

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)
        return [replace(stage, name="transkimmer",
                        losses={"task": 1.0, "skim": self.config.skim_coefficient})]

    # -- decisions ----------------------------------------------------------------------------

    def _decide(self, logits: torch.Tensor, training: bool) -> torch.Tensor:
        """Keep decisions (float 0/1) for the scored tokens; straight-through when sampled."""
        if training or self.config.gumbel_eval:
            return F.gumbel_softmax(logits, tau=self.config.gumbel_tau, hard=True)[..., KEEP]
        t = self.config.keep_threshold
        margin = -math.inf if t == 0 else math.log(t / (1 - t))
        return (logits[..., KEEP] - logits[..., SKIM] > margin).to(logits.dtype)

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, model, batch: dict) -> Output:
        if model.training or self.config.simulate:
            return self._masked(model, batch)[0]
        return self._removed(model, batch)

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        output, skim_loss = self._masked(model, batch)
        return {"task": task_loss(model.kind, output.logits, batch), "skim": skim_loss}

    def _masked(self, model, batch: dict) -> tuple[Output, torch.Tensor]:
        """Every token through every layer; skimmed tokens are masked as keys and their output
        frozen (the training forward, and `simulate` at inference)."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        pads = additive_mask(batch["attention_mask"], hidden.dtype)
        keep = hidden.new_ones(batch_size, length)
        output = hidden
        kept_fractions = []
        for layer, predictor in zip(model.layers, model.skim_predictors, strict=True):
            decided = self._decide(predictor(hidden[:, 1:]), model.training)
            keep = keep * torch.cat([keep.new_ones(batch_size, 1), decided], dim=1)  # [CLS] kept
            kept_fractions.append(keep.sum(dim=1).mean() / length)
            hidden, _ = attention_layer(
                layer, hidden, pads, keep,
                renormalise=self.config.training_mask == "renormalised")
            output = output * (1 - keep[..., None]) + hidden * keep[..., None]
        skim_loss = torch.stack(kept_fractions).mean()
        layers = len(model.layers)
        extra = torch.full((batch_size,), model.head_macs(length)
                           + layers * (length - 1) * predictor_macs(model.hidden_size))
        return Output(model.logits(output), Trace.dense(batch_size, length, layers, extra)), \
            skim_loss

    def _removed(self, model, batch: dict) -> Output:
        """Inference with physical removal: before each layer the skimmed tokens leave the
        tensor (their states go to the output buffer); the layer runs on the survivors."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        tokens = Tokens.start(hidden, batch["attention_mask"])
        buffer = OutputBuffer(hidden) if model.kind == EXTRACTIVE_QA else None
        widths, extra = [], model.head_macs(length)
        for index, (layer, predictor) in enumerate(
                zip(model.layers, model.skim_predictors, strict=True)):
            # slot 0 is [CLS] in every row: it is never removed and never scored
            logits = predictor(tokens.hidden[:, 1:])
            decided = self._decide(logits, False).bool()
            extra += (tokens.width - 1) * predictor_macs(model.hidden_size)
            keep = torch.cat([decided.new_ones(batch_size, 1), decided], dim=1)
            p_keep = logits.softmax(dim=-1)[..., KEEP]
            keep = decide_tokens(keep, tokens, index,
                                 torch.cat([p_keep.new_ones(batch_size, 1), p_keep], dim=1))
            if buffer is not None:
                buffer.write(tokens, ~keep)
            tokens = tokens.keep(keep)
            tokens = replace(tokens, hidden=layer(tokens.hidden, tokens.mask()))
            widths.append(tokens.width)
        if buffer is not None:
            buffer.write(tokens)
            logits = model.logits(buffer.result())
        else:
            logits = model.logits(tokens.hidden)
        trace = Trace.of_widths(widths, batch_size, extra)
        return Output(logits, trace)
