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
        from skimbench.profiles import BASE_BUDGETS

        rows = [(name, b.backbone, str(b.epochs), str(b.max_train_examples or "all"))
                for name, b in BASE_BUDGETS.items()]
        _table(("profile", "backbone", "epochs", "train examples (before per-task settings)"), rows)


@main.command()
@click.option("--method", "-m", required=True, help="Method key (see `skimbench list methods`).")
@click.option("--dataset", "--task", "-d", "task", required=True,
              help="Task key (see `skimbench list tasks`).")
@click.option("--backbone", "-b", default=None,
              help="minilm, random:<config>, a hub name or a local path [profile's default].")
@click.option("--profile", "-p", default="ci", show_default=True,
              help="Budget profile: smoke, ci, local or paper.")
@click.option("--padding", default="all", show_default=True,
              help="Padding mode(s) to evaluate in: sequence, batch, none or all.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a method or budget setting (repeatable), e.g. --set lr=3e-5.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Local data folder laid out like shared/data [$SKIMBENCH_DATA_DIR].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Results folder; runs go to OUT/runs/<task>/<method>/.")
@click.option("--run-id", default=None, help="Run directory name [<profile>-<backbone>-s<seed>].")
@click.option("--overwrite", is_flag=True, help="Replace a run directory with another config.")
@click.option("--counter", default="flop_counter", show_default=True,
              help="FLOPs counter that cross-checks the traces: flop_counter, torchprofile, "
                   "ptflops (only flop_counter is held to 1% agreement).")
@click.option("--threads", type=int, default=None,
              help="torch threads for training and timing [torch's default: physical cores].")
def run(method, task, backbone, profile, padding, seed, overrides, data_dir, out, run_id,
        overwrite, counter, threads):
    """Train (or reuse) and evaluate one method on one task; write its run directory.

    \b
    Examples:
      skimbench run --method baseline --dataset sst2 --profile ci
      skimbench run -m baseline -d squad --data-dir ../shared/data
      skimbench run -m truncate -d sst2 --profile smoke --set keep_tokens=16 --padding none
    """
    from skimbench.runner import RunSpec, parse_overrides
    from skimbench.runner import run as run_one

    spec = RunSpec(method=method, task=task, backbone=backbone, profile=profile, seed=seed,
                   padding=padding, overrides=parse_overrides(overrides), out=out,
                   data_dir=data_dir, run_id=run_id, overwrite=overwrite, counter=counter,
                   threads=threads)
    run_dir = run_one(spec, echo=lambda line: click.echo(line, err=True))
    _show(run_dir)


@main.command()
@click.option("--against", type=click.Path(path_type=Path),
              default=Path("results/reference"), show_default=True,
              help="Committed reference run directories (config.json + record.json).")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Where the re-runs go (or are read from with --reuse).")
@click.option("--reuse", is_flag=True, help="Compare finished records without re-running.")
@click.option("--profile", default="ci", show_default=True,
              help="The profile the references must have.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Local data folder [$SKIMBENCH_DATA_DIR].")
def check(against, results, reuse, profile, data_dir):
    """Re-run the reference configurations and fail on regressions (DESIGN 8).

    A breach is a metric more than 1 point (or the reference's bootstrap half-width) below the
    reference, a FLOPs speedup more than 2% lower, a time speedup more than 20% lower, a lift
    over random removal below 0 beyond its 95% interval, or no random controls where the
    reference has them.

    \b
    Examples:
      skimbench check --against results/reference
      skimbench check --against results/reference --reuse
    """
    from skimbench.check import check as run_check

    breaches = run_check(against, results, reuse, profile, data_dir,
                         echo=lambda line: click.echo(line, err=True))
    for line in breaches:
        click.echo(f"BREACH {line}")
    if breaches:
        sys.exit(1)
    click.echo("check passed: no regression against the references")


@main.command()
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Folder searched for finished run records.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"),
              show_default=True, help="Where tables, plots and README.md are written.")
def report(results, out):
    """Tables (Markdown, CSV, LaTeX) and Pareto plots (PNG, SVG) from every finished run.

    \b
    Examples:
      skimbench report
      skimbench report --results results/published --out reports
    """
    from skimbench.report import write_report

    files = write_report(results, out)
    click.echo(f"wrote {len(files)} files; index: {files[-1]}")


@main.command()
@click.option("--backbone", "-b", default="minilm", show_default=True)
@click.option("--lengths", default="8,16,24,32,64,128,256,384,512", show_default=True)
@click.option("--batch", "batches", default="1,32", show_default=True,
              help="Batch sizes, comma-separated.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/latency"),
              show_default=True, help="Folder for <backbone>.json.")
def latency(backbone, lengths, batches, out):
    """Time the plain encoder vs input length and fit its floor t(n) = t0 + MACs(n)/R.

    \b
    Examples:
      skimbench latency --backbone minilm
      skimbench latency --backbone random:bert-base --lengths 8,24,128,384 --batch 1
    """
    from skimbench.backbone import resolve_backbone
    from skimbench.latency import latency_curve
    from skimbench.records import write_json

    resolved = resolve_backbone(backbone)
    curve = latency_curve(backbone, _positive_ints("--lengths", lengths),
                          _positive_ints("--batch", batches),
                          echo=lambda line: click.echo(line, err=True))
    path = Path(out) / f"{resolved.slug}-{curve['device']}.json"
    write_json(path, curve)
    _table(("batch", "floor t0 (ms)", "throughput (GMAC/s)"),
           [(b, f"{f['t0_ms']:.1f}", f"{f['gmacs_per_s']:.1f}") for b, f in curve["fit"].items()])
    click.echo(f"written {path}")


def _positive_ints(option: str, text: str) -> list[int]:
    from skimbench.errors import UsageError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option} takes comma-separated positive integers, got {text!r}")
    return values


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def show(run_dir: Path):
    """Print a run's record as a table.

    \b
    Example:
      skimbench show results/runs/sst2/baseline/ci-minilm-s42
    """
    _show(run_dir)


@main.command()
@click.option("--backbone", "-b", default="minilm", show_default=True,
              help="minilm, random:<config>, a hub name or a local path.")
@click.option("--length", "-n", "lengths", default="128,384", show_default=True,
              help="Comma-separated sequence lengths (one unpadded batch each).")
@click.option("--attn", default="sdpa,eager", show_default=True,
              help="Comma-separated attention implementations: sdpa, eager.")
@click.option("--kind", type=click.Choice(["classification", "extractive_qa"]),
              default="classification", show_default=True,
              help="Task head: pooler + classifier, or the QA span head.")
@click.option("--counters", default="flop_counter,torchprofile,ptflops", show_default=True,
              help="Comma-separated FLOPs counters to run.")
def flops(backbone, lengths, attn, kind, counters):
    """Compare FLOPs counters with the analytic MACs of one forward (DESIGN 4.1, 4.2).

    \b
    Examples:
      skimbench flops --backbone random:bert-base --length 128,384
      skimbench flops -b minilm -n 64 --attn sdpa --counters flop_counter,ptflops
      skimbench flops -b random:tiny -n 16 --kind extractive_qa
    """
    from skimbench import flops as counting

    names = counting.parse_list(counters, "counters", counting.COUNTERS)
    rows = counting.compare_counters(
        backbone, counting.parse_lengths(lengths),
        counting.parse_list(attn, "attn", counting.ATTN_IMPLEMENTATIONS), kind=kind,
        counters=names)
    header = ("length", "attn", "analytic GMACs")
    for name in names:
        header += (f"{name} GMACs", "diff")
    table, failures = [], []
    for row in rows:
        cells = (str(row["length"]), row["attn"], f"{row['analytic'] / 1e9:.4g}")
        for name in names:
            result = row["counters"][name]
            if result["macs"] is None:
                cells += ("failed", "-")
                failures.append(f"{name} failed at length {row['length']}, {row['attn']}: "
                                f"{result['error']}")
            else:
                cells += (f"{result['macs'] / 1e9:.4g}", f"{100 * result['diff']:+.2f}%")
        table.append(cells)
    _table(header, table)
    for line in failures:
        click.echo(line)
    click.echo(f"\nMACs of one forward, batch size 1, {backbone}, {kind} head; FLOPs = 2 x MACs. "
               "diff = (counter - analytic) / analytic.\nNot counted by the analytic formula "
               "(DESIGN 4.1): embeddings, layer norms, softmax, activations and biases.")


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
    for name, value in r.get("baseline_metrics", {}).items():
        rows.append((f"baseline {name}", f"{value:.2f}"))
    for mode, p in r["padding"].items():
        rows.append((f"MACs/example [{mode}]", f"{p['macs_per_example']:.4g}"
                     + ("  (counter disagrees >1%)" if p.get("macs_mismatch") else "")))
        rows.append((f"FLOPs speedup [{mode}]", f"{p['flops_speedup']:.2f}x"))
        if p.get("cpu_time_speedup") is not None:
            oracle = p.get("oracle_speedup")
            rows.append((f"CPU time speedup [{mode}]", f"{p['cpu_time_speedup']:.2f}x"
                         + (f"  (oracle {oracle:.2f}x)" if oracle else "")))
        if p.get("total_flops_speedup") is not None:  # with a cache: its build cost included
            total_time = p.get("total_cpu_time_speedup")
            rows.append((f"FLOPs speedup total [{mode}]", f"{p['total_flops_speedup']:.2f}x"
                         + (f"  (CPU time {total_time:.2f}x)" if total_time else "")))
    rows.append(("train time", f"{r['train_seconds']:.1f}s"))
    _table(("field", "value"), rows)
    for line in _control_lines(r):
        click.echo(line)


def _control_lines(r: dict) -> list[str]:
    """The random controls and predictor diagnostics of a record (skimbench.controls); older
    records lack the keys, which reads as None."""
    lines = []
    if r.get("control"):
        lines.append(f"this run is the {r['control']} control: the method's keep decisions "
                     "replaced by random ones at its own counts (same MACs), not timed")
    controls = r.get("controls") or {}
    main = r.get("main_metric")
    for name, entry in controls.items():
        if not isinstance(entry, dict) or "lift" not in entry:
            continue  # padding, seed, unit
        names = sorted(entry["lift"], key=lambda metric: metric != main)
        parts = []
        for metric in names:
            low, high = (entry.get("lift_ci") or {}).get(metric) or (None, None)
            parts.append(f"{metric} {entry['lift'][metric]:+.2f}"
                         + (f" [{low:+.2f}, {high:+.2f}]" if low is not None else ""))
        lines.append(f"lift over {name}: " + "; ".join(parts) + " (points, paired bootstrap "
                     f"95%; padding {controls.get('padding', 'none')}, "
                     f"unit: {controls.get('unit', 'token')})")
    diagnostics = r.get("diagnostics") or {}
    if diagnostics.get("layers"):
        lines.append(f"predictor diagnostics (reference: "
                     f"{diagnostics.get('reference', 'n/a')}):")
    for row in diagnostics.get("layers", []):
        auc = "n/a" if row.get("auc") is None else f"{row['auc']:.3f}"
        lines.append(f"layer {row['layer']}: AUC {auc} ({row['important']} important / "
                     f"{row['other']} other)")
    return lines


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for cells in (header, ["-" * w for w in widths], *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
                   .rstrip())


if __name__ == "__main__":
    main()
