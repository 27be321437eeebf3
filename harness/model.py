"""The task model every method starts from: a BERT-style encoder plus the shared task heads.

The encoder runs layer by layer (`embed`, then `encoder_layers`), so methods that remove tokens
between layers reuse the same modules and weights, and every forward returns a per-example
Trace of what was computed (DESIGN 2, 4.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, REGRESSION

REMOVED_LOGIT = -1e4  # span logit of a removed position: no answer is decoded there


@dataclass
class Trace:
    """Per example (rows) and layer (columns): query, key and FFN tokens and query-key pairs.

    `exit_layer` is the number of layers run; `extra_macs` counts heads and predictors.
    Work a method precomputes once and reuses across examples (a cache, e.g. a passage encoded
    once for all its questions) is not in the schedule: `precomputed_macs` is the full cost of
    the cached work a row reads, and rows with equal `precomputed_key` share one copy of it, so
    the harness charges it once per key (the "total" cost beside the online one).
    """

    query_tokens: torch.Tensor   # (B, L) int64
    key_tokens: torch.Tensor
    ffn_tokens: torch.Tensor
    pairs: torch.Tensor
    exit_layer: torch.Tensor     # (B,)
    extra_macs: torch.Tensor     # (B,)
    precomputed_macs: torch.Tensor | None = None  # (B,) cached work read, not run online
    precomputed_key: torch.Tensor | None = None   # (B,) int64: rows sharing that work

    @classmethod
    def dense(cls, batch_size: int, length: int, num_layers: int, extra_macs: torch.Tensor):
        """Every layer sees all `length` positions (pads included): the plain encoder."""
        tokens = torch.full((batch_size, num_layers), length, dtype=torch.long)
        return cls(tokens, tokens.clone(), tokens.clone(), tokens * length,
                   torch.full((batch_size,), num_layers, dtype=torch.long), extra_macs)

    @classmethod
    def of_widths(cls, widths: list[int], batch_size: int, extra_macs: int):
        """Layer l ran `widths[l]` slots for every row (removal aligned to the batch's
        longest row), attention over all of them."""
        counts = torch.tensor(widths).expand(batch_size, -1)
        return cls(counts.clone(), counts.clone(), counts.clone(), counts * counts,
                   torch.full((batch_size,), len(widths)),
                   torch.full((batch_size,), extra_macs))

    def macs(self, hidden: int, ffn: int) -> torch.Tensor:
        """Per-example MACs from the schedule, DESIGN 4.1 (embeddings, norms, softmax excluded)."""
        q, k, f, p = self.query_tokens, self.key_tokens, self.ffn_tokens, self.pairs
        per_layer = hidden * hidden * (2 * q + 2 * k) + 2 * p * hidden + 2 * f * hidden * ffn
        return per_layer.sum(dim=1) + self.extra_macs


@dataclass
class Output:
    logits: torch.Tensor         # (B, C) classes, (B, 1) regression, (B, N, 2) QA start/end
    trace: Trace


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, N) 1/0 mask -> (B, 1, 1, N) additive mask, or None when nothing is padded."""
    if bool(attention_mask.all()):
        return None
    blocked = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return blocked


class TaskModel(nn.Module):
    """Encoder + task head: [CLS] pooler + classifier, or a start/end span head for QA."""

    def __init__(self, encoder: nn.Module, kind: str, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.kind = kind
        config = encoder.config
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        out = 2 if kind == EXTRACTIVE_QA else num_labels
        self.head = nn.Linear(config.hidden_size, out)
        self.head.weight.data.normal_(0.0, config.initializer_range)
        self.head.bias.data.zero_()

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def ffn_size(self) -> int:
        return self.encoder.config.intermediate_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def embed(self, batch: dict) -> torch.Tensor:
        return self.encoder.embeddings(input_ids=batch["input_ids"],
                                       token_type_ids=batch.get("token_type_ids"))

    def head_macs(self, length: int) -> int:
        """MACs of the task head per example: pooler + classifier, or the span head."""
        hidden, out = self.hidden_size, self.head.out_features
        if self.kind == EXTRACTIVE_QA:
            return length * hidden * out
        return hidden * hidden + hidden * out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The task head on the final hidden states (B, N, H)."""
        if self.kind == EXTRACTIVE_QA:
            return self.head(self.dropout(hidden))
        pooled = self.encoder.pooler(hidden)
        return self.head(self.dropout(pooled))

    def forward(self, batch: dict) -> Output:
        """The plain encoder: every layer on every position of the (padded) batch."""
        hidden = self.embed(batch)
        mask = additive_mask(batch["attention_mask"], hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        batch_size, length = batch["input_ids"].shape
        extra = torch.full((batch_size,), self.head_macs(length), dtype=torch.long)
        return Output(self.logits(hidden),
                      Trace.dense(batch_size, length, len(self.layers), extra))


def task_loss(kind: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy, MSE for regression, or the mean of start/end cross-entropy for QA."""
    if kind == CLASSIFICATION:
        return F.cross_entropy(logits, batch["labels"])
    if kind == REGRESSION:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].float())
    length = logits.shape[1]
    start = batch["start_positions"].clamp(0, length - 1)
    end = batch["end_positions"].clamp(0, length - 1)
    return (F.cross_entropy(logits[..., 0], start) + F.cross_entropy(logits[..., 1], end)) / 2


def distillation_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, batch: dict,
                      temperature: float) -> torch.Tensor:
    """Knowledge distillation towards a teacher's logits: `T^2 KL(teacher || student)` at
    temperature T, summed over the classes and averaged over the batch (for QA over the
    positions the student scores, pads and removed positions left out, start and end averaged);
    MSE of the predictions for regression."""
    if kind == REGRESSION:
        return F.mse_loss(student, teacher)
    if kind == EXTRACTIVE_QA:
        scored = (student > REMOVED_LOGIT) & batch["attention_mask"][..., None].bool()
        teacher = teacher.masked_fill(~scored, REMOVED_LOGIT)
        student = student.masked_fill(~scored, REMOVED_LOGIT)
        student, teacher = student.transpose(1, 2), teacher.transpose(1, 2)
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                  log_target=True, reduction="none").sum(-1)
    return t * t * kl.mean()
