"""MoEfication (Zhang et al. 2022): split each dense MLP into E equal experts and route tokens to k.

A gated MLP is a sum over its F intermediate neurons, ``down[:, i] * act(gate_i x) * (up_i x)``, so
any partition of the neurons into E groups of F/E gives E experts whose outputs add up to the
dense MLP exactly: with all experts chosen, the MoEfied model is the dense model. Choosing only k
of them costs what the neurons left out contributed, so the partition groups neurons that are
active together and the router learns which groups matter for a token.

Block by block (the shared engine, so each block calibrates on the MoEfied blocks before it):

1. record the MLP inputs X of the calibration tokens and the intermediate activations
   A = act(X gate^T) * (X up^T);
2. cluster the neurons into E equal groups with balanced k-means (cosine), on their
   co-activation profiles |A[:, i]| over the tokens (``coactivation``) or on their weight
   vectors [gate_i, up_i] (``weights``);
3. score each expert on each token by the norm of its output, ``||A[:, e] down[:, e]^T||``;
4. fit the router (a linear layer with bias) to these scores by least squares on the token
   statistics X^T X and X^T S (closed form), then, with ``router_steps``, train it for that many
   Adam steps to predict each token's k best experts (binary cross-entropy on the top-k labels,
   as in MoEfication's learned router). The experts' outputs add up unweighted (``ones``);
5. with ``refit_down`` (the default; nothing to refit when every expert runs), refit the experts'
   down projections by least squares so that the k chosen experts' outputs add up to the dense
   MLP's output on the calibration tokens: the dropped neurons' contribution, where it correlates
   with the kept ones', is folded into their weights.
   With the routing fixed the MoE output is linear in the down weights, ``D (A * M)`` for the
   activations A masked by each token's chosen experts M, so the best D is a ridge regression on
   an F x F Gram matrix (closed form, as the router's). The refitted weights are fitted for k:
   raising k later (``set_top_k``) no longer gives the dense model back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ... import engine
from ...data import Text
from ...errors import SparseLLMError
from ...logging_utils import logger
from ...weights.oneshot import calibration_windows
from .layer import MoEConfig, MoELayer
from .modeling import as_moe_model, gated_mlp, is_moe_model, mlp_activation

CLUSTERINGS = ("coactivation", "weights")


def balanced_assignment(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each row of ``scores`` (items x clusters) to a cluster, exactly ``size`` items per cluster.

    In rounds: every unassigned item proposes to its best cluster that still has room; a cluster
    accepts its best-scoring proposers up to its room. Deterministic; at most one round per cluster.
    """
    items, clusters = scores.shape
    if items != size * clusters:
        raise SparseLLMError(f"cannot split {items} items into {clusters} groups of {size}")
    labels = torch.full((items,), -1, dtype=torch.long)
    room = torch.full((clusters,), size, dtype=torch.long)
    while (labels < 0).any():
        free = (labels < 0).nonzero().squeeze(1)
        offers = scores[free].masked_fill(room == 0, float("-inf"))
        best, choice = offers.max(dim=1)
        for cluster in choice.unique().tolist():
            proposers = (choice == cluster).nonzero().squeeze(1)
            accepted = proposers[best[proposers].argsort(descending=True, stable=True)[: room[cluster]]]
            labels[free[accepted]] = cluster
            room[cluster] -= len(accepted)
    return labels


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``features`` into equal groups by cosine similarity; returns a label per row.

    k-means++ seeding (from ``seed``), then alternate balanced assignment and mean centroids until
    the labels stop changing.
    """
    points = F.normalize(features.float(), dim=1)
    size = points.shape[0] // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = [points[torch.randint(points.shape[0], (1,), generator=generator).item()]]
    for _ in range(1, clusters):
        nearest = (points @ torch.stack(centroids).t()).max(dim=1).values
        distance = (1 - nearest).clamp_min(0) + 1e-12
        centroids.append(points[torch.multinomial(distance, 1, generator=generator).item()])
    centroid = torch.stack(centroids)
    labels = None
    for _ in range(iterations):
        new_labels = balanced_assignment(points @ centroid.t(), size)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroid).index_add_(0, labels, points)
        centroid = F.normalize(sums, dim=1)
    return labels


class TokenRecorder:
    """Keeps every calibration token's input (the engine calls ``add_batch`` for each batch)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        self.batches.append(inputs.detach().reshape(-1, inputs.shape[-1]).float().cpu())

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.batches)


def expert_scores(activations: torch.Tensor, down: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Norm of each expert's output on each token: (tokens, E), experts' neurons in ``groups`` (E, F/E)."""
    return torch.stack([(activations[:, group] @ down[:, group].t()).norm(dim=1) for group in groups], dim=1)


def fit_router(inputs: torch.Tensor, scores: torch.Tensor, top_k: int, steps: int = 0, lr: float = 1e-3,
               ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear router (weight (E, H), bias (E,)) that ranks experts as ``scores`` (tokens, E) does.

    Least squares from the inputs' second moments (ridge-regularised by ``ridge`` x the mean
    feature variance), then ``steps`` full-batch Adam steps of binary cross-entropy against each
    token's ``top_k`` best experts.
    """
    tokens, hidden = inputs.shape
    # Only each token's ranking of the experts matters: standardise the scores per token, so that
    # tokens with large MLP outputs do not dominate the fit and the logits start near unit scale.
    targets = scores.double()
    targets = (targets - targets.mean(dim=1, keepdim=True)) / targets.std(dim=1, keepdim=True).clamp_min(1e-12)
    design = torch.cat([inputs, torch.ones(tokens, 1)], dim=1).double()
    gram = design.t() @ design
    gram.diagonal()[:hidden] += ridge * gram.diagonal()[:hidden].mean()
    solution = torch.linalg.solve(gram, design.t() @ targets).float()
    weight, bias = solution[:hidden].t().contiguous(), solution[hidden].contiguous()
    if steps > 0:
        labels = torch.zeros_like(scores).scatter_(1, scores.topk(top_k, dim=1).indices, 1.0)
        weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = F.binary_cross_entropy_with_logits(F.linear(inputs, weight, bias), labels)
                loss.backward()
                optimizer.step()
        weight, bias = weight.detach(), bias.detach()
    return weight, bias


def fit_down_projections(activations: torch.Tensor, chosen: torch.Tensor, groups: torch.Tensor,
                         targets: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Down projections (E, H, F/E) minimising ``||sum over chosen e of down_e a_e(x) - y(x)||^2`` over tokens.

    ``activations`` (tokens, F) are the dense MLP's intermediate activations, ``chosen`` (tokens, k)
    each token's experts, ``groups`` (E, F/E) the experts' neurons, ``targets`` (tokens, H) the dense
    output. Ridge-regularised by ``ridge`` x the Gram matrix's mean diagonal.
    """
    experts, size = groups.shape
    routed = torch.zeros(activations.shape[0], experts).scatter_(1, chosen, 1.0)
    masked = activations[:, groups.flatten()] * routed.repeat_interleave(size, dim=1)
    gram = (masked.t() @ masked).double()
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    solution = torch.linalg.solve(gram, (masked.t() @ targets).double()).float()  # (F, H)
    return solution.view(experts, size, -1).transpose(1, 2).contiguous()


@dataclass
class MoEfyLayer:
    name: str
    router_recall: float  # share of each token's k best experts (by output norm) that the router picks
    relative_error: float  # ||MoE(X) - MLP(X)|| / ||MLP(X)|| on calibration tokens
    seconds: float


@dataclass
class MoEfyReport:
    """What a MoEfication run did: the sparsity.json written next to the MoE model."""

    method: str
    experts: int
    top_k: int
    cluster: str
    router_steps: int
    refit_down: bool
    moe: dict
    calibration: dict
    layers: list[MoEfyLayer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def active_share(self) -> float:
        """Share of each MLP's neurons (and weights) a token runs."""
        return self.top_k / self.experts

    def to_dict(self) -> dict:
        return asdict(self) | {"mlp_params_per_token_vs_dense": self.active_share}


@torch.no_grad()
def moefy(model, tokenizer, num_experts: int = 16, top_k: int = 4, *, cluster: str = "coactivation",
          router_steps: int = 0, router_lr: float = 1e-3, refit_down: bool = True,
          capacity_factor: float | None = None,
          calib: str | Text = "builtin", nsamples: int = 32, seqlen: int = 512, batch_size: int = 8,
          device: str | None = None, seed: int = 0) -> MoEfyReport:
    """MoEfy every gated MLP of ``model`` in place into ``num_experts`` experts, ``top_k`` per token."""
    started = time.perf_counter()
    if is_moe_model(model):
        raise SparseLLMError("the model is already an MoE model")
    if cluster not in CLUSTERINGS:
        raise SparseLLMError(f"unknown clustering '{cluster}': use one of {', '.join(CLUSTERINGS)}")
    if router_steps < 0:
        raise SparseLLMError(f"router steps must be non-negative, got {router_steps}")
    refit_down = refit_down and top_k < num_experts
    windows, calibration = calibration_windows(model, tokenizer, calib, nsamples, seqlen)
    moe_config = None
    layers: list[int] = []
    report = None
    for step in engine.walk(model, windows, batch_size=batch_size, device=device, desc="moefy"):
        layer_started = time.perf_counter()
        mlp = gated_mlp(step.block)
        intermediate = mlp.gate_proj.weight.shape[0]
        if moe_config is None:
            if intermediate % num_experts:
                raise SparseLLMError(f"the MLP's {intermediate} neurons do not split into {num_experts} equal experts")
            moe_config = MoEConfig(num_experts, intermediate // num_experts, top_k, capacity_factor, "ones",
                                   activation=mlp_activation(model.config, mlp), router_bias=True)
            report = MoEfyReport("moefy", num_experts, top_k, cluster, router_steps, refit_down,
                                 moe_config.to_dict(), calibration)
        recorder = step.collect(lambda name, module: TokenRecorder(), {f"{step.name}.mlp.gate_proj": mlp.gate_proj})
        inputs = next(iter(recorder.values())).tokens()
        gate, up, down = (p.weight.detach().float().cpu() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        activations = mlp.act_fn(inputs @ gate.t()) * (inputs @ up.t())
        features = activations.abs().t() if cluster == "coactivation" else torch.cat([gate, up], dim=1)
        labels = balanced_kmeans(features, num_experts, seed=seed)
        groups = labels.argsort(stable=True).view(num_experts, -1)
        scores = expert_scores(activations, down, groups)
        weight, bias = fit_router(inputs, scores, top_k, router_steps, router_lr)
        dtype, where = mlp.gate_proj.weight.dtype, mlp.gate_proj.weight.device
        layer = MoELayer.from_weights(
            moe_config, weight.to(where, dtype),
            torch.stack([torch.cat([gate[group], up[group]]) for group in groups]).to(where, dtype),
            torch.stack([down[:, group] for group in groups]).to(where, dtype),
            bias.to(where, dtype),
        ).train(mlp.training)  # in the mode of the MLP it replaces (inference picks the kernels by it)
        chosen = layer.route(inputs.to(where, dtype)).experts.cpu()
        if refit_down:
            down_proj = fit_down_projections(activations, chosen, groups, activations @ down.t())
            layer.experts.down_proj.data.copy_(down_proj.to(where, dtype))
        probe = inputs[:2048]
        dense_out = mlp(probe.to(where, dtype)).float().cpu()
        moe_out = layer(probe.to(where, dtype)).float().cpu()
        best = scores.topk(top_k, dim=1).indices
        recall = (chosen.unsqueeze(2) == best.unsqueeze(1)).any(dim=2).float().mean().item()
        step.block.mlp = layer
        layers.append(step.index)
        result = MoEfyLayer(step.name, recall,
                            ((moe_out - dense_out).norm() / dense_out.norm().clamp_min(1e-12)).item(),
                            time.perf_counter() - layer_started)
        report.layers.append(result)
        logger.info("%s: %d experts of %d neurons, router recall %.3f, relative error %.4f, %.1f s", step.name,
                    num_experts, moe_config.expert_size, result.router_recall, result.relative_error,
                    result.seconds)
    as_moe_model(model, moe_config, layers)
    report.seconds = time.perf_counter() - started
    logger.info("MoEfied %d MLPs into %d experts, %d per token (%.0f %% of the MLP neurons) in %.1f s",
                len(layers), num_experts, top_k, 100 * report.active_share, report.seconds)
    return report
