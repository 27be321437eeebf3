"""FLOPs counters against the analytic MACs of DESIGN 4.1 (tiny random models; one BERT-base)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from skimbench import flops
from skimbench.backbone import resolve_backbone
from skimbench.cli import main
from skimbench.errors import UsageError
from skimbench.features import collate
from skimbench.flops import COUNTERS, compare_counters, count_macs
from skimbench.model import TaskModel, Trace
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA

# random:tiny (L=2 H=32 A=2 F=64) plus two shapes made by editing its config: F != 4H, more
# layers and heads, a single head.
SHAPES = {
    "tiny": {},
    "L3-H48-A4-F80": dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=4,
                          intermediate_size=80),
    "L1-H64-A1-F256": dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=1,
                           intermediate_size=256),
}


def task_model(shape: dict, attn: str, kind: str) -> TaskModel:
    from transformers import AutoModel

    config = resolve_backbone("random:tiny").config()
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, attn_implementation=attn)
    return TaskModel(encoder, kind, 3 if kind == CLASSIFICATION else 2).eval()


def batch_of(length: int, batch_size: int = 1, kind: str = CLASSIFICATION) -> dict:
    """`batch_size` unpadded features of exactly `length` tokens, through `collate`."""
    generator = torch.Generator().manual_seed(length)
    features = []
    for row in range(batch_size):
        feature = {"input_ids": torch.randint(1000, 30000, (length,), generator=generator)
                   .tolist(), "token_type_ids": [0] * length, "example_index": row}
        if kind == EXTRACTIVE_QA:
            feature.update(start_positions=0, end_positions=0)
        else:
            feature["labels"] = 0
        features.append(feature)
    batch = collate(features, None)
    assert bool(batch["attention_mask"].all())
    return batch


def analytic(model: TaskModel, batch: dict) -> int:
    with torch.no_grad():
        trace = model(batch).trace
    return int(trace.macs(model.hidden_size, model.ffn_size).sum())


def attention_macs(model: TaskModel, batch: dict) -> int:
    """The formula's 2·p·H per layer, p = n² per example."""
    batch_size, length = batch["input_ids"].shape
    return len(model.layers) * batch_size * 2 * length * length * model.hidden_size


# --- flop_counter == analytic, exactly ---------------------------------------------------------

@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flop_counter_equals_the_analytic_macs(shape, attn, kind):
    model = task_model(SHAPES[shape], attn, kind)
    for length in (7, 32, 100):
        batch = batch_of(length, kind=kind)
        assert count_macs(model, batch, "flop_counter") == analytic(model, batch), length


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flop_counter_equals_the_analytic_macs_at_batch_size_above_one(attn, kind):
    model = task_model(SHAPES["L3-H48-A4-F80"], attn, kind)
    for length in (5, 40):
        batch = batch_of(length, batch_size=3, kind=kind)
        assert count_macs(model, batch, "flop_counter") == analytic(model, batch), length


def test_without_the_sdpa_mapping_attention_matmuls_are_missed_exactly():
    """Plain FlopCounterMode misses the CPU sdpa kernel: short by 2·p·H per layer, no more."""
    for shape in ("tiny", "L3-H48-A4-F80"):
        sdpa, eager = (task_model(SHAPES[shape], attn, CLASSIFICATION) for attn in
                       ("sdpa", "eager"))
        for length in (7, 32):
            batch = batch_of(length, batch_size=2)
            expected = analytic(sdpa, batch)
            for model, missing in ((sdpa, attention_macs(sdpa, batch)), (eager, 0)):
                with torch.no_grad(), FlopCounterMode(display=False) as plain:
                    model(batch)
                assert plain.get_total_flops() // 2 == expected - missing
            assert attention_macs(sdpa, batch) > 0


def test_sdpa_math_fallback_is_counted_without_the_mapping():
    """The mapping is needed for the fused CPU kernel only; the math path is plain bmm."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = task_model(SHAPES["tiny"], "sdpa", CLASSIFICATION)
    batch = batch_of(16, batch_size=2)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as plain:
        model(batch)
    assert plain.get_total_flops() // 2 == analytic(model, batch)


def test_sdpa_mapping_matches_explicit_matmuls_forward_and_backward():
    """Lq != Lk: B·heads·Lq·Lk·2d MACs forward, twice that backward, as the explicit matmuls.

    (With dv != d torch leaves the fused CPU kernel for the math path, so d = dv here.)
    """
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 4, requires_grad=True)
    k = torch.randn(2, 3, 6, 4, requires_grad=True)
    v = torch.randn(2, 3, 6, 4, requires_grad=True)

    def explicit():
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v

    def fused():
        return F.scaled_dot_product_attention(q, k, v, scale=0.5)

    def count(attention, mapping):
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as forward:
            attention()
        with FlopCounterMode(display=False, custom_mapping=mapping) as both:
            attention().sum().backward()
        return forward.get_total_flops(), both.get_total_flops()

    assert torch.allclose(explicit(), fused(), atol=1e-5)
    assert count(fused, None) == (0, 0)          # the fused CPU kernel ran, and is unmapped
    macs = 2 * 3 * 5 * 6 * (4 + 4)
    assert count(fused, flops.SDPA_CPU_FLOPS) == count(explicit, None) == (2 * macs, 2 * 3 * macs)


def test_sdpa_formula_for_other_value_widths_and_batch_dims():
    assert flops._sdpa_macs((2, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 7)) == 2 * 3 * 5 * 6 * (4 + 7)
    assert flops._sdpa_macs((3, 5, 4), (3, 6, 4), (3, 6, 4)) == 3 * 5 * 6 * 8


# --- BERT-base ---------------------------------------------------------------------------------

def test_bert_base_analytic_figures_of_design_4_1():
    def gmacs(length):
        dense = Trace.dense(1, length, 12, torch.zeros(1, dtype=torch.long))
        return round(float(dense.macs(768, 3072).sum()) / 1e9, 2)

    assert gmacs(128) == 11.17
    assert gmacs(384) == 35.33


def test_flop_counter_on_random_bert_base_matches_analytic_at_128():
    torch.manual_seed(0)
    model = TaskModel(resolve_backbone("random:bert-base").encoder("sdpa"), CLASSIFICATION, 2)
    batch = batch_of(128)
    expected = analytic(model, batch)
    assert expected == 11_173_625_856 + 768 * 768 + 768 * 2   # encoder + pooler + classifier
    assert count_macs(model, batch, "flop_counter") == expected


# --- torchprofile and ptflops ------------------------------------------------------------------

def extra_terms(length: int, layers: int = 2, hidden: int = 32, heads: int = 2, ffn: int = 64,
                labels: int = 2) -> dict[str, int]:
    """What the other counters add or drop on random:tiny, batch 1, classification head."""
    return {
        # embedding LayerNorm + 2 per layer, one op per (affine) element
        "layer_norm": (2 * layers + 1) * length * hidden,
        # one add per output element of every Linear: Q, K, V, O, FFN in/out; pooler, classifier
        "bias": layers * length * (5 * hidden + ffn) + hidden + labels,
        # eager: scores * scaling (torchprofile's aten::mul) or F.softmax (ptflops), per score
        "per_score": layers * heads * length * length,
        "attention": layers * 2 * length * length * hidden,
    }


@pytest.fixture(scope="module")
def tiny_comparison():
    return compare_counters("random:tiny", (16, 32))


def test_compare_counters_reports_each_counter_against_analytic(tiny_comparison):
    rows = tiny_comparison
    assert [(r["length"], r["attn"]) for r in rows] == [(16, "sdpa"), (32, "sdpa"),
                                                         (16, "eager"), (32, "eager")]
    for row in rows:
        assert row["batch_size"] == 1 and row["analytic"] > 0
        assert set(row["counters"]) == set(COUNTERS)
        for name, result in row["counters"].items():
            assert result["error"] is None, (name, result)
            assert result["macs"] > 0
            assert result["diff"] == pytest.approx((result["macs"] - row["analytic"])
                                                   / row["analytic"])
        assert row["counters"]["flop_counter"]["diff"] == 0


def test_torchprofile_adds_layer_norms_and_eager_score_scaling(tiny_comparison):
    """Observed (torchprofile 0.1.0): sdpa counted like the formula, plus one MAC per layer-norm
    element, plus one per attention score for eager's `* scaling`: always above analytic."""
    for row in tiny_comparison:
        extra = extra_terms(row["length"])
        expected = row["analytic"] + extra["layer_norm"]
        if row["attn"] == "eager":
            expected += extra["per_score"]
        assert row["counters"]["torchprofile"]["macs"] == expected, row
        assert row["counters"]["torchprofile"]["diff"] > 0


def test_ptflops_misses_sdpa_attention_and_adds_biases_and_norms(tiny_comparison):
    """Observed (ptflops 0.7.5, pytorch backend): bias adds and layer-norm elements are added;
    under sdpa the attention matmuls are missing (below analytic), under eager they are counted
    through torch.matmul, with F.softmax elements on top (above analytic)."""
    for row in tiny_comparison:
        extra = extra_terms(row["length"])
        expected = row["analytic"] + extra["bias"] + extra["layer_norm"]
        ptflops = row["counters"]["ptflops"]
        if row["attn"] == "sdpa":
            expected -= extra["attention"]
            assert ptflops["diff"] < 0
        else:
            expected += extra["per_score"]
            assert ptflops["diff"] > 0
        assert ptflops["macs"] == expected, row


@pytest.mark.parametrize("counter", ["torchprofile", "ptflops"])
def test_other_counters_count_the_whole_batch(counter):
    model = task_model(SHAPES["tiny"], "sdpa", CLASSIFICATION)
    one, two = (count_macs(model, batch_of(12, batch_size=b), counter) for b in (1, 2))
    assert one > 0 and two == 2 * one


def test_counting_leaves_the_model_and_torch_as_they_were():
    model = task_model(SHAPES["tiny"], "eager", CLASSIFICATION).train()
    batch = batch_of(8)

    def snapshot():
        return ({name: sorted(vars(m)) for name, m in model.named_modules()},
                [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
                (F.gelu, F.softmax, F.linear, torch.matmul, torch.Tensor.matmul, torch.addmm))

    before = snapshot()
    for counter in COUNTERS:
        count_macs(model, batch, counter)
        assert not model.training
        assert snapshot() == before, counter


def test_a_counter_failure_is_a_reason_not_an_exception(monkeypatch):
    real = flops.count_macs

    def flaky(model, batch, counter="flop_counter"):
        if counter == "torchprofile":
            raise RuntimeError("boom\nsecond line")
        return real(model, batch, counter)

    monkeypatch.setattr(flops, "count_macs", flaky)
    [row] = compare_counters("random:tiny", [8], ("sdpa",))
    assert row["counters"]["torchprofile"] == {"macs": None, "diff": None,
                                               "error": "RuntimeError: boom"}
    assert row["counters"]["flop_counter"]["diff"] == 0
    assert row["counters"]["ptflops"]["macs"] > 0


def test_ptflops_failure_raises_with_its_reason():
    class Broken(torch.nn.Module):
        def forward(self, batch):
            raise ValueError("bad forward")

    gelu = F.gelu
    with pytest.raises(RuntimeError, match="ValueError: bad forward"):
        count_macs(Broken(), batch_of(4), "ptflops")
    assert F.gelu is gelu


def test_unknown_counter_names_the_valid_ones():
    model = task_model(SHAPES["tiny"], "sdpa", CLASSIFICATION)
    with pytest.raises(UsageError, match="flop_counter, torchprofile, ptflops"):
        count_macs(model, batch_of(4), "fvcore")
    with pytest.raises(UsageError, match="counter"):
        compare_counters("random:tiny", [8], counters=("fvcore",))


# --- CLI ---------------------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(main, ["flops", *args], catch_exceptions=False)


def test_cli_prints_each_length_and_every_counter():
    result = invoke("--backbone", "random:tiny", "--length", "16,32")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[0].split()
    assert header[:4] == ["length", "attn", "analytic", "GMACs"]
    for name in COUNTERS:
        assert f"{name} GMACs" in lines[0]
    rows = [line.split() for line in lines[2:6]]
    assert [(r[0], r[1]) for r in rows] == [("16", "sdpa"), ("32", "sdpa"), ("16", "eager"),
                                            ("32", "eager")]
    assert all(r[4] == "+0.00%" for r in rows)          # flop_counter's diff
    assert "FLOPs = 2 x MACs" in result.output
    assert ("embeddings, layer norms, softmax, activations and biases" in result.output)


@pytest.mark.parametrize("args, word", [
    (("--length", "16,abc"), "--length"),
    (("--length", "0"), "--length"),
    (("--length", "-5"), "--length"),
    (("--length", "16", "--counters", "flop_counter,fvcore"), "fvcore"),
    (("--length", "16", "--attn", "flash"), "flash"),
    (("--length", "600"), "512 positions"),
])
def test_cli_bad_values_are_one_line_errors(args, word):
    result = invoke("--backbone", "random:tiny", *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and word in errors[0], result.output
    assert "Traceback" not in result.output


def test_cli_help_has_examples():
    result = invoke("--help")
    assert result.exit_code == 0 and "Example" in result.output
