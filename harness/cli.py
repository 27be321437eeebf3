"""The `skimbench` command line. Heavy imports (torch, transformers) happen inside commands,
so `skimbench --help` stays fast."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from skimbench import __version__


class _Group(click.Group):
    """Turns SkimbenchError into one line on stderr and its exit code, never a traceback."""

    def invoke(self, ctx):
        from skimbench.errors import SkimbenchError

        try:
            return super().invoke(ctx)
        except SkimbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: the run directory is marked partial; re-run to resume",
                       err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skimbench")
def main():
    """Measure token-skimming and compression methods for BERT encoders under one protocol.

    \b
    Examples:
      skimbench list methods
      skimbench run --method baseline --dataset sst2 --profile ci
      skimbench show results/runs/sst2/baseline/ci-minilm-s42
    """


@main.command("list")
@click.argument("what", type=click.Choice(["methods", "tasks", "backbones", "profiles"]),
                default="methods")
def list_(what: str):
    """List methods (with the task kinds each supports), tasks, backbones or profiles.

    \b
    Examples:
      skimbench list methods
      skimbench list tasks
    """
    if what == "methods":
        from skimbench.method import methods

        rows = [(key, ",".join(sorted(cls.kinds)), ",".join(cls.needs) or "-", cls.status,
                 cls.summary()) for key, cls in methods().items()]
        _table(("method", "task kinds", "needs", "status", "what it is"), rows)
    elif what == "tasks":
        from skimbench.data import FileLog, data_dir_from
        from skimbench.tasks import TASKS

        root = data_dir_from(None)
        log = FileLog()
        rows = [(t.key, t.title, t.kind, t.main_metric, str(t.max_length),
                 "yes" if root and all(log.find(root, f) for f in t.local_files) else "no")
                for t in TASKS.values()]
        _table(("task", "data set", "kind", "metric", "max len", "local data"), rows)
    elif what == "backbones":
        from skimbench.backbone import RANDOM_CONFIGS

        rows = [("minilm", "packaged all-MiniLM-L6-v2 (default, offline)")]
        rows += [(f"random:{k}", "random init: L={num_hidden_layers} H={hidden_size} "
                  "A={num_attention_heads} F={intermediate_size}".format(**v))
                 for k, v in RANDOM_CONFIGS.items()]
        rows += [("<hub name or path>", "e.g. bert-base-uncased or ./my-checkpoint")]
        _table(("backbone", "what it is"), rows)
    else:
        from skimbench.profiles import _BASE

        rows = [(name, b.backbone, str(b.epochs), str(b.max_train_examples or "all"))
                for name, b in _BASE.items()]
        _table(("profile", "backbone", "epochs", "train examples"), rows)


@main.command()
@click.option("--method", "-m", required=True, help="Method key (see `skimbench list methods`).")
@click.option("--dataset", "--task", "-d", "task", required=True,
              help="Task key (see `skimbench list tasks`).")
@click.option("--backbone", "-b", default=None,
              help="minilm, random:<config>, a hub name or a local path [profile's default].")
@click.option("--profile", "-p", default="ci", show_default=True,
              help="Budget profile: smoke, ci, local or paper.")
@click.option("--padding", default="batch", show_default=True,
              help="Padding mode to evaluate in: sequence, batch, none or all.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a method or budget setting (repeatable), e.g. --set lr=3e-5.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Local data folder laid out like shared/data [$SKIMBENCH_DATA_DIR].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Results folder; runs go to OUT/runs/<task>/<method>/.")
@click.option("--run-id", default=None, help="Run directory name [<profile>-<backbone>-s<seed>].")
@click.option("--overwrite", is_flag=True, help="Replace a run directory with another config.")
def run(method, task, backbone, profile, padding, seed, overrides, data_dir, out, run_id,
        overwrite):
    """Train (or reuse) and evaluate one method on one task; write its run directory.

    \b
    Examples:
      skimbench run --method baseline --dataset sst2 --profile ci
      skimbench run -m baseline -d squad --data-dir ../shared/data
      skimbench run -m baseline -d sst2 --profile smoke --set lr=1e-3 --padding all
    """
    from skimbench.runner import RunSpec, parse_overrides
    from skimbench.runner import run as run_one

    spec = RunSpec(method=method, task=task, backbone=backbone, profile=profile, seed=seed,
                   padding=padding, overrides=parse_overrides(overrides), out=out,
                   data_dir=data_dir, run_id=run_id, overwrite=overwrite)
    run_dir = run_one(spec, echo=lambda line: click.echo(line, err=True))
    _show(run_dir)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def show(run_dir: Path):
    """Print a run's record as a table.

    \b
    Example:
      skimbench show results/runs/sst2/baseline/ci-minilm-s42
    """
    _show(run_dir)


def _show(run_dir: Path) -> None:
    from skimbench.errors import UsageError
    from skimbench.records import read_json, status_of

    path = run_dir / "record.json"
    if not path.is_file():
        status = status_of(run_dir) if run_dir.is_dir() else None
        raise UsageError(f"{run_dir} has no record.json (status: {status or 'not a run'}): "
                         "give a finished run directory")
    r = read_json(path)
    rows = [("run", str(run_dir)), ("method", r["method"]), ("task", f"{r['task']} "
            f"({r['task_kind']})"), ("backbone", r["backbone"]), ("profile", r["profile"]),
            ("seed", str(r["seed"])), ("split", r["split"]),
            ("examples", f"{r['num_train_examples']} train, {r['num_eval_examples']} eval "
                         f"({r['num_eval_features']} features)")]
    for name, value in r["metrics"].items():
        ci = r["metric_ci"].get(name)
        rows.append((name, f"{value:.2f}" + (f"  [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")))
    for mode, p in r["padding"].items():
        rows.append((f"MACs/example [{mode}]", f"{p['macs_per_example']:.4g}"))
    rows.append(("train time", f"{r['train_seconds']:.1f}s"))
    _table(("field", "value"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for cells in (header, ["-" * w for w in widths], *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
                   .rstrip())


if __name__ == "__main__":
    main()
