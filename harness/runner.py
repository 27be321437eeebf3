"""`skimbench run`: resolve a run, train it (or reuse it), evaluate it, write its directory.

    results/runs/<task>/<method>/<run-id>/
      config.json  status.json  record.json  predictions.jsonl  env.json  log.txt  checkpoint/

A finished run with the same resolved config is skipped; a failed or interrupted one is marked
`failed` / `partial` in status.json and resumes from its last finished training stage.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from skimbench import __version__
from skimbench.backbone import Backbone, resolve_backbone
from skimbench.controls import (
    CONTROL_PADDING,
    check_control,
    diagnostics,
    evaluate_control,
    run_controls,
)
from skimbench.data import FileLog, data_dir_from
from skimbench.decisions import Observed, Recorder
from skimbench.errors import UsageError
from skimbench.evaluate import Evaluation, evaluate
from skimbench.features import encode, padding_modes
from skimbench.flops import DEFAULT_COUNTER, check_counter
from skimbench.hub import go_offline_if_unreachable
from skimbench.measure import measure_mode
from skimbench.method import (
    CHECKPOINT,
    CONTROLS,
    Context,
    Method,
    check_supports,
    get_method,
    load_checkpoint,
)
from skimbench.profiles import BUDGET_KEYS, Budget, budget_for
from skimbench.records import (
    RunRecord,
    environment,
    read_json,
    set_status,
    status_of,
    write_atomic,
    write_json,
)
from skimbench.selection import hold_out, select_checkpoint, selects
from skimbench.tasks import OFFLINE_SPLIT_SEED, Task, data_source, get_task, load_task_data
from skimbench.timing import PeakRSS
from skimbench.trainer import save_state, train

BASELINE = "baseline"
# a method's own training recipe: overriding these never changes its prerequisites' training
RECIPE_KEYS = frozenset({"epochs", "lr", "batch_size", "warmup_ratio", "weight_decay",
                         "grad_clip"})


@dataclass
class RunSpec:
    """What the user asked for (CLI flags); `resolve` fills in every default."""

    method: str
    task: str
    backbone: str | None = None            # None: the profile's backbone
    profile: str = "ci"
    seed: int = 42
    padding: str = "all"
    overrides: dict[str, str] = field(default_factory=dict)
    out: Path = Path("results")
    data_dir: Path | str | None = None
    run_id: str | None = None
    overwrite: bool = False
    counter: str = DEFAULT_COUNTER         # FLOPs counter that cross-checks the traces
    threads: int | None = None             # torch threads (default: torch's, physical cores)


@dataclass
class ResolvedRun:
    spec: RunSpec
    method: Method
    task: Task
    backbone: Backbone
    budget: Budget
    paddings: tuple[str, ...]
    run_dir: Path

    def config(self) -> dict:
        """The resolved config: two runs with equal configs are the same run."""
        return {"skimbench": __version__, "method": self.method.key, "task": self.task.key,
                "backbone": self.backbone.name, "profile": self.spec.profile,
                "seed": self.spec.seed, "padding": list(self.paddings),
                "budget": asdict(self.budget), "method_config": asdict(self.method.config),
                "overrides": dict(sorted(self.spec.overrides.items())),
                # only a non-default counter is named, so the protocol's default run keeps
                # one identity whichever counter list the version offers
                **({"counter": self.spec.counter} if self.spec.counter != DEFAULT_COUNTER
                   else {})}


def _parse_value(key: str, raw: str, annotation: str):
    """Convert a --set string to the field's declared type, or say what the field takes."""
    kinds = [part.strip() for part in str(annotation).split("|")]
    if raw.lower() in ("none", "null") and "None" in kinds:
        return None
    for kind in kinds:
        try:
            if kind == "bool":
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
            elif kind == "int":
                return int(raw)
            elif kind == "float":
                return float(raw)
            elif kind == "str":
                return raw
            elif kind.startswith("tuple"):
                return tuple(float(v) if "float" in kind else int(v) if "int" in kind else v
                             for v in raw.split(","))
        except ValueError:
            continue
    raise UsageError(f"invalid --set {key}={raw}: {key} takes {annotation}")


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"invalid --set {pair!r}: write key=value, e.g. --set lr=3e-5")
        out[key.strip()] = value.strip()
    return out


def _apply_overrides(overrides: dict[str, str], budget: Budget, method_cls: type[Method]):
    method_fields = {f.name: f.type for f in fields(method_cls.Config)}
    budget_fields = {f.name: f.type for f in fields(Budget)}
    budget_changes, method_changes = {}, {}
    for key, raw in overrides.items():
        if key in method_fields:
            method_changes[key] = _parse_value(key, raw, method_fields[key])
        elif key in budget_fields and key != "backbone":
            budget_changes[key] = _parse_value(key, raw, budget_fields[key])
        else:
            valid = sorted(set(method_fields) | (set(BUDGET_KEYS) - {"backbone"}))
            raise UsageError(f"unknown --set key {key!r} for method {method_cls.key!r}: valid "
                             f"keys are {', '.join(valid)}")
    try:
        config = method_cls.Config(**method_changes)
        budget = replace(budget, **budget_changes)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid --set for method {method_cls.key!r}: {exc}") from None
    return budget, config


def default_run_id(profile: str, backbone: Backbone, seed: int, overrides: dict,
                   padding: str = "all") -> str:
    run_id = f"{profile}-{backbone.slug}-s{seed}"
    if padding != "all":
        run_id += f"-{padding}"
    if overrides:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
        run_id += f"-{digest}"
    return run_id


def resolve(spec: RunSpec) -> ResolvedRun:
    """Validate every name and setting before anything is written or trained."""
    go_offline_if_unreachable()
    method_cls = get_method(spec.method)
    task = get_task(spec.task)
    check_supports(method_cls, task)
    budget = budget_for(spec.profile, task)
    if spec.profile == "paper":
        budget = replace(budget, **method_cls.paper_budget(task))
    paddings = padding_modes(spec.padding)
    check_counter(spec.counter)
    if spec.threads is not None and spec.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {spec.threads}")
    budget, config = _apply_overrides(spec.overrides, budget, method_cls)
    config = method_cls.configure(config, task)
    backbone = resolve_backbone(spec.backbone or budget.backbone)
    # a hub name that cannot be loaded, or settings the backbone cannot take, fail here,
    # before any file is written
    method = method_cls(config)
    try:
        method.check_backbone(backbone.config())
    except ValueError as exc:
        raise UsageError(f"invalid setting for method {method_cls.key!r} on backbone "
                         f"{backbone.name!r}: {exc}") from None
    try:
        check_control(method, paddings)
    except ValueError as exc:
        raise UsageError(f"invalid --set for method {method_cls.key!r}: {exc}") from None
    budget = replace(budget, backbone=backbone.name)
    run_id = spec.run_id or default_run_id(spec.profile, backbone, spec.seed, spec.overrides,
                                           spec.padding)
    run_dir = Path(spec.out) / "runs" / task.key / method_cls.key / run_id
    return ResolvedRun(spec, method, task, backbone, budget, paddings, run_dir)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _training_identity(config: dict, inference_settings: tuple[str, ...]) -> dict:
    """A run's config without what leaves training unchanged: padding modes, counter,
    the override spelling and the method's inference-only settings."""
    kept = {k: v for k, v in config.items() if k not in ("padding", "overrides", "counter")}
    kept["method_config"] = {k: v for k, v in config.get("method_config", {}).items()
                             if k not in inference_settings}
    return kept


def trained_donor(run_dir: Path, config: dict, method: Method) -> Path | None:
    """A finished sibling run that trained exactly this model: a run differing only in
    inference settings (a threshold sweep) reuses its weights."""
    if not method.inference_keys() or not run_dir.parent.is_dir():
        return None
    wanted = _training_identity(config, method.inference_keys())
    for other in sorted(run_dir.parent.iterdir()):
        if (other == run_dir or status_of(other) != "finished"
                or not (other / CHECKPOINT).is_file() or not (other / "config.json").is_file()):
            continue
        if _training_identity(read_json(other / "config.json"),
                              method.inference_keys()) == wanted:
            return other
    return None


def _subset(items: list, limit: int | None) -> list:
    """A fixed seeded sample (same for every run seed), kept in data set order."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(OFFLINE_SPLIT_SEED).sample(range(len(items)), limit))
    return [items[i] for i in keep]


class Logger:
    """Prints progress lines and appends them to the run's log.txt."""

    def __init__(self, path: Path, echo):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.echo(line)


def run(spec: RunSpec, echo=print) -> Path:
    """Train and evaluate one run (reusing a finished one); returns its directory."""
    resolved = resolve(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)  # pinned for training and timing; in env.json
    run_dir, config = resolved.run_dir, resolved.config()
    data_dir = data_dir_from(spec.data_dir)
    data_source(resolved.task, data_dir)  # no data: fail before anything is written
    config_path = run_dir / "config.json"
    if config_path.is_file():
        differences = _diff(read_json(config_path), config)
        if differences and not spec.overwrite:
            raise UsageError(f"run directory {run_dir} exists with a different config "
                             f"({'; '.join(differences[:3])}): pass --run-id NEW or --overwrite")
        if not differences and status_of(run_dir) == "finished":
            echo(f"{run_dir}: already finished with this config, reusing it")
            return run_dir
        if differences:  # --overwrite: stale checkpoints must not be resumed
            for stale in [*(run_dir / "checkpoint").glob("*.pt"), run_dir / TRAINED]:
                stale.unlink(missing_ok=True)
    wanted = set(resolved.method.needs)
    if resolved.method.key != BASELINE:
        wanted.add(BASELINE)  # every speedup is against the baseline, in the same mode
    # prerequisites are shared by every padding mode: always the full (`all`) run. Overrides of
    # the data, lengths, evaluation and the max_steps cap apply to them too; the method's
    # settings and its training recipe (epochs, lr, ...) do not
    method_keys = {f.name for f in fields(resolved.method.Config)}
    budget_overrides = {k: v for k, v in spec.overrides.items()
                        if k not in method_keys and k not in RECIPE_KEYS}
    needs = {need: run(RunSpec(method=need, task=spec.task, backbone=resolved.backbone.name,
                               profile=spec.profile, seed=spec.seed, out=spec.out,
                               data_dir=spec.data_dir, overrides=budget_overrides), echo)
             for need in sorted(wanted)}
    write_json(config_path, config)
    set_status(run_dir, "running")
    log = Logger(run_dir / "log.txt", echo)
    try:
        _execute(resolved, data_dir, needs, log)
    except KeyboardInterrupt:
        set_status(run_dir, "partial", reason="interrupted")
        raise
    except Exception as exc:
        set_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    set_status(run_dir, "finished")
    return run_dir


CONTROL_NOTE = ("control={control}: the method's keep decisions replaced by random ones at its "
                "own per-example, per-layer counts (same MACs); not timed")

# the training summary beside the trained weights: a run that stops after training resumes
# at evaluation
TRAINED = "checkpoint/trained.json"


# what an evaluation depends on besides the weights, the task and its data
EVAL_BUDGET_KEYS = ("max_eval_examples", "max_length", "doc_stride", "max_query_length",
                    "eval_batch_size")


def recorded_evaluation(run_dir: Path, padding: str, budget: Budget, split: str,
                        num_features: int) -> Evaluation | None:
    """A finished run's own evaluation in one padding mode (metrics and MACs, read back from
    record.json and predictions.jsonl), when it evaluated exactly this eval set: the baseline
    is then not evaluated again in every method run. None when anything differs."""
    run_dir = Path(run_dir)
    try:
        record = read_json(run_dir / "record.json")
        config = read_json(run_dir / "config.json")
        mode = record["padding"][padding]
        if (record["split"] != split or record["num_eval_features"] != num_features
                or any(config["budget"][key] != getattr(budget, key)
                       for key in EVAL_BUDGET_KEYS)):
            return None
        with (run_dir / "predictions.jsonl").open(encoding="utf-8") as rows:
            macs = sum(json.loads(line)["macs_by_padding"][padding] for line in rows)
        return Evaluation(padding, mode["metrics"], mode["metric_ci"], [], macs,
                          positions=0, seconds=0.0)
    except (OSError, ValueError, KeyError):  # not finished, or written by an older version
        return None


def _select(r: ResolvedRun, model, candidates: list[Path], baseline, base_model,
            examples: list, features: list[dict], max_length: int, log) -> dict:
    """Keep the fastest epoch within tolerance on the held-out examples (skimbench.selection);
    the summary names every candidate's metric and speedup."""
    chosen, rows = select_checkpoint(
        r.method, model, candidates, baseline, base_model, r.task, examples, features,
        r.budget.eval_batch_size, max_length, r.method.config.select_tolerance)
    metric = r.task.main_metric
    for row in rows:
        log(f"selection: {row['checkpoint']} {metric} {row[metric]:.2f} (baseline "
            f"{row['baseline_' + metric]:.2f}), FLOPs speedup {row['flops_speedup']:.2f}x"
            + (" <- kept" if row["chosen"] else ""))
    return {"stage": "selection", "held_out_train_examples": len(examples),
            "tolerance": r.method.config.select_tolerance, "kept": chosen.name,
            "candidates": rows}


def _execute(r: ResolvedRun, data_dir: Path | None, needs: dict[str, Path], log) -> None:
    task, budget, method, run_dir = r.task, r.budget, r.method, r.run_dir
    log(f"run {method.key} on {task.key} ({r.spec.profile}, {r.backbone.name}, "
        f"seed {r.spec.seed}) -> {run_dir}")
    files = FileLog()
    data = load_task_data(task, data_dir, files)
    train_examples = _subset(data.train, budget.max_train_examples)
    eval_examples = _subset(data.eval, budget.max_eval_examples)
    ctx = Context(r.backbone, task, budget, needs, run_dir)
    stages = method.stages(ctx)
    if stages and method.keeps_epochs:
        stages[-1] = replace(stages[-1], save_epochs=True)
    # checkpoint selection needs two epochs or more to choose from, and data held out to choose
    select_examples = []
    if (stages and selects(method.config)
            and len(stages[-1].epoch_ends(len(train_examples))) > 1):
        train_examples, select_examples = hold_out(train_examples,
                                                   method.config.select_examples)
        stages[-1] = replace(stages[-1], save_epochs=True)
    tokenizer = r.backbone.tokenizer()
    max_length = budget.max_length or task.max_length
    encode_args = dict(max_length=max_length, doc_stride=budget.doc_stride,
                       max_query_length=budget.max_query_length)
    train_features = encode(task, train_examples, tokenizer, **encode_args)
    started = time.perf_counter()
    eval_features = encode(task, eval_examples, tokenizer, **encode_args)
    tokenize_seconds = time.perf_counter() - started
    log(f"data ({data.source}): {data.split}; {len(train_examples)} train examples "
        f"({len(train_features)} features), {len(eval_examples)} eval examples "
        f"({len(eval_features)} features)")

    torch.manual_seed(r.spec.seed)
    model = method.build(ctx)
    checkpoint = run_dir / CHECKPOINT
    baseline = base_model = None
    if method.key != BASELINE:
        baseline = get_method(BASELINE)(get_method(BASELINE).Config())
        base_model = load_checkpoint(baseline.build(ctx), needs[BASELINE]).eval()
    started = time.perf_counter()
    donor = trained_donor(run_dir, r.config(), method)
    earlier = read_json(run_dir / TRAINED) if (run_dir / TRAINED).is_file() else None
    if earlier is not None and checkpoint.is_file():
        # an earlier attempt of this very run finished training and stopped later (in
        # evaluation): its weights are kept, not trained again
        load_checkpoint(model, run_dir).eval()
        summaries = earlier["train"]
        log(f"training skipped: {checkpoint} holds the weights an earlier attempt of this run "
            "trained before it stopped")
    elif donor is not None:
        load_checkpoint(model, donor).eval()
        summaries = [{"stage": "reused", "weights_from": str(donor)}]
        needs = {**needs, "trained_weights": donor}
        log(f"training skipped: {donor} trained the same model (only inference settings "
            "differ); reusing its weights")
    else:
        method.prepare(model, ctx, train_features, log)
        summaries = train(model, stages, train_features, method.losses, r.spec.seed,
                          checkpoint.parent, log, budget.group_by_length)
        # the stage files are temporary: the record names what stays
        last_stage = summaries[-1] if summaries else {}
        epochs = [Path(p) for p in last_stage.pop("epoch_checkpoints", [])]
        if select_examples:
            summaries.append(_select(r, model, epochs, baseline, base_model, select_examples,
                                     encode(task, select_examples, tokenizer, **encode_args),
                                     max_length, log))
        if method.keeps_epochs:  # the earlier epochs stay beside the final weights
            for k, path in enumerate(epochs[:-1], start=1):
                path.replace(checkpoint.parent / f"epoch-{k}.pt")
            last_stage["earlier_epochs"] = [f"checkpoint/epoch-{k}.pt"
                                               for k in range(1, len(epochs))]
    train_seconds = (earlier["train_seconds"] if earlier is not None and checkpoint.is_file()
                     else time.perf_counter() - started)
    save_state(model, checkpoint)
    write_json(run_dir / TRAINED, {"train": summaries, "train_seconds": train_seconds})
    for stage_file in checkpoint.parent.glob("stage-*.pt"):
        stage_file.unlink()

    evaluations, base_evaluations, measured = {}, {}, {}
    control = check_control(method, r.paddings)
    with_controls = method.controlled and control is None and method.config.controls
    recorders: dict[str, Recorder] = {}
    for padding in r.paddings:
        args = (task, eval_examples, eval_features, padding, budget.eval_batch_size, max_length)
        recorded = control is not None or (with_controls and padding == CONTROL_PADDING)
        with PeakRSS() as memory:
            recorder = recorders[padding] = Recorder() if recorded else None
            e = evaluations[padding] = evaluate(
                Observed(method, recorder) if recorded else method, model, *args)
            if control is not None:  # this run is the control: replay the recorded counts
                e = evaluations[padding] = evaluate_control(
                    control, method, model, base_model, recorder, r.spec.seed, *args)
        base = base_evaluations[padding] = None if baseline is None else (
            recorded_evaluation(needs[BASELINE], padding, budget, data.split, len(eval_features))
            or evaluate(baseline, base_model, *args))
        m = measured[padding] = measure_mode(method, model, baseline, base_model, eval_features,
                                             padding, budget, max_length, e, base,
                                             memory.peak_mb, r.spec.counter,
                                             timed=control is None)
        log(f"[{padding}] {task.main_metric} {e.metrics[task.main_metric]:.2f}, "
            f"MACs/example {m.macs_per_example:.3e}, FLOPs speedup {m.flops_speedup:.2f}x"
            + (f", CPU time speedup {m.cpu_time_speedup:.2f}x" if control is None else
               f" ({control} control: not timed)")
            + (f" (oracle {m.oracle_speedup:.2f}x)" if m.oracle_speedup else "")
            + (" [MACs MISMATCH vs counter]" if m.macs_mismatch else ""))
    controls = predictor = None
    if with_controls and CONTROL_PADDING in recorders:
        own, args = evaluations[CONTROL_PADDING], (task, eval_examples, eval_features)
        controls = run_controls(method, model, base_model, own, recorders[CONTROL_PADDING],
                                base_evaluations[CONTROL_PADDING].macs_sum, r.spec.seed, *args,
                                budget.eval_batch_size, max_length)
        predictor = diagnostics(recorders[CONTROL_PADDING], base_model, task, eval_features,
                                budget.eval_batch_size)
        for name in CONTROLS:
            value, (low, high) = (controls[name]["lift"][task.main_metric],
                                  controls[name]["lift_ci"][task.main_metric])
            log(f"lift over {name} removal: {value:+.2f} {task.main_metric} points "
                f"(95% CI {low:+.2f} to {high:+.2f})")
        for row in (predictor or {}).get("layers", []):
            log(f"layer {row['layer']}: keep-score AUC "
                + ("n/a" if row["auc"] is None else f"{row['auc']:.3f}"))
    # the headline metric comes from `none`, the reference schedule (DESIGN 3), when it ran
    headline = "none" if "none" in evaluations else r.paddings[0]
    first = evaluations[headline]
    first_base = base_evaluations[headline] or first  # a baseline run is its own baseline
    record = RunRecord(
        method=method.key, task=task.key, task_kind=task.kind, backbone=r.backbone.name,
        profile=r.spec.profile, seed=r.spec.seed, split=data.split, data_source=data.source,
        num_train_examples=len(train_examples), num_eval_examples=len(eval_examples),
        num_eval_features=len(eval_features), main_metric=task.main_metric,
        metrics=first.metrics, metric_ci=first.metric_ci,
        baseline_metrics=first_base.metrics,
        padding={mode: {**asdict(m), "metrics": evaluations[mode].metrics,
                        "metric_ci": evaluations[mode].metric_ci}
                 for mode, m in measured.items()},
        executed=method.executed, train=summaries, train_seconds=train_seconds,
        tokenize_seconds=tokenize_seconds, needs={k: str(v) for k, v in needs.items()},
        notes=method.record_notes() + ([CONTROL_NOTE.format(control=control)] if control else []),
        control=control, controls=controls, diagnostics=predictor)
    lines = []
    for index, row in enumerate(first.predictions):
        row = dict(row, macs_by_padding={m: e.predictions[index]["macs"]
                                         for m, e in evaluations.items()})
        lines.append(json.dumps(row))
    write_atomic(run_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    write_json(run_dir / "env.json", environment(files.sha256))
    write_json(run_dir / "record.json", record.to_json())
    log(f"finished: {task.main_metric} {first.metrics[task.main_metric]:.2f} "
        f"(95% CI {first.metric_ci[task.main_metric][0]:.2f}-"
        f"{first.metric_ci[task.main_metric][1]:.2f}); record {run_dir / 'record.json'}")
