"""Integrity of a compact folder: ``compact.json`` records every tensor's file, dtype, shape and CRC-32.

Loading checks each safetensors header against the manifest before reading (a truncated file or
an edited shape is named by tensor), and each tensor's bytes against its checksum as it is read.
CRC-32 catches any flipped byte or burst of up to 32 bits for certain; it guards against damage,
not against someone who rewrites the manifest too.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import torch

from ..errors import SparseLLMError

MANIFEST_FILE = "compact.json"
FORMAT_VERSION = 1
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checksum(tensor: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes (zlib's), as 8 hex digits; compiled (carry-less multiplies, on
    every thread: 4x zlib's speed here) when the kernels' extension is built."""
    from ..kernels.backend import extension

    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    module = extension()
    crc = module.crc32(data, 0) if module is not None else zlib.crc32(memoryview(data.numpy()))
    return f"{crc & 0xFFFFFFFF:08x}"


def tensor_entry(tensor: torch.Tensor, file: str) -> dict:
    """A tensor's line in the manifest."""
    return {"file": file, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "crc32": checksum(tensor)}


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SparseLLMError(f"{folder} is not a compact sparsellm folder: {MANIFEST_FILE} is missing") from None
    except (OSError, ValueError) as exc:
        raise SparseLLMError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not {"tensors", "layers"} <= manifest.keys():
        raise SparseLLMError(f"{path} is not a sparsellm compact manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SparseLLMError(f"{path} has format version {manifest['format_version']}; this sparsellm reads "
                             f"up to {FORMAT_VERSION}: upgrade sparsellm")
    return manifest


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking the file holds all the bytes it promises."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SparseLLMError(f"{path.name} is truncated: {size} bytes, not even a header")
        (length,) = struct.unpack("<Q", prefix)
        raw = handle.read(length)
    if len(raw) < length:
        raise SparseLLMError(f"{path.name} is truncated: its header needs {length} bytes, the file has {size}")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise SparseLLMError(f"{path.name}: damaged safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    available = size - 8 - length
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][1]):
        if entry["data_offsets"][1] > available:
            raise SparseLLMError(f"{path.name} is truncated: tensor {name} needs bytes up to "
                                 f"{entry['data_offsets'][1]} of the data, the file holds {available}")
    return header


def check_file(folder: Path, file: str, expected: dict[str, dict]) -> None:
    """Compare a file's header with the manifest entries of the tensors it should hold."""
    path = folder / file
    if not path.exists():
        raise SparseLLMError(f"{file} is missing from {folder} (the manifest lists {len(expected)} tensors in it)")
    header = read_header(path)
    for name, entry in expected.items():
        found = header.get(name)
        if found is None:
            raise SparseLLMError(f"tensor {name} is missing from {file}")
        dtype = _SAFETENSORS_DTYPES.get(found["dtype"], found["dtype"])
        if dtype != entry["dtype"] or list(found["shape"]) != entry["shape"]:
            raise SparseLLMError(f"tensor {name} in {file} is {dtype} {found['shape']}, the manifest says "
                                 f"{entry['dtype']} {entry['shape']}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise SparseLLMError(f"tensor {extra[0]} in {file} is not in the manifest")


def check_tensor(name: str, tensor: torch.Tensor, entry: dict) -> torch.Tensor:
    """``tensor`` if its checksum is the manifest's, else an error."""
    if checksum(tensor) != entry["crc32"]:
        raise SparseLLMError(f"tensor {name} in {entry['file']} fails its checksum: the file was altered or damaged")
    return tensor
