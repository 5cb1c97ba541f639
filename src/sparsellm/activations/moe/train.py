"""Training an MoE model with its auxiliary losses, expert usage, and the plots people look at.

The loss of a step is ``task loss + balance_weight * L_balance + z_weight * L_z``, where
L_balance and L_z are the Switch load-balancing loss and the router z-loss averaged over the MoE
layers (so the weights do not depend on how many layers are MoE; Switch used 0.01 for the
balance and ST-MoE 0.001 for the z-loss). The task loss is the LM loss, or, given a ``teacher``
(the dense model a MoEfied model came from), the KL divergence from the teacher's next-token
distribution: the experts then learn to give back what the dense MLPs computed, not to fit the
training text. A small loop of its own, since it needs nothing but the aux losses added; the task
losses are the training package's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...data import Text, check_context, load_text, token_windows
from ...errors import SparseLLMError
from ...logging_utils import logger, progress
from ...training.distill import distillation_loss, generate_windows, next_token_loss
from .layer import load_balancing_loss, router_z_loss
from .modeling import moe_layers, unpack_experts

LR_SCHEDULES = ("constant", "cosine")
PROMPT_TOKENS = 16  # of a calibration window, continued by the teacher in distill_experts
PLANNING_STEPS = 5  # a time-limited run times the steps after the first (warm-up) of these, then plans


def router_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of the model's last forward pass, averaged over its MoE layers."""
    routings = [layer.last_routing for layer in moe_layers(model).values()]
    if not routings or any(r is None for r in routings):
        raise SparseLLMError("no routing recorded: run a forward pass through an MoE model first")
    balance = torch.stack([load_balancing_loss(r.probs, r.experts) for r in routings]).mean()
    z_loss = torch.stack([router_z_loss(r.logits) for r in routings]).mean()
    return balance, z_loss


def expert_counts(model: nn.Module) -> torch.Tensor:
    """Assignments each expert of each MoE layer served in the last forward pass: (layers, E)."""
    return torch.stack([layer.last_routing.expert_counts().cpu() for layer in moe_layers(model).values()])


@dataclass
class TrainLog:
    """Per step: total loss, task loss (``objective``: ``lm`` or ``distillation``), balance and z-loss,
    learning rate; and expert usage summed over all steps."""

    balance_weight: float
    z_weight: float
    objective: str = "lm"
    lr: float = 0.0  # the peak rate
    lr_schedule: str = "constant"
    steps: list[dict] = field(default_factory=list)
    planned_steps: int = 0  # the steps asked for, or fewer where a time limit cut the plan
    usage: torch.Tensor | None = None  # (MoE layers, E) assignments served
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"balance_weight": self.balance_weight, "z_weight": self.z_weight, "objective": self.objective,
                "lr": self.lr, "lr_schedule": self.lr_schedule, "planned_steps": self.planned_steps, "steps": self.steps,
                "usage": self.usage.tolist() if self.usage is not None else None, "tokens": self.tokens,
                "seconds": round(self.seconds, 2)}


def calibration_windows(tokenizer, data: str | Text, seqlen: int) -> torch.Tensor:
    """The calibration split of ``data`` (a corpus name or a Text) as windows of ``seqlen`` tokens."""
    return token_windows(tokenizer, data if isinstance(data, Text) else load_text(data, "calibration"), seqlen)


def train(model: nn.Module, tokenizer, *, data: str | Text | torch.Tensor = "builtin", steps: int = 100, batch_size: int = 4,
          seqlen: int = 256, lr: float = 1e-4, balance_weight: float = 0.01, z_weight: float = 0.001,
          only_moe: bool = False, teacher: nn.Module | None = None, seed: int = 0,
          lr_schedule: str = "constant", time_limit: float | None = None) -> TrainLog:
    """Train ``model`` in place with AdamW on windows of the calibration split of ``data`` (or on
    ``data``'s rows, when it is a tensor of token windows; ``seqlen`` is then their length).

    Windows are drawn without replacement in a seeded order (cycling when they run out); the
    evaluation split is never seen. ``only_moe`` trains the routers and experts alone; a ``teacher``
    makes the task loss distillation from it (see the module's docstring). ``lr_schedule``:
    ``constant``, or ``cosine`` (from ``lr`` down to a tenth of it at the last step).

    ``time_limit`` (seconds) caps the run: the steps after the first of ``PLANNING_STEPS`` are timed,
    the run is planned for as many steps as fit (at most ``steps``), and from there the cosine decays
    over that plan, so a cut run still ends at the low rate rather than stopping midway; should the
    steps slow down, the run stops at the first step that ends past the limit.
    """
    if steps < 1 or batch_size < 1:
        raise SparseLLMError("steps and batch size must be at least 1")
    if lr_schedule not in LR_SCHEDULES:
        raise SparseLLMError(f"unknown learning-rate schedule {lr_schedule!r}: choose from {', '.join(LR_SCHEDULES)}")
    if not moe_layers(model):
        raise SparseLLMError("the model has no MoE layers to train")
    check_time_limit(time_limit)
    if unpacked := unpack_experts(model):
        logger.info("unpacked the experts of %d MoE layers to train them (pack_experts packs them again)", unpacked)
    windows = data if isinstance(data, torch.Tensor) else calibration_windows(tokenizer, data, seqlen)
    check_context(model, windows.shape[1])
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=generator)
                       for _ in range(-(-steps * batch_size // len(windows)))])
    moe_prefixes = tuple(f"{name}." for name in moe_layers(model))
    trainable = {name: not only_moe or name.startswith(moe_prefixes) for name, _ in model.named_parameters()}
    was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    parameters = [p for name, p in model.named_parameters() if trainable[name]]
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    log = TrainLog(balance_weight, z_weight, "lm" if teacher is None else "distillation", lr, lr_schedule,
                   planned_steps=steps)
    device = model.get_input_embeddings().weight.device
    started = time.perf_counter()
    model.train()
    bar = progress(total=steps, desc="train", unit="step")
    step_ends = []  # seconds from the start, unrounded, for the time limit's plan
    step = 0
    while step < log.planned_steps:
        step_lr = cosine_rate(lr, step, log.planned_steps) if lr_schedule == "cosine" else lr
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        batch = windows[order[step * batch_size : (step + 1) * batch_size]].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        if teacher is None:
            task_loss = next_token_loss(logits, batch)
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            task_loss, _ = distillation_loss(logits, teacher_logits, batch, alpha=1.0)
        balance, z_loss = router_losses(model)
        loss = task_loss + balance_weight * balance + z_weight * z_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counts = expert_counts(model)
        log.usage = counts if log.usage is None else log.usage + counts
        log.tokens += batch.numel()
        step_ends.append(time.perf_counter() - started)
        log.steps.append({"step": step + 1, "loss": loss.item(), "task_loss": task_loss.item(),
                          "balance_loss": balance.item(), "z_loss": z_loss.item(),
                          "lr": step_lr, "seconds": round(step_ends[-1], 2)})
        bar.update()
        bar.set_postfix(task=f"{task_loss.item():.3f}", balance=f"{balance.item():.3f}")
        step += 1
        if time_limit is not None:
            if step == PLANNING_STEPS:
                per_step = (step_ends[-1] - step_ends[0]) / (step - 1)
                fit = step + int((time_limit - step_ends[-1]) / max(per_step, 1e-9))
                if fit < log.planned_steps:
                    log.planned_steps = max(fit, step)
                    bar.total = log.planned_steps
                    logger.info("time limit %.0f s: planned %d of the %d steps", time_limit, log.planned_steps, steps)
            if step_ends[-1] > time_limit:
                break
    bar.close()
    model.eval()
    for name, param in model.named_parameters():
        param.requires_grad_(was_trainable[name])
    log.seconds = time.perf_counter() - started
    logger.info("trained %d steps (%d tokens) in %.1f s: %s loss %.3f -> %.3f, balance loss %.3f -> %.3f",
                len(log.steps), log.tokens, log.seconds, log.objective, log.steps[0]["task_loss"], log.steps[-1]["task_loss"],
                log.steps[0]["balance_loss"], log.steps[-1]["balance_loss"])
    return log


def check_time_limit(seconds: float | None) -> None:
    if seconds is not None and seconds <= 0:
        raise SparseLLMError(f"the time limit must be positive, got {seconds} s")


def cosine_rate(peak: float, step: int, steps: int) -> float:
    """The rate at ``step`` (from 0) of a cosine decay from ``peak`` to a tenth of it at the last of ``steps``."""
    return peak / 10 + (peak - peak / 10) * (1 + math.cos(math.pi * step / max(steps - 1, 1))) / 2


def distill_experts(model: nn.Module, teacher: nn.Module, tokenizer, *, steps: int, lr: float = 3e-4,
                    batch_size: int = 4, seqlen: int = 256, data: str | Text = "builtin", teacher_windows: int = 0,
                    extra_data: str | Text | None = None, seed: int = 0, lr_schedule: str = "cosine",
                    time_limit: float | None = None) -> TrainLog:
    """Train a MoEfied model's experts to give back the dense ``teacher``'s next-token distribution:
    the recovery step after MoEfication. The aux losses are off (the routers were fitted to the
    experts' outputs, not to balance), and with MoEfication's unweighted sum of experts no gradient
    reaches the routers: their choices stay as fitted. The default peak rate and cosine decay were
    chosen on the sample model at 8 of 16 experts (docs/BENCHMARKS.md).

    The windows are the calibration split's, plus ``teacher_windows`` that the teacher writes, each
    continuing the first ``PROMPT_TOKENS`` tokens of a calibration window: text in the corpus's
    register, and as much of it as a long run needs (the split alone is seen many times over, and
    the student then fits it rather than the teacher); and the windows of ``extra_data``'s calibration
    split (say ``docstrings``: more text, at no cost of writing). ``time_limit`` (seconds) caps the
    writing and the training together: the training plans the steps that fit in what the writing
    left (see ``train``).
    """
    check_time_limit(time_limit)
    started = time.perf_counter()
    windows = calibration_windows(tokenizer, data, seqlen)
    if teacher_windows:
        on_gpu = teacher.get_input_embeddings().weight.device.type == "cuda"
        written = generate_windows(teacher, tokenizer, teacher_windows, seqlen, windows[:, :PROMPT_TOKENS], seed=seed,
                                   batch_size=256 if on_gpu else 64)  # batched decoding: far cheaper per window
        windows = torch.cat([windows, written])
    if extra_data is not None:
        windows = torch.cat([windows, calibration_windows(tokenizer, extra_data, seqlen)])
    if time_limit is not None:  # the writing spent part of it
        time_limit = max(time_limit - (time.perf_counter() - started), 1e-3)
    return train(model, tokenizer, data=windows, steps=steps, batch_size=batch_size, lr=lr, balance_weight=0.0,
                 z_weight=0.0, only_moe=True, teacher=teacher, seed=seed, lr_schedule=lr_schedule,
                 time_limit=time_limit)


def plot_training(runs: dict[str, TrainLog], folder: str | Path) -> list[Path]:
    """Write loss.png (task and balance loss per step, one line per run) and expert_usage.png
    (share of assignments per expert, one row of bars per run, each layer a thin line, the mean bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figure, (lm_axis, balance_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, log in runs.items():
        steps = [s["step"] for s in log.steps]
        lm_axis.plot(steps, _smooth([s["task_loss"] for s in log.steps]), label=label)
        balance_axis.plot(steps, _smooth([s["balance_loss"] for s in log.steps]), label=label)
    task = "LM loss" if all(log.objective == "lm" for log in runs.values()) else "task loss (LM or KL from the teacher)"
    lm_axis.set(xlabel="step", ylabel=f"{task} (moving mean of 5)", title=task)
    balance_axis.set(xlabel="step", ylabel="load-balancing loss (1 = balanced)", title="load balance")
    balance_axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    for axis in (lm_axis, balance_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    loss_path = folder / "loss.png"
    figure.savefig(loss_path, dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False, sharey=True)
    for axis, (label, log) in zip(axes[0], runs.items(), strict=True):
        share = log.usage.float() / log.usage.sum(dim=1, keepdim=True).clamp_min(1)
        experts = range(share.shape[1])
        axis.bar(experts, share.mean(dim=0).tolist(), color="tab:blue", alpha=0.6, label="mean over layers")
        for row in share.tolist():
            axis.plot(experts, row, color="black", alpha=0.15, linewidth=0.8)
        axis.axhline(1 / share.shape[1], color="tab:red", linestyle="--", linewidth=1, label="balanced")
        axis.set(xlabel="expert", ylabel="share of assignments", title=label, xticks=list(experts))
        axis.legend()
    figure.tight_layout()
    usage_path = folder / "expert_usage.png"
    figure.savefig(usage_path, dpi=120)
    plt.close(figure)
    return [loss_path, usage_path]


def _smooth(values: list[float], width: int = 5) -> list[float]:
    return [sum(values[max(0, i - width + 1) : i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]
