"""Writing model folders: atomically (temp folder, then rename), with sparsity.json beside the weights."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SparseLLMError
from .logging_utils import logger

METADATA_FILE = "sparsity.json"
RECIPE_FILE = "recipe.yaml"


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
    """sparsity.json, and the job's recipe as recipe.yaml when the metadata holds one."""
    with open(Path(folder) / METADATA_FILE, "w") as handle:
        json.dump(metadata | {"versions": versions()}, handle, indent=2)
    if "recipe" in metadata:
        import yaml

        (Path(folder) / RECIPE_FILE).write_text(yaml.safe_dump(metadata["recipe"], sort_keys=False,
                                                               default_flow_style=None))


def folder_bytes(folder: str | os.PathLike, suffix: str = "") -> int:
    """Bytes of the files of a model folder (ending in ``suffix``), before the file system's rounding.

    Sub-folders (a report written inside it) are not part of the model.
    """
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(suffix))


def read_metadata(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return None
    with open(path) as handle:
        return json.load(handle)


FORMATS = ("compact", "dense")


def save(model, tokenizer, output: str | os.PathLike, metadata: dict | None = None,
         overwrite: bool = False, format: str = "compact", dtype=None) -> Path:
    """Save an HF folder (safetensors, config, tokenizer) plus sparsity.json, atomically.

    ``format="compact"`` packs the pruned (and quantized) layers so the size follows the sparsity
    (see ``sparsellm.format``; load it with ``sparsellm.load``); ``"dense"`` writes every weight as
    is, for plain ``from_pretrained``. ``dtype`` (e.g. "bfloat16") converts the saved floats.
    """
    from .models import parse_dtype

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if format == "compact":
        from .format import compact

        return compact.save(model, tokenizer, output, metadata, overwrite, dtype)
    if format != "dense":
        raise SparseLLMError(f"unknown format '{format}': use {' or '.join(FORMATS)}")
    with atomic_folder(output, overwrite) as staging:
        if dtype is None:
            model.save_pretrained(staging, max_shard_size="2GB")  # offloaded models are gathered shard by shard
        else:
            from .format.layout import cast
            from .offload import state_tensors

            tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # written once, by their source
            converted = {name: cast(name, tensor, dtype) for name, tensor in state_tensors(model) if name not in tied}
            model.save_pretrained(staging, max_shard_size="2GB", state_dict=converted)
            config = json.loads((staging / "config.json").read_text())
            (staging / "config.json").write_text(json.dumps(config | {"dtype": str(dtype).removeprefix("torch.")},
                                                            indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if metadata is not None:
            write_metadata(staging, metadata)
    logger.info("saved %s", output)
    return Path(output)
