"""Shared machinery of the token-dropping methods (methods-spec 1.5-1.8).

Removal is physical: `Tokens.keep` gathers every row's kept slots (in input order) into a
shorter tensor, so later layers compute on fewer positions and a FLOPs counter sees it. Rows of a
batch that keep different counts are aligned to the longest with masked filler slots, so a row's
result never depends on its batch mates. `OutputBuffer` holds each removed token's last state for
span heads (methods-spec 1.6), and `attention_layer` runs a BERT layer with eager attention when a
method needs the attention probabilities or soft key weights (`attention_block` stops before the
FFN, for methods that remove tokens in between); every other layer keeps the backbone's fast
attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.decisions import decide
from skimbench.model import REMOVED_LOGIT, Output, Trace, additive_mask


@dataclass
class Tokens:
    """The slots of a batch still being computed.

    `alive`: the slot holds an input position not yet removed (a real token or a pad);
    `attend`: the slot may be attended to (alive and not a pad). Filler slots, which only align
    ragged rows, are neither.
    """

    hidden: torch.Tensor      # (B, n, H)
    positions: torch.Tensor   # (B, n) index into the input
    alive: torch.Tensor       # (B, n) bool
    attend: torch.Tensor      # (B, n) bool

    @classmethod
    def start(cls, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Tokens:
        batch, length = attention_mask.shape
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        alive = torch.ones((batch, length), dtype=torch.bool, device=hidden.device)
        return cls(hidden, positions, alive, attention_mask.bool())

    @property
    def width(self) -> int:
        return self.hidden.shape[1]

    def mask(self) -> torch.Tensor | None:
        """The additive attention mask over these slots (None when every slot attends)."""
        return additive_mask(self.attend, self.hidden.dtype)

    def keep(self, keep: torch.Tensor) -> Tokens:
        """Gather the slots where `keep` (B, n) is true, in order; rows with fewer kept slots
        than the batch's most are filled with masked filler slots. Nothing is copied when every
        slot is kept."""
        keep = keep & self.alive
        if bool(keep.all()):
            return self
        if keep.shape[0] == 1:  # one row: no alignment, a plain index select (4x fewer ops)
            index = keep[0].nonzero().squeeze(1)
            return Tokens(self.hidden[:, index], self.positions[:, index],
                          self.alive[:, index], self.attend[:, index])
        counts = keep.sum(dim=1)
        width = int(counts.max())  # 0 when every row removes everything
        order = torch.arange(self.width, device=keep.device).expand_as(keep)
        # kept slots first (ascending), then the others: explicit indices, never a flat mask
        index = torch.where(keep, order, order + self.width).argsort(dim=1)[:, :width]
        used = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
        hidden = self.hidden.gather(1, index[..., None].expand(-1, -1, self.hidden.shape[-1]))
        return Tokens(hidden, self.positions.gather(1, index), used,
                      self.attend.gather(1, index) & used)

    def masked(self, keep: torch.Tensor) -> Tokens:
        """The same decision by masking only: removed slots stay in the tensor (computed, never
        attended to). Equal outputs to `keep`, at the dense cost: the check that removal is
        exact, and the cost a mask-only implementation really has."""
        keep = keep & self.alive
        return Tokens(self.hidden, self.positions, keep, self.attend & keep)


def decide_tokens(keep: torch.Tensor, tokens: Tokens, layer: int,
                  scores: torch.Tensor | None = None) -> torch.Tensor:
    """A keep decision over tokens where slot 0 ([CLS]) always stays: every other real token is
    a candidate (`decisions.decide`: the random control and the predictor diagnostics)."""
    candidates = tokens.attend.clone()
    candidates[:, 0] = False
    return decide(keep, candidates, layer, scores, tokens.positions)


class TokenScorer(nn.Module):
    """Linear(H, 32) -> GELU -> Linear(32, 1), BERT's init: one logit per token (AdapLeR's
    contribution predictors and TR-BERT's policies share this shape)."""

    width = 32

    def __init__(self, hidden: int, init_range: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, self.width), nn.GELU(),
                                 nn.Linear(self.width, 1))
        for linear in (self.net[0], self.net[2]):
            linear.weight.data.normal_(0.0, init_range)
            linear.bias.data.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)

    @classmethod
    def macs(cls, hidden: int) -> int:
        """MACs per scored token: the two Linear layers (32H + 32; 24,608 at H = 768)."""
        return hidden * cls.width + cls.width


class OutputBuffer:
    """Final states per input position: removed tokens keep the state they left with."""

    def __init__(self, hidden: torch.Tensor):
        batch, length, size = hidden.shape
        # one spare column receives the writes of filler slots, and is dropped at the end
        self.states = torch.cat([hidden, hidden.new_zeros(batch, 1, size)], dim=1)

    def write(self, tokens: Tokens, where: torch.Tensor | None = None) -> None:
        """Store the states of the alive slots (only those in `where`, when given)."""
        chosen = tokens.alive if where is None else tokens.alive & where
        column = torch.where(chosen, tokens.positions, self.states.shape[1] - 1)
        self.states = self.states.scatter(
            1, column[..., None].expand(-1, -1, self.states.shape[-1]), tokens.hidden)

    def result(self) -> torch.Tensor:
        return self.states[:, :-1]


def scatter_logits(logits: torch.Tensor, tokens: Tokens, length: int) -> torch.Tensor:
    """Span logits of the surviving slots (B, n, 2) back at their input positions (B, length,
    2); every removed position gets REMOVED_LOGIT."""
    batch, _, out = logits.shape
    full = logits.new_full((batch, length + 1, out), REMOVED_LOGIT)
    column = torch.where(tokens.alive, tokens.positions, length)
    full = full.scatter(1, column[..., None].expand(-1, -1, out), logits)
    return full[:, :-1]


def attention_block(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                    key_weights: torch.Tensor | None = None, renormalise: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A BERT layer's attention sub-layer (after its residual + LayerNorm) with eager attention:
    (output, post-softmax probabilities (B, A, n, n)). Methods that remove tokens between
    attention and FFN (PoWER-BERT, LTP) run the FFN themselves on the survivors.

    `key_weights` (B, n) scales each key's probability and renormalises every query's row, a
    differentiable stand-in for removing the keys with weight 0 (methods-spec 1.8);
    `renormalise=False` keeps the plain product (not equivalent to removal)."""
    attention = layer.attention.self
    batch, length = hidden.shape[:2]
    heads, size = attention.num_attention_heads, attention.attention_head_size
    shape = (batch, length, heads, size)
    # scale the queries (n x d) rather than the scores (n x n) and add the mask in place:
    # the (B, A, n, n) scores are written once, not three times
    query = (attention.query(hidden) * attention.scaling).view(shape).transpose(1, 2)
    key = attention.key(hidden).view(shape).transpose(1, 2)
    value = attention.value(hidden).view(shape).transpose(1, 2)
    scores = torch.matmul(query, key.transpose(2, 3))
    if mask is not None:
        scores.add_(mask)
    probs = F.softmax(scores, dim=-1)
    if key_weights is not None:
        probs = probs * key_weights[:, None, None, :].to(probs.dtype)
        if renormalise:
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    context = torch.matmul(attention.dropout(probs), value)
    context = context.transpose(1, 2).reshape(batch, length, attention.all_head_size)
    return layer.attention.output(context, hidden), probs


def attention_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                    key_weights: torch.Tensor | None = None, renormalise: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole BERT layer with eager attention: (output, probabilities); see
    `attention_block` for `key_weights`."""
    attended, probs = attention_block(layer, hidden, mask, key_weights, renormalise)
    return layer.feed_forward_chunk(attended), probs


def diagonal_blocks(probs: torch.Tensor, block: int) -> torch.Tensor:
    """(B, A, n, n) -> (B, A, n / block, block, block): each block's attention to itself."""
    batch, heads, length, _ = probs.shape
    blocks = length // block
    grid = probs.reshape(batch, heads, blocks, block, blocks, block)
    return grid.diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3)


def attention_layer_diagonal(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                             block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One BERT layer and its diagonal attention blocks (B, A, n / block, block, block), plus
    the MACs per row spent on them beyond the layer.

    In training (gradients must reach the maps) this is the eager layer. At inference on a CPU
    the fused attention kernel computes the output and each query's log-sum-exp, and only the
    diagonal blocks' probabilities are formed from their own scores: exact, at the cost of
    n * block * H more MACs, instead of materialising all n x n probabilities."""
    if layer.training or hidden.device.type != "cpu":
        output, probs = attention_layer(layer, hidden, mask)
        return output, diagonal_blocks(probs, block), 0
    attention = layer.attention.self
    batch, length, size = hidden.shape
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    shape = (batch, length, heads, head_size)
    query, key, value = (projection(hidden).view(shape).transpose(1, 2) for projection in
                         (attention.query, attention.key, attention.value))
    context, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=mask, scale=attention.scaling)
    blocks = length // block
    tiles = (batch, heads, blocks, block, head_size)
    scores = torch.matmul(query.reshape(tiles) * attention.scaling,
                          key.reshape(tiles).transpose(-1, -2))
    if mask is not None:
        scores = scores + mask.reshape(batch, 1, blocks, 1, block)
    diagonal = torch.exp(scores - logsumexp.reshape(batch, heads, blocks, block, 1))
    context = context.transpose(1, 2).reshape(batch, length, size)
    output = layer.feed_forward_chunk(layer.attention.output(context, hidden))
    return output, diagonal, length * block * size


def attention_received(probs: torch.Tensor, queries: torch.Tensor,
                       exclude_self: bool = False) -> torch.Tensor:
    """(B, A, n, n) probabilities -> (B, n): the head-averaged attention each key receives,
    summed over the query rows in `queries` (B, n) bool (pads and removed slots left out), and
    over every other row but its own when `exclude_self` (PoWER-BERT's significance; LTP's
    importance before its normalisation)."""
    mean = probs.mean(dim=1) * queries[:, :, None].to(probs.dtype)
    if exclude_self:
        mean = mean * (1 - torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device))
    return mean.sum(dim=1)


def prune_after_attention(model: nn.Module, batch: dict, decide, masked: bool = False
                          ) -> Output:
    """The encoder with tokens removed between each layer's attention and its FFN
    (PoWER-BERT, LTP). `decide(index, probs, tokens)` gives the slots (B, n) to keep after
    layer `index`'s attention (None keeps all); `masked` keeps removed slots as non-attended
    ones instead (the dense cost). Each layer's trace has two lengths: attention on the slots
    it received, FFN on those kept."""
    hidden = model.embed(batch)
    batch_size, length = batch["input_ids"].shape
    tokens = Tokens.start(hidden, batch["attention_mask"])
    attention_widths, ffn_widths = [], []
    for index, layer in enumerate(model.layers):
        attention_widths.append(tokens.width)
        attended, probs = attention_block(layer, tokens.hidden, tokens.mask())
        keep = decide(index, probs, tokens)
        tokens = replace(tokens, hidden=attended)
        if keep is not None:
            tokens = tokens.masked(keep) if masked else tokens.keep(keep)
        tokens = replace(tokens, hidden=layer.feed_forward_chunk(tokens.hidden))
        ffn_widths.append(tokens.width)
    attention = torch.tensor(attention_widths).expand(batch_size, -1)
    ffn = torch.tensor(ffn_widths).expand(batch_size, -1)
    trace = Trace(attention.clone(), attention.clone(), ffn.clone(), attention * attention,
                  torch.full((batch_size,), len(model.layers)),
                  torch.full((batch_size,), model.head_macs(length)))
    return Output(model.logits(tokens.hidden), trace)
