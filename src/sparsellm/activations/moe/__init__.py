"""Mixture-of-experts: Switch-style MoE layers, dense-to-MoE conversion (MoEfication, upcycling), training.

Importing this package registers the ``sparsellm_moe`` model type with transformers, so MoE folders
load with a plain ``AutoModelForCausalLM.from_pretrained`` too.
"""

from .layer import Experts, MoEConfig, MoELayer, Routing, load_balancing_loss, router_z_loss
from .modeling import as_moe_model, is_moe_model, moe_layers, register, set_top_k
from .upcycle import upcycle

register()

__all__ = [
    "Experts", "MoEConfig", "MoELayer", "Routing", "as_moe_model", "is_moe_model", "load_balancing_loss",
    "moe_layers", "register", "router_z_loss", "set_top_k", "upcycle",
]
