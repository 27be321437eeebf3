"""DeeBERT: dynamic early exiting (Xin et al., ACL 2020, arXiv 2004.12993; official code
castorini/DeeBERT, `examples/run_highway_glue.py` and `transformers/modeling_highway_bert.py`;
methods-spec 12).

An off-ramp after each of the layers 1..L-1 (the official BertHighway: a pooler Linear(H, H) +
tanh on that layer's [CLS] state, dropout, Linear(H, C)); the last layer answers with the
model's own pooler and classifier. At inference an example leaves at the first off-ramp whose
prediction entropy `-sum p log p` (natural log, from the softmax) is below the threshold S
(`entropy`), with that off-ramp's logits; S is an inference setting, so a sweep over S (the
accuracy-speed curve) reuses one trained model.

Training is the official two-stage recipe. Stage 1 trains the backbone and the final
classifier on the task loss alone: that is exactly the fine-tuned baseline, which the harness
trains once, so `build` starts from it. Stage 2 (`offramps`, this method's only stage) trains
the off-ramps with the backbone, final pooler and classifier frozen, on the sum of the
off-ramps' cross-entropies (the code's `sum(highway_losses[:-1])`), with the same recipe as
stage 1 (`train_highway.sh`: lr 2e-5, batch 8, 3 epochs for BERT, no warm-up, no weight decay,
clip 1.0; `--profile paper`); under the other profiles stage 2 takes the profile's recipe, as
its baseline did. The off-ramp poolers start as copies of the pre-trained pooler, as the code's
`init_highway_pooler` (called before stage 1) does, and evaluation uses the trained ones.

Batched early exit: after each layer the off-ramp runs on the rows still in the batch; rows
whose entropy is below S take its logits and leave, and the hidden states and attention mask of
the others are gathered (`index_select` on the batch axis), so later layers compute only the
rows still running; outputs are written back in input order. A row's trace runs its layers up
to its exit at its padded length (nothing after), plus `H^2 + HC` per off-ramp it ran and the
final head if it reached the last layer. A row's exit and logits do not depend on its batch
mates (up to float rounding of the padded batch).

Where this file departs from the official code (methods-spec 12.4-12.7):
- batched inference as above; the code exits by raising an exception and runs batch 1 only;
- no off-ramp after the last layer: the code also tests its last highway, which stage 2 never
  trains, before falling back to the final classifier (methods-spec 12.6.2);
- the entropy is computed as `-sum softmax * log_softmax` (the code's `log A - B/A` overflows
  for large logits);
- with S <= 0 no example can exit (an entropy is never negative), so no off-ramp runs: the
  model is the baseline at the baseline's cost (the code still evaluates every highway);
- `offramp_input=mean` feeds each off-ramp the mean of the real tokens' states instead of
  [CLS]'s (not in the paper): a backbone trained for mean pooling, like all-MiniLM-L6-v2, keeps
  an almost input-independent [CLS] state in its lower layers, where [CLS] off-ramps can learn
  nothing (the mean's additions are not MACs and are not counted);
- `offramp_pooler=baseline` copies the fine-tuned pooler instead of the pre-trained one (the
  default, `pretrained`, is the code's);
- stage 2 runs the encoder only up to layer L-1 (the final classifier's loss is not used), and
  gradient clipping sees the off-ramps' gradients only (the code clips over every parameter,
  the frozen backbone's gradients included).
Tasks: classification. Regression (which the code accepts) is refused: the entropy of one
output is always 0, so every example would exit at layer 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.decisions import decide
from skimbench.method import Context, ControlSettings, Method, register
from skimbench.model import Output, Trace, additive_mask
from skimbench.tasks import CLASSIFICATION

OFFRAMP_POOLERS = ("pretrained", "baseline")
OFFRAMP_INPUTS = ("cls", "mean")


@dataclass
class DeeBertConfig(ControlSettings):
    # inference: exit where the off-ramp's entropy < S; -1 never exits. 0.1, one of
    # eval_entropy.sh's values (0 to 0.7), exits a binary prediction at >= 98% confidence; in
    # an issue's MRPC replication it kept the full model's F1 (methods-spec 12.5, unverified)
    entropy: float = 0.1
    offramp_pooler: str = "pretrained"  # the pooler the off-ramps start from (pretrained: code)
    offramp_input: str = "cls"          # what an off-ramp reads: [CLS] (paper) | mean of tokens

    def __post_init__(self):
        if not math.isfinite(self.entropy):
            raise ValueError(f"entropy must be a finite number (e.g. 0.1; -1 never exits), got "
                             f"{self.entropy}")
        if self.offramp_pooler not in OFFRAMP_POOLERS:
            raise ValueError(f"offramp_pooler must be one of {', '.join(OFFRAMP_POOLERS)}, got "
                             f"{self.offramp_pooler!r}")
        if self.offramp_input not in OFFRAMP_INPUTS:
            raise ValueError(f"offramp_input must be one of {', '.join(OFFRAMP_INPUTS)}, got "
                             f"{self.offramp_input!r}")


class OffRamp(nn.Module):
    """The official BertHighway: pooler (Linear + tanh) on [CLS], dropout, classifier."""

    def __init__(self, config, num_labels: int):
        super().__init__()
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.classifier.weight.data.normal_(0.0, config.initializer_range)
        self.classifier.bias.data.zero_()

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pooler(cls_state))))

    def macs(self) -> int:
        """Per example: the pooler and the classifier."""
        return (self.pooler.in_features * self.pooler.out_features
                + self.classifier.in_features * self.classifier.out_features)


def add_offramps(model: nn.Module, pooler: nn.Module) -> nn.Module:
    """Off-ramps after layers 1..L-1 as `model.offramps`, their poolers copies of `pooler`
    (HF's BertPooler: `dense`, then tanh)."""
    config = model.encoder.config
    model.offramps = nn.ModuleList(OffRamp(config, model.head.out_features)
                                   for _ in range(len(model.layers) - 1))
    for ramp in model.offramps:
        ramp.pooler.load_state_dict(pooler.dense.state_dict())
    return model


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Prediction entropy per row, in nats, from the softmax (never overflows)."""
    logits = logits.float()
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


@register("deebert")
class DeeBert(Method):
    """Off-ramps after every layer; exit where the prediction entropy is below S (ACL 2020)."""

    paper_names = ("DeeBERT",)
    Config = DeeBertConfig
    kinds = frozenset({CLASSIFICATION})
    needs = ("baseline",)
    inference_settings = ("entropy",)
    control_unit = "example"  # the random control shuffles exit layers between examples
    # train_highway.sh (BERT): both stages at lr 2e-5, batch 8, 3 epochs, no warm-up (warmup
    # steps 0), no weight decay (the script's default 0.0), clip 1.0 (methods-spec 12.3)
    paper_budgets = {"*": dict(lr=2e-5, batch_size=8, epochs=3, warmup_ratio=0.0,
                               weight_decay=0.0, grad_clip=1.0)}

    def check_backbone(self, config) -> None:
        if config.num_hidden_layers < 2:
            raise ValueError("deebert puts off-ramps after layers 1..L-1: the backbone needs 2 "
                             "layers or more")

    def build(self, ctx: Context):
        if "baseline" not in ctx.needs:
            raise ValueError("deebert starts from the fine-tuned baseline run, which this "
                             "context lacks")
        model = self.baseline_model(ctx)
        source = model if self.config.offramp_pooler == "baseline" else Method.build(self, ctx)
        return add_offramps(model, source.encoder.pooler)

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)
        return [replace(stage, name="offramps", losses={"offramps": 1.0},
                        frozen=("encoder.", "head."))]

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Stage 2: the sum over the off-ramps of their cross-entropy, every row through every
        layer but the last."""
        hidden = model.embed(batch)
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        real = batch["attention_mask"]
        total = hidden.new_zeros(())
        for layer, ramp in zip(model.layers, model.offramps, strict=False):
            hidden = layer(hidden, mask)
            total = total + F.cross_entropy(ramp(self._ramp_input(hidden, real)),
                                            batch["labels"])
        return {"offramps": total}

    def _ramp_input(self, hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """What an off-ramp reads: the [CLS] state, or the mean over the row's real tokens."""
        if self.config.offramp_input == "cls":
            return hidden[:, 0]
        weights = real.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)

    def forward(self, model, batch: dict) -> Output:
        """Batched early exit: rows leave at their first confident off-ramp, and later layers
        run on the rows still in the batch only."""
        hidden = model.embed(batch)
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        real = batch["attention_mask"]
        batch_size, length = batch["input_ids"].shape
        num_layers = len(model.layers)
        exits = self.config.entropy > 0  # an entropy is never negative: S <= 0 never exits
        running = torch.arange(batch_size, device=hidden.device)  # input row of each row left
        exit_layer = torch.full((batch_size,), num_layers, device=hidden.device)
        logits = hidden.new_empty((batch_size, model.head.out_features))
        for index, layer in enumerate(model.layers):
            hidden = layer(hidden, mask)
            if index == num_layers - 1 or not exits:
                continue
            ramp_logits = model.offramps[index](self._ramp_input(hidden, real))
            uncertainty = entropy(ramp_logits)
            # the harness's decision gate sees the batch as one row of candidates (the rows
            # still running), each kept (running on) or not
            staying = decide(uncertainty[None] >= self.config.entropy,
                             torch.ones_like(uncertainty, dtype=torch.bool)[None], index + 1)[0]
            leaving = ~staying
            if not bool(leaving.any()):
                continue
            logits[running[leaving]] = ramp_logits[leaving]
            exit_layer[running[leaving]] = index + 1
            staying = (~leaving).nonzero().squeeze(1)
            running = running[staying]
            if len(running) == 0:
                break
            hidden = hidden.index_select(0, staying)
            mask = None if mask is None else mask.index_select(0, staying)
            real = real.index_select(0, staying)
        if len(running):
            logits[running] = model.logits(hidden)
        return Output(logits, self._trace(model, exit_layer.cpu(), length, exits))

    def _trace(self, model, exit_layer: torch.Tensor, length: int, exits: bool) -> Trace:
        """Each row: its layers up to its exit at the padded length, the off-ramps it ran, and
        the final head if it reached the last layer."""
        num_layers = len(model.layers)
        ran = torch.arange(num_layers)[None, :] < exit_layer[:, None]
        tokens = ran.long() * length
        finished = exit_layer == num_layers
        ramps = exit_layer.clamp(max=num_layers - 1) if exits else torch.zeros_like(exit_layer)
        ramp_macs = model.offramps[0].macs()
        extra = ramps * ramp_macs + finished.long() * model.head_macs(length)
        return Trace(tokens, tokens.clone(), tokens.clone(), tokens * length, exit_layer, extra)
