"""deformer: k = 0 is the baseline; the passage cache changes no answer; the trace is what runs
(FLOPs counter) with the cache's build cost reported apart; single-segment tasks are refused;
an end-to-end run records the online and total columns."""

from __future__ import annotations

import pytest
import torch
from test_simple_baselines import method, tiny

from skimbench.errors import UsageError
from skimbench.evaluate import evaluate
from skimbench.features import collate
from skimbench.flops import count_macs
from skimbench.measure import _MethodForward
from skimbench.records import read_json
from skimbench.runner import RunSpec, resolve, run
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA, get_task


def pair_features(questions: list[int], passages: list[int], seed: int = 0) -> list[dict]:
    """[CLS] q [SEP] p [SEP] rows: question i has questions[i] tokens and reads passage
    passages[i] (rows with the same passage index share its tokens, as QA windows do)."""
    g = torch.Generator().manual_seed(seed)
    texts = {p: torch.randint(1000, 30000, (7 + 3 * p,), generator=g).tolist()
             for p in set(passages)}
    out = []
    for i, (nq, p) in enumerate(zip(questions, passages, strict=True)):
        question = torch.randint(1000, 30000, (nq,), generator=g).tolist()
        ids = [101, *question, 102, *texts[p], 102]
        out.append({"input_ids": ids, "token_type_ids": [0] * (nq + 2) + [1] * (len(texts[p]) + 1),
                    "labels": i % 2, "start_positions": nq + 3, "end_positions": nq + 4,
                    "example_index": i})
    return out


QUESTIONS, PASSAGES = [3, 5, 4, 6, 2], [0, 0, 1, 1, 0]


def test_zero_separate_layers_is_the_baseline():
    batch = collate(pair_features(QUESTIONS, PASSAGES), None)
    for kind in (CLASSIFICATION, EXTRACTIVE_QA):
        model = tiny(kind)
        with torch.inference_mode():
            torch.testing.assert_close(method("deformer", sep_layers=0).forward(model, batch)
                                       .logits, model(batch).logits)


@pytest.mark.parametrize("pad_to", [None, 48])
@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_passage_cache_changes_no_answer(kind, pad_to):
    model = tiny(kind)
    features = pair_features(QUESTIONS, PASSAGES)
    cached = method("deformer", sep_layers=1, max_first_length=4)
    plain = method("deformer", sep_layers=1, max_first_length=4, cache=False)
    with torch.inference_mode():
        for rows in ([0, 1, 2], [3, 4]):  # the second batch reuses passages of the first
            batch = collate([features[i] for i in rows], pad_to)
            got, want = cached.forward(model, batch), plain.forward(model, batch)
            real = batch["attention_mask"].bool()
            if kind == EXTRACTIVE_QA:
                torch.testing.assert_close(got.logits[real], want.logits[real], atol=1e-5,
                                           rtol=1e-5)
                assert got.logits[real].argmax(0).tolist() == want.logits[real].argmax(0).tolist()
            else:
                torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert cached.precomputed_size()["entries"] == 2  # one entry per passage
    assert cached.precomputed_size()["bytes"] == (8 + 11) * model.hidden_size * 4  # passage + [SEP]


def test_question_truncation_drops_question_tokens():
    model = tiny(EXTRACTIVE_QA)
    batch = collate(pair_features([6], [0]), None)
    with torch.inference_mode():
        out = method("deformer", sep_layers=1, max_first_length=2).forward(model, batch)
    assert out.trace.query_tokens.tolist() == [[4, 4 + 8]]  # [CLS] 2 tokens [SEP]; + passage [SEP]
    assert (out.logits[0, 3:7] < -1e3).all()  # the 4 dropped question tokens score nothing


def schedule(out, model) -> int:
    return int(out.trace.macs(model.hidden_size, model.ffn_size).sum())


@pytest.mark.parametrize("pad_to", [None, 48])
def test_counted_macs_equal_the_schedule(pad_to):
    """The counter sees what runs: without the cache, the schedule; with a cold cache, the
    online schedule plus each distinct passage built once; with a warm one, the schedule."""
    model = tiny(EXTRACTIVE_QA)
    batch = collate(pair_features(QUESTIONS, PASSAGES), pad_to)
    plain = method("deformer", sep_layers=1, cache=False)
    out = plain.forward(model, batch)
    assert count_macs(_MethodForward(plain, model), batch) == schedule(out, model)
    assert out.trace.query_tokens[0].tolist() == [out.trace.query_tokens[0, 1]] * 2
    cached = method("deformer", sep_layers=1)
    with torch.no_grad():
        out = cached.forward(model, batch)
    cached.clear_precomputed()
    built = dict(zip(out.trace.precomputed_key.tolist(), out.trace.precomputed_macs.tolist(),
                     strict=True))
    assert len(built) == 2
    assert count_macs(_MethodForward(cached, model), batch) == schedule(out, model) \
        + sum(built.values())
    assert count_macs(_MethodForward(cached, model), batch) == schedule(out, model)
    # online: the lower layer ran on the question slots only
    width_q = max(QUESTIONS) + 2
    assert out.trace.query_tokens[0, 0] == width_q and out.trace.pairs[0, 0] == width_q ** 2


def test_evaluation_charges_each_passage_once():
    model = tiny(CLASSIFICATION)
    task = get_task("mrpc")
    features = pair_features(QUESTIONS, PASSAGES)

    class Example:
        def __init__(self, i):
            self.id, self.label = str(i), i % 2

    examples = [Example(i) for i in range(len(features))]
    m = method("deformer", sep_layers=1)
    e = evaluate(m, model, task, examples, features, "none", 8, 64)
    h, f = model.hidden_size, model.ffn_size
    expected = sum(4 * n * h * h + 2 * n * n * h + 2 * n * h * f for n in (8, 11))
    assert e.precomputed_macs_sum == expected


def test_single_segment_task_is_refused():
    with pytest.raises(UsageError, match="two-segment"):
        resolve(RunSpec(method="deformer", task="sst2", profile="smoke"))
    assert resolve(RunSpec(method="deformer", task="squad", profile="smoke")) \
        .method.config.max_first_length == 25


@pytest.mark.parametrize("task, overrides", [("squad", {}),
                                             ("stsb", {"distill": "true", "sep_layers": "1"})])
def test_smoke_run_records_online_and_total(tiny_data, tmp_path, task, overrides):
    run_dir = run(RunSpec(method="deformer", task=task, profile="smoke", data_dir=tiny_data,
                          out=tmp_path, overrides=overrides, threads=1), lambda _line: None)
    record = read_json(run_dir / "record.json")
    for mode in record["padding"].values():
        assert not mode["macs_mismatch"]
        assert mode["precomputed_macs_sum"] > 0 and mode["precomputed_size"]["entries"] > 0
        assert mode["total_flops_speedup"] < mode["flops_speedup"]
        assert mode["total_cpu_time_speedup"] > 0
    if overrides:
        assert record["train"][0]["stage"] == "deformer"


def test_replay_grows_back_to_the_joint_width():
    """The oracle replays the lower layer at the question's width, the upper at the joint."""
    from skimbench.measure import replay_all

    model = tiny(EXTRACTIVE_QA)
    batch = collate(pair_features([3], [1]), None)
    m = method("deformer", sep_layers=1)
    widths = []
    for layer in model.layers:
        layer.attention.register_forward_hook(lambda mod, a, o: widths.append(a[0].shape[1]))
    replay_all(model, m, [batch])()
    assert widths[-2:] == [5, 5 + 11]


def test_report_shows_total_columns_only_with_a_cache():
    from test_report_render import make_frame

    from skimbench import report_render as rr

    old = rr.task_table(make_frame())  # records without the fields render as before
    assert "FLOPs speedup total (none)" not in old.columns
    frame = make_frame()
    frame.loc[frame["method"] == "truncate", "total_flops_speedup"] = 1.2
    shown = rr.task_table(frame)
    assert "FLOPs speedup total (none)" in shown.columns
    assert "1.20x" in shown["FLOPs speedup total (none)"].tolist()
