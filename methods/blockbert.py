"""BlockBERT: blockwise self-attention (Qiu et al., Findings of EMNLP 2020, arXiv 1911.02972;
methods-spec 7). The official repository xptree/BlockBERT holds no code: this is written from
the paper.

Every layer splits the sequence into `blocks` (n) blocks; in each head, query block i attends
only key block pi(i), where pi is a power of the cyclic shift (i -> i + 1 mod n). The paper's head
splits count the heads per permutation, identity first: n = 2 -> 10:2, n = 3 -> 8:2:2 (12 heads,
N = 512; 9:3 for n = 2 at N = 1024, `--set heads=9:3`). `heads` left unset takes the paper's
split for `blocks`, scaled to the backbone's head count (largest remainders; every permutation
the paper uses keeps a head while the identity keeps one). The attention is computed block by
block: queries are viewed as (B*n, A, N/n, d), the keys and values of each head group are rolled
along the block axis, and one attention call runs on the N/n-long blocks (`kernel=sdpa`, the
fused kernel; `kernel=matmul`, two explicit batched matmuls with the n blocks of (N/n)^2 scores
materialised, the paper's memory profile). The attention matmuls therefore cost 2 N^2 H / n
MACs per layer instead of 2 N^2 H; projections and FFN are unchanged (so the FLOPs saving is
small at GLUE lengths: the method's benefit is memory and time at long lengths).

The length that runs is the input length rounded up to a multiple of n: the method appends
masked filler slots after the embeddings (never new positions, so a 512-token input still fits
512 position embeddings), and the trace counts every slot that ran: all layers at that length,
`pairs = length^2 / n`. A query whose key block holds no real token (a short input) gets a zero
context from that head, never NaN. Nothing is removed, so the harness's oracle (the dense
encoder replayed at these lengths) and removal efficiency say nothing about this method.

`partition` says where the block boundaries fall (methods-spec 7.7.3):
- `real` (default): the paper's mask formula applied to each row's real length, so block i holds
  the real tokens p with floor(p n / len) = i, each block laid out in its own N/n slots with
  filler after it. Every block holds real tokens (inputs of at least n tokens) and an example's
  prediction is the same in the `sequence`, `batch` and `none` padding modes.
- `tensor`: equal blocks of the padded tensor, pads included: the paper's fixed-N partition when
  run in `sequence` mode (short inputs then leave their later blocks, and the shifted heads'
  keys, to padding); in `batch` mode the boundaries move with the batch's longest member.

Where this departs from the paper:
- pre-training not reproduced: the paper pre-trains BlockBERT from scratch with this attention
  (MLM, 2.4M steps); here the pre-trained dense backbone is fine-tuned with block attention, so
  expect an accuracy drop the paper does not have (the spec's `blockbert-ft` variant).
  `mlm_epochs` > 0 first continues masked-LM training with block attention on the task's own
  text (the spec's `blockbert-mlm`: BERT's 15% masking of word tokens, a fresh MLM head tied
  to the word embeddings, at `mlm_lr`), a short stand-in for the pre-training;
- `init=baseline` starts from the task's fine-tuned dense baseline instead of the pre-trained
  backbone, so a short fine-tune only adapts the model to block attention (not in the paper);
- the fine-tuning budget is the harness's (`--profile paper` on SQuAD: 4 epochs, batch 32,
  lr 3e-5 from the paper's grid, N = 512);
- classification and regression run mechanically (the paper evaluates QA only); [CLS] sees only
  its heads' key blocks, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.method import Context, InitSettings, Method, register
from skimbench.model import Output, Trace

# heads on (identity, shift 1, shift 2, ...), N = 512, A = 12 (paper Table 2)
PAPER_SPLITS = {1: (12,), 2: (10, 2), 3: (8, 2, 2)}
PARTITIONS = ("real", "tensor")
KERNELS = ("sdpa", "matmul")


def scale_split(split: tuple[int, ...], heads: int) -> tuple[int, ...]:
    """A head split scaled to `heads` heads: proportional, largest remainders first; then each
    permutation the split uses gets a head from the identity's while the identity keeps one."""
    total = sum(split)
    counts = [count * heads // total for count in split]
    by_remainder = sorted(range(len(split)), key=lambda i: (-(split[i] * heads % total), i))
    for i in by_remainder[: heads - sum(counts)]:
        counts[i] += 1
    for i in range(1, len(counts)):
        if split[i] > 0 and counts[i] == 0 and counts[0] > 1:
            counts[0] -= 1
            counts[i] += 1
    return tuple(counts)


@dataclass
class BlockBertConfig(InitSettings):
    blocks: int = 2            # n (paper: 2 or 3)
    heads: str | None = None   # heads per shift 0..n-1 as in the paper ("10:2"); None: the
                               # paper's split for `blocks`, scaled to the backbone
    partition: str = "real"    # real | tensor: where block boundaries fall
    kernel: str = "sdpa"       # sdpa | matmul: how each block's attention runs
    mlm_epochs: float = 0.0    # masked-LM continuation on the task's text first (0: none)
    mlm_lr: float = 5e-5       # its learning rate

    def __post_init__(self):
        super().__post_init__()
        if self.blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {self.blocks}")
        if self.heads is not None:
            counts = self.head_counts()
            if len(counts) != self.blocks:
                raise ValueError(f"heads={self.heads} gives {len(counts)} counts but "
                                 f"blocks={self.blocks}: give one head count per permutation "
                                 f"(shift 0..{self.blocks - 1}), e.g. heads=10:2")
            if sum(counts) == 0:
                raise ValueError(f"heads={self.heads} gives no head at all")
        elif self.blocks not in PAPER_SPLITS:
            raise ValueError(f"the paper has no head split for blocks={self.blocks} (only "
                             f"{', '.join(map(str, PAPER_SPLITS))}): give heads=..., one count "
                             "per permutation")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got "
                             f"{self.partition!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.mlm_epochs < 0 or self.mlm_lr <= 0:
            raise ValueError(f"mlm_epochs must be >= 0 and mlm_lr > 0, got {self.mlm_epochs} "
                             f"and {self.mlm_lr}")

    def head_counts(self) -> tuple[int, ...]:
        """`heads` as counts, identity first."""
        try:
            counts = tuple(int(part) for part in str(self.heads).split(":"))
        except ValueError:
            counts = (-1,)
        if min(counts) < 0:
            raise ValueError(f"heads must be head counts >= 0 separated by ':' (e.g. 10:2), "
                             f"got {self.heads!r}")
        return counts


@dataclass
class Layout:
    """Where each input position sits in the blocked sequence of `width` = n * `block` slots."""

    width: int
    block: int
    slot_of: torch.Tensor | None      # (B, width) slot of each position; None: the identity
    position_of: torch.Tensor | None  # (B, width) the inverse
    valid: torch.Tensor               # (B, width) the slot holds a real token (may be attended)


def block_layout(attention_mask: torch.Tensor, blocks: int, partition: str) -> Layout:
    """The blocked layout of a right-padded batch (real tokens first, as the harness pads)."""
    batch, length = attention_mask.shape
    block = -(-length // blocks)
    width = block * blocks
    real = F.pad(attention_mask.bool(), (0, width - length))
    if partition == "tensor":
        return Layout(width, block, None, None, real)
    position = torch.arange(width, device=real.device).expand(batch, width)
    lengths = real.sum(dim=1, keepdim=True).clamp_min(1)
    index = position * blocks // lengths                        # block of a real position
    start = (index * lengths + blocks - 1) // blocks            # its block's first position
    slot_real = index * block + position - start
    # the free slots in order take the pads (and appended fillers) in order
    taken = torch.zeros(batch, width + 1, dtype=torch.bool, device=real.device)
    taken.scatter_(1, torch.where(real, slot_real, width), True)
    free = torch.where(taken[:, :width], position + width, position).argsort(dim=1)
    slot_pad = free.gather(1, (position - lengths).clamp_min(0))
    slot_of = torch.where(real, slot_real, slot_pad)
    if bool((slot_of == position).all()):
        return Layout(width, block, None, None, real)
    position_of = torch.empty_like(slot_of).scatter_(1, slot_of, position)
    return Layout(width, block, slot_of, position_of, real.gather(1, position_of))


def roll_heads(x: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """x (B, n, b, A, ...) -> each head group's blocks rolled so that block i holds the
    group's key block (i + shift) mod n."""
    parts = [x[:, :, :, start:end].roll(-shift, dims=1) if shift else x[:, :, :, start:end]
             for shift, start, end in groups]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)


MASK_TOKEN_ID = 103   # [MASK] in the bert-base-uncased vocabulary (MiniLM's and BERT's)
FIRST_WORD_ID = 999   # ids below are [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]
MASK_SHARE = 0.15     # BERT's masking: 15% of the tokens, 80% [MASK], 10% random, 10% kept


class MaskedLMHead(nn.Module):
    """BERT's MLM head (dense, GELU, LayerNorm, decoder tied to the word embeddings), freshly
    initialised: sentence-embedding checkpoints such as MiniLM ship none."""

    def __init__(self, encoder):
        super().__init__()
        config = encoder.config
        self.transform = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size),
                                       nn.GELU(), nn.LayerNorm(config.hidden_size,
                                                               eps=config.layer_norm_eps))
        self.words = encoder.embeddings.word_embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ self.words.weight.T + self.bias


def mask_tokens(batch: dict, vocab_size: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of the real word tokens ([CLS], [SEP] and pads never): (inputs, labels),
    labels -100 where nothing is predicted; at least one token per batch."""
    ids = batch["input_ids"]
    words = batch["attention_mask"].bool() & (ids >= FIRST_WORD_ID)
    chosen = words & (torch.rand(ids.shape) < MASK_SHARE)
    if not bool(chosen.any()):
        chosen = words & (torch.cumsum(words.flatten().long(), 0).view_as(words) == 1)
    labels = torch.where(chosen, ids, -100)
    draw = torch.rand(ids.shape)
    inputs = torch.where(chosen & (draw < 0.8), mask_id, ids)
    random_words = torch.randint(FIRST_WORD_ID, vocab_size, ids.shape)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_words, inputs)
    return inputs, labels


@register("blockbert")
class BlockBert(Method):
    """Blockwise attention: per head, query block i sees only key block pi(i) (EMNLP 2020)."""

    Config = BlockBertConfig
    paper_names = ("BlockBERT n=2, 10:2", "BlockBERT n=3, 8:2:2", "BlockBERT n=2, 9:3")
    inference_settings = ("kernel",)
    # Sec. 4.2: SpanBERT's fine-tuning at N = 512, stride 128, 4 epochs, batch {16, 32},
    # lr {5e-6, ..., 5e-5} (the grid's middle here; the paper does not say which won)
    paper_budgets = {key: dict(epochs=4, batch_size=32, lr=3e-5, max_length=512)
                     for key in ("squad", "squad_v2")}

    def head_split(self, num_heads: int) -> tuple[int, ...]:
        """Heads per permutation (shift 0, 1, ..., n-1) for a backbone with `num_heads`."""
        if self.config.heads is None:
            return scale_split(PAPER_SPLITS[self.config.blocks], num_heads)
        split = self.config.head_counts()
        if sum(split) != num_heads:
            raise ValueError(f"heads={self.config.heads} counts {sum(split)} heads but the "
                             f"backbone has {num_heads}")
        return split

    def check_backbone(self, config) -> None:
        self.head_split(config.num_attention_heads)

    def build(self, ctx: Context):
        model = self.initial_model(ctx)
        if self.config.mlm_epochs > 0:
            model.mlm_head = MaskedLMHead(model.encoder)
        return model

    def stages(self, ctx: Context):
        """Fine-tuning, after `mlm_epochs` of masked-LM on the task's own text (the head's
        `mlm` loss, labels unused) when asked."""
        [finetune] = super().stages(ctx)
        self._phase = "finetune"
        if self.config.mlm_epochs == 0:
            return [finetune]

        def phase(name: str):
            def on_step(model, step: int, total: int) -> None:
                self._phase = name
            return on_step

        mlm = replace(finetune, name="mlm", epochs=self.config.mlm_epochs,
                      lr=self.config.mlm_lr, losses={"mlm": 1.0}, frozen=("head.",),
                      on_step=phase("mlm"))
        return [mlm, replace(finetune, on_step=phase("finetune"))]

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        if getattr(self, "_phase", "finetune") != "mlm":
            return super().losses(model, batch)
        inputs, labels = mask_tokens(batch, model.encoder.config.vocab_size, MASK_TOKEN_ID)
        hidden = self.encode(model, {**batch, "input_ids": inputs})
        scores = model.mlm_head(hidden[labels >= 0])
        return {"mlm": F.cross_entropy(scores, labels[labels >= 0])}

    def record_notes(self) -> list[str]:
        start = ("the task's fine-tuned dense baseline" if self.config.init == "baseline"
                 else "the pre-trained dense backbone")
        return [f"pre-training not reproduced: {start} fine-tuned with block attention"]

    def forward(self, model, batch: dict) -> Output:
        """The blockwise encoder, then the task head; the trace counts every slot that ran."""
        hidden, width, block = self._encode(model, batch)
        batch_size, length = batch["input_ids"].shape
        layers = len(model.layers)
        tokens = torch.full((batch_size, layers), width, dtype=torch.long)
        trace = Trace(tokens, tokens.clone(), tokens.clone(), tokens * block,
                      torch.full((batch_size,), layers, dtype=torch.long),
                      torch.full((batch_size,), model.head_macs(length), dtype=torch.long))
        return Output(model.logits(hidden), trace)

    def encode(self, model, batch: dict) -> torch.Tensor:
        """The last layer's states (B, N, H), in input order."""
        return self._encode(model, batch)[0]

    def _encode(self, model, batch: dict) -> tuple[torch.Tensor, int, int]:
        """Embed, lay the positions out in blocks, run every layer blockwise, restore the input
        order: (states, blocked width, block size)."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        n = self.config.blocks
        layout = block_layout(batch["attention_mask"], n, self.config.partition)
        if layout.width > length:  # filler slots (zeros, never attended) up to n blocks
            hidden = F.pad(hidden, (0, 0, 0, layout.width - length))
        if layout.position_of is not None:
            hidden = hidden.gather(1, layout.position_of[..., None].expand_as(hidden))
        split = self.head_split(model.encoder.config.num_attention_heads)
        groups = [(shift, end - count, end) for shift, (count, end) in
                  enumerate(zip(split, accumulate(split), strict=True)) if count]
        # each head's key validity per query block: (B, n, b, A) -> (B * n, A, 1, b)
        heads = sum(split)
        valid = roll_heads(layout.valid.view(batch_size, n, layout.block, 1)
                           .expand(-1, -1, -1, heads), groups)
        valid = valid.permute(0, 1, 3, 2).reshape(batch_size * n, heads, 1, layout.block)
        mask = None if bool(valid.all()) else torch.zeros(
            valid.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(
            ~valid, torch.finfo(hidden.dtype).min)
        seen = valid.any(dim=-1, keepdim=True)  # (B * n, A, 1, 1): the key block has a token
        seen = None if bool(seen.all()) else seen
        for layer in model.layers:
            hidden = self._layer(layer, hidden, n, groups, mask, seen)
        if layout.slot_of is not None:
            hidden = hidden.gather(1, layout.slot_of[..., None].expand_as(hidden))
        return hidden[:, :length], layout.width, layout.block

    def _layer(self, layer, hidden: torch.Tensor, n: int, groups: list[tuple[int, int, int]],
               mask: torch.Tensor | None, seen: torch.Tensor | None) -> torch.Tensor:
        """One BERT layer with blockwise attention on hidden (B, n * b, H)."""
        attention = layer.attention.self
        batch, width, size = hidden.shape
        heads, head_size = attention.num_attention_heads, attention.attention_head_size
        block = width // n
        blocked = (batch, n, block, heads, head_size)

        def per_block(x: torch.Tensor) -> torch.Tensor:  # (B, n, b, A, d) -> (B * n, A, b, d)
            return x.reshape(batch * n, block, heads, head_size).transpose(1, 2)

        query = per_block(attention.query(hidden).view(blocked))
        key = per_block(roll_heads(attention.key(hidden).view(blocked), groups))
        value = per_block(roll_heads(attention.value(hidden).view(blocked), groups))
        if self.config.kernel == "sdpa":
            dropout = attention.dropout.p if layer.training else 0.0
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                     dropout_p=dropout,
                                                     scale=attention.scaling)
        else:
            scores = torch.matmul(query * attention.scaling, key.transpose(2, 3))
            if mask is not None:
                scores = scores + mask
            context = torch.matmul(attention.dropout(F.softmax(scores, dim=-1)), value)
        if seen is not None:  # no key in the block: the head contributes nothing
            context = torch.where(seen, context, 0.0)
        context = context.transpose(1, 2).reshape(batch, width, size)
        return layer.feed_forward_chunk(layer.attention.output(context, hidden))
