"""The layer-by-layer engine: walk a causal LM's decoder blocks over calibration windows.

1. ``capture``: run the model once with every block replaced by a recorder, so we learn exactly
   what each block receives (hidden states of block 0, attention masks, position ids, rotary
   embeddings, cache flags; per block, since some families such as Gemma 3 give different masks
   to sliding-window and global layers). Nothing but the embeddings is computed.
2. For each block: ``collect`` runs it over all windows with hooks on its linear layers, so a
   method gathers the input statistics of every layer in one pass (layers that read the same
   tensor, such as q/k/v, share one accumulator); the caller prunes; ``propagate`` re-runs the
   pruned block to produce the next block's inputs, so errors propagate as in SparseGPT (or
   ``collect(propagate=True)`` keeps the dense block's outputs, and the pruned block is never run).

Only one block is in fast memory at a time (``device``); activations stay on the CPU in the
model's dtype. Blocks that accelerate offloaded to disk are read in, and written back after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

from .logging_utils import progress
from .models import decoder_blocks, linear_layers


class _Stop(Exception):
    """Raised inside a forward pass once everything needed from it has been seen."""


def to_device(value, device: torch.device):
    """Move tensors inside nested tuples / lists / dicts to a device."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockCall:
    """Everything but the hidden states that one block receives for one batch of windows."""

    args: tuple
    kwargs: dict


@dataclass
class Activations:
    """Hidden states entering the current block, batch by batch, and each block's other inputs."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]  # [batch][block]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@contextmanager
def replaced_forwards(blocks: nn.ModuleList, make_forward: Callable[[int], Callable | None]) -> Iterator[None]:
    """Temporarily give block i the forward ``make_forward(i)`` (None leaves it alone)."""
    originals = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks):
            forward = make_forward(index)
            if forward is not None:
                block.forward = forward
        yield
    finally:
        for block, original in zip(blocks, originals, strict=True):
            if original is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = original


@torch.no_grad()
def capture(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> Activations:
    """Record the inputs of block 0 and the keyword inputs of every block, batch by batch."""
    _, blocks = decoder_blocks(model)
    base = model.base_model
    device = _input_device(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            states = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(states.detach().cpu())
                calls.append([])
            calls[-1].append(BlockCall(tuple(args[1:]), dict(kwargs)))
            if index == len(blocks) - 1:
                raise _Stop
            return states
        return forward

    with replaced_forwards(blocks, recorder):
        for start in range(0, len(windows), batch_size):
            with suppress(_Stop):
                base(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    return Activations(hidden, calls)


@torch.no_grad()
def logits_from(model: nn.Module, index: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``input_ids`` when block ``index`` receives ``hidden`` instead of what the
    blocks before it would compute (they are skipped; block 0 gets the embeddings, ``hidden`` unused).

    Everything around the blocks (masks, rotary embeddings, final norm, LM head, logit soft-capping)
    is the model's own code, so this is exact for every family the engine walks.
    """
    _, blocks = decoder_blocks(model)
    device = _input_device(model)

    def skipped(position: int):
        if position >= index:
            return None

        def forward(*args, **kwargs):
            if position == index - 1:
                return hidden.to(device)
            return args[0] if args else kwargs["hidden_states"]
        return forward

    with replaced_forwards(blocks, skipped):
        return model(input_ids=input_ids.to(device), use_cache=False).logits


def _input_device(model: nn.Module) -> torch.device:
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def block_output(output):
    """Blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple | list) else output


@dataclass
class BlockStep:
    """One decoder block during a walk: gather statistics, (the caller prunes), propagate."""

    index: int
    name: str
    block: nn.Module
    activations: Activations
    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    propagated: bool = False
    model: nn.Module | None = None  # the whole model, for callers that run it from this block on

    @property
    def layers(self) -> dict[str, nn.Module]:
        return linear_layers(self.block, self.name)

    def _run(self, batch: int) -> torch.Tensor:
        call = self.activations.calls[batch][self.index]
        hidden = self.activations.hidden[batch].to(self.device)
        output = self.block(hidden, *to_device(call.args, self.device), **to_device(call.kwargs, self.device))
        return block_output(output)

    @torch.no_grad()
    def collect(self, make_accumulator: Callable[[str, nn.Module], object],
                layers: dict[str, nn.Module] | None = None, propagate: bool = False) -> dict:
        """Run the block over every batch, feeding each layer's input to an accumulator.

        ``make_accumulator(name, module)`` builds an object with ``add_batch(inputs, sequences)``. Layers that
        receive the very same input tensor share one accumulator. Unless ``propagate`` is set, each
        forward stops after the last hooked layer, and the block's output is not kept.
        """
        started = time.perf_counter()
        layers = self.layers if layers is None else layers
        accumulators: dict[str, object] = {}
        order: list[str] = []  # execution order of hooked layers, learnt on the first batch
        seen: list[tuple[torch.Tensor, str]] = []  # inputs of this batch (held, so `is` is safe)

        def hook(name: str):
            def pre_hook(module, args):
                inputs = args[0]
                leader = next((n for t, n in seen if t is inputs), None)
                if leader is None:
                    seen.append((inputs, name))
                    if name not in accumulators:
                        accumulators[name] = make_accumulator(name, module)
                    accumulators[name].add_batch(inputs, sequences)
                elif name not in accumulators:
                    accumulators[name] = accumulators[leader]
                if name not in order:
                    order.append(name)
                elif not propagate and name == order[-1] and len(order) == len(layers):
                    raise _Stop
            return pre_hook

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
        outputs = []
        try:
            for batch in range(len(self.activations.hidden)):
                seen.clear()
                sequences = self.activations.hidden[batch].shape[0]
                try:
                    output = self._run(batch)
                    if propagate:
                        outputs.append(output.to("cpu", self.activations.hidden[batch].dtype))
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            seen.clear()
        if propagate:
            self.activations.hidden[:] = outputs
            self.propagated = True
        self.seconds["collect"] = self.seconds.get("collect", 0.0) + time.perf_counter() - started
        return accumulators

    @torch.no_grad()
    def propagate(self) -> None:
        """Run the (pruned) block over every batch; its outputs become the next block's inputs."""
        started = time.perf_counter()
        hidden = self.activations.hidden
        for batch in range(len(hidden)):
            hidden[batch] = self._run(batch).to("cpu", hidden[batch].dtype)
        self.propagated = True
        self.seconds["propagate"] = time.perf_counter() - started


@contextmanager
def materialized(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Hold one block's weights on ``device`` (loading them if accelerate offloaded them)."""
    from . import offload

    with offload.loaded(block, device) as held:
        yield held


def walk(model: nn.Module, windows: torch.Tensor | None, batch_size: int = 8,
         device: str | torch.device | None = None, desc: str = "blocks") -> Iterator[BlockStep]:
    """Yield a BlockStep per decoder block, in order, with the block in fast memory.

    With ``windows`` None (methods that need no data) no forward pass is run. After the caller is
    done with a step, the block is propagated if the caller did not do it, then released.
    """
    prefix, blocks = decoder_blocks(model)
    device = torch.device(device) if device is not None else _input_device(model)
    activations = capture(model, windows, batch_size) if windows is not None else Activations([], [])
    for index in progress(range(len(blocks)), desc=desc, unit="block"):
        with materialized(blocks[index], device) as block:
            step = BlockStep(index, f"{prefix}.{index}", block, activations, device, model=model)
            yield step
            if windows is not None and not step.propagated:
                step.propagate()
