"""What is inside a model folder: per-layer shape, dtype, sparsity and bytes, read tensor by tensor.

For a compact folder the table comes from its manifest: each layer's layout, bits, and bytes on
disk next to the bytes the same weights take dense.
"""

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
    layout: str = "dense"
    bits: int | None = None  # of each stored value: the dtype's, or the quantization's
    dense_bytes: int | None = None  # the same weights stored dense, in ``dtype``


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


def compact_table(folder: str | os.PathLike) -> list[TensorInfo]:
    """One row per linear layer of a compact folder, from its manifest (no weights are read)."""
    from .format.compact import CompactFolder

    with CompactFolder(folder) as compact:
        layers = compact.layers
    rows = []
    for name, layer in layers.items():
        numel = layer["shape"][0] * layer["shape"][1]
        quantization = layer["quantization"]
        rows.append(TensorInfo(
            f"{name}.weight", tuple(layer["shape"]), layer["dtype"], 1 - layer["nonzeros"] / max(numel, 1),
            layer["bytes"], layer["layout"] + (f" {layer['pattern']}" if layer["layout"] == "sparse-nm" else ""),
            quantization["bits"] if quantization else getattr(torch, layer["dtype"]).itemsize * 8,
            layer["dense_bytes"]))
    return rows


def summary(folder: str | os.PathLike) -> dict:
    from .format.compact import is_compact

    compact = Path(folder).is_dir() and is_compact(folder)
    rows = compact_table(folder) if compact else tensor_table(folder)
    metadata = read_metadata(folder) or {}
    weights = [r for r in rows if r.sparsity > 0]
    numel = sum(torch.Size(r.shape).numel() for r in weights)
    return {
        "folder": str(folder),
        "format": "compact" if compact else "dense",
        "bytes": sum(r.bytes for r in rows),
        "dense_bytes": sum(r.dense_bytes or r.bytes for r in rows),
        "method": metadata.get("method"),
        "pattern": metadata.get("pattern"),
        "pruned_layers": len(weights),
        "pruned_layer_sparsity": sum(r.sparsity * torch.Size(r.shape).numel() for r in weights) / numel
        if numel else 0.0,
        "tensors": rows,
    }
