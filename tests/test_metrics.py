"""skimbench.metrics: every expected value below is worked out by hand in the comment beside it."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from skimbench import metrics

# Binary confusion matrix TP=3, FP=1, FN=2, TN=4 (n=10), positive class 1.
GOLDS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
PREDS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
#        TP TP TP FP FN FN TN TN TN TN


# --------------------------------------------------------------------------- classification


def test_accuracy_on_confusion_matrix():
    # (TP + TN) / n = (3 + 4) / 10 = 70 points
    assert metrics.accuracy(PREDS, GOLDS) == pytest.approx(70.0)
    assert isinstance(metrics.accuracy(PREDS, GOLDS), float)


def test_f1_on_confusion_matrix():
    # 2TP / (2TP + FP + FN) = 6 / 9 = 66.67 (P = 3/4, R = 3/5, 2PR/(P+R) = 0.9/1.35 = 2/3)
    assert metrics.f1(PREDS, GOLDS) == pytest.approx(200 / 3)
    # positive=0 swaps roles: TP'=4, FP'=2, FN'=1 -> 8 / 11 = 72.73
    assert metrics.f1(PREDS, GOLDS, positive=0) == pytest.approx(800 / 11)


def test_f1_string_labels_and_undefined_case():
    # TP=1 ("yes","yes"), FP=1, FN=0 -> 2 / 3
    assert metrics.f1(["yes", "yes", "no"], ["yes", "no", "no"], positive="yes") == pytest.approx(
        200 / 3
    )
    # no positive predicted and none gold: 2TP+FP+FN = 0 -> documented 0.0 (sklearn's default)
    assert metrics.f1([0, 0, 0], [0, 0, 0]) == 0.0
    # positives gold but never predicted: TP=0 -> 0
    assert metrics.f1([0, 0], [1, 0]) == 0.0


def test_matthews_binary():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(4*5*5*6)
    # = 10 / sqrt(600) = 1 / sqrt(6) -> 100 / sqrt(6) = 40.82 points
    assert metrics.matthews(PREDS, GOLDS) == pytest.approx(100 / math.sqrt(6))


def test_matthews_multiclass():
    # General formula (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)),
    # c = correct, s = n, p_k / t_k = predicted / true counts of class k.
    # Cyclic all-wrong 3 classes: c=0, s=3, p=t=(1,1,1): (0 - 3) / sqrt(6 * 6) = -0.5
    assert metrics.matthews([1, 2, 0], [0, 1, 2]) == pytest.approx(-50.0)
    # Half right, 3 classes: c=3, s=6, p=t=(2,2,2): (18 - 12) / sqrt(24 * 24) = 0.25
    assert metrics.matthews([0, 1, 1, 2, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(25.0)
    # Perfect: c=s=6 -> (36 - 12) / 24 = 1
    assert metrics.matthews([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]) == pytest.approx(100.0)


def test_matthews_undefined_is_zero():
    # all predictions one class: s^2 - sum p_k^2 = 16 - 16 = 0 -> undefined -> 0.0
    assert metrics.matthews([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    # all golds one class: same on the gold side
    assert metrics.matthews([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0


def test_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        metrics.f1([], [])


# --------------------------------------------------------------------------- regression


def test_pearson_spearman_monotone_nonlinear():
    x, y = [1, 2, 3, 4], [1, 4, 9, 16]
    # ranks identical -> spearman = 1
    assert metrics.spearman(x, y) == pytest.approx(100.0)
    # dx = (-1.5,-.5,.5,1.5), dy = (-6.5,-3.5,1.5,8.5); sum dx*dy = 25, sum dx^2 = 5,
    # sum dy^2 = 129 -> r = 25 / sqrt(645) = 0.98437
    assert metrics.pearson(x, y) == pytest.approx(100 * 25 / math.sqrt(645))
    assert metrics.pearson(x, y) < 100.0


def test_pearson_spearman_anticorrelated():
    # y = 5 - x exactly: both -1
    assert metrics.pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-100.0)
    assert metrics.spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(
        -100.0
    )


def test_correlations_undefined_are_zero():
    # constant input: zero variance -> undefined -> 0.0 (and no warning leaks)
    assert metrics.pearson([1, 2, 3], [2, 2, 2]) == 0.0
    assert metrics.spearman([5, 5, 5], [1, 2, 3]) == 0.0
    # a single example: undefined
    assert metrics.pearson([1], [2]) == 0.0


def test_metrics_registry():
    assert set(metrics.METRICS) == {"accuracy", "f1", "matthews", "pearson", "spearman"}
    assert metrics.METRICS["accuracy"](PREDS, GOLDS) == pytest.approx(70.0)


# --------------------------------------------------------------------------- SQuAD normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("theatre", "theatre"),  # \b...\b: article must be a whole word
        ("A", ""),  # lower -> "a" -> removed
        ("(a)", ""),  # punctuation goes first, leaving the bare article
        ("U.S.A.", "usa"),
        ("rock-n-roll", "rocknroll"),
        ("don't", "dont"),
        ("the-end", "theend"),  # punctuation removed before articles: no word "the" remains
        ("  multiple   spaces\tand\nnewlines ", "multiple spaces and newlines"),
        ("1990–2000", "1990–2000"),  # en dash is not in string.punctuation: kept
        ("«Quoted»", "«quoted»"),  # guillemets likewise kept
    ],
)
def test_normalize_answer(raw, expected):
    assert metrics.normalize_answer(raw) == expected


# --------------------------------------------------------------------------- SQuAD per answer


def test_squad_exact():
    assert metrics.squad_exact("The Cat.", "cat") == 1.0  # both normalise to "cat"
    assert metrics.squad_exact("cats", "cat") == 0.0
    assert metrics.squad_exact("", "the") == 1.0  # both normalise to ""


def test_squad_f1_hand_cases():
    # [cat, sat, on, mat] vs [cat, on, mat]: common 3, P = 3/4, R = 3/3 -> 2*(3/4)/(7/4) = 6/7
    assert metrics.squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # multiplicity: [x, x, y] vs [x, y, y]: common min(2,1) + min(1,2) = 2, P = R = 2/3
    assert metrics.squad_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # [x, x, x] vs [x]: common 1, P = 1/3, R = 1 -> (2/3)/(4/3) = 1/2
    assert metrics.squad_f1("x x x", "x") == pytest.approx(0.5)
    # articles vanish before counting: [b] vs [b] -> 1
    assert metrics.squad_f1("a a b", "the b") == pytest.approx(1.0)
    assert metrics.squad_f1("red fox", "blue whale") == 0.0


def test_squad_f1_empty_rules_v2():
    assert metrics.squad_f1("", "") == 1.0  # both empty
    assert metrics.squad_f1("the", "") == 1.0  # "the" normalises to empty too
    assert metrics.squad_f1("paris", "") == 0.0
    assert metrics.squad_f1("", "paris") == 0.0


# --------------------------------------------------------------------------- SQuAD v1.1


def test_squad_v1():
    refs = {
        "q1": ["Denver Broncos", "The Denver Broncos"],
        "q2": ["Santa Clara, California", "Levi's Stadium"],
        "q3": ["Super Bowl 50"],
    }
    preds = {
        "q1": "denver broncos!",  # EM 1, F1 1
        # [levis, stadium, in, santa, clara] (5 tokens)
        #   vs [santa, clara, california]: common 2, P 2/5, R 2/3 -> (8/15)/(16/15) = 1/2
        #   vs [levis, stadium]:           common 2, P 2/5, R 1   -> (4/5)/(7/5)   = 4/7
        # max = 4/7, EM 0
        "q2": "Levi's Stadium in Santa Clara",
        # q3 missing -> "" -> EM 0, F1 0
        "extra": "ignored: not in references",
    }
    out = metrics.squad_v1(preds, refs)
    assert out["exact_match"] == pytest.approx(100 / 3)  # 1 of 3
    assert out["f1"] == pytest.approx(100 * (1 + 4 / 7) / 3)  # = 1100/21 = 52.38
    assert out["total"] == 3
    em, f = metrics.squad_v1_per_example(preds, refs)
    np.testing.assert_allclose(em, [1, 0, 0])
    np.testing.assert_allclose(f, [1, 4 / 7, 0])


def test_squad_v1_rejects_empty_gold_list():
    with pytest.raises(ValueError):
        metrics.squad_v1({"q": "x"}, {"q": []})


# --------------------------------------------------------------------------- SQuAD v2.0

V2_REFS = {
    "a1": ["Paris"],
    "a2": ["blue whale", "the blue whale"],
    "a3": ["1990"],
    "u1": [],  # unanswerable: empty list
    "u2": [""],  # unanswerable: only empty strings
}
V2_PREDS = {
    "a1": "paris",  # EM 1, F1 1
    "a2": "whale",  # [whale] vs [blue, whale]: P 1, R 1/2 -> F1 2/3; EM 0
    "a3": "",  # abstains on an answerable question: 0, 0
    "u1": "",  # correct abstention: 1, 1
    "u2": "London",  # answers an unanswerable question: 0, 0
}
V2_NA = {"a1": 0.1, "a2": 0.6, "a3": 0.9, "u1": 0.8, "u2": 0.7}


def test_squad_v2_without_na_probs():
    out = metrics.squad_v2(V2_PREDS, V2_REFS)
    # EM (1,0,0,1,0) -> 2/5; F1 (1,2/3,0,1,0) -> (8/3)/5
    assert out["exact"] == pytest.approx(40.0)
    assert out["f1"] == pytest.approx(100 * 8 / 15)
    assert out["total"] == 5
    # HasAns a1..a3: EM 1/3, F1 (5/3)/3 = 5/9
    assert out["HasAns_exact"] == pytest.approx(100 / 3)
    assert out["HasAns_f1"] == pytest.approx(500 / 9)
    assert out["HasAns_total"] == 3
    # NoAns u1, u2: 1/2 both
    assert out["NoAns_exact"] == pytest.approx(50.0)
    assert out["NoAns_f1"] == pytest.approx(50.0)
    assert out["NoAns_total"] == 2
    assert not any(k.startswith("best_") for k in out)


def test_squad_v2_with_threshold():
    out = metrics.squad_v2(V2_PREDS, V2_REFS, na_probs=V2_NA, na_threshold=0.65)
    # na_prob > 0.65 forces "": a3 (0.9) stays 0; u1 (0.8) stays 1; u2 (0.7) becomes 1.
    # EM (1,0,0,1,1) -> 3/5; F1 (1,2/3,0,1,1) -> (11/3)/5 = 11/15
    assert out["exact"] == pytest.approx(60.0)
    assert out["f1"] == pytest.approx(100 * 11 / 15)
    assert out["total"] == 5
    assert out["HasAns_exact"] == pytest.approx(100 / 3)
    assert out["HasAns_f1"] == pytest.approx(500 / 9)
    assert out["HasAns_total"] == 3
    assert out["NoAns_exact"] == pytest.approx(100.0)
    assert out["NoAns_f1"] == pytest.approx(100.0)
    assert out["NoAns_total"] == 2
    # find_best_thresh on RAW scores: start "all no-answer" = #NoAns = 2, thresh 0.0; then in
    # na_prob order a1 .1, a2 .6, u2 .7, u1 .8, a3 .9 add has-ans score, or -1 for a non-empty
    # pred on a no-ans question, else 0.
    # EM: 2 -> a1 +1 = 3 (best, 0.1) -> a2 +0 = 3 -> u2 -1 = 2 -> u1 0 -> a3 0. 3/5, thresh 0.1
    assert out["best_exact"] == pytest.approx(60.0)
    assert out["best_exact_thresh"] == pytest.approx(0.1)
    # F1: 2 -> a1 = 3 (0.1) -> a2 +2/3 = 11/3 (best, 0.6) -> u2 = 8/3 -> ... ; (11/3)/5
    assert out["best_f1"] == pytest.approx(100 * 11 / 15)
    assert out["best_f1_thresh"] == pytest.approx(0.6)
    em, f = metrics.squad_v2_per_example(V2_PREDS, V2_REFS, V2_NA, 0.65)
    np.testing.assert_allclose(em, [1, 0, 0, 1, 1])
    np.testing.assert_allclose(f, [1, 2 / 3, 0, 1, 1])


def test_squad_v2_default_threshold_changes_nothing_but_adds_best():
    # na_prob <= 1.0 is never > 1.0: same main scores as without na_probs, plus best_* keys
    out = metrics.squad_v2(V2_PREDS, V2_REFS, na_probs=V2_NA)
    assert out["exact"] == pytest.approx(40.0)
    assert out["f1"] == pytest.approx(100 * 8 / 15)
    assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"} <= set(out)


def test_squad_v2_omits_empty_subsets_and_missing_pred_is_no_answer():
    out = metrics.squad_v2({}, {"u": [], "v": [""]})
    # no predictions at all -> "" everywhere -> both unanswerable right: 100
    assert out == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 2,
        "NoAns_exact": 100.0,
        "NoAns_f1": 100.0,
        "NoAns_total": 2,
    }
    out = metrics.squad_v2({"a": "x"}, {"a": ["x"]})
    assert "NoAns_total" not in out and out["HasAns_total"] == 1


def test_squad_v2_na_probs_must_cover_references():
    with pytest.raises(ValueError):
        metrics.squad_v2(V2_PREDS, V2_REFS, na_probs={"a1": 0.1})


# --------------------------------------------------------------------------- bootstrap


def _acc(p, g):
    return metrics.accuracy(p, g)


def _sample(n, seed=1):
    rng = np.random.default_rng(seed)
    golds = rng.integers(0, 2, size=n)
    preds = np.where(rng.random(n) < 0.8, golds, 1 - golds)  # ~80% accurate
    return preds, golds


def test_bootstrap_deterministic_and_contains_estimate():
    p, g = _sample(500)
    a = metrics.bootstrap_ci(_acc, (p, g), n_resamples=300, seed=7)
    b = metrics.bootstrap_ci(_acc, (p, g), n_resamples=300, seed=7)
    c = metrics.bootstrap_ci(_acc, (p, g), n_resamples=300, seed=8)
    assert a == b
    assert a != c
    assert all(isinstance(x, float) for x in a)
    lo, hi = a
    assert lo < metrics.accuracy(p, g) < hi


def test_bootstrap_constant_data_collapses():
    ones = np.ones(50)
    assert metrics.bootstrap_ci(_acc, (ones, ones), n_resamples=100) == (100.0, 100.0)


def test_bootstrap_width_shrinks_with_n():
    def width(n):
        lo, hi = metrics.bootstrap_ci(_acc, _sample(n), n_resamples=400, seed=0)
        return hi - lo

    # width ~ 1/sqrt(n): 100 -> 10,000 examples should shrink it about tenfold
    assert width(10_000) < width(100) / 4


def test_bootstrap_squad_per_example_mean():
    em, f = metrics.squad_v1_per_example(
        {"q1": "a b", "q2": "c"}, {"q1": ["a b"], "q2": ["d"], "q3": ["e"]}
    )
    lo, hi = metrics.bootstrap_ci(lambda x: 100 * x.mean(), (f,), n_resamples=200)
    assert 0.0 <= lo <= 100 / 3 <= hi <= 100.0


def test_bootstrap_speed():
    p, g = _sample(10_000)
    t0 = time.perf_counter()
    metrics.bootstrap_ci(_acc, (p, g), n_resamples=1000)
    assert time.perf_counter() - t0 < 1.0
