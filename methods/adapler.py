"""AdapLeR: adaptive length reduction by contribution predictors (Modarressi et al., ACL 2022,
arXiv 2203.08991; official code amodaresi/AdapLeR, TensorFlow; methods-spec 5).

Before every layer a small Contribution Predictor (CP) gives a distribution over the tokens still
alive; a token whose share falls below `delta_l = eta_l / n_l` (a learned fraction eta_l of the
uniform share over the n_l alive tokens) is dropped for good. [CLS] is never dropped. The CPs
learn to mimic the gradient x input saliency of the fine-tuned baseline (an inclusive KL,
weighted L - l), eta is learned against a length loss (the expected number of unmasked tokens),
and a learned [CLS] amplification theta shifts contribution onto [CLS]. Training uses a soft
removal mask whose sharpness lambda is annealed until it is the hard removal of inference.

Where this file departs from the official code (methods-spec 5.4-5.9):
- `init=baseline` (default) starts from the fine-tuned baseline's weights; the official phase 3
  starts from pre-trained BERT (`init=pretrained`). On our CPU budgets (one or two epochs of
  MiniLM) the length-reduction stage cannot re-learn the task from scratch while it learns to
  drop tokens, so the fine-tuned weights are the sensible start; the CPs and eta/theta are new
  either way.
- Saliency is averaged over the baseline's last `saliency_epochs` epochs (default 1: its final
  weights; the paper averages its 3 best of 5, ranked on dev). The baseline run keeps every
  epoch's weights but has no held-out data to rank them on (our evaluation set is what records
  report), and under its linearly decaying learning rate its last epochs are its settled ones.
- The two optimisers (network: CE + gamma * KL; thresholds eta/theta: CE + phi * length) are one
  AdamW with `length_reduction.` in its own parameter group (lr `threshold_lr`, no decay), and
  one shared clip-norm and epsilon (1e-8, not 1e-12). The loss routing is emulated by detaching:
  the length loss sees the CP scores detached, so it reaches eta and theta only through the
  thresholds and the [CLS] dummy theta_d (its path through the hidden states of later layers is
  dropped); the KL reads the CPs on detached hidden states with the alive mask and theta
  detached, so it trains the CPs only, never eta/theta and, unlike the official code, not the
  encoder either (`saliency_to_encoder=true` lets it reach the encoder as in the code, at the
  price of a stray KL gradient on eta/theta through the hidden states: one backward pass cannot
  split a gradient at the shared hidden states). CE reaches everything, as in both optimisers.
- The lambda schedule switches on the stage's epoch count like the code (5 -> 10 * 10^k,
  3 -> 50 * 50^k, 10 -> 10 * 3^k, any other count the 5-epoch branch; 1000 at the very first
  step), applied to k = 0.. over equal parts of the stage's steps (as many parts as epochs for
  3/5/10 epochs, 5 parts otherwise), so a step-capped or one-epoch stage still anneals to hard
  removal.
- theta has L - 1 values, for the CPs of layers 1..L-1; the CP of layer 0 reads the embeddings,
  whose [CLS] has no context yet, and is not amplified. theta is floored at 0.01 (its gradient is
  divided by theta); eta is clipped to [0.01, 1] after every step, as in the code.
- Inference removes the dropped tokens physically before each layer, also in batches (filler
  slots align ragged rows, so a row's answer never depends on its batch mates); the released
  batched evaluation only masks. Token counts are the true survivors (the code's last-layer count
  compares the share with eta instead of eta / n). `eta_scale` multiplies the learned eta at
  inference (0 keeps every token, > 1 drops more) and `simulate=true` evaluates the same
  decisions by masking (the dense cost).
- The CPs learn at their own rate, `predictor_lr` (default 1e-3); the paper trains them at the
  network's rate over 5 epochs from pre-trained BERT. On our budgets (157 to 2,000 steps from
  the fine-tuned baseline at lr 1.5e-4 or 5e-5) CPs initialised at N(0, 0.02) stay almost
  uniform: measured on the SST-2 `ci` run, every share stayed within 0.8-1.2x of 1/n, so no
  token fell under eta / n and nothing was removed. `predictor_lr=none` is the paper's setting.
- Model selection as in the code, by the harness (skimbench.selection): with two or more epochs
  the weights after each epoch are scored with hard removal, and the fastest whose accuracy is
  within `select_tolerance` (1 point, the code's 0.01) of the baseline's is kept. The code
  selects on the dev set and reports test; we select on `select_examples` training examples
  held out from this stage, so that the evaluation set stays unseen. `select=final` keeps the
  last epoch. Weight decay 0.01 (code and README; the paper says 0.1).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from skimbench.errors import UsageError
from skimbench.method import CHECKPOINT, Context, ControlSettings, Method, register
from skimbench.model import Output, Trace, additive_mask, task_loss
from skimbench.saliency import compute_saliency
from skimbench.selection import SelectionSettings
from skimbench.skim import Tokens, TokenScorer, attention_layer, decide_tokens
from skimbench.tasks import CLASSIFICATION, Task

# Table 4 of the paper: (gamma, phi) per data set; any other task takes SST-2's
PAPER_WEIGHTS = {"sst2": (5e-3, 5e-4), "imdb": (5e-3, 5e-4), "hatexplain": (5e-2, 2e-2),
                 "mrpc": (3e-2, 5e-2), "mnli": (5e-3, 5e-4), "qnli": (5e-3, 1e-4),
                 "agnews": (1e-1, 1e-1), "dbpedia": (1e-1, 1e-1)}
DEFAULT_WEIGHTS = PAPER_WEIGHTS["sst2"]
INITS = ("baseline", "pretrained")
MASK_FLOOR = -10000.0          # soft mask values are clipped to [MASK_FLOOR, 0]
FIRST_LAMBDA = 1000.0          # lambda of the very first training step
ETA_RANGE = (0.01, 1.0)
THETA_FLOOR = 0.01
SALIENCY_FILE = "saliency.pt"
SALIENCY_FORMAT = 1


@dataclass
class AdapLeRConfig(SelectionSettings, ControlSettings):
    gamma: float | None = None       # weight of the saliency KL; None: Table 4 for the task
    phi: float | None = None         # weight of the length loss; None: Table 4 for the task
    threshold_lr: float = 5e-4       # learning rate of eta and theta
    predictor_lr: float | None = 1e-3  # learning rate of the CPs; None: the network's (paper)
    eta_init: float = 0.25
    beta: float = 0.1                # slope of the soft mask above the threshold
    init: str = "baseline"           # baseline (fine-tuned weights) | pretrained (the paper's)
    saliency_to_encoder: bool = False  # the KL also trains the encoder (see the docstring)
    saliency_epochs: int = 1         # average the saliency of the baseline's last N epochs
    eta_scale: float = 1.0           # inference: thresholds eta_l * eta_scale / n_l; 0 keeps all
    simulate: bool = False           # infer by masking instead of removing (dense cost)

    def __post_init__(self):
        super().__post_init__()
        if self.saliency_epochs < 1:
            raise ValueError(f"saliency_epochs must be >= 1, got {self.saliency_epochs}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("gamma", "phi"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.threshold_lr < 0:
            raise ValueError(f"threshold_lr must be >= 0, got {self.threshold_lr}")
        if self.predictor_lr is not None and self.predictor_lr < 0:
            raise ValueError(f"predictor_lr must be >= 0, got {self.predictor_lr}")
        if not ETA_RANGE[0] <= self.eta_init <= ETA_RANGE[1]:
            raise ValueError(f"eta_init must be in [{ETA_RANGE[0]}, {ETA_RANGE[1]}], got "
                             f"{self.eta_init}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if self.eta_scale < 0:
            raise ValueError(f"eta_scale must be >= 0, got {self.eta_scale}")


class LengthReduction(nn.Module):
    """The learned thresholds eta (one per layer) and [CLS] amplifications theta (layers 1..)."""

    def __init__(self, layers: int, eta_init: float):
        super().__init__()
        self.eta = nn.Parameter(torch.full((layers,), float(eta_init)))
        self.theta = nn.Parameter(torch.ones(max(0, layers - 1)))

    def theta_of(self, layer: int) -> torch.Tensor | None:
        return self.theta[layer - 1] if layer > 0 else None

    @torch.no_grad()
    def clip(self) -> None:
        self.eta.clamp_(*ETA_RANGE)
        self.theta.clamp_(min=THETA_FLOOR)


def lambda_schedule(epochs: float) -> tuple[int, float, float]:
    """(parts, base, growth) of the code's epoch-switched schedule: lambda = base * growth^k in
    part k of the stage."""
    if epochs == 3:
        return 3, 50.0, 50.0
    if epochs == 10:
        return 10, 10.0, 3.0
    return 5, 10.0, 10.0  # 5 epochs, and the code's fallback for any other count


def annealed_lambda(step: int, total: int, epochs: float) -> float:
    if step == 0:
        return FIRST_LAMBDA
    parts, base, growth = lambda_schedule(epochs)
    return base * growth ** min(parts - 1, step * parts // max(1, total))


def soft_mask(shares: torch.Tensor, delta: torch.Tensor, lam: float, beta: float
              ) -> torch.Tensor:
    """m(s) of methods-spec 5.3: the minimum of the steep line below the threshold and the
    gentle one above it, clipped to [-10000, 0]. `delta` (B, 1)."""
    below = (lam / delta) * (shares - delta) - beta / lam
    above = (shares - 1) * beta / ((1 - delta).clamp_min(1e-6) * lam)
    return torch.minimum(below, above).clamp(MASK_FLOOR, 0.0)


@dataclass
class SoftPass:
    """The training forward's results: output, losses, and each layer's alive mask."""

    output: Output
    saliency: torch.Tensor   # sum_l (L - l) KL(S_hat_l || CP_l), batch mean (0 without targets)
    length: torch.Tensor     # mean_b sum_l sum_i alive_l,i over real tokens
    alive: list[torch.Tensor]  # per layer, after its removal (B, N)


@register("adapler")
class AdapLeR(Method):
    """Contribution predictors drop low-saliency tokens before each layer (ACL 2022)."""

    paper_names = ("AdapLeR",)
    Config = AdapLeRConfig
    kinds = frozenset({CLASSIFICATION})
    needs = ("baseline",)
    inference_settings = ("eta_scale", "simulate")
    # README / run.sh for SST-2, and the fine-tuning table's per-task epochs and batch with
    # lr 3e-5 (methods-spec 5.4); lengths are the tasks' own (SST-2 64, HateXplain 72, ...)
    paper_budgets = {
        "*": dict(lr=3e-5, batch_size=32, epochs=5, warmup_ratio=0.06, weight_decay=0.01),
        "imdb": dict(lr=3e-5, batch_size=16, epochs=5, warmup_ratio=0.06, weight_decay=0.01),
        "mnli": dict(lr=3e-5, batch_size=32, epochs=3, warmup_ratio=0.06, weight_decay=0.01),
        "dbpedia": dict(lr=3e-5, batch_size=32, epochs=3, warmup_ratio=0.06, weight_decay=0.01),
        "mrpc": dict(lr=3e-5, batch_size=32, epochs=10, warmup_ratio=0.06, weight_decay=0.01),
        "cola": dict(lr=3e-5, batch_size=32, epochs=10, warmup_ratio=0.06, weight_decay=0.01),
    }

    def __init__(self, config: AdapLeRConfig):
        super().__init__(config)
        self._saliency: torch.Tensor | None = None   # (rows by example_index, max length)
        self._lambda = FIRST_LAMBDA                   # the training mask's sharpness now

    @classmethod
    def configure(cls, config: AdapLeRConfig, task: Task) -> AdapLeRConfig:
        """Fill gamma and phi in from the paper's Table 4 (SST-2's values for other tasks)."""
        gamma, phi = PAPER_WEIGHTS.get(task.key, DEFAULT_WEIGHTS)
        return replace(config, gamma=gamma if config.gamma is None else config.gamma,
                       phi=phi if config.phi is None else config.phi)

    def build(self, ctx: Context):
        if self.config.init == "baseline":
            if "baseline" not in ctx.needs:
                raise ValueError("init=baseline starts from the fine-tuned baseline run, which "
                                 "this context lacks; use init=pretrained")
            model = self.baseline_model(ctx)
        else:
            model = super().build(ctx)
        config = model.encoder.config
        model.contribution_predictors = nn.ModuleList(
            TokenScorer(config.hidden_size, config.initializer_range)
            for _ in model.layers)
        model.length_reduction = LengthReduction(len(model.layers), self.config.eta_init)
        return model

    def stages(self, ctx: Context):
        [stage] = super().stages(ctx)

        def on_step(model: nn.Module, step: int, total: int) -> None:
            # before each step (and once after the last): clip what the last step moved, then
            # set this step's sharpness
            model.length_reduction.clip()
            self._lambda = annealed_lambda(step, total, stage.epochs)

        return [replace(stage, name="adapler",
                        losses={"task": 1.0, "saliency": self.config.gamma,
                                "length": self.config.phi},
                        param_lrs={"length_reduction.": self.config.threshold_lr,
                                   **({"contribution_predictors.": self.config.predictor_lr}
                                      if self.config.predictor_lr is not None else {})},
                        on_step=on_step)]

    # -- saliency (the CPs' teacher) -----------------------------------------------------------

    def prepare(self, model: nn.Module, ctx: Context, features: list[dict], log) -> None:
        """Gradient x input saliency of the fine-tuned baseline for every training feature,
        averaged over its last `saliency_epochs` epochs, cached in the run directory."""
        teachers = baseline_epochs(ctx.needs["baseline"], self.config.saliency_epochs)
        fingerprint = _fingerprint(teachers, features)
        path = ctx.run_dir / SALIENCY_FILE if ctx.run_dir is not None else None
        if path is not None and path.is_file():
            cached = torch.load(path, map_location="cpu")
            if cached.get("fingerprint") == fingerprint:
                self._saliency = cached["saliency"]
                log(f"saliency: reusing {path} ({len(features)} features)")
                return
        started = time.perf_counter()
        teacher = Method.build(self, ctx)
        maps = []
        for weights in teachers:
            teacher.load_state_dict(torch.load(weights, map_location="cpu"))
            maps.append(compute_saliency(teacher.eval(), features, ctx.budget.batch_size))
        # rows by example_index: training batches look their targets up by it
        by_feature = torch.stack(maps).mean(dim=0)
        self._saliency = by_feature.new_zeros(
            max(f["example_index"] for f in features) + 1, by_feature.shape[1])
        self._saliency[torch.tensor([f["example_index"] for f in features])] = by_feature
        log(f"saliency: {len(features)} features from the fine-tuned baseline's "
            f"{', '.join(p.name for p in teachers)} in {time.perf_counter() - started:.1f}s")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"format": SALIENCY_FORMAT, "fingerprint": fingerprint,
                        "saliency": self._saliency}, tmp)
            tmp.replace(path)

    def _targets(self, batch: dict) -> torch.Tensor:
        if self._saliency is None:
            raise RuntimeError("adapler: no saliency maps; prepare() computes them before "
                               "training")
        rows = self._saliency[batch["example_index"].cpu()]
        length = batch["input_ids"].shape[1]
        if rows.shape[1] < length:
            rows = F.pad(rows, (0, length - rows.shape[1]))
        rows = rows[:, :length].to(batch["input_ids"].device)
        return rows * batch["attention_mask"].to(rows.dtype)

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, model, batch: dict) -> Output:
        if model.training:
            return self._soft(model, batch, self._lambda).output
        return self._hard(model, batch, simulate=self.config.simulate)

    def losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        result = self._soft(model, batch, self._lambda, self._targets(batch))
        return {"task": task_loss(model.kind, result.output.logits, batch),
                "saliency": result.saliency, "length": result.length}

    def _soft(self, model, batch: dict, lam: float, targets: torch.Tensor | None = None
              ) -> SoftPass:
        """Every token through every layer under the soft removal mask (methods-spec 5.3):
        the training forward. Adding the cumulative mask m to a key's attention score equals
        multiplying its probability by alive = exp(m) and renormalising, which is what
        `attention_layer` does with `key_weights=alive`."""
        beta = self.config.beta
        lengths = model.length_reduction
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        layers = len(model.layers)
        real = batch["attention_mask"].to(hidden.dtype)
        pads = additive_mask(batch["attention_mask"], hidden.dtype)
        not_cls = torch.ones_like(real)
        not_cls[:, 0] = 0
        floor = torch.full_like(real, MASK_FLOOR)
        # log alive: 0 = kept, MASK_FLOOR = gone (pads from the start); [CLS] stays 0
        log_alive = torch.where(real > 0, torch.zeros_like(real), floor)
        log_alive_len = log_alive  # the same values on the length loss's gradient path
        saliency = hidden.new_zeros(())
        length_loss = hidden.new_zeros(batch_size)
        alive_per_layer = []
        for index, (layer, predictor) in enumerate(
                zip(model.layers, model.contribution_predictors, strict=True)):
            eta, theta = lengths.eta[index], lengths.theta_of(index)
            logits = predictor(hidden)
            # theta_d = theta / theta.detach() = 1 multiplies the [CLS] share: d/dtheta is
            # d/dtheta_d / theta (paper Appendix B)
            cls_boost = (torch.log(theta) - torch.log(theta.detach()) if theta is not None
                         else None)
            if targets is not None:
                kl_logits = logits if self.config.saliency_to_encoder else \
                    predictor(hidden.detach())
                saliency = saliency + (layers - index) * _inclusive_kl(
                    targets, kl_logits, log_alive.detach(),
                    None if theta is None else theta.detach())
            new_log_alive = []
            for scores, current in ((logits, log_alive), (logits.detach(), log_alive_len)):
                scored = scores + current
                if cls_boost is not None:
                    scored = torch.cat([scored[:, :1] + cls_boost, scored[:, 1:]], dim=1)
                shares = scored.softmax(dim=-1)
                alive = current.exp()
                count = 1 + (alive * real * not_cls).sum(dim=1, keepdim=True)
                m = soft_mask(shares, eta / count, lam, beta) * not_cls
                new_log_alive.append((current + m).clamp_min(MASK_FLOOR))
            log_alive, log_alive_len = new_log_alive
            alive = log_alive.exp()
            hidden, _ = attention_layer(layer, hidden, pads, alive, renormalise=True)
            length_loss = length_loss + (log_alive_len.exp() * real).sum(dim=1)
            alive_per_layer.append(alive)
        extra = torch.full((batch_size,), model.head_macs(length)
                           + layers * length * TokenScorer.macs(model.hidden_size))
        output = Output(model.logits(hidden), Trace.dense(batch_size, length, layers, extra))
        return SoftPass(output, saliency, length_loss.mean(), alive_per_layer)

    def _hard(self, model, batch: dict, simulate: bool = False,
              kept: list[torch.Tensor] | None = None) -> Output:
        """Inference: before each layer the CP scores the alive tokens; those under
        eta_l * eta_scale / n_l leave the tensor (or are masked, `simulate`), [CLS] stays.
        `kept`, when given, receives each layer's per-row count of real tokens it runs on."""
        hidden = model.embed(batch)
        batch_size, length = batch["input_ids"].shape
        tokens = Tokens.start(hidden, batch["attention_mask"])
        eta = model.length_reduction.eta * self.config.eta_scale
        per_token = TokenScorer.macs(model.hidden_size)
        widths, extra = [], model.head_macs(length)
        for index, (layer, predictor) in enumerate(
                zip(model.layers, model.contribution_predictors, strict=True)):
            extra += tokens.width * per_token
            logits = predictor(tokens.hidden).masked_fill(~tokens.attend, -math.inf)
            shares = logits.softmax(dim=-1)
            count = tokens.attend.sum(dim=1, keepdim=True)
            keep = shares >= eta[index] / count
            keep[:, 0] = True  # slot 0 is [CLS] in every row
            keep = decide_tokens(keep, tokens, index, shares * count)
            tokens = tokens.masked(keep) if simulate else tokens.keep(keep)
            if kept is not None:
                kept.append(tokens.attend.sum(dim=1))
            tokens = replace(tokens, hidden=layer(tokens.hidden, tokens.mask()))
            widths.append(tokens.width)
        trace = Trace.of_widths(widths, batch_size, extra)
        return Output(model.logits(tokens.hidden), trace)


def _inclusive_kl(targets: torch.Tensor, logits: torch.Tensor, log_alive: torch.Tensor,
                  theta: torch.Tensor | None) -> torch.Tensor:
    """KL(S_hat || CP) averaged over the rows with any target mass: S_hat is the saliency on
    the alive tokens, [CLS] scaled by theta, renormalised; CP the predictor's distribution
    over the alive tokens. Nothing here carries a gradient but the CP logits."""
    target = targets * log_alive.exp()
    if theta is not None:
        target = torch.cat([target[:, :1] * theta, target[:, 1:]], dim=1)
    mass = target.sum(dim=1, keepdim=True)
    valid = mass.squeeze(1) > 0
    target = target / mass.clamp_min(torch.finfo(target.dtype).tiny)
    log_cp = (logits + log_alive).log_softmax(dim=-1)
    present = target > 0
    terms = torch.where(present, target * (target.clamp_min(1e-30).log() - log_cp),
                        torch.zeros_like(target))
    per_row = terms.sum(dim=1)
    return (per_row * valid).sum() / valid.sum().clamp_min(1)


def baseline_epochs(run_dir: Path, count: int) -> list[Path]:
    """The weights of a baseline run's last `count` epochs, the final one first."""
    run_dir = Path(run_dir)
    earlier = sorted(run_dir.glob("checkpoint/epoch-*.pt"),
                     key=lambda p: int(p.stem.split("-")[1]), reverse=True)
    found = [run_dir / CHECKPOINT, *earlier]
    if count > len(found):
        raise UsageError(f"adapler: saliency_epochs={count} needs the baseline's last {count} "
                         f"epochs, but {run_dir} keeps {len(found)}; train the baseline for "
                         f"more epochs or use a smaller saliency_epochs")
    return found[:count]


def _fingerprint(teachers: list[Path], features: list[dict]) -> str:
    """What the saliency maps depend on: the teachers' weights and the training features."""
    digest = hashlib.sha1()
    for weights in teachers:
        stat = weights.stat()
        digest.update(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for feature in features:
        digest.update(f"{feature['example_index']}:{feature['labels']}:".encode())
        digest.update(",".join(map(str, feature["input_ids"])).encode())
        digest.update(b";")
    return digest.hexdigest()
