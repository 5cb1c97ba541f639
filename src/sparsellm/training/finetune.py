"""Sparse fine-tuning: the mask is the pruned model's zeros and never changes.

The model comes pruned, from any pruned folder (``sparsellm prune`` output included) or from the
one-shot pruning that ``sparsellm train --method finetune --init sparsegpt`` runs first; training
then only moves the kept weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import SparseLLMError
from .sparsifier import MaskSchedule, register


@register
@dataclass
class FixedMask(MaskSchedule):
    name = "finetune"

    def initial_masks(self, weights: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict:
        masks = {name: weight != 0 for name, weight in weights.items()}
        pruned = sum(int((~mask).sum()) for mask in masks.values())
        if pruned == 0:
            raise SparseLLMError("finetune keeps the model's zeros as the mask, and this model has none: "
                                 "prune it first (sparsellm prune, or --init with --sparsity)")
        return masks

    def update(self, step: int, weights: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor] | None,
               masks: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return dict(masks)
