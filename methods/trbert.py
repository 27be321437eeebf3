"""TR-BERT: dynamic token reduction by a policy trained with reinforcement learning (Ye et al.,
NAACL 2021, arXiv 2105.11618; official code thunlp/TR-BERT; methods-spec 10).

At two fixed points, before layer 1 and before layer L/2 (layers 1 and 6 of BERT-base, 1 and 3
of the 6-layer MiniLM; one point when L/2 = 1), a small policy network Linear(H, 32) -> GELU ->
Linear(32, 1) -> sigmoid gives each token a keep probability. Kept tokens go on through the
remaining layers; the others stop: for classification they are discarded, for extractive QA
their state at the drop point goes to the output buffer, so the span head still scores every
position. [CLS] is always kept, pads never.

Training starts from the fine-tuned baseline, through the harness trainer:
1. `prepare`: one pass of the baseline over the training features stores, per feature, the
   residual-importance heuristic `|<dLoss/dh_b, h_b - h_{s_j}>|` (h_b the output of layer
   2L/3, 8 for BERT-base; h_{s_j} the output feeding point j: a first-order estimate of the loss
   change if the token skipped the layers in between) and the baseline's logits (the
   distillation targets); both cached in the run directory.
2. stage `policy`: only the policies train (backbone and head frozen). Each example is copied K
   times, each copy samples keep/drop from Bernoulli(p); reward `-loss - alpha * mean over the
   points of kept / N`; loss `sum (r - mean_K r) * NLL(selection) / rows` (REINFORCE with the
   mean reward of the K copies as baseline). Imitation: for the first `guide_rate` of the steps
   copy 0 keeps the top `round(sum p)` tokens by the heuristic instead of sampling.
3. stage `joint`: everything trains on the distillation loss (soft cross-entropy against the
   baseline's logits, replacing the gold labels, as `--train_teacher`) plus the same REINFORCE
   term (no imitation); the reward uses the distillation loss.

Where this file departs from the official code (methods-spec 10.6-10.7):
- inference keeps `p >= keep_threshold` (0.5, the code's rule) and, by default, each row exactly
  its own tokens: ragged rows are aligned with masked filler slots (`Tokens.keep`), so a row's
  answer never depends on its batch mates. `faithful_batching=true` is the code's rule: every
  row keeps the batch's largest count k*, topped up with its next-best tokens by p.
  `keep_threshold` is an inference setting: a sweep traces the accuracy-speed curve from one
  training run (0 keeps every token: the baseline on the real tokens);
- the heuristic uses each example's own loss (the code's batch-mean loss scales a row's scores
  by 1/batch size; the ranking, all the imitation reads, is the same) and is keyed by feature
  content, not by a cached feature order; QA losses (heuristic, reward, distillation) leave pad
  positions out of the span softmax, so no row's loss depends on its batch's padding;
- the selection NLL averages over the real tokens except [CLS], whose keep is forced, not
  decided (the code also counts [CLS]'s log-probability);
- training gathers the selected tokens (with filler slots) as inference does, in input order;
  the code's selection-matrix product keeps score order, which is the same function after
  the embeddings (methods-spec 1.5);
- the length term divides by the padded batch length N, as the code does: alpha therefore
  depends on the batch padding (methods-spec 10.6).
Alpha per task is the README's table (train_rl / train_both; SQuAD 1.1 takes SQuAD 2.0's); the
heuristic pre-training of the selector (`--train_init`, IMDB only) is not offered.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from skimbench.features import length_sorted_batches
from skimbench.method import CHECKPOINT, Context, ControlSettings, Method, register
from skimbench.model import Output, Trace, additive_mask
from skimbench.skim import OutputBuffer, Tokens, TokenScorer, decide_tokens
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, Task

# README "Harmonic Coefficient Lambda": alpha of (train_rl, train_both) per data set
README_ALPHAS = {"squad_v2": (5.0, 5.0), "squad": (5.0, 5.0), "yelp": (2.0, 0.5),
                 "20news": (1.0, 1.0), "imdb": (1.0, 1.0)}
DEFAULT_ALPHAS = (1.0, 1.0)
GUIDE_RATES = {CLASSIFICATION: 0.5, EXTRACTIVE_QA: 0.2}  # run_classification.py, run_squad.py
TEACHER_FILE = "trbert-teacher.pt"
TEACHER_FORMAT = 1


@dataclass
class TRBertConfig(ControlSettings):
    alpha_policy: float | None = None  # length penalty, policy stage; None: README's for the task
    alpha_joint: float | None = None   # length penalty, joint stage; None: README's for the task
    samples: int = 8                   # K copies per example (the code's sample_K)
    guide_rate: float | None = None    # share of policy steps with imitation; None: 0.5 / QA 0.2
    distill: bool = True               # joint stage on the baseline's logits (--train_teacher)
    temperature: float = 1.0           # of the distillation soft targets
    keep_threshold: float = 0.5        # inference: keep a token iff p >= this
    faithful_batching: bool = False    # inference: rows keep the batch's top-k* (the code's)

    def __post_init__(self):
        for name in ("alpha_policy", "alpha_joint"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (the baseline is their mean reward), got "
                             f"{self.samples}")
        if self.guide_rate is not None and not 0.0 <= self.guide_rate <= 1.0:
            raise ValueError(f"guide_rate must be in [0, 1], got {self.guide_rate}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.keep_threshold <= 1.0:
            raise ValueError(f"keep_threshold must be in [0, 1], got {self.keep_threshold}")


def selection_points(layers: int) -> tuple[int, ...]:
    """The layers a selection comes before: 1 and L/2 (one point when they coincide)."""
    return tuple(sorted({p for p in (1, layers // 2) if 0 < p < layers}))


def score_layer(layers: int) -> int:
    """The layer whose output the heuristic differentiates: 2L/3 (8 of 12, 4 of 6)."""
    return min(layers - 1, 2 * layers // 3)


def add_policies(model: nn.Module) -> nn.Module:
    """One policy per selection point, as `model.policies`."""
    config = model.encoder.config
    model.policies = nn.ModuleList(
        TokenScorer(config.hidden_size, config.initializer_range)
        for _ in selection_points(len(model.layers)))
    return model


def feature_key(example_index: int, ids) -> tuple[int, str]:
    """A training feature's identity: QA windows of one question share the example index."""
    return int(example_index), hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def span_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """QA logits with pad positions out of every softmax: a row's loss ignores its padding."""
    pads = ~batch["attention_mask"].bool()[..., None]
    return logits.masked_fill(pads, torch.finfo(logits.dtype).min)


def row_losses(kind: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The task loss per row: cross-entropy, or the mean of start/end cross-entropy over the
    real positions for QA."""
    if kind == CLASSIFICATION:
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    logits = span_logits(logits, batch)
    length = logits.shape[1]
    start = batch["start_positions"].clamp(0, length - 1)
    end = batch["end_positions"].clamp(0, length - 1)
    return (F.cross_entropy(logits[..., 0], start, reduction="none")
            + F.cross_entropy(logits[..., 1], end, reduction="none")) / 2


def soft_losses(kind: str, logits: torch.Tensor, teacher: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """Soft cross-entropy per row against the teacher's probabilities (QA: over positions, the
    mean of start and end)."""
    dim = -1 if kind == CLASSIFICATION else 1
    targets = (teacher / temperature).softmax(dim=dim)
    terms = -(targets * (logits / temperature).log_softmax(dim=dim)).sum(dim=dim)
    return terms if kind == CLASSIFICATION else terms.mean(dim=-1)


@dataclass
class Teacher:
    """What `prepare` stores per training feature: heuristic scores (points, n) and logits."""

    rows: dict[tuple[int, str], int]
    scores: list[torch.Tensor]
    logits: list[torch.Tensor]

    def state(self) -> dict:
        """Plain containers, for a `torch.load(weights_only=True)` cache."""
        return {"keys": [list(key) for key in self.rows], "rows": list(self.rows.values()),
                "scores": self.scores, "logits": self.logits}

    @classmethod
    def from_state(cls, state: dict) -> Teacher:
        rows = {(index, digest): row for (index, digest), row in
                zip(state["keys"], state["rows"], strict=True)}
        return cls(rows, state["scores"], state["logits"])


@register("trbert")
class TRBert(Method):
    """RL-trained policies drop tokens before layer 1 and L/2 (NAACL 2021)."""

    paper_names = ("TR-BERT",)
    Config = TRBertConfig
    kinds = frozenset({CLASSIFICATION, EXTRACTIVE_QA})
    needs = ("baseline",)
    inference_settings = ("keep_threshold", "faithful_batching")
    # README (IMDB): lr 3e-5, batch 8 x grad-accumulation 4, 3 epochs each for train_rl and
    # train_both; AdamW without weight decay, 10% warm-up, clip 1.0 (methods-spec 10.3)
    paper_budgets = {"*": dict(lr=3e-5, batch_size=32, epochs=3, warmup_ratio=0.1,
                               weight_decay=0.0, grad_clip=1.0)}

    def __init__(self, config: TRBertConfig):
        super().__init__(config)
        self._teacher: Teacher | None = None
        self._phase = "policy"   # the stage now training: its alpha, loss and imitation
        self._guided = False     # copy 0 imitates the heuristic at this step

    @classmethod
    def configure(cls, config: TRBertConfig, task: Task) -> TRBertConfig:
        """Fill alpha in from the README's table and guide_rate from the task kind."""
        policy, joint = README_ALPHAS.get(task.key, DEFAULT_ALPHAS)
        return replace(
            config,
            alpha_policy=policy if config.alpha_policy is None else config.alpha_policy,
            alpha_joint=joint if config.alpha_joint is None else config.alpha_joint,
            guide_rate=GUIDE_RATES.get(task.kind, 0.5) if config.guide_rate is None
            else config.guide_rate)

    def check_backbone(self, config) -> None:
        if config.num_hidden_layers < 2:
            raise ValueError("trbert selects before layer 1: the backbone needs 2 layers or more")

    def build(self, ctx: Context):
        if "baseline" not in ctx.needs:
            raise ValueError("trbert starts from the fine-tuned baseline run, which this "
                             "context lacks")
        return add_policies(self.baseline_model(ctx))

    def stages(self, ctx: Context):
        [base] = super().stages(ctx)

        def phase(name: str):
            def on_step(model: nn.Module, step: int, total: int) -> None:
                self._phase = name
                self._guided = name == "policy" and step < self.config.guide_rate * total
            return on_step

        joint_loss = "distill" if self.config.distill else "task"
        return [replace(base, name="policy", losses={"reinforce": 1.0},
                        frozen=("encoder.", "head."), on_step=phase("policy")),
                replace(base, name="joint", losses={joint_loss: 1.0, "reinforce": 1.0},
                        on_step=phase("joint"))]

    # -- the teacher: heuristic scores and logits ----------------------------------------------

    def prepare(self, model: nn.Module, ctx: Context, features: list[dict], log) -> None:
        """The baseline's heuristic scores and logits for every training feature, cached in the
        run directory."""
        weights = Path(ctx.needs["baseline"]) / CHECKPOINT
        fingerprint = _fingerprint(weights, features, len(model.layers))
        path = ctx.run_dir / TEACHER_FILE if ctx.run_dir is not None else None
        if path is not None and path.is_file():
            cached = torch.load(path, map_location="cpu")
            if cached.get("fingerprint") == fingerprint:
                self._teacher = Teacher.from_state(cached["teacher"])
                log(f"teacher: reusing {path} ({len(features)} features)")
                return
        started = time.perf_counter()
        teacher = self.baseline_model(ctx).eval()
        self._teacher = compute_teacher(teacher, features, ctx.budget.batch_size)
        log(f"teacher: heuristic scores and logits of {len(features)} features from the "
            f"fine-tuned baseline in {time.perf_counter() - started:.1f}s")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"format": TEACHER_FORMAT, "fingerprint": fingerprint,
                        "teacher": self._teacher.state()}, tmp)
            tmp.replace(path)

    def _lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's heuristic scores (B, points, N) and teacher logits, padded to N."""
        if self._teacher is None:
            raise RuntimeError("trbert: no teacher scores; prepare() computes them before "
                               "training")
        length = batch["input_ids"].shape[1]
        scores, logits = [], []
        for ids, mask, index in zip(batch["input_ids"].tolist(),
                                    batch["attention_mask"].tolist(),
                                    batch["example_index"].tolist(), strict=True):
            row = self._teacher.rows[feature_key(index, ids[:sum(mask)])]
            score, logit = self._teacher.scores[row], self._teacher.logits[row]
            scores.append(F.pad(score, (0, length - score.shape[-1])))
            if logit.ndim == 2:  # QA (n, 2): positions beyond the feature get no mass
                logit = F.pad(logit, (0, 0, 0, length - logit.shape[0]), value=-torch.inf)
            logits.append(logit)
        device = batch["input_ids"].device
        return torch.stack(scores).to(device), torch.stack(logits).to(device)

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, model, batch: dict) -> Output:
        """Inference: the policies' deterministic selections, removed physically."""
        return self._encode(model, batch, self._infer)

    def _infer(self, point: int, logits: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Keep p >= keep_threshold among the real tokens, and [CLS]; with faithful batching,
        every row then keeps the batch's largest count, its best tokens by p."""
        probs = logits.sigmoid() * tokens.attend
        keep = (probs >= self.config.keep_threshold) & tokens.attend
        keep[:, 0] = True
        if self.config.faithful_batching and keep.shape[0] > 1:
            score = torch.where(tokens.alive, probs, -1.0)
            score[:, 0] = 2.0
            keep = _ranks(score) < keep.sum(dim=1).max()
        return keep

    def _encode(self, model, batch: dict, decide) -> Output:
        """The encoder with a selection before each point's layer: `decide(point, logits,
        tokens)` gives the slots (B, n) to keep; the rest leave the tensor (QA: their state
        goes to the output buffer)."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        tokens = Tokens.start(hidden, batch["attention_mask"])
        buffer = OutputBuffer(hidden) if model.kind == EXTRACTIVE_QA else None
        points = selection_points(len(model.layers))
        widths, extra = [], model.head_macs(length)
        for index, layer in enumerate(model.layers):
            if index in points:
                point = points.index(index)
                extra += tokens.width * TokenScorer.macs(model.hidden_size)
                logits = model.policies[point](tokens.hidden)
                keep = decide_tokens(decide(point, logits, tokens), tokens, index,
                                     logits.sigmoid())
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

    # -- training -----------------------------------------------------------------------------

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """K sampled copies of the batch: the task and distillation losses over all copies,
        and the REINFORCE loss of the selections."""
        k, batch_size = self.config.samples, batch["input_ids"].shape[0]
        scores, teacher = self._lookup(batch)
        copies = {key: torch.cat([value] * k) for key, value in batch.items()}
        guided = self._guided
        nll, kept = [], []

        def sample(point: int, logits: torch.Tensor, tokens: Tokens) -> torch.Tensor:
            real = tokens.attend.clone()
            probs = logits.sigmoid() * real
            chosen = torch.bernoulli(probs.detach()).bool()
            if guided:  # copy 0 keeps the round(sum p) best tokens by the heuristic
                rows = slice(0, batch_size)
                score = scores[:, point].gather(1, tokens.positions[rows])
                score = score.masked_fill(~real[rows], -torch.inf)
                count = (probs[rows].detach().sum(dim=1) + 0.5).floor()
                chosen[rows] = _ranks(score) < count[:, None]
            chosen[:, 0] = True
            chosen &= real
            real[:, 0] = False  # [CLS] is kept by rule, not by the policy
            terms = F.binary_cross_entropy_with_logits(logits, chosen.to(logits.dtype),
                                                       reduction="none") * real
            nll.append(terms.sum(dim=1) / real.sum(dim=1).clamp_min(1))
            kept.append(chosen.sum(dim=1))
            return chosen

        output = self._encode(model, copies, sample)
        task = row_losses(model.kind, output.logits, copies)
        student = (output.logits if model.kind == CLASSIFICATION
                   else span_logits(output.logits, copies))
        distill = soft_losses(model.kind, student, torch.cat([teacher] * k),
                              self.config.temperature)
        joint = self._phase == "joint"
        loss = distill if joint and self.config.distill else task
        alpha = self.config.alpha_joint if joint else self.config.alpha_policy
        length = batch["input_ids"].shape[1]
        penalty = torch.stack(kept).to(loss.dtype).mean(dim=0) / length
        reward = (-loss.detach() - alpha * penalty).double().view(k, batch_size)
        advantage = (reward - reward.mean(dim=0, keepdim=True)).view(-1).to(loss.dtype)
        reinforce = (advantage * torch.stack(nll).sum(dim=0)).sum() / (k * batch_size)
        return {"task": task.mean(), "distill": distill.mean(), "reinforce": reinforce}


def _ranks(score: torch.Tensor) -> torch.Tensor:
    """Each slot's rank in its row by descending score (0 = best)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device)
                   .expand_as(order).contiguous())
    return ranks


def compute_teacher(model: nn.Module, features: list[dict], batch_size: int) -> Teacher:
    """For each feature, the residual heuristic `|<dLoss/dh_b, h_b - h_{p-1}>|` per point p
    (h_b the output of layer `score_layer`, the loss the feature's own) and the logits of the
    fine-tuned model, in eval mode; batches of similar lengths, padded to their longest."""
    layers = len(model.layers)
    back, feeds = score_layer(layers), [p - 1 for p in selection_points(layers)]
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    device = next(model.parameters()).device
    rows, scores, logits = {}, [None] * len(features), [None] * len(features)
    with torch.enable_grad():
        for chunk, batch in length_sorted_batches(features, batch_size, device,
                                                  "trbert teacher"):
            hidden = model.embed(batch)
            mask = additive_mask(batch["attention_mask"], hidden.dtype)
            outputs = []
            for index, layer in enumerate(model.layers):
                hidden = layer(hidden, mask)
                if index == back:
                    hidden = hidden.detach().requires_grad_(True)
                outputs.append(hidden)
            out = model.logits(hidden)
            [grad] = torch.autograd.grad(row_losses(model.kind, out, batch).sum(),
                                         outputs[back])
            with torch.no_grad():
                score = torch.stack([(grad * (outputs[back] - outputs[f])).sum(dim=-1).abs()
                                     for f in feeds], dim=1)
            for j, i in enumerate(chunk):
                n = len(features[i]["input_ids"])
                rows[feature_key(features[i]["example_index"], features[i]["input_ids"])] = i
                scores[i] = score[j, :, :n].detach().cpu().float()
                logits[i] = (out[j, :n] if model.kind == EXTRACTIVE_QA
                             else out[j]).detach().cpu().float()
    return Teacher(rows, scores, logits)


def _fingerprint(weights: Path, features: list[dict], layers: int) -> str:
    """What the teacher's data depend on: the baseline's weights, the features and labels."""
    digest = hashlib.sha1(f"{TEACHER_FORMAT}|{layers}|".encode())
    stat = weights.stat()
    digest.update(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for feature in features:
        labels = (feature["labels"] if "labels" in feature
                  else (feature["start_positions"], feature["end_positions"]))
        digest.update(f"{feature['example_index']}:{labels}:".encode())
        digest.update(",".join(map(str, feature["input_ids"])).encode())
        digest.update(b";")
    return digest.hexdigest()
