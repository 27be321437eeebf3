"""DeFormer: decomposed pre-trained transformers for faster question answering (Cao et al.,
ACL 2020, arXiv 2005.00697; official code StonyBrookNLP/deformer, TensorFlow; methods-spec 6).

For a two-segment input the lower k layers (`sep_layers`) encode the first segment (the question,
or sentence 1 of a pair) and the second (the passage, or sentence 2) separately, each with
positions restarting at 0; the upper layers run jointly on their concatenation. No parameter is
added. The passage's lower-layer states then no longer depend on the question, so they are
computed once per passage and reused by every question on it: a real cache keyed by the
passage's token ids (and position offset), built on a cache miss one passage at a time at its
real length. The trace counts what runs online: lower layers on the question only (q = kv = ffn
= n_q, n_q^2 pairs), upper layers on all n_q + n_c slots; `Trace.precomputed_macs` carries each
row's passage cost so the harness reports the "total" cost too (each passage's lower layers
charged once and so shared by its questions). With `cache=false` (and always in training) the
passage runs every time: lower layers at n_q + n_c with n_q^2 + n_c^2 pairs. k = 0 is the
baseline itself (the plain encoder on the standard input).

Optional distillation (the paper's `sbert`): the fine-tuned baseline (the paper's k = 0 teacher)
is frozen, and the loss is `task_weight * task + kd_weight * T^2 KL(teacher || student) +
hidden_weight * mean over the upper layers of MSE(student, teacher hidden states)`, KL averaged
over start/end for QA (MSE of the predictions for regression), T = 2, all weights 1 as in the
code's defaults. The student starts from pre-trained weights (`init=pretrained`, the paper's
`ebert`) or from the fine-tuned baseline (`init=baseline`, one of the code's merged inits).

Where this file departs from the paper and code:
- Input layout: the harness's standard features ([CLS] seg1 [SEP] seg2 [SEP], token types 0/1,
  its QA windows with `max_query_length` and stride) are split at the token types, so the
  baseline and DeFormer see the same windows (methods-spec 14). The paper builds its own fixed
  320 = 27 + 293 windows. Question truncation to `max_first_length` tokens happens inside the
  forward (paper: SQuAD 25, MNLI 85, QQP 40; 0 keeps the whole first segment, the default for
  other tasks): truncated question tokens are not computed and get no span logit.
- Padding: the first segment is padded to the batch's longest (truncated) first segment; the
  second keeps every slot after its row's first segment, i.e. the passage plus the pads the
  padded input has after it (the pads the baseline computes too), as wide as the batch's widest.
  So `none` has no pad, `sequence` keeps the task length's pads, and a batch costs at most the
  spread of its question lengths more than the baseline's slots. The paper pads both segments
  to fixed budgets.
- Sharing: the harness's QA windows give the passage `max_length - question - 3` tokens, so
  two questions share an entry only when their windows hold the same passage tokens: always
  when the paragraph fits one window (most of SQuAD at 384: 300 ci questions, 66 entries),
  not for long paragraphs split differently by questions of different lengths. The paper's
  fixed question budget makes every window question-independent.
- Cache invalidation: entries are dropped whenever the embedding or lower-layer weights change
  (tensor versions), or the model is another one; the cache lives in the method object.
- `sep_layers` defaults to three quarters of the depth (the paper's 9 of 12; 4 of MiniLM's 6,
  methods-spec 15).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.errors import UsageError
from skimbench.method import Context, InitSettings, Method, register
from skimbench.model import (
    Output,
    TaskModel,
    Trace,
    additive_mask,
    distillation_loss,
    task_loss,
)
from skimbench.skim import REMOVED_LOGIT
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, REGRESSION, Task

# tasks whose examples have two segments (QA: question + passage windows)
PAIR_TASKS = frozenset({"mrpc", "stsb", "rte", "wnli", "qnli", "mnli", "qqp"})
# the code's max_first_length per task (methods-spec 6.2); any other pair task keeps seg1 whole
PAPER_FIRST_LENGTH = {"squad": 25, "squad_v2": 25, "mnli": 85, "qqp": 40}


@dataclass
class DeFormerConfig(InitSettings):
    sep_layers: int | None = None       # k separate lower layers; None: 3/4 of the depth
    max_first_length: int | None = None  # seg1 tokens kept; None: the paper's per task, 0: all
    restart_positions: bool = True      # positions from 0 in each segment (cacheable)
    cache: bool = True                  # inference: reuse each passage's lower-layer states
    distill: bool = False               # the paper's sbert: KD + upper-layer hidden MSE
    task_weight: float = 1.0            # gamma
    kd_weight: float = 1.0              # alpha
    hidden_weight: float = 1.0          # beta
    temperature: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if self.sep_layers is not None and self.sep_layers < 0:
            raise ValueError(f"sep_layers must be >= 0, got {self.sep_layers}")
        if self.max_first_length is not None and self.max_first_length < 0:
            raise ValueError(f"max_first_length must be >= 0, got {self.max_first_length}")
        for name in ("task_weight", "kd_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class Split:
    """A batch in DeFormer's layout: the first segment's kept slots, then the second's."""

    first_ids: torch.Tensor        # (B, A) token ids of [CLS] seg1 [SEP] (truncated), padded
    first_mask: torch.Tensor       # (B, A) 1 on real slots
    first_source: torch.Tensor     # (B, A) input position of each slot (length for pads)
    first_len: torch.Tensor        # (B,) real first-segment slots
    second_start: torch.Tensor     # (B,) input position where seg2 starts
    second_len: torch.Tensor       # (B,) real seg2 tokens (its [SEP] included)
    width: int                     # second-segment slots: the widest row's tail


def split_batch(batch: dict, max_first: int) -> Split:
    """Cut each row at its token types; keep [CLS], the first `max_first` seg1 tokens (all when
    0) and its [SEP]; the second segment is every slot after the first's [SEP]."""
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    length, device = ids.shape[1], ids.device
    real = mask.sum(dim=1)
    starts = ((types == 0) & (mask > 0)).sum(dim=1)  # seg1 is the type-0 prefix
    kept = []
    for start in starts.tolist():
        body = list(range(1, start - 1))
        if max_first and len(body) > max_first:
            body = body[:max_first]
        kept.append([0, *body, start - 1] if start >= 2 else list(range(start)))
    width_a = max(len(k) for k in kept)
    source = torch.full((len(kept), width_a), length, dtype=torch.long)
    for row, positions in enumerate(kept):
        source[row, :len(positions)] = torch.tensor(positions, dtype=torch.long)
    source = source.to(device)
    first_len = torch.tensor([len(k) for k in kept], device=device)
    first_mask = (torch.arange(width_a, device=device)[None, :] < first_len[:, None]).long()
    first_ids = torch.cat([ids, ids[:, :1]], dim=1).gather(1, source) * first_mask
    return Split(first_ids, first_mask, source, first_len, starts, real - starts,
                 int((length - starts).max()))


@register("deformer")
class DeFormer(Method):
    """Question and passage encoded apart in the lower layers, passage states cached (ACL 2020)."""

    paper_names = ("DeFormer",)
    Config = DeFormerConfig
    kinds = frozenset({CLASSIFICATION, REGRESSION, EXTRACTIVE_QA})
    needs = ("baseline",)
    inference_settings = ("cache",)
    # config/*.ini: BERT-base lr 5e-5, 3 epochs, batch 32, 15% warm-up (methods-spec 6.3)
    paper_budgets = {"*": dict(lr=5e-5, epochs=3, batch_size=32, warmup_ratio=0.15)}

    def __init__(self, config: DeFormerConfig):
        super().__init__(config)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._stamp: tuple | None = None           # the weights the cache was built with
        self._teacher: TaskModel | None = None

    @classmethod
    def configure(cls, config: DeFormerConfig, task: Task) -> DeFormerConfig:
        """Refuse single-segment tasks; fill the question budget in from the paper."""
        if task.kind != EXTRACTIVE_QA and task.key not in PAIR_TASKS:
            raise UsageError(f"method 'deformer' needs two-segment inputs (question + passage "
                             f"or a sentence pair); {task.key!r} has one segment: use "
                             f"squad, squad_v2 or one of {', '.join(sorted(PAIR_TASKS))}")
        if config.max_first_length is None:
            config = replace(config, max_first_length=PAPER_FIRST_LENGTH.get(task.key, 0))
        return config

    def check_backbone(self, config) -> None:
        if self.config.sep_layers is not None and \
                self.config.sep_layers > config.num_hidden_layers:
            raise ValueError(f"sep_layers={self.config.sep_layers} exceeds the backbone's "
                             f"{config.num_hidden_layers} layers")
        if getattr(config, "type_vocab_size", 2) < 2:
            raise ValueError("deformer splits segments by token type, which this backbone "
                             "does not have (type_vocab_size 1)")

    def sep_layers(self, model: TaskModel) -> int:
        k = self.config.sep_layers
        return len(model.layers) * 3 // 4 if k is None else min(k, len(model.layers))

    def build(self, ctx: Context) -> nn.Module:
        model = self.initial_model(ctx)
        if self.config.distill:
            self._teacher = self.teacher_model(ctx)
        return model

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)
        losses = ({"task": self.config.task_weight, "kd": self.config.kd_weight,
                   "hidden": self.config.hidden_weight} if self.config.distill
                  else {"task": 1.0})
        return [replace(stage, name="deformer", losses=losses)]

    # -- the passage cache ------------------------------------------------------------------

    def clear_precomputed(self) -> None:
        self._cache.clear()

    def precomputed_size(self) -> dict:
        return {"entries": len(self._cache),
                "bytes": sum(t.numel() * t.element_size() for t in self._cache.values())}

    def _check_stamp(self, model: TaskModel, k: int) -> None:
        """Empty the cache when the weights it was built with changed."""
        params = [*model.encoder.embeddings.parameters(),
                  *(p for layer in model.layers[:k] for p in layer.parameters())]
        stamp = (id(model), k, *(p._version for p in params))
        if stamp != self._stamp:
            self._cache.clear()
            self._stamp = stamp

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, model: TaskModel, batch: dict) -> Output:
        k = self.sep_layers(model)
        if k == 0:
            return model(batch)
        use_cache = self.config.cache and not model.training and not torch.is_grad_enabled()
        return self._decomposed(model, batch, k, use_cache)[0]

    def _embed(self, model, ids, types, offset, mask) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :] + offset[:, None]
        return model.encoder.embeddings(input_ids=ids, token_type_ids=types,
                                        position_ids=positions * mask)

    def _lower(self, model, hidden, mask, k) -> torch.Tensor:
        extended = additive_mask(mask, hidden.dtype)
        for layer in model.layers[:k]:
            hidden = layer(hidden, extended)
        return hidden

    def _decomposed(self, model: TaskModel, batch: dict, k: int, use_cache: bool
                    ) -> tuple[Output, list[torch.Tensor], torch.Tensor]:
        """The output, the upper layers' hidden states (DeFormer's layout) and each slot's
        input position (the input length for pad slots)."""
        ids = batch["input_ids"]
        device, (size, length) = ids.device, ids.shape
        split = split_batch(batch, self.config.max_first_length or 0)
        width_a, width_b = split.first_ids.shape[1], split.width
        zero = torch.zeros(size, dtype=torch.long, device=device)
        first_mask = split.first_mask
        first = self._embed(model, split.first_ids, zero[:, None] * first_mask, zero,
                            first_mask)
        first = self._lower(model, first, first_mask, k)
        # the second segment: every slot after the first segment, pads included
        slots = torch.arange(width_b, device=device)[None, :]
        tail = slots + split.second_start[:, None]
        second_source = torch.where(tail < length, tail, length)
        second_mask = (slots < split.second_len[:, None]).long()
        padded_ids = torch.cat([ids, ids.new_zeros(size, 1)], dim=1)
        second_ids = padded_ids.gather(1, second_source) * second_mask
        offset = zero if self.config.restart_positions else split.first_len
        precomputed = keys = None
        if use_cache:
            self._check_stamp(model, k)
            second, keys, precomputed = self._from_cache(model, second_ids, second_mask,
                                                         offset, split.second_len, k)
        else:
            second = self._embed(model, second_ids, second_mask, offset, second_mask)
            second = self._lower(model, second, second_mask, k)
        joint = torch.cat([first, second], dim=1)
        joint_mask = torch.cat([first_mask, second_mask], dim=1)
        extended = additive_mask(joint_mask, joint.dtype)
        upper = []
        for layer in model.layers[k:]:
            joint = layer(joint, extended)
            upper.append(joint)
        logits = model.logits(joint)
        source = torch.cat([split.first_source, second_source], dim=1)
        if model.kind == EXTRACTIVE_QA:  # back at the input positions; truncated ones removed
            full = logits.new_full((size, length + 1, logits.shape[-1]), REMOVED_LOGIT)
            logits = full.scatter(1, source[..., None].expand(-1, -1, logits.shape[-1]),
                                  logits)[:, :-1]
        n_joint = width_a + width_b
        upper_layers = len(model.layers) - k
        lower = width_a if use_cache else n_joint
        lower_pairs = width_a ** 2 + (0 if use_cache else width_b ** 2)
        queries = torch.tensor([lower] * k + [n_joint] * upper_layers).expand(size, -1)
        pairs = torch.tensor([lower_pairs] * k + [n_joint ** 2] * upper_layers).expand(size, -1)
        extra = torch.full((size,), model.head_macs(n_joint), dtype=torch.long)
        trace = Trace(queries.clone(), queries.clone(), queries.clone(), pairs.clone(),
                      torch.full((size,), len(model.layers)), extra)
        if precomputed is not None:
            trace.precomputed_macs, trace.precomputed_key = precomputed, keys
        return Output(logits, trace), upper, source

    def _from_cache(self, model, ids, mask, offset, lengths, k):
        """The second segments' lower-layer states from the cache, building missing entries
        one passage at a time at its real length. Returns the states (pads zero), each row's
        key and the full MACs of its entry (what the cache saves per use)."""
        size, width = ids.shape
        states = model.encoder.embeddings.word_embeddings.weight.new_zeros(
            size, width, model.hidden_size)
        keys, costs = [], []
        for row in range(size):
            n = int(lengths[row])
            key = (int(offset[row]), *ids[row, :n].tolist())
            entry = self._cache.get(key)
            if entry is None:
                one_mask = mask[row:row + 1, :n]
                hidden = self._embed(model, ids[row:row + 1, :n], one_mask, offset[row:row + 1],
                                     one_mask)
                entry = self._cache[key] = self._lower(model, hidden, one_mask, k)[0]
            states[row, :n] = entry
            keys.append(hash(key))
            costs.append(k * dense_layer_macs(n, model.hidden_size, model.ffn_size))
        return states, torch.tensor(keys), torch.tensor(costs)

    # -- training -------------------------------------------------------------------------------

    def losses(self, model: TaskModel, batch: dict) -> dict[str, torch.Tensor]:
        k = self.sep_layers(model)
        if k == 0:
            output, upper, source = model(batch), [], None
        else:
            output, upper, source = self._decomposed(model, batch, k, use_cache=False)
        losses = {"task": task_loss(model.kind, output.logits, batch)}
        if not self.config.distill:
            return losses
        if self._teacher is None:
            raise RuntimeError("deformer: distill=true needs the baseline teacher; build() "
                               "loads it from the baseline run")
        with torch.no_grad():
            taught, states = teacher_forward(self._teacher, batch)
        losses["kd"] = distillation_loss(model.kind, output.logits, taught, batch,
                                         self.config.temperature)
        losses["hidden"] = hidden_mse(upper, states[k:], source, batch["attention_mask"])
        return losses


def dense_layer_macs(n: int, hidden: int, ffn: int) -> int:
    """One encoder layer on n tokens, every query seeing every key (DESIGN 4.1)."""
    return 4 * n * hidden * hidden + 2 * n * n * hidden + 2 * n * hidden * ffn


def teacher_forward(teacher: TaskModel, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The baseline's logits and every layer's hidden states on the standard input."""
    hidden = teacher.embed(batch)
    mask = additive_mask(batch["attention_mask"], hidden.dtype)
    states = []
    for layer in teacher.layers:
        hidden = layer(hidden, mask)
        states.append(hidden)
    return teacher.logits(hidden), states


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor],
               source: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the upper layers of the MSE between the student's states and the teacher's at
    the same input positions (real tokens the student computed)."""
    if not student:
        return attention_mask.new_zeros((), dtype=torch.float)
    length = attention_mask.shape[1]
    real = torch.cat([attention_mask, attention_mask.new_zeros(len(attention_mask), 1)], 1)
    used = real.gather(1, source).bool() & (source < length)
    losses = []
    for mine, theirs in zip(student, teacher, strict=True):
        padded = torch.cat([theirs, theirs.new_zeros(len(theirs), 1, theirs.shape[-1])], 1)
        target = padded.gather(1, source[..., None].expand(-1, -1, theirs.shape[-1]))
        losses.append(F.mse_loss(mine[used], target[used]))
    return torch.stack(losses).mean()
