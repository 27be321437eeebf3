"""Block-Skim: skim 32-token blocks that cannot hold the answer, from the attention maps
(Guan et al., "Block-Skim: Efficient Question Answering for Transformer", AAAI 2022, and its
ICLR 2021 submission "Block Skim Transformer"; official code ChandlerGuan/blockskim;
methods-spec 3).

A small CNN per augmented layer reads the diagonal 32x32 blocks of that layer's attention
probabilities (at inference formed from the fused kernel's log-sum-exp, so no layer gives up
fast attention) and predicts whether each block holds answer tokens. Training is one stage from
the pre-trained backbone on the full, un-skimmed model: the QA loss plus alpha times the
class-weighted block loss summed over layers (the maps receive its gradient). At inference,
after each augmented layer, blocks with p_keep < `threshold` are physically removed from the
hidden states and the attention mask for every later layer; the span head runs on the
survivors and removed positions get a large negative logit (`removed_policy=mask_logits`, the
code) or their last state (`forward_states`, the ICLR text).

Defaults follow the official code and its scripts (`preset=repo`): every layer augmented,
alpha 0.1, beta 20, label a block positive iff it holds more than one answer token, loss over
all blocks. `preset=iclr2021` is the seed paper: one augmented layer (a third of the depth: layer
4 of BERT-base's 12), alpha 1, beta 4, loss over passage blocks only, skipped blocks forwarded
(use `--set max_length=384` for its SQuAD length). Rows of a batch are aligned to the most kept
blocks with masked filler slots, so a row's answer does not depend on its batch mates;
`faithful_batching=true` fills with each row's next-best blocks as the code does, and
`simulate=true` masks skipped blocks instead of removing them (same answers, dense cost).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.decisions import decide
from skimbench.method import Context, ControlSettings, Method, register
from skimbench.model import Output, Trace, task_loss
from skimbench.skim import OutputBuffer, Tokens, attention_layer_diagonal, scatter_logits
from skimbench.tasks import EXTRACTIVE_QA

LABEL_RULES = ("gt1", "ge1")
LOSS_BLOCKS = ("all", "passage_only")
REMOVED_POLICIES = ("mask_logits", "forward_states")
PRESETS = {
    "repo": {},
    "iclr2021": dict(skim_factor=1.0, balance_factor=4.0, skim_layers="third",
                     loss_blocks="passage_only", removed_policy="forward_states"),
}
KEEP = 1  # predictor output column of "block holds the answer"
IGNORE = -100


@dataclass
class BlockSkimConfig(ControlSettings):
    threshold: float = 0.001     # tau: keep a block iff p_keep >= tau (code's default)
    preset: str = "repo"         # repo | iclr2021: sets the settings still at their defaults
    skim_factor: float = 0.1     # alpha, weight of the block loss (scripts)
    balance_factor: float = 20.0  # beta, class weight of "keep" blocks (scripts, SQuAD)
    skim_layers: str = "all"     # all | third (one layer at L/3) | <l> (one 0-indexed layer)
    label_rule: str = "gt1"      # gt1: > 1 answer token (code) | ge1: any answer token (paper)
    loss_blocks: str = "all"     # all | passage_only (no question or pad token in the block)
    removed_policy: str = "mask_logits"  # mask_logits | forward_states
    faithful_batching: bool = False  # fill ragged rows with next-best blocks (code)
    protect_question: bool = False   # never skim blocks holding [CLS] or question tokens
    simulate: bool = False       # infer by masking skipped blocks instead of removing them
    block_size: int = 32

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)
        for name, allowed in (("label_rule", LABEL_RULES), ("loss_blocks", LOSS_BLOCKS),
                              ("removed_policy", REMOVED_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if not (self.skim_layers in ("all", "third") or self.skim_layers.isdigit()):
            raise ValueError(f"skim_layers must be all, third or a layer index, got "
                             f"{self.skim_layers!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.block_size < 4 or self.block_size % 4:
            raise ValueError(f"block_size must be a multiple of 4, got {self.block_size}")

    def augmented(self, num_layers: int) -> list[int]:
        """The layers that carry a block predictor."""
        if self.skim_layers == "all":
            return list(range(num_layers))
        layer = round(num_layers / 3) - 1 if self.skim_layers == "third" else int(
            self.skim_layers)
        if not 0 <= layer < num_layers:
            raise ValueError(f"skim_layers={self.skim_layers} but the backbone has "
                             f"{num_layers} layers")
        return [layer]


class BlockPredictor(nn.Module):
    """Per diagonal block (A heads x b x b probabilities): two conv-BN-ReLU-pool stages and a
    Linear to (skip, keep), the code's order (methods-spec 3.2)."""

    def __init__(self, heads: int, block: int, init_range: float):
        super().__init__()
        self.block = block
        self.features = nn.Sequential(
            nn.Conv2d(heads, heads, 3, padding=1), nn.BatchNorm2d(heads), nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(heads, heads, 3, padding=1), nn.BatchNorm2d(heads), nn.ReLU(),
            nn.AvgPool2d(2))
        self.classifier = nn.Linear(heads * (block // 4) ** 2, 2)
        self.classifier.weight.data.normal_(0.0, init_range)
        self.classifier.bias.data.zero_()

    def forward(self, diagonal: torch.Tensor) -> torch.Tensor:
        """(B, A, K, b, b) diagonal attention blocks -> (B, K, 2) block logits."""
        batch, heads, blocks, b, _ = diagonal.shape
        maps = diagonal.transpose(1, 2).reshape(batch * blocks, heads, b, b)
        return self.classifier(self.features(maps).flatten(1)).view(batch, blocks, 2)

    @staticmethod
    def macs(heads: int, block: int) -> int:
        """MACs per block: the two 3x3 convolutions and the Linear."""
        return 9 * heads**2 * block**2 + 9 * heads**2 * (block // 2) ** 2 \
            + 2 * heads * block**2 // 16


def pad_to_blocks(batch: dict, block: int) -> dict:
    """Pad the batch's length up to a multiple of the block size (counted as slots)."""
    length = batch["input_ids"].shape[1]
    extra = -length % block
    if not extra:
        return batch
    padded = dict(batch)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        padded[key] = F.pad(batch[key], (0, extra))
    return padded


def block_labels(batch: dict, config: BlockSkimConfig) -> torch.Tensor:
    """(B, K) block labels from the answer span: 1 = holds the answer, IGNORE = not scored."""
    b = config.block_size
    length = batch["input_ids"].shape[1]
    start, end = batch["start_positions"], batch["end_positions"]
    position = torch.arange(length)[None, :]
    answer = (position >= start[:, None]) & (position <= end[:, None])
    answer &= (end > 0)[:, None]  # an answer outside the window points at [CLS]: no block
    counts = answer.view(len(answer), -1, b).sum(dim=-1)
    labels = (counts > 1 if config.label_rule == "gt1" else counts >= 1).long()
    if config.loss_blocks == "passage_only":
        passage = (batch["token_type_ids"].bool() & batch["attention_mask"].bool())
        labels[~passage.view(len(passage), -1, b).all(dim=-1)] = IGNORE
    return labels


@register("blockskim")
class BlockSkim(Method):
    """Block predictor on attention maps; skimmed 32-token blocks removed (AAAI 2022)."""

    paper_names = ("BST", "BST (BSM at one layer, skipping)")
    Config = BlockSkimConfig
    kinds = frozenset({EXTRACTIVE_QA})
    inference_settings = ("threshold", "faithful_batching", "protect_question",
                          "removed_policy", "simulate")
    # the released script's recipe (methods-spec 3.3), for `--profile paper`
    paper_budgets = {"*": dict(lr=3e-5, epochs=2, batch_size=16, max_length=512,
                               warmup_ratio=0.0)}

    def check_backbone(self, config) -> None:
        self.config.augmented(config.num_hidden_layers)

    def build(self, ctx: Context):
        model = super().build(ctx)
        config = model.encoder.config
        model.block_predictors = nn.ModuleDict({
            str(layer): BlockPredictor(config.num_attention_heads, self.config.block_size,
                                       config.initializer_range)
            for layer in self.config.augmented(len(model.layers))})
        return model

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)
        return [replace(stage, name="blockskim",
                        losses={"task": 1.0, "skim": self.config.skim_factor})]

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """QA loss and the block loss summed over augmented layers, on the un-skimmed model."""
        output, block_logits = self._run(model, batch, skim=False)
        labels = block_labels(pad_to_blocks(batch, self.config.block_size), self.config)
        weight = torch.tensor([1.0, self.config.balance_factor])
        skim = sum(F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), weight=weight,
                                   ignore_index=IGNORE) for logits in block_logits)
        return {"task": task_loss(model.kind, output.logits, batch),
                "skim": torch.nan_to_num(skim)}  # a batch with no scored block adds nothing

    def forward(self, model, batch: dict) -> Output:
        return self._run(model, batch, skim=not model.training)[0]

    def _keep_blocks(self, block_logits: torch.Tensor, tokens: Tokens, types: torch.Tensor,
                     layer: int, answer: torch.Tensor | None) -> torch.Tensor:
        """(B, K) blocks to keep: p_keep >= tau, optionally the question's, aligned per batch.
        The candidates of the harness's decision gate are the blocks holding real tokens (less
        the question's when protected); `answer` (B, input blocks), the blocks the training
        labels mark, is the diagnostics' reference."""
        b = self.config.block_size
        p_keep = block_logits.softmax(dim=-1)[..., KEEP]
        alive = tokens.alive.view(len(p_keep), -1, b).any(dim=-1)
        candidates = tokens.attend.view(len(p_keep), -1, b).any(dim=-1)
        keep = (p_keep >= self.config.threshold) & alive
        if self.config.protect_question:
            question = (tokens.attend & ~types.bool()).view(len(p_keep), -1, b).any(dim=-1)
            keep |= question & alive
            candidates &= ~question
        if self.config.faithful_batching:  # every row keeps its top-m blocks, m = batch max
            most = int(keep.sum(dim=1).max())
            ranked = p_keep.masked_fill(~alive, -1.0).topk(most, dim=1).indices
            keep = torch.zeros_like(keep).scatter(1, ranked, True) & alive
        blocks = tokens.positions[:, ::b] // b  # each slot block's block in the input
        return decide(keep, candidates, layer, p_keep, blocks,
                      None if answer is None else answer.gather(1, blocks))

    def _run(self, model, batch: dict, skim: bool) -> tuple[Output, list[torch.Tensor]]:
        b = self.config.block_size
        length = batch["input_ids"].shape[1]
        padded = pad_to_blocks(batch, b)
        hidden = model.embed(padded)
        tokens = Tokens.start(hidden, padded["attention_mask"])
        forward_states = self.config.removed_policy == "forward_states"
        buffer = OutputBuffer(hidden) if skim and forward_states else None
        heads = model.encoder.config.num_attention_heads
        answer = (block_labels(padded, self.config) == 1
                  if skim and "start_positions" in padded else None)
        widths, block_logits, extra = [], [], 0
        for index, layer in enumerate(model.layers):
            predictor = model.block_predictors[str(index)] \
                if str(index) in model.block_predictors else None
            widths.append(tokens.width)
            if tokens.width == 0:  # every block of every row is gone: nothing left to compute
                continue
            if predictor is None:
                tokens = replace(tokens, hidden=layer(tokens.hidden, tokens.mask()))
                continue
            out, diagonal, diagonal_macs = attention_layer_diagonal(
                layer, tokens.hidden, tokens.mask(), b)
            tokens = replace(tokens, hidden=out)
            logits = predictor(diagonal)
            extra += diagonal_macs + logits.shape[1] * BlockPredictor.macs(heads, b)
            block_logits.append(logits)
            if skim:
                types = padded["token_type_ids"].gather(1, tokens.positions)
                keep = self._keep_blocks(logits, tokens, types, index, answer
                                         ).repeat_interleave(b, dim=1)
                if buffer is not None:
                    buffer.write(tokens, ~keep)
                tokens = tokens.masked(keep) if self.config.simulate else tokens.keep(keep)
        if buffer is not None:
            buffer.write(tokens)
            span = model.logits(buffer.result())
            extra += model.head_macs(span.shape[1])
        else:
            span = model.logits(tokens.hidden)
            extra += model.head_macs(tokens.width)
            if skim:
                span = scatter_logits(span, tokens, padded["input_ids"].shape[1])
        batch_size = len(span)
        trace = Trace.of_widths(widths, batch_size, extra)
        return Output(span[:, :length], trace), block_logits
