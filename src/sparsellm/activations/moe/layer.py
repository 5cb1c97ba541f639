"""A mixture-of-experts MLP: a float32 router sends each token to k experts, and only those run.

Routing (Switch Transformers; D6 in the algorithm notes): ``logits = W_r x`` in float32, with x
scaled by U(1-eps, 1+eps) jitter while training; ``p = softmax(logits)``; the k largest p choose
the experts. Each chosen expert's output is scaled by a weight, one of three ``weighting``s:

- ``softmax``: p itself (Switch: top-1 output is p_max * expert(x), which trains the router);
- ``normalized``: p renormalised over the chosen k, so k identical experts give back the dense MLP
  (upcycling);
- ``ones``: 1, for MoEfied experts that are slices of one dense MLP: all of them together are
  exactly the dense MLP.

Capacity: with a ``capacity_factor`` c, an expert takes at most ceil(c * k * tokens / E) of the
(token, expert) assignments of one forward call. Assignments are served first choices first, then
second choices, and so on, each in token order (batch-major), so a token loses its lowest-ranked
experts first. A dropped assignment adds nothing: the decoder block's residual carries the token
on. Without a capacity factor the layer is dropless.

Dispatch sorts the assignments by expert; the experts then run as one padded batch (two batched
products) when the routing is balanced enough, else one after the other on their contiguous runs of
the gathered tokens. Expert weights are stacked as (E, 2F, H) and (E, H, F) (the layout transformers
uses for Mixtral), so choosing an expert is a contiguous slice.

For inference on the CPU, ``pack_()`` swaps the experts for ``PackedExperts``: the same weights, once,
in the compiled kernels' layout (kernels/csrc/moe.cpp: panels of 16 outputs, input-major), which run
every call (one decoding token routed and run in one call; many tokens grouped by expert). A BLAS
GEMM of the ~32 rows an expert gets from 256 tokens at E = 8 spends much of its time packing the
weights anew on every call; packed once, the layer runs at about the speed of a dense MLP with the
same active parameters. ``state_dict`` gives the (E, 2F, H) / (E, H, F) tensors either way, so a
packed model saves as an unpacked one; ``unpack_()`` returns to training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SparseLLMError
from ...kernels.layouts import EXPERT_PANEL, pack_down, pack_gate_up, unpack_down, unpack_gate_up

WEIGHTINGS = ("softmax", "normalized", "ones")
# Batched dispatch pads every expert to the busiest one's count. Measured, E = 8, 256 tokens, top-1
# (22 % padding): 1.21x one product per expert at H 576 / F 1536, 0.98x at H 2048 / F 5632. Past
# this much padding the wasted rows cost more than the calls saved: loop over the experts.
PADDED_DISPATCH_LIMIT = 1.5


@dataclass(frozen=True)
class MoEConfig:
    """What one MoE layer is: E experts of ``expert_size`` neurons each, k of them per token."""

    num_experts: int
    expert_size: int
    top_k: int = 1
    capacity_factor: float | None = None  # None: dropless
    weighting: str = "softmax"
    jitter: float = 0.0  # multiplicative router-input noise while training
    activation: str = "silu"  # the family's MLP activation (gated: act(gate) * up)
    router_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.expert_size < 1:
            raise SparseLLMError(f"an MoE layer needs at least one expert of at least one neuron, "
                                 f"got {self.num_experts} experts of {self.expert_size}")
        if not 1 <= self.top_k <= self.num_experts:
            raise SparseLLMError(f"top-k must be between 1 and the number of experts ({self.num_experts}), "
                                 f"got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise SparseLLMError(f"the capacity factor must be positive, got {self.capacity_factor}")
        if self.weighting not in WEIGHTINGS:
            raise SparseLLMError(f"unknown expert weighting '{self.weighting}': use one of {', '.join(WEIGHTINGS)}")
        if not 0 <= self.jitter < 1:
            raise SparseLLMError(f"router jitter must be in [0, 1), got {self.jitter}")

    def capacity(self, tokens: int) -> int | None:
        """Assignments one expert may take in a call over ``tokens`` tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * self.top_k * tokens / self.num_experts))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass
class Routing:
    """The router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) float32
    probs: torch.Tensor  # (N, E) softmax of the logits
    experts: torch.Tensor  # (N, k) chosen experts, most probable first
    weights: torch.Tensor  # (N, k) float32 scale of each chosen expert's output
    kept: torch.Tensor | None  # (N, k) bool, False where capacity dropped the assignment; None: none dropped

    def expert_counts(self) -> torch.Tensor:
        """Assignments each expert served (dropped ones excluded), shape (E,)."""
        experts = self.experts if self.kept is None else self.experts[self.kept]
        return torch.bincount(experts.reshape(-1), minlength=self.logits.shape[-1])


class Router(nn.Module):
    """logits = W x + b in float32. Not an ``nn.Linear``, so weight pruning leaves routers alone."""

    def __init__(self, hidden_size: int, num_experts: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        nn.init.uniform_(self.weight, -hidden_size ** -0.5, hidden_size ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), bias)


class Experts(nn.Module):
    """E gated MLPs stacked: ``down(act(gate x) * up x)`` with gate and up fused in one matrix."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, activation: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.activation, self.act_fn = activation, ACT2FN[activation]
        # nn.Linear's default initialisation, per expert
        nn.init.uniform_(self.gate_up_proj, -hidden_size ** -0.5, hidden_size ** -0.5)
        nn.init.uniform_(self.down_proj, -expert_size ** -0.5, expert_size ** -0.5)

    @classmethod
    def from_weights(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str) -> Experts:
        """Experts holding the given (E, 2F, H) and (E, H, F) tensors, uncopied."""
        num_experts, hidden_size, expert_size = down_proj.shape
        with torch.device("meta"):  # skip the random initialisation of tensors replaced right away
            experts = cls(num_experts, hidden_size, expert_size, activation)
        experts.gate_up_proj, experts.down_proj = nn.Parameter(gate_up_proj), nn.Parameter(down_proj)
        return experts

    def forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.gate_up_proj[expert], self.down_proj[expert], x)

    def run(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One expert, given its weights (2F, H) and (H, F), on the rows of x."""
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows of x (E, T, H) -> (E, T, H): two batched products in all."""
        gate, up = torch.bmm(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))


class PackedExperts(nn.Module):
    """Experts for inference: the weights once, as the compiled kernels read them (``pack_gate_up``,
    ``pack_down``). Not trainable; ``state_dict`` reads and writes the unpacked ``gate_up_proj`` and
    ``down_proj`` of ``Experts``, so checkpoints are the same either way."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        if experts.activation != "silu":
            raise SparseLLMError(f"the MoE kernels run SiLU-gated experts; this layer's use {experts.activation}")
        self.hidden_size, self.expert_size = experts.down_proj.shape[1:]
        self.activation = experts.activation
        self.register_buffer("gate_up_panels", pack_gate_up(experts.gate_up_proj.detach()))
        self.register_buffer("down_panels", pack_down(experts.down_proj.detach()))

    def unpacked(self) -> Experts:
        """The same weights as ``Experts`` (a copy): for the torch paths and for training."""
        return Experts.from_weights(unpack_gate_up(self.gate_up_panels, self.expert_size),
                                    unpack_down(self.down_panels, self.hidden_size), self.activation)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "gate_up_proj"] = unpack_gate_up(self.gate_up_panels, self.expert_size)
        destination[prefix + "down_proj"] = unpack_down(self.down_panels, self.hidden_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name, pack, buffer in (("gate_up_proj", pack_gate_up, self.gate_up_panels),
                                   ("down_proj", pack_down, self.down_panels)):
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
                continue
            panels = pack(state_dict[prefix + name].to(buffer.dtype))
            if panels.shape != buffer.shape:
                error_msgs.append(f"{prefix + name}: packs to {tuple(panels.shape)}, the layer holds {tuple(buffer.shape)}")
                continue
            with torch.no_grad():
                buffer.copy_(panels)

    def extra_repr(self) -> str:
        return f"experts={self.gate_up_panels.shape[0]}x{self.expert_size}, packed in panels of {EXPERT_PANEL}"


class MoELayer(nn.Module):
    """Router + experts, a drop-in for a decoder block's MLP: (..., H) -> (..., H).

    The routing of the last call stays in ``last_routing`` so the training loop can add the
    auxiliary losses (``load_balancing_loss``, ``router_z_loss``) and count expert usage.
    """

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.moe_config = config
        self.router = Router(hidden_size, config.num_experts, config.router_bias)
        self.experts = Experts(config.num_experts, hidden_size, config.expert_size, config.activation)
        self.last_routing: Routing | None = None

    @classmethod
    def from_weights(cls, config: MoEConfig, router: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor, router_bias: torch.Tensor | None = None) -> MoELayer:
        """A layer holding the given tensors, uncopied: router (E, H) and its bias (E,) when the config
        has one, gate_up (E, 2F, H), down (E, H, F)."""
        expected = {"router": (config.num_experts, router.shape[1]),
                    "gate_up_proj": (config.num_experts, 2 * config.expert_size, router.shape[1]),
                    "down_proj": (config.num_experts, router.shape[1], config.expert_size)}
        for name, tensor in (("router", router), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if tuple(tensor.shape) != expected[name]:
                raise SparseLLMError(f"MoE {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        with torch.device("meta"):  # skip the random initialisation of tensors replaced right away
            layer = cls(router.shape[1], config)
        layer.router.weight = nn.Parameter(router)
        if config.router_bias:
            if router_bias is None or router_bias.shape != (config.num_experts,):
                raise SparseLLMError(f"the router needs a bias of shape ({config.num_experts},)")
            layer.router.bias = nn.Parameter(router_bias)
        layer.experts = Experts.from_weights(gate_up_proj, down_proj, config.activation)
        return layer

    def route(self, x: torch.Tensor) -> Routing:
        """Choose k experts for each row of x (N, H), in float32 ("selective precision")."""
        config = self.moe_config
        inputs = x.float()
        if self.training and config.jitter > 0:
            inputs = inputs * torch.empty_like(inputs).uniform_(1 - config.jitter, 1 + config.jitter)
        logits = self.router(inputs)
        probs = logits.softmax(dim=-1)
        top_probs, experts = probs.topk(config.top_k, dim=-1)
        if config.weighting == "softmax":
            weights = top_probs
        elif config.weighting == "normalized":
            weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        else:
            weights = torch.ones_like(top_probs)
        capacity = config.capacity(x.shape[0])
        kept = None
        if capacity is not None and capacity < x.shape[0]:  # else no expert can overflow
            # Position of each assignment in its expert's queue: first choices of all tokens, then
            # second choices, each in token order (the cumsum of Switch's one-hot dispatch mask).
            queue = F.one_hot(experts.t().reshape(-1), config.num_experts)
            position = (queue.cumsum(0) * queue).sum(-1) - 1
            kept = (position < capacity).view(config.top_k, -1).t()
        return Routing(logits, probs, experts, weights, kept)

    def pack_(self) -> MoELayer:
        """Hold the experts for inference only, once, in the compiled kernels' layout (``PackedExperts``)."""
        if isinstance(self.experts, Experts):
            self.experts = PackedExperts(self.experts)
        return self

    def unpack_(self) -> MoELayer:
        """Back to trainable ``Experts`` (the inverse of ``pack_``)."""
        if isinstance(self.experts, PackedExperts):
            self.experts = self.experts.unpacked()
        return self

    def dispatch(self, x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        """Sum each token's weighted expert outputs, running each expert once on its tokens."""
        tokens, k = routing.experts.shape
        if tokens == 1:  # decoding: no grouping to do, and every op saved counts at this size
            return self._single_token(x, routing, experts)
        token_index = torch.arange(tokens, device=x.device).repeat_interleave(k)
        expert_index = routing.experts.reshape(-1)
        weights = routing.weights.reshape(-1)
        if routing.kept is not None:
            keep = routing.kept.reshape(-1)
            token_index, expert_index, weights = token_index[keep], expert_index[keep], weights[keep]
        order = expert_index.argsort(stable=True)
        token_index, weights = token_index[order], weights[order].to(x.dtype).unsqueeze(-1)
        counts = torch.bincount(expert_index, minlength=self.moe_config.num_experts).tolist()
        output = torch.zeros_like(x)
        if len(counts) * max(counts) <= PADDED_DISPATCH_LIMIT * len(token_index):
            return self._padded(x, token_index, expert_index[order], counts, weights, output, experts)
        # One unbind for all experts: autograd stacks their weights' gradients once, where indexing
        # one expert at a time gives each backward a zero-filled gradient of the whole stack
        # (measured: a quarter of a distillation step at 32 experts went to filling them).
        gate_up, down = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            # this expert's tokens: a contiguous run of the sorted assignments; gathered, run and
            # added back one expert at a time, so the working set stays small
            tokens_here = token_index[start : start + count]
            expert_output = experts.run(gate_up[expert], down[expert], x.index_select(0, tokens_here))
            if self.moe_config.weighting != "ones":
                expert_output = expert_output * weights[start : start + count]
            output.index_add_(0, tokens_here, expert_output)
            start += count
        return output

    def _padded(self, x: torch.Tensor, token_index: torch.Tensor, expert_index: torch.Tensor, counts: list[int],
                weights: torch.Tensor, output: torch.Tensor, experts: Experts) -> torch.Tensor:
        """Dispatch as one batch: the assignments (sorted by expert) fill an (E, most, H) buffer row
        by row, the experts run as two batched products, and the rows go back to their tokens."""
        starts = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)
        slot = torch.arange(len(token_index), device=x.device) - starts[expert_index]
        buffer = x.new_zeros(len(counts), max(counts), x.shape[-1])
        buffer[expert_index, slot] = x[token_index]
        expert_output = experts.batched(buffer)[expert_index, slot]
        if self.moe_config.weighting != "ones":
            expert_output = expert_output * weights
        return output.index_add_(0, token_index, expert_output)

    def _single_token(self, x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        output = None
        for rank, expert in enumerate(routing.experts[0].tolist()):
            expert_output = experts(expert, x)
            if self.moe_config.weighting != "ones":
                expert_output = expert_output * routing.weights[0, rank].to(x.dtype)
            output = expert_output if output is None else output + expert_output
        return output

    def _kernels(self, x: torch.Tensor):
        """(compiled extension, whether it may use AVX-512) when this call can run on sparsellm's
        kernels: packed (so SiLU-gated) experts, no gradients wanted, float32 on the CPU, the kernels
        built and not switched to ``torch``; else None."""
        router = list(self.router.parameters())
        if not isinstance(self.experts, PackedExperts) \
                or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *router))) \
                or x.device.type != "cpu" or x.dtype != torch.float32 \
                or any(t.dtype != torch.float32 for t in (*router, self.experts.gate_up_panels)):
            return None
        from ...kernels import backend

        module, chosen = backend.extension(), backend.current().name
        if module is None or chosen == "torch":
            return None
        return module, chosen != "avx2"

    def _fused_token(self, x: torch.Tensor, module, allow_avx512: bool) -> torch.Tensor:
        """One decoding token through the compiled layer (kernels/csrc/moe.cpp: routing and experts in
        one call, instead of ~6 torch calls plus ~7 per expert)."""
        router, experts = self.router, self.experts
        bias = router.bias if router.bias is not None else torch.empty(0)
        output, logits, probs, chosen, weights = module.moe_token(
            x[0].contiguous(), router.weight.contiguous(), bias, experts.gate_up_panels, experts.down_panels,
            self.moe_config.top_k, WEIGHTINGS.index(self.moe_config.weighting), allow_avx512)
        self.last_routing = Routing(logits[None], probs[None], chosen[None], weights[None], None)
        return output[None]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        packed = isinstance(self.experts, PackedExperts)
        if packed and self.training:
            raise SparseLLMError("this MoE layer's experts are packed for inference: unpack_() it to train")
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        kernels = self._kernels(x)
        if kernels is not None and x.shape[0] == 1:
            return self._fused_token(x, *kernels).view(hidden_states.shape)
        routing = self.route(x)
        self.last_routing = routing
        if kernels is not None:
            module, allow_avx512 = kernels
            experts = routing.experts if routing.kept is None else routing.experts.masked_fill(~routing.kept, -1)
            output = module.moe_experts(x.contiguous(), experts, routing.weights, self.experts.gate_up_panels,
                                        self.experts.down_panels, allow_avx512)
        else:  # packed experts without the kernels (no compiler, bfloat16, ...) run unpacked, as a copy
            output = self.dispatch(x, routing, self.experts.unpacked() if packed else self.experts)
        return output.view(hidden_states.shape)

    def extra_repr(self) -> str:
        config = self.moe_config
        capacity = "dropless" if config.capacity_factor is None else f"capacity_factor={config.capacity_factor}"
        return (f"experts={config.num_experts}x{config.expert_size}, top_k={config.top_k}, "
                f"weighting={config.weighting}, {capacity}")


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss N * sum_e f_e * P_e (1 when perfectly balanced).

    f_e is the share of the router's (token, expert) choices that went to e (before capacity
    drops), P_e the mean router probability of e over the tokens; N = number of experts.
    """
    num_experts = probs.shape[-1]
    chosen = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    share = chosen / experts.numel()
    return num_experts * (share * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()
