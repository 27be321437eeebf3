"""FLOPs counters beside the analytic MACs (DESIGN 4.1, 4.2).

`count_macs` runs one forward under a counter; `compare_counters` sets every counter against the
trace's analytic MACs. All numbers here are MACs (one multiply-accumulate = 2 FLOPs).

What each counter measures on a BERT TaskModel (checked in tests/test_flops.py):
- `flop_counter`: torch's FlopCounterMode counts matmuls only (mm, addmm, bmm, sdpa kernels), so
  with the CPU sdpa mapping below it equals the analytic formula exactly, in eager and sdpa.
- `torchprofile`: traces with torch.jit; counts Linear, matmul and sdpa like the formula but also
  one MAC per affine layer-norm element and per element of every `mul` (eager's score scaling).
- `ptflops` (its `pytorch` backend): module hooks on nn.Linear/nn.LayerNorm plus patched
  torch.matmul/F.softmax; it adds bias adds and layer-norm elements, but never sees
  F.scaled_dot_product_attention, so under sdpa the attention matmuls are missing.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from skimbench.errors import UsageError
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, REGRESSION

COUNTERS = ("flop_counter", "torchprofile", "ptflops")
DEFAULT_COUNTER = "flop_counter"  # the protocol's counter: the only one held to the trace
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
KINDS = (CLASSIFICATION, EXTRACTIVE_QA, REGRESSION)

_aten = torch.ops.aten


def _sdpa_macs(query_shape, key_shape, value_shape) -> int:
    """MACs of softmax(q kᵀ) v for q (B, Hq, Lq, d), k (B, Hkv, Lk, d), v (B, Hkv, Lk, dv).

    q·kᵀ is B·Hq·Lq·Lk·d MACs and attn·v is B·Hq·Lq·Lk·dv; with dv = d and Hq·d = H that is the
    formula's 2·p·H per example (p = Lq·Lk). Grouped-query heads broadcast k and v to Hq heads.
    Causal masking is not discounted (as in torch's own sdpa formulas; BERT is not causal).
    """
    *batch, heads, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    groups = 1
    for size in batch:
        groups *= size
    return groups * heads * lq * lk * (d + dv)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of aten._scaled_dot_product_flash_attention_for_cpu (the forward)."""
    return 2 * _sdpa_macs(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                             out_shape=None, **kwargs) -> int:
    """FLOPs of its backward: dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q, twice the forward
    (the recomputation of P inside the kernel is not counted, as for torch's GPU kernels)."""
    return 4 * _sdpa_macs(query_shape, key_shape, value_shape)


# The ops torch 2.13 dispatches F.scaled_dot_product_attention (and its backward) to on CPU, seen
# with a dispatch trace for float32/64, bf16 and fp16, with or without attn_mask, whenever v's
# head size equals q's. Otherwise, or under SDPBackend.MATH, torch decomposes it into bmm, which
# FlopCounterMode already counts. torch's own registry covers only the CUDA kernels, so without
# these entries sdpa attention on CPU silently counts as 0.
SDPA_CPU_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


class _Positional(nn.Module):
    """The model as a module of tensors (positional or named), returning its logits: what
    torch.jit.trace (torchprofile) and ptflops can call. A fresh one per count, so any attribute
    a counter sets on its root module is dropped with it."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.keys, tensors, strict=False))
        batch.update(named)
        out = self.model(batch)
        return out.logits if hasattr(out, "logits") else out


def check_counter(counter: str) -> None:
    if counter not in COUNTERS:
        raise UsageError(f"unknown FLOPs counter {counter!r}: choose from {', '.join(COUNTERS)}")


def count_macs(model: nn.Module, batch: dict, counter: str = DEFAULT_COUNTER) -> int:
    """MACs of one forward `model(batch)` (the whole batch) as measured by `counter`.

    The model is put in eval mode (and left there); nothing else about it or torch is changed.
    """
    check_counter(counter)
    model.eval()
    if counter == DEFAULT_COUNTER:
        # FlopCounterMode reports FLOPs = 2 x MACs (2·m·n·k per matmul): halve it.
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as mode:
            model(batch)
        return mode.get_total_flops() // 2
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    wrapper = _Positional(model, tuple(tensors))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if counter == "torchprofile":
            from torchprofile import profile_macs

            # profile_macs reports MACs.
            return int(profile_macs(wrapper, tuple(tensors.values())))
        return _ptflops_macs(wrapper, tensors)


def _ptflops_macs(wrapper: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """ptflops' `pytorch` backend (its default), which reports MACs.

    It hooks nn.Linear / nn.LayerNorm modules (which transformers 5's BERT is built from) and
    patches torch.matmul, F.softmax etc. while it runs, restoring them afterwards. Its `aten`
    backend also runs on BERT but leaves forward pre-hooks on the model's children (ptflops
    0.7.5), so it is not used. Inputs are passed by name, so ptflops assumes batch size 1 and
    returns the MACs of the whole forward, not a per-example mean. BERT's GELU (which holds the
    unpatched F.gelu) and the pooler's tanh are not counted by it.
    """
    from ptflops import get_model_complexity_info

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        macs, _params = get_model_complexity_info(
            wrapper, tuple(tensors["input_ids"].shape), print_per_layer_stat=False,
            as_strings=False, input_constructor=lambda _shape: dict(tensors), ost=log,
            backend="pytorch")
    if macs is None:  # ptflops prints the exception and returns None instead of raising
        lines = log.getvalue().splitlines()
        reason = next((line for line in lines if line.startswith("<class ")),
                      "ptflops returned no result")
        raise RuntimeError(reason.replace("<class '", "").replace("'>", "", 1))
    return int(macs)


def random_batch(length: int, batch_size: int, kind: str, vocab_size: int, seed: int = 0) -> dict:
    """`batch_size` sequences of exactly `length` random token ids (no padding, one segment)."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for row in range(batch_size):
        ids = torch.randint(vocab_size, (length,), generator=generator).tolist()
        feature = {"input_ids": ids, "token_type_ids": [0] * length, "example_index": row}
        if kind == EXTRACTIVE_QA:
            feature.update(start_positions=0, end_positions=0)
        else:
            feature["labels"] = 0.0 if kind == REGRESSION else 0
        features.append(feature)
    from skimbench.features import collate

    return collate(features, None)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:200] if first else type(exc).__name__


def compare_counters(backbone_name: str, lengths, attn_implementations=ATTN_IMPLEMENTATIONS,
                     kind: str = CLASSIFICATION, batch_size: int = 1,
                     counters=COUNTERS) -> list[dict]:
    """Analytic MACs vs every counter, one row per (attention implementation, length).

    Each row: {"length", "attn", "batch_size", "analytic": int, "counters": {name: {"macs":
    int | None, "diff": (macs - analytic) / analytic | None, "error": one-line reason | None}}}.
    A counter that fails on a configuration gives macs None and its reason, never an exception.
    """
    from skimbench.backbone import resolve_backbone
    from skimbench.model import TaskModel

    lengths = [int(n) for n in lengths]
    unknown = [c for c in counters if c not in COUNTERS]
    if unknown:
        raise UsageError(f"unknown FLOPs counter {unknown[0]!r}: choose from {', '.join(COUNTERS)}")
    bad_attn = [a for a in attn_implementations if a not in ATTN_IMPLEMENTATIONS]
    if bad_attn:
        raise UsageError(f"unknown attention implementation {bad_attn[0]!r}: choose from "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if kind not in KINDS:
        raise UsageError(f"unknown task kind {kind!r}: choose from {', '.join(KINDS)}")
    if batch_size < 1 or any(n < 1 for n in lengths):
        raise UsageError("lengths and the batch size must be positive integers")
    backbone = resolve_backbone(backbone_name)
    config = backbone.config()
    too_long = [n for n in lengths if n > config.max_position_embeddings]
    if too_long:
        raise UsageError(f"length {too_long[0]} exceeds backbone {backbone_name!r}'s "
                         f"{config.max_position_embeddings} positions")
    rows = []
    for attn in attn_implementations:
        torch.manual_seed(0)
        num_labels = 1 if kind == REGRESSION else 2
        model = TaskModel(backbone.encoder(attn), kind, num_labels).eval()
        for length in lengths:
            batch = random_batch(length, batch_size, kind, config.vocab_size)
            with torch.no_grad():
                trace = model(batch).trace
            analytic = int(trace.macs(model.hidden_size, model.ffn_size).sum())
            results = {}
            for name in counters:
                try:
                    macs = count_macs(model, batch, name)
                    results[name] = {"macs": macs, "diff": (macs - analytic) / analytic,
                                     "error": None}
                except Exception as exc:  # a counter's failure is a result, not a crash
                    results[name] = {"macs": None, "diff": None, "error": _reason(exc)}
            rows.append({"length": length, "attn": attn, "batch_size": batch_size,
                         "analytic": analytic, "counters": results})
    return rows


def parse_list(value: str, what: str, valid: tuple[str, ...] | None = None) -> list[str]:
    """A comma-separated option -> its items; unknown items are one UsageError."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise UsageError(f"--{what} is empty: give a comma-separated list")
    if valid is not None:
        for item in items:
            if item not in valid:
                raise UsageError(f"unknown --{what} value {item!r}: choose from "
                                 f"{', '.join(valid)}")
    return items


def parse_lengths(value: str) -> list[int]:
    """'128,384' -> [128, 384]; anything but positive integers is one UsageError."""
    lengths = []
    for item in parse_list(value, "length"):
        if not item.isdigit() or int(item) < 1:
            raise UsageError(f"bad --length value {item!r}: give positive integers, "
                             "e.g. --length 128,384")
        lengths.append(int(item))
    return lengths
