"""Task metrics in points (0-100), SQuAD v1.1/v2.0 scoring, percentile bootstrap CIs (also of
a paired difference) and ROC AUC.

Self-contained: imports only numpy, scipy.stats and the standard library.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "METRICS",
    "accuracy",
    "bootstrap_ci",
    "f1",
    "matthews",
    "normalize_answer",
    "paired_difference",
    "pearson",
    "roc_auc",
    "spearman",
    "squad_exact",
    "squad_f1",
    "squad_v1",
    "squad_v1_per_example",
    "squad_v2",
    "squad_v2_per_example",
]


# --------------------------------------------------------------------------- classification


def _pair(preds: Sequence, golds: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays of equal, non-zero length."""
    p, g = np.asarray(preds).ravel(), np.asarray(golds).ravel()
    if p.shape != g.shape:
        raise ValueError(f"preds and golds differ in length: {p.size} vs {g.size}")
    if p.size == 0:
        raise ValueError("preds and golds are empty")
    return p, g


def accuracy(preds: Sequence, golds: Sequence) -> float:
    """Percentage of exact label matches."""
    p, g = _pair(preds, golds)
    return float(100.0 * np.mean(p == g))


def f1(preds: Sequence, golds: Sequence, positive: object = 1) -> float:
    """Binary F1 of the `positive` class; 0.0 when it is never predicted nor gold (as sklearn)."""
    p, g = _pair(preds, golds)
    pp, gp = p == positive, g == positive
    tp = int(np.sum(pp & gp))
    denom = int(np.sum(pp)) + int(np.sum(gp))  # 2TP + FP + FN
    return float(100.0 * 2 * tp / denom) if denom else 0.0


def matthews(preds: Sequence, golds: Sequence) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K, as sklearn); 0.0 when undefined."""
    p, g = _pair(preds, golds)
    _, codes = np.unique(np.concatenate([p, g]), return_inverse=True)
    k = int(codes.max()) + 1
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (codes[p.size :], codes[: p.size]), 1.0)  # rows gold, columns pred
    t, q = cm.sum(axis=1), cm.sum(axis=0)
    n, c = cm.sum(), np.trace(cm)
    cov_pp, cov_tt = n * n - q @ q, n * n - t @ t
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(100.0 * (c * n - t @ q) / np.sqrt(cov_pp * cov_tt))


def _correlation(fn: Callable, preds: Sequence, golds: Sequence) -> float:
    """scipy correlation x100, 0.0 when undefined (n < 2, constant input, NaN)."""
    p, g = _pair(preds, golds)
    if p.size < 2:
        return 0.0
    p, g = p.astype(np.float64), g.astype(np.float64)
    if np.all(p == p[0]) or np.all(g == g[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on near-constant input; NaN is handled below
        r = float(fn(p, g)[0])
    return 0.0 if np.isnan(r) else 100.0 * r


def pearson(preds: Sequence, golds: Sequence) -> float:
    """Pearson r x100 (STS-B); 0.0 when undefined."""
    return _correlation(stats.pearsonr, preds, golds)


def spearman(preds: Sequence, golds: Sequence) -> float:
    """Spearman rho x100 (STS-B); 0.0 when undefined."""
    return _correlation(stats.spearmanr, preds, golds)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


# --------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD normalisation: lower -> drop punctuation -> drop articles -> fix spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token F1 in [0, 1]; v2.0 rule: if either side normalises to nothing, 1.0 iff both do."""
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _golds(answers: Sequence[str] | str) -> list[str]:
    """A bare string is one gold answer (guards against iterating its characters)."""
    return [answers] if isinstance(answers, str) else list(answers)


def _best(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) maximised over the gold answers."""
    return (
        max(squad_exact(prediction, a) for a in golds),
        max(squad_f1(prediction, a) for a in golds),
    )


def squad_v1_per_example(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-question (EM, F1) in [0, 1], in `references` order; a missing prediction is ""."""
    em, f = [], []
    for qid, answers in references.items():
        golds = _golds(answers)
        if not golds:
            raise ValueError(f"SQuAD v1.1 question {qid!r} has no gold answer; use squad_v2")
        e, s = _best(predictions.get(qid, ""), golds)
        em.append(e)
        f.append(s)
    return np.asarray(em, dtype=np.float64), np.asarray(f, dtype=np.float64)


def squad_v1(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float | int]:
    """evaluate-v1.1.py: exact_match and f1 in points over every id in `references`."""
    em, f = squad_v1_per_example(predictions, references)
    if em.size == 0:
        raise ValueError("references is empty")
    return {
        "exact_match": 100.0 * float(em.mean()),
        "f1": 100.0 * float(f.mean()),
        "total": em.size,
    }


def _v2_raw(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Ids, has-answer mask, unthresholded EM and F1, and raw predictions (missing -> "")."""
    qids, has, em, f, preds = [], [], [], [], []
    for qid, answers in references.items():
        golds = [a for a in _golds(answers) if normalize_answer(a)]
        pred = predictions.get(qid, "")
        e, s = _best(pred, golds or [""])
        qids.append(qid)
        has.append(bool(golds))
        em.append(e)
        f.append(s)
        preds.append(pred)
    return qids, np.asarray(has, bool), np.asarray(em, float), np.asarray(f, float), preds


def _na_vector(qids: list[str], na_probs: Mapping[str, float]) -> np.ndarray:
    """na_prob per question; every scored id must have one (the official script needs it too)."""
    missing = [q for q in qids if q not in na_probs]
    if missing:
        raise ValueError(f"na_probs lacks {len(missing)} question id(s), e.g. {missing[0]!r}")
    return np.asarray([float(na_probs[q]) for q in qids], dtype=np.float64)


def _apply_threshold(
    em: np.ndarray, f: np.ndarray, has: np.ndarray, na: np.ndarray | None, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """apply_no_ans_threshold: na_prob > threshold turns the prediction into "" (no answer)."""
    if na is None:
        return em, f
    forced = na > threshold
    no_ans_score = (~has).astype(np.float64)  # "" is right exactly when there is no answer
    return np.where(forced, no_ans_score, em), np.where(forced, no_ans_score, f)


def squad_v2_per_example(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float] | None = None,
    na_threshold: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-question (EM, F1) in [0, 1] after the no-answer threshold, in `references` order."""
    qids, has, em, f, _ = _v2_raw(predictions, references)
    na = None if na_probs is None else _na_vector(qids, na_probs)
    return _apply_threshold(em, f, has, na, na_threshold)


def _find_best_thresh(
    preds: list[str], scores: np.ndarray, na: np.ndarray, has: np.ndarray, order: list[int]
) -> tuple[float, float]:
    """Official find_best_thresh: sweep na_prob ascending from 'everything is no-answer'."""
    cur = best = float(np.sum(~has))
    best_thresh = 0.0
    for i in order:
        # Like the script, a non-empty raw prediction loses 1 on an unanswerable question.
        cur += scores[i] if has[i] else (-1.0 if preds[i] else 0.0)
        if cur > best:
            best, best_thresh = cur, float(na[i])
    return 100.0 * best / len(preds), best_thresh


def squad_v2(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float] | None = None,
    na_threshold: float = 1.0,
) -> dict[str, float | int]:
    """evaluate-v2.0.py: overall, HasAns_/NoAns_ (when non-empty) and, given na_probs, best_*."""
    qids, has, em_raw, f_raw, preds = _v2_raw(predictions, references)
    if not qids:
        raise ValueError("references is empty")
    na = None if na_probs is None else _na_vector(qids, na_probs)
    em, f = _apply_threshold(em_raw, f_raw, has, na, na_threshold)
    out: dict[str, float | int] = {
        "exact": 100.0 * float(em.mean()),
        "f1": 100.0 * float(f.mean()),
        "total": len(qids),
    }
    for prefix, mask in (("HasAns", has), ("NoAns", ~has)):
        if mask.any():
            out[f"{prefix}_exact"] = 100.0 * float(em[mask].mean())
            out[f"{prefix}_f1"] = 100.0 * float(f[mask].mean())
            out[f"{prefix}_total"] = int(mask.sum())
    if na is not None:
        # Ties broken in na_probs' own key order, as the script's sorted(na_probs, ...) does.
        pos = {q: i for i, q in enumerate(qids)}
        order = [
            pos[q] for q in sorted((q for q in na_probs if q in pos), key=na_probs.__getitem__)
        ]
        out["best_exact"], out["best_exact_thresh"] = _find_best_thresh(
            preds, em_raw, na, has, order
        )
        out["best_f1"], out["best_f1_thresh"] = _find_best_thresh(preds, f_raw, na, has, order)
    return out


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    statistic: Callable[..., float],
    arrays: tuple[np.ndarray, ...],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap CI: resample examples (rows) jointly across `arrays`."""
    cols = tuple(np.asarray(a) for a in arrays)
    if not cols:
        raise ValueError("bootstrap_ci needs at least one array")
    n = len(cols[0])
    if n == 0 or any(len(a) != n for a in cols):
        raise ValueError(f"arrays must be non-empty and equally long, got {[len(a) for a in cols]}")
    if n_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("need n_resamples >= 1 and 0 < alpha < 1")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples, dtype=np.float64)
    for r in range(n_resamples):  # a plain loop: ~0.1 s for 1000 x 10,000 with accuracy
        idx = rng.integers(0, n, size=n)
        values[r] = statistic(*(a[idx] for a in cols))
    lo, hi = np.percentile(values, [100.0 * alpha / 2, 100.0 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_difference(
    statistic: Callable[..., float],
    ours: tuple[np.ndarray, ...],
    theirs: tuple[np.ndarray, ...],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, tuple[float, float]]:
    """statistic(ours) - statistic(theirs) over the same examples, with a paired percentile
    bootstrap interval: every resample draws the same examples for both sides."""
    k = len(ours)

    def difference(*cols: np.ndarray) -> float:
        return statistic(*cols[:k]) - statistic(*cols[k:])

    arrays = tuple(np.asarray(a) for a in (*ours, *theirs))
    return difference(*arrays), bootstrap_ci(difference, arrays, n_resamples, seed, alpha)


# --------------------------------------------------------------------------- ranking


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC: the chance that a positive outscores a negative (ties count half), i.e. the
    Mann-Whitney U of the positives over n_pos * n_neg. None when a class is empty."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    positive, negative = scores[labels], scores[~labels]
    if positive.size == 0 or negative.size == 0:
        return None
    u = stats.mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(u / (positive.size * negative.size))
