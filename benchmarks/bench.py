"""Benchmarks of the harness itself (issue 4): `nox -s bench` or `python benchmarks/bench.py`.

Writes results/bench.json and prints each figure with its target:
  (a) harness overhead: baseline eval throughput through skimbench vs a bare transformers loop
      on the same tensors (target ratio >= 0.9);
  (b) analytic MACs of 10,000 traced examples (target < 1 s);
  (c) repeatability: one A/B time speedup measured twice (target: within 5%);
  (d) latency curves and floors of minilm and random:bert-base, and the removal efficiency of
      truncating SQuAD-length inputs to half (target >= 0.95: truncation has no overhead);
  (e) removal efficiency of Transkimmer and Block-Skim on MiniLM at batch 1 and batch 32, with
      predictors set to drop part of the tokens (target >= 0.9, issue 5): what their predictors
      and gathers cost beyond the computation they leave;
  (f) BlockBERT at long lengths (its headline, methods-spec 7.6): activation peak memory and
      batch latency of dense attention (sdpa, eager) and of blockwise attention (n = 2, 3;
      sdpa and matmul kernels) at 512 and 1024 tokens (`--only blockbert`, a few minutes);
  (g) length-grouped training batches (trainer.epoch_batches): training examples per second of
      grouped vs random batches on real SQuAD windows and SST-2 with the `local` recipe, the
      same steps each, alternated (target >= 1.5x on SQuAD; `--only grouping`, about 10 minutes
      on one thread; needs the local data, SKIMBENCH_DATA_DIR).
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from skimbench.backbone import resolve_backbone
from skimbench.data import FileLog, data_dir_from
from skimbench.errors import DataError
from skimbench.features import collate, encode, eval_batches
from skimbench.flops import random_batch
from skimbench.latency import latency_curve
from skimbench.measure import forward_all, replay_all
from skimbench.method import get_method
from skimbench.model import TaskModel, Trace
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task, load_task_data
from skimbench.timing import TimingConfig, time_ab
from skimbench.trainer import epoch_batches, train


def random_features(count: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, length // 2), length + 1, (count,), generator=g)
    return [{"input_ids": [101] + torch.randint(1000, 30000, (int(n) - 2,), generator=g)
             .tolist() + [102], "token_type_ids": [0] * int(n), "labels": 0,
             "example_index": i} for i, n in enumerate(lengths)]


def model_for(backbone: str) -> TaskModel:
    torch.manual_seed(0)
    return TaskModel(resolve_backbone(backbone).encoder("sdpa"), CLASSIFICATION, 2).eval()


def harness_overhead(config: TimingConfig) -> dict:
    """(a) skimbench's eval path (collate + method.forward + trace) vs bare HF on tensors."""
    model = model_for("minilm")
    baseline = get_method("baseline")(get_method("baseline").Config())
    features = random_features(256, 64)
    tensors = [collate(features[i:i + 32], None) for i in range(0, len(features), 32)]

    def through_skimbench():
        with torch.inference_mode():
            for batch in eval_batches(features, "batch", 32, 64):
                out = baseline.forward(model, batch)
                out.trace.macs(model.hidden_size, model.ffn_size)

    def bare_transformers():
        with torch.inference_mode():
            for batch in tensors:
                pooled = model.encoder(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       token_type_ids=batch["token_type_ids"]).pooler_output
                model.head(pooled)

    ab = time_ab(bare_transformers, through_skimbench, config)
    return {"ratio": ab.speedup, "bare_median_s": ab.baseline.median_s,
            "skimbench_median_s": ab.method.median_s, "load_flagged": ab.load_flagged,
            "target": ">= 0.9", "ok": ab.speedup >= 0.9}


def analytic_macs_speed() -> dict:
    """(b) MACs of 10,000 traced examples from their schedules."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 512, (10_000, 12), generator=g)
    started = time.perf_counter()
    trace = Trace(tokens, tokens, tokens, tokens * tokens,
                  torch.full((10_000,), 12), torch.zeros(10_000, dtype=torch.long))
    total = int(trace.macs(768, 3072).sum())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "examples": 10_000, "total_macs": total, "target": "< 1 s",
            "ok": seconds < 1.0}


def repeatability(config: TimingConfig) -> dict:
    """(c) the same truncate-vs-baseline time speedup measured twice."""
    model = model_for("minilm")
    baseline = get_method("baseline")(get_method("baseline").Config())
    truncate = get_method("truncate")(get_method("truncate").Config(keep_tokens=64))
    batches = [collate([f], None) for f in random_features(16, 128, seed=1)]
    first, second = (time_ab(forward_all(baseline, model, batches),
                             forward_all(truncate, model, batches), config) for _ in range(2))
    spread = abs(first.speedup - second.speedup) / first.speedup
    return {"first": first.speedup, "second": second.speedup, "relative_difference": spread,
            "target": "within 5%", "ok": spread <= 0.05}


def removal_efficiency(config: TimingConfig) -> dict:
    """(d) truncate SQuAD-length inputs (384) to half: time speedup / oracle speedup."""
    model = model_for("minilm")
    baseline = get_method("baseline")(get_method("baseline").Config())
    truncate = get_method("truncate")(get_method("truncate").Config(keep_tokens=192))
    batches = [collate([f], 384) for f in random_features(8, 384, seed=2)]
    ours = time_ab(forward_all(baseline, model, batches), forward_all(truncate, model, batches),
                   config)
    oracle = time_ab(forward_all(baseline, model, batches), replay_all(model, truncate, batches),
                     config)
    efficiency = ours.speedup / oracle.speedup
    return {"time_speedup": ours.speedup, "oracle_speedup": oracle.speedup,
            "removal_efficiency": efficiency, "target": ">= 0.95", "ok": efficiency >= 0.95}


def _skimmer(key: str, kind: str, **settings):
    """A skimming method on MiniLM whose (untrained) predictors drop part of the tokens."""
    from skimbench.method import Context
    from skimbench.profiles import budget_for

    cls = get_method(key)
    task = get_task("squad" if kind == EXTRACTIVE_QA else "sst2")
    method = cls(cls.configure(cls.Config(**settings), task))
    torch.manual_seed(0)
    model = method.build(Context(resolve_backbone("minilm"), task, budget_for("ci", task), {}))
    torch.manual_seed(1)
    if key == "transkimmer":  # keep about 85% of the tokens at each layer
        for predictor in model.skim_predictors:
            predictor.net[4].weight.data.normal_(0.0, 1.0 / model.hidden_size**0.5)
            predictor.net[4].bias.data = torch.tensor([-1.0, 1.0])
    else:  # the first layer's blocks split at their median p_keep; later layers keep all
        for name, predictor in model.block_predictors.items():
            predictor.classifier.weight.data.normal_(0.0, 1.0)
            if name != "0":
                predictor.classifier.bias.data = torch.tensor([-1e3, 1e3])
    return method, model.eval()


def _median_threshold(method, model, batches: list[dict]) -> float:
    from skimbench.methods.blockskim import pad_to_blocks
    from skimbench.skim import Tokens, attention_layer_diagonal

    values = []
    with torch.inference_mode():
        for batch in batches:
            padded = pad_to_blocks(batch, 32)
            tokens = Tokens.start(model.embed(padded), padded["attention_mask"])
            _, diagonal, _ = attention_layer_diagonal(model.layers[0], tokens.hidden,
                                                      tokens.mask(), 32)
            values.append(model.block_predictors["0"](diagonal).softmax(-1)[..., 1].flatten())
    return float(torch.cat(values).median())


def skimming_efficiency(config: TimingConfig) -> dict:
    """(e) Transkimmer (SST-2-like lengths) and Block-Skim (SQuAD length) on MiniLM."""
    baseline = get_method("baseline")(get_method("baseline").Config())
    results = {}
    for key, kind, length in (("transkimmer", CLASSIFICATION, 64),
                              ("blockskim", EXTRACTIVE_QA, 384)):
        method, model = _skimmer(key, kind)
        features = random_features(32, length, seed=3)
        for batch_size in (1, 32):
            batches = ([collate([f], None) for f in features[:16]] if batch_size == 1
                       else [collate(features, None)])
            if key == "blockskim":
                cls = type(method)
                method = cls(cls.Config(threshold=_median_threshold(method, model, batches)))
            with torch.inference_mode():
                kept = [method.forward(model, b).trace.query_tokens.float().mean().item()
                        / b["input_ids"].shape[1] for b in batches]
            ours = time_ab(forward_all(baseline, model, batches),
                           forward_all(method, model, batches), config)
            oracle = time_ab(forward_all(baseline, model, batches),
                             replay_all(model, method, batches), config)
            efficiency = ours.speedup / oracle.speedup
            results[f"{key}_batch{batch_size}"] = {
                "mean_kept_fraction": sum(kept) / len(kept), "time_speedup": ours.speedup,
                "oracle_speedup": oracle.speedup, "removal_efficiency": efficiency,
                "load_flagged": ours.load_flagged or oracle.load_flagged,
                "target": ">= 0.9", "ok": efficiency >= 0.9}
    return results


# (f) BlockBERT: dense vs blockwise attention at long lengths ---------------------------------

LONG_LENGTHS = (512, 1024)
LONG_BATCH = 2
# name -> (blocks, kernel); blocks None: the dense encoder with that attention implementation
LONG_VARIANTS = {"dense sdpa": (None, "sdpa"), "dense eager": (None, "eager"),
                 "blockbert n=2 sdpa": (2, "sdpa"), "blockbert n=2 matmul": (2, "matmul"),
                 "blockbert n=3 sdpa": (3, "sdpa"), "blockbert n=3 matmul": (3, "matmul")}


def long_model(attn: str) -> TaskModel:
    """MiniLM's shape (L 6, H 384, A 12) with 1024 position embeddings, random weights (time
    and memory do not depend on them; MiniLM's trained table stops at 512), span head."""
    from transformers import AutoModel

    config = resolve_backbone("random:minilm").config()
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, attn_implementation=attn)
    return TaskModel(encoder, EXTRACTIVE_QA, 2).eval()


def long_variant(name: str, length: int):
    """(method, model) of one variant; n = 2 takes the paper's 9:3 split at 1024 tokens."""
    blocks, kernel = LONG_VARIANTS[name]
    if blocks is None:
        return get_method("baseline")(get_method("baseline").Config()), long_model(kernel)
    cls = get_method("blockbert")
    heads = "9:3" if blocks == 2 and length >= 1024 else None
    return cls(cls.Config(blocks=blocks, heads=heads, kernel=kernel)), long_model("sdpa")


class PeakTensors(TorchDispatchMode):
    """Peak bytes of the tensors ops return while the block runs (activations, the CPU
    counterpart of torch.cuda.max_memory_allocated; weights and inputs made before it and the
    kernels' internal scratch space are not counted). Deterministic, unlike the RSS of a
    process whose allocator keeps freed memory."""

    def __enter__(self) -> PeakTensors:
        self.live, self.now, self.peak = {}, 0, 0
        return super().__enter__()

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()  # one Python object while it lives
                if id(storage) not in self.live:
                    self.live[id(storage)] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, id(storage))
        return out


def blockbert_long_inputs(config: TimingConfig) -> dict:
    """(f) BlockBERT's memory and time claim at 512 and 1024 tokens, batch LONG_BATCH, CPU:
    peak activation memory of one forward, and each variant A/B-timed against dense sdpa
    attention. The paper's figures (V100, FP16; pre-training memory and 8 x 1024 inference
    time) are GPU numbers: this is the same comparison on this machine's CPU."""
    results: dict = {"batch_size": LONG_BATCH, "threads": torch.get_num_threads(),
                     "weights": "random, MiniLM shape, 1024 position embeddings",
                     "memory": "peak MB of live activation tensors in one forward"}
    for length in LONG_LENGTHS:
        batch = random_batch(length, LONG_BATCH, EXTRACTIVE_QA, 30522)
        dense_method, dense_model = long_variant("dense sdpa", length)
        dense = forward_all(dense_method, dense_model, [batch])
        rows: dict = {}
        for name in LONG_VARIANTS:
            method, model = long_variant(name, length)
            with PeakTensors() as memory, torch.inference_mode():
                trace = method.forward(model, batch).trace
            row = rows[name] = {"peak_mb": memory.peak / 2**20,
                                "macs": int(trace.macs(model.hidden_size, model.ffn_size).sum())}
            if name == "dense sdpa":
                row["time_speedup_vs_dense_sdpa"] = 1.0
            else:
                ab = time_ab(dense, forward_all(method, model, [batch]), config)
                rows["dense sdpa"]["median_s"] = ab.baseline.median_s  # its latest
                row.update(median_s=ab.method.median_s, time_speedup_vs_dense_sdpa=ab.speedup,
                           load_flagged=ab.load_flagged)
        for row in rows.values():
            for dense_name in ("dense sdpa", "dense eager"):
                key = f"memory_change_vs_{dense_name.replace(' ', '_')}"
                row[key] = row["peak_mb"] / rows[dense_name]["peak_mb"] - 1
        results[str(length)] = rows
    return results


# (g) length-grouped training batches ---------------------------------------------------------

# task -> training steps of each arm, at the `local` profile's batch size (16 SQuAD, 32 SST-2)
GROUPING_STEPS = {"squad": 30, "sst2": 60}
GROUPING_CHUNKS = 3  # each arm's steps in this many chunks, grouped and random alternating


def _padded_positions(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def _train_counting(model, stage, features: list[dict], group: bool, seed: int) -> dict:
    """Train `stage` (the baseline's step); seconds, examples and (padded) positions."""
    baseline = get_method("baseline")(get_method("baseline").Config())
    seen = {"examples": 0, "tokens": 0, "positions": 0}

    def loss_fn(model, batch):
        seen["examples"] += batch["input_ids"].shape[0]
        seen["positions"] += batch["input_ids"].numel()
        seen["tokens"] += int(batch["attention_mask"].sum())
        return baseline.losses(model, batch)

    [summary] = train(model, [stage], features, loss_fn, seed=seed, log=lambda _: None,
                      group_by_length=group)
    return {"seconds": summary["seconds"], **seen}


def grouping_task(key: str, steps: int) -> dict:
    """One task of (g): see grouping_throughput."""
    from skimbench.method import Context
    from skimbench.profiles import budget_for

    baseline = get_method("baseline")(get_method("baseline").Config())
    task = get_task(key)
    budget = budget_for("local", task)
    data = load_task_data(task, data_dir_from(None), FileLog())
    backbone = resolve_backbone(budget.backbone)
    max_length = budget.max_length or task.max_length
    features = encode(task, data.train, backbone.tokenizer(), max_length=max_length,
                      doc_stride=budget.doc_stride, max_query_length=budget.max_query_length)
    lengths = [len(f["input_ids"]) for f in features]
    ctx = Context(backbone, task, budget, {})
    [stage] = baseline.stages(ctx)
    models = {group: baseline.build(ctx) for group in (True, False)}  # the same weights
    totals = {group: {"seconds": 0.0, "examples": 0, "tokens": 0, "positions": 0}
              for group in (True, False)}
    for group in (True, False):  # warm-up, untimed
        _train_counting(models[group], replace(stage, max_steps=1), features, group, 10_000)
    per_chunk = steps // GROUPING_CHUNKS
    for rnd in range(GROUPING_CHUNKS):
        count = per_chunk if rnd < GROUPING_CHUNKS - 1 else steps - per_chunk * rnd
        for group in ((True, False) if rnd % 2 == 0 else (False, True)):
            measured = _train_counting(models[group], replace(stage, max_steps=count),
                                       features, group, rnd)
            for name, value in measured.items():
                totals[group][name] += value
    epoch = {group: _padded_positions(lengths, epoch_batches(
        lengths, stage.batch_size, torch.Generator().manual_seed(0), group))
        for group in (True, False)}
    row: dict = {"features": len(features), "mean_length": sum(lengths) / len(lengths),
                 "max_length": max_length, "batch_size": stage.batch_size, "lr": stage.lr,
                 "steps_each": steps, "epoch_padded_positions_ratio": epoch[False] / epoch[True]}
    for group, name in ((True, "grouped"), (False, "random")):
        t = totals[group]
        row[name] = {"examples": t["examples"], "seconds": t["seconds"],
                     "examples_per_s": t["examples"] / t["seconds"],
                     "mean_padded_length": t["positions"] / t["examples"],
                     "padding_fraction": 1 - t["tokens"] / t["positions"]}
    row["ratio"] = row["grouped"]["examples_per_s"] / row["random"]["examples_per_s"]
    return row


def grouping_throughput() -> dict:
    """(g) Training examples/s of the baseline's training step (trainer.train) with
    length-grouped vs random batches, on the training split of real SQuAD (windows) and SST-2
    with the `local` profile's MiniLM, max_length, batch size and lr. Both arms start from the
    same weights and train the same number of steps, in chunks that alternate (grouped first in
    even rounds, random first in odd ones) after one untimed step each, so that load on the
    machine hits both; chunk k draws its batches from a fresh epoch of seed k in both arms.
    `epoch_padded_positions_ratio`: random / grouped positions computed over one whole epoch,
    the speedup the padding alone allows (the timed steps are a sample of the epoch)."""
    results: dict = {"threads": torch.get_num_threads(), "profile": "local",
                     "method": "baseline", "chunks_per_arm": GROUPING_CHUNKS}
    for key, steps in GROUPING_STEPS.items():
        results[key] = grouping_task(key, steps)
    results["squad"].update(target=">= 1.5", ok=results["squad"]["ratio"] >= 1.5)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench.json"))
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--only", choices=("skimming", "blockbert", "grouping"), default=None,
                        help="run one benchmark and print it (nothing written)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads [torch's default: physical cores]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TimingConfig(warmup=2, min_iters=10, min_seconds=args.min_seconds)
    long_config = TimingConfig(warmup=1, min_iters=5, min_seconds=0.0)
    if args.only == "skimming":
        print(json.dumps(skimming_efficiency(config), indent=2))
        return
    if args.only == "blockbert":
        print(json.dumps(blockbert_long_inputs(long_config), indent=2))
        return
    if args.only == "grouping":
        print(json.dumps(grouping_throughput(), indent=2))
        return
    figures = {"threads": torch.get_num_threads()}
    figures["a_harness_overhead"] = harness_overhead(config)
    figures["b_analytic_macs"] = analytic_macs_speed()
    figures["c_repeatability"] = repeatability(config)
    figures["d_removal_efficiency"] = removal_efficiency(config)
    figures["e_skimming_removal_efficiency"] = skimming_efficiency(config)
    figures["f_blockbert_long_inputs"] = blockbert_long_inputs(long_config)
    try:
        figures["g_training_grouping"] = grouping_throughput()
    except DataError as exc:  # no local data and no hub: the other figures still stand
        figures["g_training_grouping"] = {"skipped": str(exc)}
    curve_config = TimingConfig(warmup=1, min_iters=3, min_seconds=0.5, max_seconds=20.0)
    figures["d_latency_curves"] = {
        "minilm": latency_curve("minilm", (8, 16, 24, 32, 64, 128, 256, 384, 512), (1, 32),
                                curve_config, echo=lambda _: None)["fit"],
        "random:bert-base": latency_curve("random:bert-base", (8, 16, 24, 32, 64, 128, 384),
                                          (1,), curve_config, echo=lambda _: None)["fit"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
