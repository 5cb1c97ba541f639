"""Pruning inside a stock ``transformers.Trainer``: ``trainer.add_callback(SparsityCallback(sparsity=0.8))``.

The callback builds a ``Sparsifier`` when training begins (the Trainer's model and optimizer and
its number of steps), then brackets each optimizer step: masks updated and gradients masked in
``on_pre_optimizer_step`` (the Trainer has already clipped: the clipping norm includes the pruned
gradients), weights masked in ``on_optimizer_step``. Resuming from a Trainer checkpoint rebuilds
the masks from the zeros of the restored weights. Each log line gains the current ``sparsity``.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import TrainerCallback

from .sparsifier import Sparsifier, as_matrix, make_schedule, prunable_layers


class SparsityCallback(TrainerCallback):
    """Gradual (``gmp``), dynamic (``rigl``) or fixed-mask (``finetune``) sparsity for ``transformers.Trainer``.

    ``options`` go to the schedule (``every``, ``start``, ``end``, ``initial_sparsity``,
    ``drop_fraction``); left out, they take the method's defaults for the Trainer's ``max_steps``.
    """

    def __init__(self, sparsity: float | None = None, method: str = "gmp", pattern: str = "unstructured",
                 distribution: str = "uniform", ignore: Sequence[str] = (), **options) -> None:
        self.method, self.sparsity, self.pattern = method, sparsity, pattern
        self.distribution, self.ignore, self.options = distribution, tuple(ignore), options
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        schedule = make_schedule(self.method, state.max_steps, self.sparsity, self.pattern,
                                 distribution=self.distribution, **self.options)
        masks = None
        if state.global_step > 0:  # resumed: pruned weights are exactly zero, so the zeros are the masks
            masks = {name: as_matrix(module, module.weight.detach() != 0)
                     for name, module in prunable_layers(model, self.ignore).items()}
        self.sparsifier = Sparsifier(model, schedule, optimizer, ignore=self.ignore, step=state.global_step,
                                     masks=masks)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.after_optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.sparsifier is not None:
            logs["sparsity"] = round(self.sparsifier.sparsity(), 4)


__all__ = ["SparsityCallback"]
