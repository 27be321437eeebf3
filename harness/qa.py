"""Extractive QA on SQuAD: examples, sliding-window features and span decoding for BERT."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Offset = tuple[int, int]


@dataclass
class QAExample:
    """One SQuAD question with its context and gold answers ([] when unanswerable)."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


@dataclass
class QAFeature:
    """One [CLS] question [SEP] context-window [SEP] model input with its answer labels."""

    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[Offset | None]
    question_length: int
    start_position: int
    end_position: int
    # True where this window gives the token its most context (BERT's "max context" rule):
    # with overlapping windows, an answer may start only where its token is best placed.
    max_context: list[bool] = field(default_factory=list)


def _paragraph_examples(paragraph: dict[str, Any]) -> list[QAExample]:
    """Examples of one SQuAD paragraph; v2.0 impossible questions get no answers."""
    context = paragraph["context"]
    out = []
    for qa in paragraph["qas"]:
        answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
        out.append(QAExample(
            id=qa["id"],
            question=qa["question"],
            context=context,
            answers=[a["text"] for a in answers],
            answer_starts=[int(a["answer_start"]) for a in answers],
        ))
    return out


def squad_articles(squad_json: dict[str, Any]) -> list[list[QAExample]]:
    """Examples grouped per article in file order, so splits can be made by article."""
    return [
        [ex for par in article["paragraphs"] for ex in _paragraph_examples(par)]
        for article in squad_json["data"]
    ]


def squad_examples(squad_json: dict[str, Any]) -> list[QAExample]:
    """All examples of a parsed SQuAD v1.1/v2.0 file, flattened in file order."""
    return [ex for article in squad_articles(squad_json) for ex in article]


def window_starts(n_tokens: int, window: int, doc_stride: int) -> list[int]:
    """Context-token starts of the windows: 0, stride, 2*stride, ... until one reaches the end.

    The step is clamped to the window size so no token is ever skipped; an empty context
    still gets one (empty) window so that every example has a feature.
    """
    if window <= 0 or doc_stride <= 0:
        raise ValueError(f"window ({window}) and doc_stride ({doc_stride}) must be positive")
    step = min(doc_stride, window)
    starts = [0]
    while starts[-1] + window < n_tokens:
        starts.append(starts[-1] + step)
    return starts


def _answer_token_span(offsets: Sequence[Offset], start: int, end: int) -> tuple[int, int] | None:
    """First and last context tokens overlapping chars [start, end), None if no token does."""
    hit = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
    return (hit[0], hit[-1]) if hit else None


def _max_context_window(spans: Sequence[tuple[int, int]], n_tokens: int) -> list[int]:
    """Per context token, the window where min(left, right context) + 0.01 * length is largest."""
    best = [0] * n_tokens
    score = [-1.0] * n_tokens
    for j, (ws, we) in enumerate(spans):
        for p in range(ws, we):
            value = min(p - ws, we - 1 - p) + 0.01 * (we - ws)
            if value > score[p]:
                best[p], score[p] = j, value
    return best


def build_features(
    examples: Sequence[QAExample],
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> list[QAFeature]:
    """Tokenise each question/unique context once (batched) and cut step-`doc_stride` windows."""
    if not examples:
        return []
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    ctx_enc = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True,
                        return_token_type_ids=False, return_attention_mask=False, verbose=False)
    ctx_index = {c: i for i, c in enumerate(contexts)}
    q_enc = tokenizer([ex.question for ex in examples], add_special_tokens=False,
                      return_token_type_ids=False, return_attention_mask=False, verbose=False)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    ctx_ids_all = ctx_enc["input_ids"]
    ctx_offs_all = [[(int(a), int(b)) for a, b in offs] for offs in ctx_enc["offset_mapping"]]

    features: list[QAFeature] = []
    for ex_i, ex in enumerate(examples):
        q_ids = q_enc["input_ids"][ex_i][:max_query_length]
        c = ctx_index[ex.context]
        ctx_ids, ctx_offs = ctx_ids_all[c], ctx_offs_all[c]
        window = max_length - len(q_ids) - 3
        if window <= 0:
            raise ValueError(f"max_length {max_length} leaves no room for context of {ex.id}")
        span = None
        if ex.answers:
            a0 = ex.answer_starts[0]
            span = _answer_token_span(ctx_offs, a0, a0 + len(ex.answers[0]))
        head_ids = [cls_id, *q_ids, sep_id]
        head_offs: list[Offset | None] = [None] * len(head_ids)
        spans = [(ws, min(ws + window, len(ctx_ids)))
                 for ws in window_starts(len(ctx_ids), window, doc_stride)]
        owner = _max_context_window(spans, len(ctx_ids))
        for j, (ws, we) in enumerate(spans):
            n_ctx = we - ws
            start_pos = end_pos = 0
            if span is not None and ws <= span[0] and span[1] < we:
                start_pos = span[0] - ws + len(head_ids)
                end_pos = span[1] - ws + len(head_ids)
            features.append(QAFeature(
                example_index=ex_i,
                input_ids=head_ids + ctx_ids[ws:we] + [sep_id],
                token_type_ids=[0] * len(head_ids) + [1] * (n_ctx + 1),
                offsets=head_offs + ctx_offs[ws:we] + [None],
                question_length=len(q_ids),
                start_position=start_pos,
                end_position=end_pos,
                max_context=[False] * len(head_ids) + [owner[p] == j for p in range(ws, we)]
                + [False],
            ))
    return features


def _as_rows(logits: Any, features: Sequence[QAFeature]) -> list[np.ndarray]:
    """Per-feature 1-D float arrays cut to each feature's length (accepts padded 2-D input)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    if len(logits) != len(features):
        raise ValueError(f"{len(logits)} logit rows for {len(features)} features")
    rows = []
    for row, f in zip(logits, features, strict=True):
        if isinstance(row, torch.Tensor):
            row = row.detach().float().cpu().numpy()
        row = np.asarray(row, dtype=np.float64)[: len(f.input_ids)]
        if len(row) != len(f.input_ids):
            raise ValueError(f"logits of length {len(row)} for a feature of {len(f.input_ids)}")
        rows.append(row)
    return rows


def _best_span(
    f: QAFeature, start: np.ndarray, end: np.ndarray, n_best: int, max_answer_length: int
) -> tuple[float, int, int] | None:
    """Best (score, start, end) among top-n context starts x ends of one window, if any valid."""
    lo, hi = f.question_length + 2, len(f.input_ids) - 1  # context tokens are [lo, hi)
    if hi <= lo:
        return None
    starts = start[lo:hi]
    if f.max_context:
        starts = np.where(np.asarray(f.max_context[lo:hi]), starts, -np.inf)
    s_idx = lo + np.argsort(-starts, kind="stable")[:n_best]
    e_idx = lo + np.argsort(-end[lo:hi], kind="stable")[:n_best]
    length = e_idx[None, :] - s_idx[:, None]
    scores = np.where((length >= 0) & (length < max_answer_length) & np.isfinite(
        starts[s_idx - lo])[:, None],
                      start[s_idx][:, None] + end[e_idx][None, :], -np.inf)
    k = int(np.argmax(scores))
    best = float(scores.flat[k])
    if best == -np.inf:
        return None
    return best, int(s_idx[k // len(e_idx)]), int(e_idx[k % len(e_idx)])


def decode_predictions(
    examples: Sequence[QAExample],
    features: Sequence[QAFeature],
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_length: int = 30,
    with_null: bool = False,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Best span text per example id over all its windows, plus null-minus-best-span odds.

    Examples without features or without a valid span predict "" with odds +inf.
    """
    starts, ends = _as_rows(start_logits, features), _as_rows(end_logits, features)
    best: dict[int, tuple[float, int, int, int]] = {}  # example -> (score, feature, start, end)
    null: dict[int, float] = {}
    for f_i, (f, s, e) in enumerate(zip(features, starts, ends, strict=True)):
        ex_i = f.example_index
        null[ex_i] = min(null.get(ex_i, np.inf), float(s[0] + e[0]))
        cand = _best_span(f, s, e, n_best, max_answer_length)
        if cand is not None and (ex_i not in best or cand[0] > best[ex_i][0]):
            best[ex_i] = (cand[0], f_i, cand[1], cand[2])

    preds: dict[str, str] = {}
    odds: dict[str, float] = {}
    for ex_i, ex in enumerate(examples):
        if ex_i not in best:
            preds[ex.id], odds[ex.id] = "", float("inf")
            continue
        score, f_i, s_tok, e_tok = best[ex_i]
        odds[ex.id] = null[ex_i] - score
        offs = features[f_i].offsets
        s_off, e_off = offs[s_tok], offs[e_tok]
        assert s_off is not None and e_off is not None
        text = ex.context[s_off[0]:e_off[1]]
        preds[ex.id] = "" if with_null and odds[ex.id] > null_threshold else text
    return preds, odds
