"""MoE models as transformers models: a dense family's classes with some MLPs swapped for MoE layers.

A converted folder's ``config.json`` is the dense family's config plus three keys:
``model_type: sparsellm_moe``, ``dense_model_type`` (e.g. ``llama``) and ``moe`` (the layer
settings and which blocks are MoE). Its safetensors hold the dense model's tensors, except that each
MoE block's ``mlp.*`` tensors are ``mlp.router.weight`` (E, H) (and ``mlp.router.bias`` (E,) for
MoEfied models), ``mlp.experts.gate_up_proj`` (E, 2F, H) and ``mlp.experts.down_proj`` (E, H, F).

Why a model type of our own rather than patching MLPs after loading the dense architecture: a
plain ``AutoModelForCausalLM.from_pretrained`` without sparsellm fails loudly ("unrecognized model
type sparsellm_moe") instead of silently building a dense model with missing MLP weights, and with
sparsellm registered (``register()``, done by ``sparsellm.models.load_model`` and on importing this
package) it loads like any transformers model: no ``trust_remote_code``, no code in the folder.
The per-family classes (e.g. ``SparseMoELlamaForCausalLM``, a ``LlamaForCausalLM`` whose chosen
blocks get an ``MoELayer`` as MLP) are made on first use, so registering imports no model code.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from ...errors import SparseLLMError
from ...models import decoder_blocks
from .layer import Experts, MoEConfig, MoELayer, PackedExperts

MODEL_TYPE = "sparsellm_moe"


def moe_settings(config) -> tuple[MoEConfig, list[int]]:
    """The MoE layer config and the indices of the MoE blocks, from a model config."""
    settings = getattr(config, "moe", None)
    if not isinstance(settings, dict) or "layers" not in settings:
        raise SparseLLMError("the model config has no 'moe' settings: not a sparsellm MoE model")
    return MoEConfig.from_dict(settings), list(settings["layers"])


def _install_moe_layers(model: nn.Module) -> None:
    moe_config, layers = moe_settings(model.config)
    _, blocks = decoder_blocks(model)
    for index in layers:
        blocks[index].mlp = MoELayer(model.config.hidden_size, moe_config)


@functools.cache
def family_classes(dense_model_type: str) -> tuple[type, type]:
    """The (config, causal LM) classes of a dense family's MoE variant, registered with the Auto classes."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        dense_config = CONFIG_MAPPING[dense_model_type]
        dense_model = MODEL_FOR_CAUSAL_LM_MAPPING[dense_config]
    except KeyError:
        raise SparseLLMError(f"unknown dense model type '{dense_model_type}' in an MoE config") from None

    class Config(dense_config):
        model_type = MODEL_TYPE

    class Model(dense_model):
        config_class = Config

        def __init__(self, config) -> None:
            super().__init__(config)
            _install_moe_layers(self)

    for cls, dense in ((Config, dense_config), (Model, dense_model)):
        cls.__name__ = cls.__qualname__ = f"SparseMoE{dense.__name__}"
    AutoModelForCausalLM.register(Config, Model, exist_ok=True)
    return Config, Model


def _entry_config_class():
    from transformers import PreTrainedConfig

    class SparseMoEConfig(PreTrainedConfig):
        """What ``AutoConfig`` finds for ``model_type: sparsellm_moe``: it hands over to the family's class."""

        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict, **kwargs):
            dense_model_type = config_dict.get("dense_model_type")
            if not dense_model_type:
                raise ValueError("a sparsellm_moe config needs 'dense_model_type' (e.g. 'llama')")
            return family_classes(dense_model_type)[0].from_dict(config_dict, **kwargs)

    return SparseMoEConfig


@functools.cache
def register() -> None:
    """Teach transformers' AutoConfig / AutoModelForCausalLM the ``sparsellm_moe`` model type (once)."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, _entry_config_class(), exist_ok=True)


def is_moe_model(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == MODEL_TYPE


def gated_mlp(block: nn.Module) -> nn.Module:
    """A decoder block's MLP, if it is the gated form MoE conversion knows: down(act(gate x) * up x)."""
    mlp = getattr(block, "mlp", None)
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections) or not hasattr(mlp, "act_fn"):
        raise SparseLLMError(
            f"MoE conversion needs gated MLPs (mlp.gate_proj/up_proj/down_proj, as in Llama, Qwen, Mistral, "
            f"Gemma); this model's blocks have {type(mlp).__name__ if mlp is not None else 'no mlp'}"
        )
    if any(p.bias is not None for p in projections):
        raise SparseLLMError("MoE conversion does not support MLPs with biases")
    return mlp


def mlp_activation(config, mlp: nn.Module) -> str:
    """The name of the MLP's activation, as transformers' ACT2FN knows it."""
    from transformers.activations import ACT2FN

    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name is None or type(ACT2FN[name]) is not type(mlp.act_fn):
        raise SparseLLMError(f"cannot tell which activation the MLP uses ({type(mlp.act_fn).__name__})")
    return name


def as_moe_model(model: nn.Module, moe_config: MoEConfig, layers: list[int]) -> nn.Module:
    """Make ``model`` (whose listed blocks already hold MoE layers) an instance of its family's MoE class.

    The object is kept (no weights are copied); its class and its config's class become the MoE
    variants, so ``save_pretrained`` writes a folder that ``from_pretrained`` reads back.
    """
    dense_model_type = model.config.model_type
    config_class, model_class = family_classes(dense_model_type)
    model.config.__class__ = config_class
    model.config.dense_model_type = dense_model_type
    model.config.moe = moe_config.to_dict() | {"layers": sorted(layers)}
    model.config.architectures = [model_class.__name__]
    model.__class__ = model_class
    return model


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The model's MoE layers by dotted name, in block order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}


def pack_experts(model: nn.Module) -> int:
    """Put every MoE layer's experts that the CPU kernels run (float32, SiLU-gated, on the CPU) in their
    layout, in place (``MoELayer.pack_``: one copy of the weights, inference only; the model still saves
    as before). Returns how many layers were packed; ``unpack_experts`` undoes it (to train)."""
    packed = 0
    for layer in moe_layers(model).values():
        experts = layer.experts
        if not isinstance(experts, Experts) or experts.activation != "silu":
            continue
        if experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.device.type == "cpu":
            layer.pack_()
            packed += 1
    return packed


def unpack_experts(model: nn.Module) -> int:
    """The inverse of ``pack_experts``: trainable experts again. Returns how many layers were unpacked."""
    layers = [layer for layer in moe_layers(model).values() if isinstance(layer.experts, PackedExperts)]
    for layer in layers:
        layer.unpack_()
    return len(layers)


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Route every MoE layer of the model to ``top_k`` experts from now on (and in what it saves)."""
    layers = moe_layers(model)
    if not layers:
        raise SparseLLMError("the model has no MoE layers")
    for layer in layers.values():
        layer.moe_config = dataclasses.replace(layer.moe_config, top_k=top_k)
    if isinstance(getattr(model.config, "moe", None), dict):
        model.config.moe = model.config.moe | {"top_k": top_k}
