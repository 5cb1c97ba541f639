"""The training loop behind ``sparsellm train``: sparsity on a schedule, optional distillation, many processes.

One call, ``train(model, tokenizer, config, output)``, runs the whole job: training windows from a
corpus (its calibration split, so evaluation text is never trained on) or written by the teacher;
one-shot pruning first where the method starts sparse; AdamW with warm-up and cosine decay;
a ``Sparsifier`` around every optimizer step; DistributedDataParallel when a launcher started
several processes; periodic atomic checkpoints from which ``resume=True`` continues bit for bit;
a metrics log, a plot, and the final model folder with ``sparsity.json``.

Batches are a pure function of the step: the global batch of step t is the same windows whatever
the number of processes, each process taking its consecutive share. Gradients are averaged over
equal shares, so N processes compute the same update as one (up to float summation order).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from ..data import check_context, load_text, tokenize, uses_bos
from ..errors import SparseLLMError
from ..evaluation import perplexity
from ..logging_utils import logger, progress
from ..weights import oneshot
from ..weights.masks import Pattern
from . import checkpoints
from .distill import DEFAULT_PROMPTS, describe_generated, distillation_loss, generate_windows, next_token_loss
from .distributed import Processes, join
from .metrics import MetricsLog, plot
from .sparsifier import Sparsifier, layer_sparsities, make_schedule, prunable_layers

TEACHER_DATA = "teacher-data.safetensors"
# Methods that train a model that is sparse from the first step; the others prune as they go.
STARTS_SPARSE = ("rigl", "finetune")


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (``resume`` refuses a checkpoint that differs)."""

    method: str = "gmp"
    sparsity: float | None = None
    pattern: str = "unstructured"
    distribution: str = "uniform"  # or "erk"
    steps: int = 100
    batch_size: int = 8  # windows per optimizer step, over all processes
    seqlen: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int | None = None  # steps; default 5 % of the run
    max_grad_norm: float = 1.0
    data: str = "builtin"  # a corpus (see data.load_text), or "teacher"
    teacher_windows: int = 256
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    distill: bool = False
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the distillation term
    init: str | None = None  # one-shot method that prunes first (rigl, finetune); default sparsegpt
    init_nsamples: int = 64
    ignore: tuple[str, ...] = ()
    # Schedule options; None takes the method's default for the run length.
    start: int | None = None
    end: int | None = None
    update_every: int | None = None
    initial_sparsity: float | None = None
    drop_fraction: float | None = None
    seed: int = 0

    def schedule_options(self) -> dict:
        options = {"distribution": self.distribution}
        if self.method == "gmp":
            options |= {"start": self.start, "end": self.end, "every": self.update_every,
                        "initial_sparsity": self.initial_sparsity}
        elif self.method == "rigl":
            options |= {"end": self.end, "every": self.update_every, "drop_fraction": self.drop_fraction}
        return options


@dataclass
class RunOptions:
    """How a run is carried out, without changing what it computes."""

    micro_batch_size: int | None = None  # windows per forward pass in one process
    save_every: int | None = None  # steps between checkpoints (0: never); by default by time instead
    save_minutes: float = 10.0  # training minutes between checkpoints when save_every is None
    keep_checkpoints: bool = False
    metrics: str = "jsonl"
    plot: bool = True
    device: str | None = None
    evaluation: dict | None = None  # perplexity() options to score the final model with (rank 0)


@dataclass
class TrainResult:
    output: Path
    steps: int
    tokens: int
    seconds: float  # training wall time, summed over resumed segments
    tokens_per_second: float  # median over steps
    final_loss: float
    sparsity: float
    data: dict
    metadata: dict = field(repr=False, default_factory=dict)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to a tenth of it at the last step."""
    warmup = config.warmup if config.warmup is not None else max(1, round(0.05 * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    fraction = min((step - warmup) / max(1, config.steps - 1 - warmup), 1.0)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * fraction)))


@dataclass
class TrainingWindows:
    """Windows of ``seqlen`` tokens cut from a token stream, in a fresh order every epoch.

    Epoch e shifts the window grid by a seeded random offset and visits the windows in a seeded
    random order, so later epochs see new window boundaries; the i-th window of the run depends
    only on (seed, i).
    """

    tokens: torch.Tensor
    seqlen: int
    bos_token_id: int | None = None  # prepended to every window (the text then fills seqlen - 1)
    seed: int = 0
    shift: bool = True
    _epochs: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.per_epoch < 1:
            raise SparseLLMError(f"the training text has {len(self.tokens)} tokens, too few for one window of "
                                 f"{self.seqlen} (and a shift); lower --seqlen or give more text")

    @property
    def body(self) -> int:
        return self.seqlen - (self.bos_token_id is not None)

    @property
    def per_epoch(self) -> int:
        return (len(self.tokens) - (self.body - 1 if self.shift else 0)) // self.body

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.per_epoch, generator=generator)
            offset = int(torch.randint(self.body, (1,), generator=generator)) if self.shift else 0
            self._epochs[epoch] = (order, offset)
        return self._epochs[epoch]

    def window(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.per_epoch)
        order, offset = self._epoch(epoch)
        start = offset + int(order[position]) * self.body
        body = self.tokens[start : start + self.body]
        if self.bos_token_id is None:
            return body
        return torch.cat([torch.tensor([self.bos_token_id], dtype=body.dtype), body])

    def batch(self, step: int, size: int, part: int = 0, parts: int = 1) -> torch.Tensor:
        """Process ``part`` of ``parts``'s consecutive share of the global batch of ``step``."""
        share = size // parts
        first = step * size + part * share
        return torch.stack([self.window(first + i) for i in range(share)])


def _training_data(config: TrainConfig, tokenizer, teacher, processes: Processes, run_dir: Path):
    """The training windows, a description for the metadata, and the calibration input for one-shot pruning."""
    if config.data != "teacher":
        text = load_text(config.data, "calibration")
        bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
        windows = TrainingWindows(tokenize(tokenizer, text), config.seqlen, bos, config.seed)
        description = text.describe() | {"tokens": len(windows.tokens), "windows_per_epoch": windows.per_epoch}
        return windows, description, text
    if teacher is None:
        raise SparseLLMError("--data teacher needs the dense model as teacher (--teacher, or a dense --model)")
    path = run_dir / TEACHER_DATA
    if path.exists():
        pool = load_file(str(path))["windows"]
    else:
        pool = torch.zeros(config.teacher_windows, config.seqlen, dtype=torch.long)
        if processes.is_main:
            pool = generate_windows(teacher, tokenizer, config.teacher_windows, config.seqlen, config.prompts,
                                    seed=config.seed)
            save_file({"windows": pool}, str(path))
        processes.broadcast(pool)
    windows = TrainingWindows(pool.flatten(), config.seqlen, None, config.seed, shift=False)
    description = describe_generated(pool, config.prompts, config.seed)
    return windows, description, pool[: config.init_nsamples]


def _prune_first(model, tokenizer, config: TrainConfig, calibration, processes: Processes) -> dict | None:
    """One-shot pruning to the targets before training, for methods that start sparse (rank 0, then shared)."""
    pattern = Pattern.parse(config.pattern)
    if config.method not in STARTS_SPARSE or (not config.sparsity and not pattern.is_nm):
        return None
    layers = prunable_layers(model, config.ignore)
    sparsity = pattern.sparsity if pattern.is_nm else config.sparsity
    pruned = sum(int((module.weight == 0).sum()) for module in layers.values())
    total = sum(module.weight.numel() for module in layers.values())
    if pruned / total >= sparsity - 1e-3:
        logger.info("the model is already %.1f %% sparse: training keeps its zeros", 100 * pruned / total)
        return None
    method = config.init or "sparsegpt"
    report = None
    if processes.is_main:
        shapes = {name: tuple(module.weight.shape) for name, module in layers.items()}
        targets = layer_sparsities(shapes, sparsity, pattern, config.distribution)
        text_or_windows = {"windows": calibration} if isinstance(calibration, torch.Tensor) else {"calib": calibration}
        report = oneshot.prune(model, tokenizer, method=method, sparsity=None if pattern.is_nm else sparsity,
                               pattern=pattern, nsamples=config.init_nsamples, seqlen=config.seqlen,
                               ignore=config.ignore, layer_sparsity=targets, **text_or_windows).to_dict()
    with torch.no_grad():
        for module in layers.values():
            processes.broadcast(module.weight.data)
    return {"method": method, "seconds": report["seconds"], "calibration": report["calibration"]} if report else {}


def _rng_state(processes: Processes) -> dict[str, torch.Tensor]:
    states = processes.gather_objects(torch.get_rng_state())
    return {f"rank{rank}": state for rank, state in enumerate(states)}


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    for item in fields(TrainConfig):
        before, now = saved.get(item.name), getattr(config, item.name)
        if isinstance(now, tuple):
            now = list(now)
        if before != now:
            raise SparseLLMError(f"cannot resume: the checkpoint was made with {item.name}={before!r}, "
                                 f"this run has {now!r}")


def _forward_loss(model, teacher, batch: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=batch, use_cache=False).logits
    if teacher is None:
        loss = next_token_loss(logits, batch)
        return loss, {"lm": loss.item()}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch, use_cache=False).logits
    return distillation_loss(logits, teacher_logits, batch, config.temperature, config.alpha)


def _publish(run_dir: Path, model, tokenizer, metadata: dict) -> None:
    """Write the final model (compact: its size follows the sparsity) into the run folder: built complete
    aside, then moved in, sparsity.json last."""
    checkpoint.save(model, tokenizer, run_dir / ".final", metadata, overwrite=True)
    final = run_dir / ".final"
    names = sorted(os.listdir(final), key=lambda name: name == checkpoint.METADATA_FILE)
    for name in names:
        os.replace(final / name, run_dir / name)
    final.rmdir()


def _check(model, config: TrainConfig, options: RunOptions, processes: Processes, teacher) -> int:
    """Refuse inconsistent settings before any work; return the windows per forward pass."""
    if config.steps < 1:
        raise SparseLLMError(f"--steps must be at least 1, got {config.steps}")
    if config.batch_size % processes.world:
        raise SparseLLMError(f"--batch-size {config.batch_size} is not divisible by the {processes.world} processes")
    share = config.batch_size // processes.world
    micro = options.micro_batch_size or share
    if share % micro:
        raise SparseLLMError(f"--micro-batch-size {micro} does not divide the {share} windows of each process")
    check_context(model, config.seqlen)
    if config.distill and teacher is None:
        raise SparseLLMError("--distill needs the dense model as teacher")
    return micro


def _optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; norms and biases without weight decay; fused: one pass over each tensor instead of several."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95), fused=True)


def _accumulate_gradients(model, teacher, batch: torch.Tensor, micro: int, config: TrainConfig,
                          device: torch.device) -> list[float]:
    """Backward over this process's share in micro-batches (DDP all-reduces on the last); mean loss, LM, KL."""
    chunks = batch.split(micro)
    totals = [0.0, 0.0, 0.0]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        with nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            loss, parts = _forward_loss(model, teacher, chunk.to(device), config)
            (loss / len(chunks)).backward()
        for position, value in enumerate((loss.item(), parts["lm"], parts.get("kl", 0.0))):
            totals[position] += value / len(chunks)
    return totals


def train(model, tokenizer, config: TrainConfig, output: str | os.PathLike, *, teacher=None,
          options: RunOptions | None = None, resume: bool = False, model_name: str = "") -> TrainResult:
    """Train ``model`` in place towards ``config.sparsity`` and write the run into ``output``.

    ``teacher``, the dense model, is needed for ``config.distill`` and ``config.data == "teacher"``.
    With ``resume`` the run continues from the newest checkpoint in ``output``.
    """
    options = options or RunOptions()
    processes = join(options.device)
    micro = _check(model, config, options, processes, teacher)
    pattern = Pattern.parse(config.pattern)
    schedule = make_schedule(config.method, config.steps, config.sparsity, pattern, **config.schedule_options())
    run_dir = Path(output)
    saved = checkpoints.latest(run_dir / "checkpoints") if resume else None
    if resume and saved is None:
        raise SparseLLMError(f"nothing to resume: {run_dir} holds no finished checkpoint")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and processes.is_main:  # what an earlier run left here must not leak into this one
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / TEACHER_DATA).unlink(missing_ok=True)
    processes.barrier()
    windows, data_description, calibration = _training_data(config, tokenizer, teacher, processes, run_dir)
    init_report = None if saved else _prune_first(model, tokenizer, config, calibration, processes)

    model.to(processes.device)
    model.config.use_cache = False
    model.train()
    if teacher is not None:
        teacher.to(processes.device).eval().requires_grad_(False)
    optimizer = _optimizer(model, config)
    start_step, tokens_seen, seconds_before, masks, updates = 0, 0, 0.0, None, []
    if saved is not None:
        restored = checkpoints.load(saved, model, optimizer)
        _check_resumable(restored.state["config"], config)
        start_step, tokens_seen, seconds_before = (restored.state[key] for key in ("step", "tokens", "seconds"))
        masks, updates = restored.masks, restored.state["mask_updates"]
        torch.set_rng_state(restored.rng.get(f"rank{processes.rank}", restored.rng["rank0"]))
        logger.info("resuming %s at step %d of %d", saved, start_step, config.steps)
    else:
        torch.manual_seed(config.seed + processes.rank)
    sparsifier = Sparsifier(model, schedule, optimizer, ignore=config.ignore, step=start_step, masks=masks)
    sparsifier.updates = updates
    trained = model
    if processes.distributed:
        trained = DistributedDataParallel(model, device_ids=None if processes.device.type == "cpu"
                                          else [processes.device.index])
    metrics = MetricsLog(run_dir, options.metrics, start_step) if processes.is_main else None
    bar = progress(total=config.steps, initial=start_step, desc=f"{config.method} {pattern}", unit="step") \
        if processes.is_main else None
    tokens_per_step = config.batch_size * config.seqlen
    step_seconds: list[float] = []
    loss, last_save = math.nan, time.perf_counter()

    for step in range(start_step, config.steps):
        started = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows.batch(step, config.batch_size, processes.rank, processes.world)
        losses = _accumulate_gradients(trained, teacher, batch, micro, config, processes.device)
        sparsifier.before_optimizer_step()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm).item() \
            if config.max_grad_norm > 0 else math.nan
        optimizer.step()
        sparsifier.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        # Every rank must agree on when to save: the time flag rides on the all-reduce of the losses.
        time_due = float(time.perf_counter() - last_save >= 60 * options.save_minutes)
        loss, lm_loss, kl_loss, save_vote = processes.mean([*losses, time_due])
        tokens_seen += tokens_per_step
        step_seconds.append(time.perf_counter() - started)
        if metrics is not None:
            metrics.append({"step": step, "loss": loss, "lm_loss": lm_loss,
                            "kl_loss": kl_loss if config.distill else math.nan, "sparsity": sparsifier.sparsity(),
                            "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                            "seconds": seconds_before + sum(step_seconds),
                            "tokens_per_second": tokens_per_step / step_seconds[-1]})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", sparsity=f"{sparsifier.sparsity():.3f}",
                            tok_s=f"{tokens_per_step / step_seconds[-1]:.0f}")
            bar.update(1)
        done = step + 1
        due = save_vote > 0 if options.save_every is None else options.save_every and done % options.save_every == 0
        if due and done < config.steps:
            last_save = time.perf_counter()
            state = {"config": asdict(config), "tokens": tokens_seen, "seconds": seconds_before + sum(step_seconds),
                     "mask_updates": sparsifier.updates, "world_size": processes.world}
            rng = _rng_state(processes)
            if processes.is_main:
                checkpoints.save(run_dir / "checkpoints", done, model, optimizer, sparsifier.masks, rng, state)
            processes.barrier()
    if bar is not None:
        bar.close()

    seconds = seconds_before + sum(step_seconds)
    per_second = tokens_per_step / statistics.median(step_seconds) if step_seconds else math.nan
    metadata = {
        "model": model_name, "method": config.method, "pattern": str(pattern), "sparsity": sparsifier.sparsity(),
        "layers": sparsifier.layer_report(),
        "training": {"config": asdict(config), "schedule": schedule.describe(), "data": data_description,
                     "init": init_report, "steps": config.steps, "tokens": tokens_seen, "seconds": seconds,
                     "tokens_per_second": per_second, "processes": processes.world, "final_loss": loss,
                     "mask_updates": sparsifier.updates, "resumed": saved is not None},
    }
    if processes.is_main:
        _finish(run_dir, model, tokenizer, metadata, metrics, options)
        logger.info("trained %d steps (%s tokens) in %.0f s, %.0f tokens/s: sparsity %.4f, loss %.3f -> %s",
                    config.steps, f"{tokens_seen:,}", seconds, per_second, sparsifier.sparsity(), loss, run_dir)
    processes.barrier()
    return TrainResult(run_dir, config.steps, tokens_seen, seconds, per_second, loss, sparsifier.sparsity(),
                       data_description, metadata)


def _finish(run_dir: Path, model, tokenizer, metadata: dict, metrics: MetricsLog, options: RunOptions) -> None:
    """Score (if asked), publish the model, draw the plot, drop the checkpoints."""
    if options.evaluation is not None:
        model.eval()
        metadata["evaluation"] = perplexity(model, tokenizer, **options.evaluation).to_dict()
    _publish(run_dir, model, tokenizer, metadata)
    if options.plot and metrics.records:
        plot(metrics.records, run_dir / "training.png",
             f"{metadata['method']} {metadata['pattern']} to {metadata['sparsity']:.2f}, "
             f"{metadata['training']['tokens']:,} tokens")
    if not options.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
