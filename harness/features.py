"""Tokenised features and the three padding modes (DESIGN 3).

Features are stored unpadded; `collate` pads a batch to the task length (`sequence`), to the
longest member (`batch`), or not at all (`none`, one example per batch), so the model computes
exactly the positions the mode prescribes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from skimbench.errors import UsageError
from skimbench.qa import build_features
from skimbench.tasks import EXTRACTIVE_QA, Task

PADDING_MODES = ("sequence", "batch", "none")


def padding_modes(option: str) -> tuple[str, ...]:
    """--padding value -> the modes to evaluate in (`all` = every mode)."""
    if option == "all":
        return PADDING_MODES
    if option not in PADDING_MODES:
        raise UsageError(f"unknown padding mode {option!r}: choose one of "
                         f"{', '.join(PADDING_MODES)} or all")
    return (option,)


def encode(task: Task, examples: list, tokenizer, max_length: int, doc_stride: int = 128,
           max_query_length: int = 64) -> list[dict]:
    """Examples -> unpadded features; QA examples become sliding windows (several per example)."""
    if task.kind == EXTRACTIVE_QA:
        windows = build_features(examples, tokenizer, max_length=max_length,
                                 doc_stride=doc_stride, max_query_length=max_query_length)
        return [{"input_ids": w.input_ids, "token_type_ids": w.token_type_ids,
                 "start_positions": w.start_position, "end_positions": w.end_position,
                 "example_index": w.example_index, "window": w} for w in windows]
    pairs = [e.text_pair for e in examples]
    encoded = tokenizer([e.text for e in examples], pairs if any(p is not None for p in pairs)
                        else None, truncation=True, max_length=max_length,
                        return_token_type_ids=True)  # RoBERTa's tokenizer omits them otherwise
    return [{"input_ids": ids, "token_type_ids": types, "labels": e.label, "example_index": i}
            for i, (e, ids, types) in enumerate(zip(examples, encoded["input_ids"],
                                                    encoded["token_type_ids"], strict=True))]


def collate(features: list[dict], pad_to: int | None, pad_id: int = 0) -> dict:
    """Pad to `pad_to` positions, or to the longest feature when None."""
    length = pad_to if pad_to is not None else max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(features), length), dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n] = torch.tensor(feature["input_ids"])
        types[row, :n] = torch.tensor(feature["token_type_ids"])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
             "example_index": torch.tensor([f["example_index"] for f in features])}
    if "labels" in features[0]:
        dtype = torch.float if isinstance(features[0]["labels"], float) else torch.long
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
    else:
        batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
        batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
    return batch


def length_sorted_batches(features: list[dict], batch_size: int, device: torch.device,
                          desc: str) -> Iterator[tuple[list[int], dict]]:
    """(feature indices, batch on `device`) over every feature, in batches of similar lengths
    padded to their longest, with a progress bar: the one-off passes over a data set that take
    gradients (saliency, TR-BERT's teacher), where batch order does not matter."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    with tqdm(total=len(features), desc=desc, unit="feature", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            yield rows, {k: v.to(device) for k, v in collate([features[i] for i in rows],
                                                             None).items()}
            bar.update(len(rows))


def eval_batches(features: list[dict], padding: str, batch_size: int, max_length: int
                 ) -> Iterator[dict]:
    """Batches in data set order for one padding mode (`none`: one example at a time)."""
    if padding == "none":
        batch_size = 1
    pad_to = max_length if padding == "sequence" else None
    for start in range(0, len(features), batch_size):
        yield collate(features[start:start + batch_size], pad_to)

