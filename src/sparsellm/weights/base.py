"""The interface every pruning method implements, the statistics it may ask for, and the registry.

A method is one small object: the engine gathers the input statistics the method ``needs`` for a
layer (in one pass over the block, shared by layers that read the same input), then calls
``prune(weight, stats, sparsity, pattern)`` and writes back the matrix it returns. A new method
is one new module that subclasses ``PruningMethod`` and decorates itself with ``@register``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SparseLLMError
from .masks import Pattern

HESSIAN = "hessian"
NORMS = "norms"


def add_gram_upper(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += X^T X on and above the diagonal only (row bands), about 40 % less work than a full product.

    Entries below the diagonal blocks are left untouched; ``torch.triu`` of the result is exact.
    """
    features = x.shape[1]
    parts = max(1, min(8, features // 144))
    bounds = [features * i // parts for i in range(parts + 1)]
    for lo, hi in itertools.pairwise(bounds):
        gram[lo:hi, lo:].addmm_(x[:, lo:hi].t(), x[:, lo:])


@dataclass
class InputStatistics:
    """Running statistics of one layer input X (tokens x features), accumulated batch by batch.

    ``hessian`` holds the upper triangle of sum(X^T X) over all tokens and ``squared_norms`` the per-feature sum of x_j^2;
    ``samples`` counts calibration sequences, ``tokens`` their tokens. ``probe`` keeps the first
    inputs so the engine can report each layer's reconstruction error.
    """

    features: int
    needs: frozenset[str]
    probe_tokens: int = 1024
    samples: int = 0
    tokens: int = 0
    squared_norms: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    probe: torch.Tensor | None = None

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        """Add a batch of inputs; ``sequences`` counts the calibration sequences in it (some families
        flatten tokens to 2-D before a layer, so the shape does not always tell)."""
        x = inputs.detach().reshape(-1, self.features).float()
        self.samples += sequences if sequences is not None else (inputs.shape[0] if inputs.dim() > 2 else 1)
        self.tokens += x.shape[0]
        if NORMS in self.needs:
            norms = x.square().sum(0)
            self.squared_norms = norms if self.squared_norms is None else self.squared_norms.add_(norms)
        if HESSIAN in self.needs:
            if self.hessian is None:
                self.hessian = torch.zeros(self.features, self.features, device=x.device)
            add_gram_upper(self.hessian, x)
        have = 0 if self.probe is None else self.probe.shape[0]
        if have < self.probe_tokens:
            rows = x[: self.probe_tokens - have].cpu()
            self.probe = rows.clone() if self.probe is None else torch.cat([self.probe, rows])

    def input_norms(self) -> torch.Tensor:
        """||X_j||_2 per input feature, scaled per sequence as in Wanda (sqrt(sum ||x_j||^2 / n))."""
        if self.squared_norms is None:
            raise RuntimeError("input norms were not gathered")
        return (self.squared_norms / max(self.samples, 1)).sqrt()

    def scaled_hessian(self) -> torch.Tensor:
        """H = 2/n sum X X^T over the n calibration sequences, as in SparseGPT."""
        if self.hessian is None:
            raise RuntimeError("the Hessian was not gathered")
        full = torch.triu(self.hessian) + torch.triu(self.hessian, 1).t()
        return full.mul_(2.0 / max(self.samples, 1))


@dataclass
class PruningMethod:
    """Base class: subclasses set ``name`` and ``needs`` and implement ``prune``.

    A method that can quantize the weights it keeps inside its own solve (SparseGPT's joint mode)
    sets ``joint_quantization`` and accepts ``quantizer=`` in ``prune``; others are followed by a
    masked GPTQ pass when quantization is asked for.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    joint_quantization: ClassVar[bool] = False
    # Whose activations calibrate block i: "pruned" (blocks before i already pruned, so errors
    # propagate, as the reference codes do) or "dense" (the original model's; one forward pass per
    # block instead of two). Methods that use data make it an option with their own default.
    calibration_inputs = "pruned"

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float,
              pattern: Pattern) -> torch.Tensor:
        """Return the pruned (out, in) float32 weight; ``weight`` may be modified in place."""
        raise NotImplementedError

    def prune_group(self, weights: list[torch.Tensor], stats: InputStatistics | None, sparsities: list[float],
                    pattern: Pattern) -> list[torch.Tensor]:
        """Prune layers that share one input (and so one statistics object); methods may batch them."""
        return [self.prune(w, stats, s, pattern) for w, s in zip(weights, sparsities, strict=True)]


METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options) -> PruningMethod:
    """Instantiate a registered method with its options (unknown options are an error)."""
    if name not in METHODS:
        raise SparseLLMError(f"unknown pruning method '{name}': choose one of {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**options)
    except TypeError as exc:
        raise SparseLLMError(f"bad option for method {name}: {exc}") from exc
