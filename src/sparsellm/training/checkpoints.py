"""Resumable training state: one atomic folder per checkpoint, safetensors and JSON only.

``<run>/checkpoints/step-0000120/`` holds the weights (``model.safetensors``), the masks
(``masks.safetensors``), the optimizer's tensors (``optimizer.safetensors``; its scalars and
parameter groups in the JSON), every process's RNG state (``rng.safetensors``) and
``trainer_state.json`` with the next step, the tokens seen, the training seconds so far, the
run's configuration and the mask-update history. The data position is the step itself (batches
are a function of the step), so nothing else is needed to continue exactly where the run stopped.
A folder is only ever seen complete (``checkpoint.atomic_folder``); leftovers of a killed write
are hidden temporary folders that ``latest`` ignores.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..checkpoint import atomic_folder
from ..errors import SparseLLMError
from ..logging_utils import logger

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """What a checkpoint restores besides the weights and the optimizer (loaded in place)."""

    state: dict
    masks: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *layout["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def save(root: Path, step: int, model, optimizer, masks: dict[str, torch.Tensor], rng: dict[str, torch.Tensor],
         state: dict, keep: int = 1) -> Path:
    """Write the checkpoint of ``step`` (the next step to run) and drop all but the ``keep`` newest."""
    folder = root / f"step-{step:07d}"
    root.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder, overwrite=True) as staging:
        save_model(model, str(staging / "model.safetensors"))
        save_file({name: mask.cpu().contiguous() for name, mask in masks.items()}, str(staging / "masks.safetensors"))
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(staging / "optimizer.safetensors"))
        save_file(rng, str(staging / "rng.safetensors"))
        with open(staging / STATE_FILE, "w") as handle:
            json.dump(state | {"step": step, "optimizer": layout}, handle, indent=1)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.debug("checkpoint %s", folder)
    return folder


def complete(root: Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(match[1]), path) for path in root.iterdir()
             if (match := _NAME.match(path.name)) and (path / STATE_FILE).exists()]
    return [path for _, path in sorted(found)]


def latest(root: Path) -> Path | None:
    folders = complete(root)
    return folders[-1] if folders else None


def load(folder: Path, model, optimizer) -> Checkpoint:
    """Load weights and optimizer state in place; return the rest."""
    try:
        with open(folder / STATE_FILE) as handle:
            state = json.load(handle)
        load_model(model, str(folder / "model.safetensors"))
        layout = state.pop("optimizer")
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), layout))
        masks = load_file(str(folder / "masks.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SparseLLMError(f"cannot resume from {folder}: {exc}") from exc
    return Checkpoint(state, masks, rng)
