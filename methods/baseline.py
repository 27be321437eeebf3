"""The fine-tuned baseline: the plain backbone with the shared task heads.

Every speedup in skimbench is measured against this model, trained with the same recipe,
backbone and data, and evaluated in the same padding mode. It is also the teacher or starting
point of the methods that declare `needs = ("baseline",)`; it keeps every epoch's weights, for
teachers averaged over epochs (AdapLeR's saliency).
"""

from __future__ import annotations

from skimbench.method import Method, register


@register("baseline")
class Baseline(Method):
    """Plain fine-tuning of the backbone (pooler + classifier, or span head for QA)."""

    keeps_epochs = True
