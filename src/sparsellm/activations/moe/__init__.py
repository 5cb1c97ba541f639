"""Mixture-of-experts: Switch-style MoE layers, dense-to-MoE conversion (MoEfication, upcycling), training.

Importing this package registers the ``sparsellm_moe`` model type with transformers, so MoE folders
load with a plain ``AutoModelForCausalLM.from_pretrained`` too.
"""

from .layer import (
    Experts,
    MoEConfig,
    MoELayer,
    PackedExperts,
    Router,
    Routing,
    load_balancing_loss,
    router_z_loss,
)
from .modeling import (
    as_moe_model,
    is_moe_model,
    moe_layers,
    pack_experts,
    register,
    set_top_k,
    unpack_experts,
)
from .moefy import MoEfyReport, moefy
from .speed import decode_mlp_seconds
from .train import TrainLog, distill_experts, expert_counts, plot_training, router_losses, train
from .upcycle import upcycle

register()

__all__ = [
    "Experts", "MoEConfig", "MoELayer", "MoEfyReport", "PackedExperts", "Router", "Routing", "TrainLog", "as_moe_model",
    "decode_mlp_seconds", "distill_experts", "expert_counts", "is_moe_model", "load_balancing_loss", "moe_layers", "moefy",
    "pack_experts", "plot_training", "register", "router_losses", "router_z_loss", "set_top_k", "train", "unpack_experts",
    "upcycle",
]
