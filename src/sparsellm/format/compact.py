"""Compact model folders: pruned (and quantized) linear layers packed, everything else as usual.

A compact folder is an HF folder whose ``model.safetensors`` holds each decoder-block linear
layer in its smallest layout (``layout.py``), ``compact.json`` (the manifest: per-tensor file,
dtype, shape and CRC-32; per-layer layout, sparsity, bits and bytes) and a ``config.json`` whose
``quantization_config`` follows the compressed-tensors convention (see docs/FORMAT.md).

``save`` encodes one tensor at a time and writes shards of at most 2 GB into a temporary folder
that is renamed at the end; ``load`` builds the model without initializing it and decodes one
layer at a time into it, so loading needs one dense model of memory plus one layer.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import offload
from ..checkpoint import atomic_folder, write_metadata
from ..errors import SparseLLMError
from ..logging_utils import logger, progress
from ..models import check_causal_lm, decoder_blocks, linear_layers
from ..weights.masks import Pattern
from ..weights.quant import QuantScheme, attach_grid, grid_of
from .layout import DENSE, EncodedLayer, cast, encode, layout_bytes, smallest_layout
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    check_file,
    check_tensor,
    dtype_name,
    read_manifest,
    tensor_entry,
)

COMPRESSED_TENSORS = "compressed-tensors"
QUANTIZED_FORMAT = "sparsellm-packed-quantized"  # not a compressed-tensors format: its readers refuse it
MAX_SHARD_BYTES = 2 * 1024**3
INDEX_FILE = "model.safetensors.index.json"


def is_compact(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


# -- save -------------------------------------------------------------------------------------


def _linear_weights(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict names of the decoder blocks' linear weights, with their modules."""
    prefix, blocks = decoder_blocks(model)
    return {f"{name}.weight": module for index, block in enumerate(blocks)
            for name, module in linear_layers(block, f"{prefix}.{index}").items()}


def _pattern_hints(metadata: Mapping | None) -> dict[str, Pattern]:
    """N:M patterns the pruning report says layers follow (checked again when encoding)."""
    hints = {}
    for layer in (metadata or {}).get("layers", []):
        with contextlib.suppress(SparseLLMError, KeyError, TypeError):
            pattern = Pattern.parse(layer["pattern"])
            if pattern.is_nm:
                hints[layer["name"]] = pattern
    return hints


def planned_bytes(model: nn.Module, nonzeros: Mapping[str, int], patterns: Mapping[str, Pattern],
                  dtype: torch.dtype | None = None, scheme: QuantScheme | None = None) -> int:
    """Tensor bytes ``save`` will write for ``model`` once each linear layer named in ``nonzeros`` keeps
    that many weights (following its N:M pattern in ``patterns``, quantized with ``scheme``).

    Computed before pruning, from shapes alone. Other layers count as stored dense; files other than
    tensor data (headers, manifest, tokenizer) are not counted. Extra zeros a method leaves only
    make the real layer smaller.
    """
    targets = _linear_weights(model)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    total = 0
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        stored_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        module = targets.get(name)
        layer = name.removesuffix(".weight")
        if module is None or tensor.dim() != 2 or layer not in nonzeros:
            total += tensor.numel() * stored_dtype.itemsize
            continue
        shape = tuple(tensor.shape[::-1] if type(module).__name__ == "Conv1D" else tensor.shape)
        layout, pattern, stored = smallest_layout(shape, nonzeros[layer],
                                                  [patterns[layer]] if layer in patterns else [], stored_dtype, scheme)
        total += layout_bytes(layout, shape, stored, stored_dtype, scheme, pattern)
    return total


class _ShardWriter:
    """Groups tensors into safetensors files of at most ``limit`` bytes (a layer's tensors stay together)."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.entries: dict[str, dict] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        for name, tensor in tensors.items():
            self.pending[name] = tensor.detach().cpu().contiguous()
            self.entries[name] = tensor_entry(self.pending[name], "")
        self.pending_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, str(self.folder / f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, dict]:
        """Write the last shard, name the files as transformers does, return the manifest's tensor table."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for index, names in enumerate(self.shards):
            file = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f".shard-{index}", self.folder / file)
            for name in names:
                self.entries[name]["file"] = file
                weight_map[name] = file
        if count > 1:
            total = sum(entry_bytes(e) for e in self.entries.values())
            (self.folder / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return self.entries


def entry_bytes(entry: dict) -> int:
    numel = 1
    for size in entry["shape"]:
        numel *= size
    return numel * getattr(torch, entry["dtype"]).itemsize


def _layer_entry(layer: EncodedLayer) -> dict:
    return {"layout": layer.layout, "shape": list(layer.shape), "dtype": dtype_name(layer.dtype),
            "stored": layer.stored, "nonzeros": layer.nonzeros,
            "pattern": str(layer.pattern), "quantization": layer.scheme.to_dict() if layer.scheme else None,
            "transposed": layer.transposed, "bytes": layer.nbytes, "dense_bytes": layer.dense_bytes,
            "tensors": list(layer.tensors)}


def compression_config(layers: Mapping[str, dict]) -> dict | None:
    """config.json's ``quantization_config``, in the compressed-tensors convention (None: nothing packed)."""
    linear = list(layers)
    sparse = {name: entry for name, entry in layers.items() if entry["layout"] != DENSE}
    quantized = {name: entry for name, entry in layers.items() if entry["quantization"]}
    if not sparse and not quantized:
        return None
    config: dict = {"quant_method": COMPRESSED_TENSORS, "format": QUANTIZED_FORMAT if quantized else "dense",
                    "quantization_status": "compressed", "config_groups": {}, "ignore": ["lm_head"]}
    schemes = list(dict.fromkeys(json.dumps(entry["quantization"], sort_keys=True) for entry in quantized.values()))
    for index, scheme in enumerate(schemes):
        config["config_groups"][f"group_{index}"] = {
            "targets": [name for name, entry in quantized.items()
                        if json.dumps(entry["quantization"], sort_keys=True) == scheme],
            "weights": QuantScheme(**json.loads(scheme)).to_compressed_tensors(),
            "input_activations": None, "output_activations": None, "format": QUANTIZED_FORMAT}
    config["ignore"] += [name for name in linear if name not in quantized]
    if sparse:
        layout = Counter(entry["layout"] for entry in sparse.values()).most_common(1)[0][0]
        targets = [name for name, entry in sparse.items() if entry["layout"] == layout]
        patterns = {layers[name]["pattern"] for name in targets}
        numel = sum(entry["shape"][0] * entry["shape"][1] for entry in sparse.values())
        zeros = numel - sum(entry["nonzeros"] for entry in sparse.values())
        config["sparsity_config"] = {
            "format": layout, "global_sparsity": zeros / numel,
            "sparsity_structure": patterns.pop() if len(patterns) == 1 else "unstructured",
            "targets": targets, "ignore": ["lm_head"] + [name for name in linear if name not in targets],
            "registry_requires_subclass": False}
    return config


def save(model: nn.Module, tokenizer, output: str | os.PathLike, metadata: dict | None = None,
         overwrite: bool = False, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` as a compact folder (plus tokenizer and ``sparsity.json``), atomically.

    ``dtype`` (default: each tensor's own) is the dtype of stored floats and of the rebuilt weights.
    Layers quantized by ``sparsellm.prune(..., quantization=...)`` are stored as integer codes.
    """
    targets = _linear_weights(model)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    hints = _pattern_hints(metadata)
    layers: dict[str, dict] = {}
    with atomic_folder(output, overwrite) as staging:
        writer = _ShardWriter(staging, max_shard_bytes)
        state = offload.state_tensors(model)
        for name, tensor in progress(state, desc="compact save", unit="tensor", total=len(model.state_dict())):
            if name in tied:
                continue
            module = targets.get(name)
            if module is None or tensor.dim() != 2:
                writer.add({name: cast(name, tensor, dtype)})
                continue
            module_name = name.removesuffix(".weight")
            transposed = type(module).__name__ == "Conv1D"
            matrix = tensor.t() if transposed else tensor
            layer = encode(module_name, matrix, grid_of(module), [hints[module_name]] if module_name in hints else [],
                           transposed, dtype)
            layers[module_name] = _layer_entry(layer)
            writer.add({f"{module_name}.{suffix}": value for suffix, value in layer.tensors.items()})
        tensors = writer.close()
        manifest = {"format_version": FORMAT_VERSION, "tensors": tensors, "layers": layers}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest))  # no indent: the C encoder, 10x faster

        config = copy.deepcopy(model.config)
        config.quantization_config = compression_config(layers)
        if config.quantization_config is None:
            del config.quantization_config
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if metadata is not None:
            write_metadata(staging, metadata)
    packed = sum(entry["bytes"] for entry in layers.values())
    dense = sum(entry["dense_bytes"] for entry in layers.values())
    logger.info("saved %s: %d linear layers in %.1f MB (%.1f %% of dense)", output, len(layers), packed / 1e6,
                100 * packed / max(dense, 1))
    return Path(output)


# -- load -------------------------------------------------------------------------------------


class CompactFolder:
    """Read a compact folder tensor by tensor, every byte checked: headers on open, checksums on read.

    ``layer(name)`` returns the raw packed tensors of a layer as an ``EncodedLayer`` (``.unpack()``
    rebuilds the dense weight); sparse kernels can build their own runtime layout from it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.entries: dict[str, dict] = self.manifest["tensors"]
        self.layers: dict[str, dict] = self.manifest["layers"]
        by_file: dict[str, dict[str, dict]] = {}
        for name, entry in self.entries.items():
            by_file.setdefault(entry["file"], {})[name] = entry
        for file, expected in sorted(by_file.items(), key=lambda item: (self.folder / item[0]).exists()):
            check_file(self.folder, file, expected)  # missing files first: they explain the rest
        self._stack = contextlib.ExitStack()
        try:
            self._handles = {file: self._stack.enter_context(safe_open(str(self.folder / file), framework="pt"))
                             for file in by_file}
        except (OSError, SafetensorError) as exc:
            self._stack.close()
            raise SparseLLMError(f"cannot read {self.folder}: {exc}") from exc
        self.layer_tensors = {f"{name}.{suffix}" for name, entry in self.layers.items() for suffix in entry["tensors"]}

    def __enter__(self) -> CompactFolder:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise SparseLLMError(f"tensor {name} is not in {self.folder / MANIFEST_FILE}")
        try:
            tensor = self._handles[entry["file"]].get_tensor(name)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise SparseLLMError(f"cannot read tensor {name} from {entry['file']}: {exc}") from exc
        return check_tensor(name, tensor, entry)

    def plain_tensors(self) -> list[str]:
        """Tensors stored as the model holds them (embeddings, norms, layers kept dense)."""
        return [name for name in self.entries if name not in self.layer_tensors]

    def layer(self, name: str) -> EncodedLayer:
        entry = self.layers[name]
        try:
            scheme = QuantScheme(**entry["quantization"]) if entry["quantization"] else None
            layer = EncodedLayer(name, entry["layout"], tuple(entry["shape"]), getattr(torch, entry["dtype"]),
                                 entry["stored"], {}, Pattern.parse(entry["pattern"]), scheme, entry["transposed"],
                                 entry["nonzeros"])
        except (KeyError, TypeError, AttributeError, SparseLLMError) as exc:
            raise SparseLLMError(f"layer {name}: damaged entry in {MANIFEST_FILE} ({exc})") from exc
        layer.tensors = {suffix: self.tensor(f"{name}.{suffix}") for suffix in entry["tensors"]}
        shape = layer.tensors.get("shape")
        if shape is not None and shape.tolist() != list(layer.shape):
            raise SparseLLMError(f"tensor {name}.shape says {shape.tolist()}, the manifest says {list(layer.shape)}")
        return layer


def _model_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model class of the folder's config with uninitialized weights (they are all overwritten)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise SparseLLMError(f"cannot read the config of {folder}: {exc}") from exc
    check_causal_lm(config)
    if hasattr(config, "quantization_config"):  # describes the files, not the model we build
        del config.quantization_config
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _place(name: str, target: torch.Tensor | None, value: torch.Tensor) -> None:
    if target is None:
        raise SparseLLMError(f"tensor {name} in the checkpoint has no place in the model its config.json describes")
    if target.shape != value.shape:
        raise SparseLLMError(f"tensor {name}: the checkpoint holds {list(value.shape)}, the model its config.json "
                             f"describes expects {list(target.shape)}")
    target.copy_(value)


@torch.no_grad()
def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
         replace: Callable[[EncodedLayer, nn.Module], nn.Module | None] | None = None) -> nn.Module:
    """A transformers model from a compact folder, every weight rebuilt bit for bit, in ``dtype``.

    ``replace(layer, module)`` may return a module to install instead of decompressing a packed
    layer into ``module`` (sparse kernels run the packed form); the module's bias is loaded by then.
    """
    folder = Path(folder)
    with CompactFolder(folder) as compact:
        model = _model_skeleton(folder, dtype)
        state = model.state_dict()
        expected = set(state) - set(getattr(model, "all_tied_weights_keys", None) or {})
        loaded, assigned = set(), {}
        for name in compact.plain_tensors():
            tensor = compact.tensor(name)
            target = state.get(name)
            if target is not None and target.dtype == tensor.dtype and target.shape == tensor.shape:
                assigned[name] = tensor  # taken as it was read: no copy
            else:
                _place(name, target, tensor)
            loaded.add(name)
        model.load_state_dict(assigned, strict=False, assign=True)
        for name in progress(compact.layers, desc="decompress", unit="layer"):
            layer = compact.layer(name)
            replacement = replace(layer, model.get_submodule(name)) if replace is not None else None
            if replacement is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, replacement)
                loaded.add(f"{name}.weight")
                continue
            target = state.get(f"{name}.weight")
            weight = layer.unpack(out=target)
            if weight is not target:
                _place(f"{name}.weight", target, weight)
            loaded.add(f"{name}.weight")
            if layer.scheme is not None:
                attach_grid(model.get_submodule(name), layer.grid())
    missing = sorted(expected - loaded)
    if missing:
        raise SparseLLMError(f"tensor {missing[0]} is missing from {folder} ({len(missing)} missing)")
    model.tie_weights()
    return model.eval()


def layers(folder: str | os.PathLike) -> Iterator[EncodedLayer]:
    """Every packed layer of a compact folder, checked (for sparse kernels and inspection)."""
    with CompactFolder(folder) as compact:
        for name in compact.layers:
            yield compact.layer(name)


def compress(folder: str | os.PathLike, output: str | os.PathLike, dtype: torch.dtype | None = None,
             quantization: QuantScheme | None = None, overwrite: bool = False) -> Path:
    """Rewrite a model folder (typically dense with zeros) as a compact one, optionally quantizing it.

    Quantization here is round-to-nearest, as no calibration data is involved.
    """
    from ..checkpoint import check_output, read_metadata
    from ..models import load_model
    from ..weights.quant import round_to_nearest

    check_output(output, overwrite)
    model, tokenizer = load_model(folder)
    metadata = (read_metadata(folder) or {}) | {"compressed_from": str(folder)}
    if quantization is not None:
        round_to_nearest(model, quantization)
        metadata["quantization"] = quantization.to_dict() | {"applied": "round-to-nearest"}
    return save(model, tokenizer, output, metadata, overwrite, dtype)
