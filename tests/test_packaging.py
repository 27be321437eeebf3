"""A built wheel (not only the editable install) imports and runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_imports_and_runs(tmp_path, tiny_data):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(REPO)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("skimbench-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    code = ("import skimbench, skimbench.methods.baseline, skimbench.cli; "
            "print(skimbench.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip().startswith(str(target))
    run = subprocess.run([sys.executable, "-m", "skimbench.cli", "run", "-m", "baseline", "-d",
                          "sst2", "--profile", "smoke", "--data-dir", str(tiny_data), "--out",
                          str(tmp_path / "results")], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "results/runs/sst2/baseline/smoke-random-tiny-s42/record.json").is_file()
