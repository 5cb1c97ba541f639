"""Blocks larger than memory: read an accelerate-offloaded block in, and write its new weights back.

``load_model(..., offload_folder=...)`` lets accelerate keep weights on disk: every leaf module gets
an ``AlignDevicesHook`` whose ``weights_map`` reads its tensors from the checkpoint (or from .dat
files in the offload folder) at each forward and drops them after. To prune, a block must hold
real tensors for a while and the pruned ones must replace the originals on disk; ``loaded`` does
both with accelerate's own functions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import is_linear


def offloaded_modules(block: nn.Module) -> list[nn.Module]:
    """Submodules whose weights accelerate keeps off the execution device."""
    return [m for m in block.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]


def is_offloaded(model: nn.Module) -> bool:
    return bool(offloaded_modules(model))


@contextmanager
def loaded(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Hold ``block`` on ``device``; offloaded weights are read in, and linear weights written back."""
    modules = offloaded_modules(block)
    if not modules:
        home = next(block.parameters()).device
        if home != device:
            block.to(device)
        try:
            yield block
        finally:
            if home != device:
                block.to(home)
        return

    from accelerate.utils import set_module_tensor_to_device

    for module in modules:
        hook = module._hf_hook
        for name in _local_tensors(module):
            set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
        hook.offload = False
    try:
        yield block
    finally:
        for module in modules:
            hook = module._hf_hook
            if is_linear(module):
                _write_back(hook.weights_map, "weight", module.weight.data)
            for name in _local_tensors(module):
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True


def _local_tensors(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)] + [
        n for n, _ in module.named_buffers(recurse=False)
    ]


def _write_back(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Store a tensor as accelerate's memory-mapped .dat file and point the loader's index at it."""
    from accelerate.utils import offload_weight

    loader, key = weights_map.dataset, weights_map.prefix + name
    if key in loader.state_dict:  # offloaded to CPU memory, not disk
        loader.state_dict[key] = tensor.detach().cpu().clone()
        return
    if loader.save_folder is None:
        loader.save_folder = tempfile.mkdtemp(prefix="sparsellm-offload-")
    loader.index.pop(key, None)
    offload_weight(tensor.detach().cpu(), key, loader.save_folder, index=loader.index)


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of the state dict, one at a time; offloaded ones read from disk."""
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            module_name, _, local = name.rpartition(".")
            tensor = model.get_submodule(module_name)._hf_hook.weights_map[local]
        yield name, tensor
