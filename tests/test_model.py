"""The task model: the layer loop equals HF's encoder, padding never changes an output, and
the schedule MACs follow DESIGN 4.1."""

from __future__ import annotations

import pytest
import torch

from skimbench.backbone import resolve_backbone
from skimbench.features import collate
from skimbench.model import TaskModel, Trace
from skimbench.tasks import CLASSIFICATION, EXTRACTIVE_QA


def tiny_model(kind=CLASSIFICATION, attn="sdpa") -> TaskModel:
    torch.manual_seed(0)
    return TaskModel(resolve_backbone("random:tiny").encoder(attn), kind, 3).eval()


def features(lengths, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": [101] + torch.randint(1000, vocab, (n - 2,), generator=g).tolist()
             + [102], "token_type_ids": [0] * n, "labels": 0, "example_index": i}
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layer_loop_equals_the_hf_encoder(attn):
    model = tiny_model(attn=attn)
    batch = collate(features([5, 9, 12]), None)
    hidden = model.embed(batch)
    from skimbench.model import additive_mask

    mask = additive_mask(batch["attention_mask"], hidden.dtype)
    for layer in model.layers:
        hidden = layer(hidden, mask)
    reference = model.encoder(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], reference.last_hidden_state[real], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(model(batch).logits,
                               model.head(reference.pooler_output), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [CLASSIFICATION, EXTRACTIVE_QA])
def test_padding_never_changes_an_output(kind):
    """sequence (pad to 40), batch (pad to the longest) and none (no pad) agree per example."""
    model = tiny_model(kind)
    feats = features([4, 11, 23, 7])
    with torch.inference_mode():
        alone = [model(collate([f], None)).logits[0] for f in feats]
        for pad_to in (None, 40):
            batched = model(collate(feats, pad_to)).logits
            for row, single in enumerate(alone):
                got = batched[row][: single.shape[0]] if kind == EXTRACTIVE_QA else batched[row]
                torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)


def test_trace_of_the_dense_encoder_follows_the_padded_length():
    model = tiny_model()
    out = model(collate(features([4, 9]), 16))
    assert out.trace.query_tokens.tolist() == [[16, 16], [16, 16]]
    assert out.trace.pairs.tolist() == [[256, 256], [256, 256]]
    assert out.trace.exit_layer.tolist() == [2, 2]
    h, f = 32, 64
    per_layer = 4 * 16 * h * h + 2 * 16 * 16 * h + 2 * 16 * h * f
    head = h * h + h * 3
    assert out.trace.macs(h, f).tolist() == [2 * per_layer + head] * 2


@pytest.mark.parametrize("length,gmacs", [(128, 11.17), (384, 35.33)])
def test_bert_base_schedule_macs_match_design(length, gmacs):
    """DESIGN 4.1: BERT-base is 11.17 GMACs at 128 tokens and 35.33 at 384 (no head)."""
    trace = Trace.dense(1, length, 12, torch.zeros(1, dtype=torch.long))
    assert round(trace.macs(768, 3072).item() / 1e9, 2) == gmacs
