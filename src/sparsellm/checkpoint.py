"""Writing model folders: atomically (temp folder, then rename), with sparsity.json beside the weights."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import SparseLLMError
from .logging_utils import logger

METADATA_FILE = "sparsity.json"


def versions() -> dict:
    """Versions of the packages that decide what a run computes."""
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {"sparsellm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace a non-empty folder unless asked (checked before any long work starts)."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise SparseLLMError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SparseLLMError(f"output folder {path} exists and is not empty; pass --overwrite to replace it")
    return path


@contextmanager
def atomic_folder(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output`` in one rename."""
    path = check_output(output, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / path.name)
            os.replace(staging, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_metadata(folder: str | os.PathLike, metadata: dict) -> None:
    with open(Path(folder) / METADATA_FILE, "w") as handle:
        json.dump(metadata | {"versions": versions()}, handle, indent=2)


def read_metadata(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return None
    with open(path) as handle:
        return json.load(handle)


def save(model, tokenizer, output: str | os.PathLike, metadata: dict | None = None,
         overwrite: bool = False, files: Mapping[str, str] | None = None) -> Path:
    """Save an HF folder (safetensors, config, tokenizer) plus sparsity.json and any extra text
    ``files`` (name -> content, such as the recipe), atomically."""
    with atomic_folder(output, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size="2GB")  # offloaded models are gathered shard by shard
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if metadata is not None:
            write_metadata(staging, metadata)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
    logger.info("saved %s", output)
    return Path(output)
