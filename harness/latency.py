"""Latency curves (DESIGN 4.4): time of the plain encoder vs length, and the fitted floor.

At batch 1 on a CPU the encoder is bound by reading its weights, not by arithmetic, so time
falls far less than FLOPs when tokens are removed. Fitting t(n) = t0 + MACs(n)/R exposes that
floor t0, which every report shows beside FLOPs speedups.
"""

from __future__ import annotations

import numpy as np
import torch

from skimbench.backbone import resolve_backbone
from skimbench.model import TaskModel
from skimbench.tasks import CLASSIFICATION
from skimbench.timing import TimingConfig, time_one

DEFAULT_LENGTHS = (8, 16, 24, 32, 64, 128, 256, 384, 512)


def fit_floor(macs: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares t = t0 + macs / R; returns (t0 seconds, R MACs per second)."""
    slope, intercept = np.polyfit(np.asarray(macs, float), np.asarray(seconds, float), 1)
    return float(max(intercept, 0.0)), float(1.0 / slope) if slope > 0 else float("inf")


def latency_curve(backbone: str, lengths=DEFAULT_LENGTHS, batch_sizes=(1, 32),
                  config: TimingConfig | None = None, echo=print) -> dict:
    config = config or TimingConfig(warmup=1, min_iters=3, min_seconds=0.5, max_seconds=20.0)
    torch.manual_seed(0)
    model = TaskModel(resolve_backbone(backbone).encoder("sdpa"), CLASSIFICATION, 2).eval()
    layers, hidden, ffn = len(model.layers), model.hidden_size, model.ffn_size
    points, fits = [], {}
    for batch_size in batch_sizes:
        for length in lengths:
            ids = torch.randint(1000, 30000, (batch_size, length))
            batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                     "attention_mask": torch.ones_like(ids)}
            with torch.inference_mode():
                macs = int(model(batch).trace.macs(hidden, ffn).sum())
                stats = time_one(lambda b=batch: model(b), config)
            points.append({"batch_size": batch_size, "length": length, "macs": macs,
                           "median_s": stats.median_s, "p10_s": stats.p10_s,
                           "p90_s": stats.p90_s, "samples": stats.samples})
            echo(f"batch {batch_size:>3} length {length:>3}: {stats.median_s * 1e3:8.1f} ms "
                 f"({macs / 1e9:.2f} GMACs)")
        mine = [p for p in points if p["batch_size"] == batch_size]
        t0, rate = fit_floor([p["macs"] for p in mine], [p["median_s"] for p in mine])
        fits[str(batch_size)] = {"t0_ms": t0 * 1e3, "gmacs_per_s": rate / 1e9}
    return {"backbone": backbone, "layers": layers, "hidden": hidden,
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "points": points, "fit": fits}
