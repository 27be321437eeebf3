"""Wall-clock timing (DESIGN 4.3): interleaved A/B on the CPU, CUDA events on a GPU, peak memory.

Speedups are always measured A/B interleaved: baseline and method alternate on the same inputs
in one process, so a shared, noisy machine slows both alike. The machine's load during a
measurement is read from /proc/stat and a run is flagged when other processes took more than
10% of the CPU.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LOAD_FLAG_THRESHOLD = 0.10


@dataclass
class TimingConfig:
    warmup: int = 2
    min_iters: int = 5
    min_seconds: float = 1.0
    max_seconds: float = 60.0        # stop early on very slow models, once min_iters are done


@dataclass
class TimeStats:
    """Seconds per call: median and spread over `samples` calls."""

    median_s: float
    p10_s: float
    p90_s: float
    samples: int

    @classmethod
    def of(cls, seconds: list[float]) -> TimeStats:
        ordered = sorted(seconds)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return cls(statistics.median(ordered), pick(0.1), pick(0.9), len(ordered))


@dataclass
class ABTiming:
    baseline: TimeStats
    method: TimeStats
    speedup: float                   # ratio of medians, baseline / method
    other_load: float                # share of the CPU other processes used meanwhile
    load_flagged: bool
    threads: int

    def to_json(self) -> dict:
        return asdict(self)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


class LoadMeter:
    """Measures how much CPU other processes used while the block ran."""

    def __enter__(self) -> LoadMeter:
        self.start, self.own_start = _cpu_jiffies(), _own_cpu_seconds()
        self.wall_start = time.perf_counter()
        self.other_load = 0.0
        return self

    def __exit__(self, *_exc) -> None:
        end = _cpu_jiffies()
        if self.start is None or end is None:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (end[0] - self.start[0]) / ticks
        capacity = (end[1] - self.start[1]) / ticks
        own = _own_cpu_seconds() - self.own_start
        self.other_load = max(0.0, busy - own) / capacity if capacity > 0 else 0.0


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_ab(baseline: Callable[[], object], method: Callable[[], object],
            config: TimingConfig | None = None) -> ABTiming:
    """Alternate baseline and method calls; each call is one timed sample."""
    config = config or TimingConfig()
    for _ in range(config.warmup):
        baseline()
        method()
    samples_a, samples_b = [], []
    with LoadMeter() as load:
        started = time.perf_counter()
        while True:
            for fn, samples in ((baseline, samples_a), (method, samples_b)):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            if len(samples_a) >= config.min_iters and (elapsed >= config.min_seconds
                                                       or elapsed >= config.max_seconds):
                break
    a, b = TimeStats.of(samples_a), TimeStats.of(samples_b)
    return ABTiming(a, b, a.median_s / b.median_s, load.other_load,
                    load.other_load > LOAD_FLAG_THRESHOLD, torch.get_num_threads())


def time_one(fn: Callable[[], object], config: TimingConfig | None = None) -> TimeStats:
    """Time a single callable (latency curves): warm-up, then min_iters and min_seconds."""
    config = config or TimingConfig()
    for _ in range(config.warmup):
        fn()
    samples, started = [], time.perf_counter()
    while len(samples) < config.min_iters or (time.perf_counter() - started
                                              < config.min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - started > config.max_seconds and len(samples) >= 3:
            break
    return TimeStats.of(samples)


def time_cuda(fn: Callable[[], object], config: TimingConfig | None = None) -> TimeStats:
    """GPU time per call with CUDA events, synchronised around every call."""
    config = config or TimingConfig()
    for _ in range(config.warmup):
        fn()
    torch.cuda.synchronize()
    samples, started = [], time.perf_counter()
    while len(samples) < config.min_iters or time.perf_counter() - started < config.min_seconds:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end) / 1000.0)
    return TimeStats.of(samples)


class PeakRSS:
    """Peak resident memory of this process during a block (Linux: VmHWM after a reset)."""

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark
        except OSError:
            pass
        self.peak_mb = None
        return self

    def __exit__(self, *_exc) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_mb = int(line.split()[1]) / 1024
        except OSError:
            pass
