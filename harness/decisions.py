"""The one gate every keep decision of a token-removal method passes through.

A method calls `decide(keep, candidates, layer, ...)` where it has decided which slots to keep,
before it removes anything. Outside the harness's controls nothing happens: the decision is
returned as it is. While an observer is installed (`observing`), the harness can

- record the decision: per row, how many candidates were kept, and each candidate's keep score
  and what it is (`Recorder`: the counts the random control replays, the scores the predictor
  diagnostics rank), or
- replace it (`RandomReplay`): keep the recorded number of candidates per row, drawn uniformly
  at random, and every slot that is not a candidate as the method decided.

Candidates are the slots the method may remove: real tokens (never pads or filler slots), less
the ones it always keeps ([CLS], a protected question). The unit is whatever the method decides
over: tokens, Block-Skim's blocks, or DeeBERT's rows (continue or exit).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

_observer: ContextVar[Observer | None] = ContextVar("skimbench_decision_observer", default=None)


def decide(keep: torch.Tensor, candidates: torch.Tensor, layer: int,
           scores: torch.Tensor | None = None, positions: torch.Tensor | None = None,
           reference: torch.Tensor | None = None) -> torch.Tensor:
    """The method's keep decision (B, n), as the harness lets it stand (bool).

    `candidates` (B, n): the slots the method may remove. `layer`: the layer the decision is made
    at (diagnostics are per layer). `scores` (B, n): the method's keep score, higher = keep
    (predictor diagnostics). `positions` (B, n): each slot's input position, where the reference
    is the baseline's token saliency; `reference` (B, n) bool: the method's own labels of what
    should be kept (Block-Skim's answer blocks), used instead."""
    observer = _observer.get()
    keep = keep.bool()
    if observer is None:
        return keep
    return observer.decide(keep, candidates.bool(), layer, scores, positions, reference)


class Observer:
    def begin(self, index: int) -> None:
        """A forward pass over eval feature (or batch) `index` starts."""

    def decide(self, keep, candidates, layer, scores, positions, reference) -> torch.Tensor:
        raise NotImplementedError


@contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    token = _observer.set(observer)
    try:
        yield observer
    finally:
        _observer.reset(token)


class Observed:
    """A method whose every forward first tells the observer which batch it is on: evaluation
    code that calls `method.forward` runs unchanged under the observer."""

    def __init__(self, method, observer: Observer):
        self._method, self._observer, self._calls = method, observer, 0

    def __getattr__(self, name):
        return getattr(self._method, name)

    def forward(self, model, batch: dict):
        self._observer.begin(self._calls)
        self._calls += 1
        with observing(self._observer):
            return self._method.forward(model, batch)


@dataclass
class ScoredSlots:
    """One decision's candidates: keep scores and the reference for each (diagnostics)."""

    layer: int
    scores: torch.Tensor            # (k,) float
    feature: int                    # the eval feature (forward pass) they belong to
    positions: torch.Tensor | None  # (k,) input positions, or None with `reference`
    reference: torch.Tensor | None  # (k,) bool, the method's own labels


@dataclass
class Recorder(Observer):
    """Lets every decision stand; keeps, per forward pass, each decision's kept-candidate count
    per row, and the candidates' scores."""

    counts: list[list[torch.Tensor]] = field(default_factory=list)
    scored: list[ScoredSlots] = field(default_factory=list)

    def begin(self, index: int) -> None:
        self.counts.append([])

    def decide(self, keep, candidates, layer, scores, positions, reference):
        self.counts[-1].append((keep & candidates).sum(dim=1).cpu())
        # diagnostics come from batch-1 passes of decisions over input positions or labels
        if scores is not None and len(keep) == 1 and (positions is not None
                                                      or reference is not None):
            chosen = candidates[0]
            self.scored.append(ScoredSlots(
                layer, scores[0][chosen].detach().float().cpu(), len(self.counts) - 1,
                None if positions is None else positions[0][chosen].cpu(),
                None if reference is None else reference[0][chosen].bool().cpu()))
        return keep


class RandomReplay(Observer):
    """Replaces each decision by a uniform random choice of as many candidates per row as the
    recorded pass kept: same counts, hence the same trace and MACs, other tokens. `order` maps
    a forward pass to the recorded pass whose counts it replays (a permutation of examples for
    DeeBERT's exit layers; the identity for token removal)."""

    def __init__(self, counts: list[list[torch.Tensor]], seed: int,
                 order: list[int] | None = None):
        self.counts, self.order = counts, order
        self.generator = torch.Generator().manual_seed(seed)
        self._current: list[torch.Tensor] = []
        self._step = 0

    def begin(self, index: int) -> None:
        recorded = index if self.order is None else self.order[index]
        self._current, self._step = self.counts[recorded], 0

    def decide(self, keep, candidates, layer, scores, positions, reference):
        if self._step >= len(self._current):
            raise RuntimeError("random control: the method made more keep decisions than in the "
                               "recorded pass (the number of decisions per pass must be fixed by "
                               "the counts it replays)")
        wanted = self._current[self._step].to(keep.device)
        self._step += 1
        return keep & ~candidates | random_choice(candidates, wanted, self.generator)


def random_choice(candidates: torch.Tensor, counts: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """(B, n) bool: `counts[b]` of row b's candidates, drawn uniformly without replacement."""
    draw = torch.rand(candidates.shape, generator=generator).to(candidates.device)
    draw = draw.masked_fill(~candidates, 2.0)  # non-candidates rank last
    rank = draw.argsort(dim=1).argsort(dim=1)
    if bool((counts > candidates.sum(dim=1)).any()):
        raise RuntimeError("random control: a row has fewer candidates than the recorded pass "
                           "kept")
    return (rank < counts[:, None]) & candidates
