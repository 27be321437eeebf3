"""The shared removal machinery (skimbench.skim): gathers keep order and mask fillers, the
output buffer keeps removed states, and the probing attention layer is the layer itself."""

from __future__ import annotations

import pytest
import torch
from test_model import features, tiny_model

from skimbench.features import collate
from skimbench.model import additive_mask
from skimbench.skim import REMOVED_LOGIT, OutputBuffer, Tokens, attention_layer, scatter_logits


def tokens(batch_size=2, length=6, hidden=3) -> Tokens:
    states = torch.arange(batch_size * length * hidden, dtype=torch.float).view(
        batch_size, length, hidden)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[1, 4:] = 0  # row 1: two pads
    return Tokens.start(states, mask)


def test_keep_gathers_in_order_and_aligns_rows_with_masked_fillers():
    t = tokens()
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    kept = t.keep(keep)
    assert kept.width == 4
    assert kept.positions[0].tolist() == [0, 2, 3, 5]
    assert kept.positions[1, :2].tolist() == [0, 1]
    assert kept.alive.tolist() == [[True] * 4, [True, True, False, False]]
    assert kept.attend.tolist() == kept.alive.tolist()
    torch.testing.assert_close(kept.hidden[0], t.hidden[0, [0, 2, 3, 5]])
    # filler slots are masked keys
    assert kept.mask()[1, 0, 0, 2:].lt(-1e30).all()


def test_a_single_row_keeps_exactly_what_it_keeps_inside_a_batch():
    t = tokens()
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    batched = t.keep(keep)
    for row in range(2):
        alone = Tokens(t.hidden[row:row + 1], t.positions[row:row + 1], t.alive[row:row + 1],
                       t.attend[row:row + 1]).keep(keep[row:row + 1])
        width = int(batched.alive[row].sum())
        assert alone.width == width
        for field in ("hidden", "positions", "alive", "attend"):
            assert torch.equal(getattr(alone, field)[0], getattr(batched, field)[row, :width])


def test_keep_never_revives_a_removed_slot_and_pads_stay_masked():
    t = tokens()
    first = t.keep(torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool))
    assert first.width == 6 and first.alive[1].tolist() == [True] * 5 + [False]
    again = first.keep(torch.ones(2, 6, dtype=torch.bool))  # the filler is not brought back
    assert again.alive[1].sum() == 5
    assert again.attend[1].tolist() == [True, True, True, False, False, False]  # 2 pads + filler


def test_keeping_everything_copies_nothing():
    t = tokens()
    assert t.keep(torch.ones(2, 6, dtype=torch.bool)) is t


def test_masked_is_the_same_decision_without_removal():
    t = tokens()
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    masked = t.masked(keep)
    assert masked.width == 6 and masked.alive.tolist() == keep.tolist()


def test_output_buffer_keeps_each_tokens_last_state():
    t = tokens()
    buffer = OutputBuffer(t.hidden.clone())
    keep = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    buffer.write(t, ~keep)                       # position 1 of row 0 leaves now
    kept = t.keep(keep)
    kept = Tokens(kept.hidden + 1000, kept.positions, kept.alive, kept.attend)
    buffer.write(kept)
    result = buffer.result()
    torch.testing.assert_close(result[0, 1], t.hidden[0, 1])          # frozen at removal
    torch.testing.assert_close(result[0, 2], t.hidden[0, 2] + 1000)   # survivor's final state
    torch.testing.assert_close(result[1], t.hidden[1] + 1000)


def test_scatter_logits_puts_survivors_back_and_removed_positions_at_minus_infinity():
    t = tokens()
    kept = t.keep(torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool))
    logits = torch.arange(kept.width * 2 * 2, dtype=torch.float).view(2, kept.width, 2)
    full = scatter_logits(logits, kept, 6)
    assert full.shape == (2, 6, 2)
    torch.testing.assert_close(full[0, 2], logits[0, 1])
    torch.testing.assert_close(full[1, 1], logits[1, 0])
    assert (full[0, [1, 3, 4, 5]] == REMOVED_LOGIT).all()
    assert (full[1, [0, 2, 3, 4, 5]] == REMOVED_LOGIT).all()  # the filler wrote nowhere


def embedded(lengths: list[int], attn: str = "sdpa"):
    """A tiny model and its embedded, masked batch of random inputs."""
    model = tiny_model(attn=attn)
    batch = collate(features(lengths), None)
    hidden = model.embed(batch)
    return model, hidden, additive_mask(batch["attention_mask"], hidden.dtype)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_layer_is_the_backbone_layer(attn):
    model, hidden, mask = embedded([5, 12], attn)
    with torch.inference_mode():
        ours, probs = attention_layer(model.layers[0], hidden, mask)
        torch.testing.assert_close(ours, model.layers[0](hidden, mask), atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 2, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 12))
    assert probs[0, :, :, 5:].abs().max() == 0  # pads get no attention


def test_zero_key_weights_equal_removing_those_keys():
    model, hidden, _ = embedded([12])
    weights = torch.ones(1, 12)
    weights[0, [3, 7, 8]] = 0
    kept = [i for i in range(12) if i not in (3, 7, 8)]
    with torch.inference_mode():
        soft, _ = attention_layer(model.layers[0], hidden, None, weights)
        removed = model.layers[0](hidden[:, kept], None)
    torch.testing.assert_close(soft[:, kept], removed, atol=1e-5, rtol=1e-5)


def test_diagonal_blocks_from_the_fused_kernel_equal_the_eager_probabilities():
    from skimbench.skim import attention_layer_diagonal, diagonal_blocks

    model, hidden, mask = embedded([64, 40])
    with torch.inference_mode():
        eager_out, probs = attention_layer(model.layers[0], hidden, mask)
        fused_out, diagonal, macs = attention_layer_diagonal(model.layers[0], hidden, mask, 32)
    torch.testing.assert_close(fused_out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diagonal, diagonal_blocks(probs, 32), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(diagonal[0, 1, 1], probs[0, 1, 32:, 32:])
    assert macs == 64 * 32 * model.hidden_size
    model.layers[0].train()  # training: the eager layer, so gradients reach the maps
    _, diagonal, macs = attention_layer_diagonal(model.layers[0], hidden, mask, 32)
    assert macs == 0 and diagonal.requires_grad
