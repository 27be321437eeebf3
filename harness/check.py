"""`skimbench check` (DESIGN 8): re-run the committed reference configurations and fail on
regressions of accuracy, FLOPs speedup or time speedup, and on a learned token-removal method
that does worse than random removal at its own counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skimbench.errors import UsageError
from skimbench.records import read_json

METRIC_TOLERANCE = 1.0         # points, or the reference's bootstrap half-width if wider
FLOPS_TOLERANCE = 0.02         # relative drop of a FLOPs speedup
TIME_TOLERANCE = 0.20          # relative drop of a time speedup (timing is noisy)


@dataclass
class Reference:
    run_id: str
    path: Path
    config: dict
    record: dict

    @property
    def name(self) -> str:
        return f"{self.record['task']}/{self.record['method']}/{self.run_id}"


def load_references(directory: Path, profile: str) -> list[Reference]:
    refs = []
    for record_path in sorted(Path(directory).glob("**/record.json")):
        run_dir = record_path.parent
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"reference {run_dir} has no config.json: commit both files")
        refs.append(Reference(run_dir.name, run_dir, read_json(run_dir / "config.json"),
                              read_json(record_path)))
    if not refs:
        raise UsageError(f"no reference records under {directory}: commit finished run "
                         "directories (config.json + record.json) there first")
    other = sorted({r.record["profile"] for r in refs} - {profile})
    if other:
        raise UsageError(f"references under {directory} include profile(s) {', '.join(other)}; "
                         f"check compares {profile!r} runs only (use --profile)")
    return refs


def compare(reference: dict, current: dict) -> list[str]:
    """One line per breach between a reference record and the current one."""
    breaches = []
    for name, ref_value in reference["metrics"].items():
        low, high = reference["metric_ci"].get(name, (ref_value, ref_value))
        tolerance = max(METRIC_TOLERANCE, (high - low) / 2)
        value = current["metrics"].get(name)
        if value is None or value < ref_value - tolerance:
            breaches.append(f"{name} {value if value is None else round(value, 2)} < reference "
                            f"{ref_value:.2f} - {tolerance:.2f}")
    for mode, ref_mode in reference["padding"].items():
        cur_mode = current["padding"].get(mode)
        if cur_mode is None:
            breaches.append(f"padding mode {mode} missing")
            continue
        for key, tolerance in (("flops_speedup", FLOPS_TOLERANCE),
                               ("cpu_time_speedup", TIME_TOLERANCE)):
            ref_value, value = ref_mode.get(key), cur_mode.get(key)
            if ref_value is None:
                continue
            if value is None or value < ref_value * (1 - tolerance):
                breaches.append(f"{key} [{mode}] {value if value is None else round(value, 3)} "
                                f"< reference {ref_value:.3f} - {tolerance:.0%}")
    return breaches + _control_breaches(reference, current)


def _control_breaches(reference: dict, current: dict) -> list[str]:
    """The learned predictor must beat random removal at the same counts: a breach where the
    current run's lift over the `random` control is below 0 beyond its paired interval, or
    where the reference has controls and the current record none (older records lack the
    key: the same as None)."""
    controls = current.get("controls")
    if not controls:
        return ["no random controls recorded (the reference has them)"] \
            if reference.get("controls") else []
    main = current.get("main_metric") or reference.get("main_metric")
    random = controls.get("random") or {}
    interval = (random.get("lift_ci") or {}).get(main)
    if interval is None or interval[1] >= 0:
        return []
    value = (random.get("lift") or {}).get(main)
    shown = "n/a" if value is None else f"{value:+.2f}"
    return [f"lift over random removal {shown} below 0 beyond its interval "
            f"[{interval[0]:+.2f}, {interval[1]:+.2f}] ({main} points)"]


def check(against: Path, results: Path, reuse: bool, profile: str, data_dir, echo
          ) -> list[str]:
    """Re-run (or, with reuse, read) every reference configuration; return breach lines."""
    from skimbench.runner import RunSpec, run

    lines = []
    for ref in load_references(against, profile):
        c = ref.config
        spec = RunSpec(method=c["method"], task=c["task"], backbone=c["backbone"],
                       profile=c["profile"], seed=c["seed"], padding=_padding(c["padding"]),
                       overrides=c.get("overrides", {}), out=results, data_dir=data_dir,
                       run_id=ref.run_id)
        run_dir = Path(results) / "runs" / c["task"] / c["method"] / ref.run_id
        if not reuse:
            run_dir = run(spec, echo)
        if not (run_dir / "record.json").is_file():
            lines.append(f"{ref.name}: no finished record at {run_dir} (run without --reuse)")
            continue
        lines += [f"{ref.name}: {b}" for b in compare(ref.record,
                                                      read_json(run_dir / "record.json"))]
    return lines


def _padding(modes: list[str]) -> str:
    return "all" if len(modes) == 3 else modes[0]
