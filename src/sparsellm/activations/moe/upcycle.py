"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model's MLPs become MoE layers of E copies.

Every expert starts as an exact copy of the block's dense MLP and the router starts as small
Gaussian noise, so before training the model computes what the dense model computed (with the
default ``normalized`` weighting the chosen experts' weights sum to 1), yet every token already
runs k experts that training can pull apart (with the auxiliary losses, see ``train``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import SparseLLMError
from ...logging_utils import logger
from ...models import decoder_blocks
from .layer import MoEConfig, MoELayer
from .modeling import as_moe_model, gated_mlp, is_moe_model, mlp_activation


def moe_block_indices(num_blocks: int, every: int) -> list[int]:
    """Blocks that get an MoE layer: every ``every``-th, counting from the last (Switch: every other)."""
    if every < 1:
        raise SparseLLMError(f"--every must be at least 1, got {every}")
    return [index for index in range(num_blocks) if (num_blocks - 1 - index) % every == 0]


@torch.no_grad()
def upcycle(model: nn.Module, num_experts: int = 8, top_k: int = 2, *, every: int = 1,
            capacity_factor: float | None = None, weighting: str = "normalized", router_std: float = 0.02,
            expert_noise: float = 0.0, jitter: float = 0.0, seed: int = 0) -> dict:
    """Turn the MLPs of every ``every``-th block into MoE layers of copies, in place; return a report.

    ``expert_noise`` scales each expert copy by (1 + expert_noise * N(0, 1)) elementwise, to break
    the experts' symmetry from the start (0: identical copies, the output equals the dense model's).
    """
    if is_moe_model(model):
        raise SparseLLMError("the model is already an MoE model")
    if router_std < 0 or expert_noise < 0:
        raise SparseLLMError("router and expert noise must be non-negative")
    _, blocks = decoder_blocks(model)
    layers = moe_block_indices(len(blocks), every)
    generator = torch.Generator().manual_seed(seed)
    moe_config = None
    for index in layers:
        mlp = gated_mlp(blocks[index])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        down = mlp.down_proj.weight
        if moe_config is None:
            moe_config = MoEConfig(num_experts, down.shape[1], top_k, capacity_factor, weighting, jitter,
                                   mlp_activation(model.config, mlp))
        experts = [(_noisy(gate_up, expert_noise, generator), _noisy(down, expert_noise, generator))
                   for _ in range(num_experts)]
        router = torch.randn(num_experts, gate_up.shape[1], generator=generator) * router_std
        blocks[index].mlp = MoELayer.from_weights(
            moe_config, router.to(gate_up.dtype).to(gate_up.device),
            torch.stack([g for g, _ in experts]), torch.stack([d for _, d in experts]),
        ).train(mlp.training)  # in the mode of the MLP it replaces (inference picks the kernels by it)
    as_moe_model(model, moe_config, layers)
    dense_mlp = 3 * moe_config.expert_size * model.config.hidden_size
    report = {
        "method": "upcycle", "experts": num_experts, "top_k": top_k, "layers": layers,
        "moe": moe_config.to_dict(), "router_std": router_std, "expert_noise": expert_noise, "seed": seed,
        "mlp_params_per_token_vs_dense": top_k, "mlp_params_total_vs_dense": num_experts,
        "dense_mlp_params_per_block": dense_mlp,
    }
    logger.info("upcycled %d of %d blocks into %d experts (top-%d): %dx the MLP parameters, %dx per token",
                len(layers), len(blocks), num_experts, top_k, num_experts, top_k)
    return report


def _noisy(weight: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    copy = weight.detach().clone()
    if scale > 0:
        noise = torch.randn(weight.shape, generator=generator).to(copy.dtype).to(copy.device)
        copy.mul_(1 + scale * noise)
    return copy
