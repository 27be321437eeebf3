"""Gradient x input saliency of a fine-tuned model: how much each input token moves the gold
answer's logit. AdapLeR trains its contribution predictors to mimic it; the predictor
diagnostics (skimbench.controls) rank every method's keep scores against it."""

from __future__ import annotations

import torch
from torch import nn

from skimbench.features import length_sorted_batches
from skimbench.model import additive_mask


def _gold_logit(model: nn.Module, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """The summed logit of every row's gold answer: its label, or (QA) its start and end."""
    logits = model.logits(hidden)
    if "labels" in batch:
        return logits.gather(1, batch["labels"][:, None]).sum()
    start = logits[..., 0].gather(1, batch["start_positions"][:, None])
    end = logits[..., 1].gather(1, batch["end_positions"][:, None])
    return (start + end).sum()


def compute_saliency(model: nn.Module, features: list[dict], batch_size: int) -> torch.Tensor:
    """(features, longest feature) saliency, row i for features[i]: the gradient of the gold logit w.r.t. the embedding
    output, times it, L2 norm over the hidden size; zero at pads. Batches of similar lengths,
    padded to their longest member. Regression tasks have no gold class: not supported."""
    longest = max(len(f["input_ids"]) for f in features)
    out = torch.zeros(len(features), longest)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    device = next(model.parameters()).device
    with torch.enable_grad():
        for rows, batch in length_sorted_batches(features, batch_size, device, "saliency"):
            embedded = model.embed(batch).detach().requires_grad_(True)
            hidden = embedded
            mask = additive_mask(batch["attention_mask"], hidden.dtype)
            for layer in model.layers:
                hidden = layer(hidden, mask)
            [grad] = torch.autograd.grad(_gold_logit(model, hidden, batch), embedded)
            maps = (grad * embedded).norm(dim=-1) * batch["attention_mask"]
            out[torch.tensor(rows), :maps.shape[1]] = maps.detach().cpu().float()
    return out
