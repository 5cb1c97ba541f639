"""Sparsity while training: gradual magnitude pruning, RigL, and sparse fine-tuning with distillation.

- ``Sparsifier(model, make_schedule("gmp", steps, 0.8), optimizer)``: call ``.step()`` instead of
  ``optimizer.step()`` in a custom loop;
- ``SparsityCallback(sparsity=0.8, method="gmp")`` for ``transformers.Trainer``;
- ``train(model, tokenizer, TrainConfig(...), output)``: the whole run behind ``sparsellm train``.
"""

from . import finetune, gmp, rigl  # noqa: F401 (register the schedules)
from .callback import SparsityCallback
from .distill import distillation_loss, generate_windows
from .sparsifier import SCHEDULES, MaskSchedule, Sparsifier, make_schedule, prunable_layers
from .trainer import RunOptions, TrainConfig, TrainResult, train

__all__ = ["SCHEDULES", "MaskSchedule", "RunOptions", "Sparsifier", "SparsityCallback", "TrainConfig",
           "TrainResult", "distillation_loss", "generate_windows", "make_schedule", "prunable_layers", "train"]
