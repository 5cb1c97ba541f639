"""What is inside a model folder: per-layer shape, dtype, sparsity and bytes, read tensor by tensor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import read_metadata
from .errors import SparseLLMError


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    sparsity: float
    bytes: int


def weight_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index) as handle:
            return [folder / name for name in sorted(set(json.load(handle)["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SparseLLMError(f"{folder} holds no .safetensors weights")
    return files


def tensor_table(folder: str | os.PathLike) -> list[TensorInfo]:
    """One row per 2-D weight tensor, one tensor in memory at a time."""
    if not Path(folder).is_dir():
        raise SparseLLMError(f"model folder not found: {folder}")
    rows = []
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = handle.get_tensor(name)
                    if tensor.dim() != 2 or not name.endswith("weight"):
                        continue
                    rows.append(TensorInfo(
                        name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                        (tensor == 0).float().mean().item(), tensor.numel() * tensor.element_size(),
                    ))
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise SparseLLMError(f"cannot read {path}: {exc}") from exc
    return rows


def summary(folder: str | os.PathLike) -> dict:
    rows = tensor_table(folder)
    metadata = read_metadata(folder) or {}
    weights = [r for r in rows if r.sparsity > 0]
    numel = sum(torch.Size(r.shape).numel() for r in weights)
    return {
        "folder": str(folder),
        "method": metadata.get("method"),
        "pattern": metadata.get("pattern"),
        "pruned_layers": len(weights),
        "pruned_layer_sparsity": sum(r.sparsity * torch.Size(r.shape).numel() for r in weights) / numel
        if numel else 0.0,
        "tensors": rows,
    }
