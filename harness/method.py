"""The method adapter protocol (DESIGN 5) and the registry methods add themselves to.

A method is one file in `methods/`: a config dataclass with the paper's defaults, `build` (the
model), `stages` (its training schedule) and `forward` (logits + Trace). Everything else, data,
heads, optimiser, evaluation and records, belongs to the harness.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from skimbench.backbone import Backbone
from skimbench.errors import UsageError, did_you_mean
from skimbench.model import Output, TaskModel, task_loss
from skimbench.profiles import Budget
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, REGRESSION, Task
from skimbench.trainer import Stage

ALL_KINDS = frozenset({CLASSIFICATION, REGRESSION, EXTRACTIVE_QA})
CHECKPOINT = "checkpoint/model.pt"  # a finished run's trained weights, inside its directory


def load_checkpoint(model: nn.Module, run_dir: Path) -> nn.Module:
    """Load a finished run's trained weights into a model of the same shape."""
    model.load_state_dict(torch.load(run_dir / CHECKPOINT, map_location="cpu"))
    return model


@dataclass
class MethodConfig:
    """Settings a method exposes to `--set`; subclasses add fields with the paper's defaults."""


INITS = ("pretrained", "baseline")


@dataclass
class InitSettings(MethodConfig):
    """Where a method that fine-tunes the whole backbone starts: the pre-trained backbone (the
    papers) or the task's fine-tuned baseline (cheaper: the model only adapts to the method)."""

    init: str = "pretrained"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


CONTROLS = ("random", "random-baseline")


@dataclass
class ControlSettings(MethodConfig):
    """The random-removal controls of a learned token-removal method (skimbench.controls), both
    inference settings: `control` makes this run evaluate a control instead of the method;
    `controls` records both controls beside the method's own metrics."""

    control: str = "none"   # none | random | random-baseline
    controls: bool = True


CONTROL_SETTINGS = ("control", "controls")


@dataclass
class Context:
    """What the harness hands a method when it builds: backbone, task, budget, prerequisites."""

    backbone: Backbone
    task: Task
    budget: Budget
    needs: dict[str, Path]         # e.g. {"baseline": <finished baseline run dir>}
    run_dir: Path | None = None    # this run's directory: caches of costly preparation


class Method:
    key: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    kinds: ClassVar[frozenset[str]] = ALL_KINDS      # task kinds supported
    needs: ClassVar[tuple[str, ...]] = ()             # "baseline": the fine-tuned baseline run
    status: ClassVar[str] = "ready"
    executed: ClassVar[bool] = True                   # computes exactly what its trace says
    attn_implementation: ClassVar[str] = "sdpa"
    # settings that only change inference: a run differing from a finished one only in these
    # reuses that run's trained weights instead of training again (threshold sweeps)
    inference_settings: ClassVar[tuple[str, ...]] = ()
    # the `method` names of its figures in paper-numbers.csv (the report's paper-table re-make)
    paper_names: ClassVar[tuple[str, ...]] = ()
    # the method's own training recipe per task key ("*": any task) under `--profile paper`
    paper_budgets: ClassVar[dict[str, dict]] = {}
    # keep the weights of every epoch before the last as checkpoint/epoch-<k>.pt (the
    # baseline: a teacher averaged over epochs)
    keeps_epochs: ClassVar[bool] = False
    # what the random control shuffles (a ControlSettings method): "token", the kept tokens of
    # each example at the method's own counts; "example", whole schedules between examples
    # (DeeBERT's exit layers: the same exit-layer histogram)
    control_unit: ClassVar[str] = "token"

    def __init__(self, config: MethodConfig):
        self.config = config

    @property
    def controlled(self) -> bool:
        """Has random-removal controls (its config takes ControlSettings)."""
        return isinstance(self.config, ControlSettings)

    def inference_keys(self) -> tuple[str, ...]:
        """Settings that change only inference: the method's own and the controls'."""
        return self.inference_settings + (CONTROL_SETTINGS if self.controlled else ())

    @classmethod
    def configure(cls, config: MethodConfig, task: Task) -> MethodConfig:
        """Settings whose default depends on the task (e.g. a per-task loss weight)."""
        return config

    @classmethod
    def paper_budget(cls, task: Task) -> dict:
        return cls.paper_budgets.get(task.key, cls.paper_budgets.get("*", {}))

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check_backbone(self, config) -> None:
        """Raise ValueError for settings this backbone (its HF config) cannot take."""

    def build(self, ctx: Context) -> nn.Module:
        """The model to train; by default the plain task model on the backbone."""
        torch.manual_seed(0)
        encoder = ctx.backbone.encoder(self.attn_implementation)
        return TaskModel(encoder, ctx.task.kind, ctx.task.num_labels)

    def baseline_model(self, ctx: Context) -> TaskModel:
        """The fine-tuned baseline of this task and backbone (for `needs = ("baseline",)`)."""
        return load_checkpoint(Method.build(self, ctx), ctx.needs["baseline"])

    def teacher_model(self, ctx: Context) -> TaskModel:
        """The fine-tuned baseline as a distillation teacher: in eval mode, nothing trainable."""
        return self.baseline_model(ctx).eval().requires_grad_(False)

    def initial_model(self, ctx: Context) -> TaskModel:
        """The model training starts from, per the config's `init` (InitSettings)."""
        if getattr(self.config, "init", "pretrained") == "baseline":
            return self.baseline_model(ctx)
        return Method.build(self, ctx)

    def record_notes(self) -> list[str]:
        """Caveats every record of this run carries, e.g. a stage of the paper that was not
        run; none by default."""
        return []

    def prepare(self, model: nn.Module, ctx: Context, features: list[dict], log) -> None:
        """Work on the training features before the first stage (e.g. a teacher's saliency
        maps); skipped when the trained weights are reused."""

    def stages(self, ctx: Context) -> list[Stage]:
        """One fine-tuning stage from the budget; multi-stage methods override."""
        b = ctx.budget
        return [Stage("finetune", epochs=b.epochs, max_steps=b.max_steps, lr=b.lr,
                      batch_size=b.batch_size, warmup_ratio=b.warmup_ratio,
                      weight_decay=b.weight_decay, grad_clip=b.grad_clip)]

    def forward(self, model: nn.Module, batch: dict) -> Output:
        return model(batch)

    def clear_precomputed(self) -> None:
        """Drop work cached across forwards (Trace.precomputed_macs), so that the next forwards
        rebuild what they read: how the harness times the "total" cost. No cache: nothing."""

    def precomputed_size(self) -> dict | None:
        """The cache's size, {"entries": n, "bytes": b}, or None for a method without one."""
        return None

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Named losses the stages weight; the task loss is always `task`."""
        output = self.forward(model, batch)
        return {"task": task_loss(model.kind, output.logits, batch)}


_METHODS: dict[str, type[Method]] = {}


def register(key: str):
    """Class decorator: make a Method available under `key`."""

    def add(cls: type[Method]) -> type[Method]:
        if key in _METHODS and _METHODS[key] is not cls:
            raise RuntimeError(f"method {key!r} registered twice")
        cls.key = key
        _METHODS[key] = cls
        return cls

    return add


def _import_methods() -> None:
    """Import every module of skimbench.methods, so each registers itself."""
    import skimbench.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def methods() -> dict[str, type[Method]]:
    _import_methods()
    return dict(sorted(_METHODS.items()))


def get_method(key: str) -> type[Method]:
    available = methods()
    if key not in available:
        raise did_you_mean("method", key, available, "methods")
    return available[key]


def check_supports(method: type[Method], task: Task) -> None:
    if task.kind not in method.kinds:
        raise UsageError(f"method {method.key!r} does not support {task.kind} tasks like "
                         f"{task.key!r}; it supports {', '.join(sorted(method.kinds))} "
                         "(see `skimbench list methods`)")
