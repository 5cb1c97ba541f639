"""Perplexity on non-overlapping token windows (the measurement protocol of docs/PROTOCOL.md)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import Text, check_context, load_text, token_windows, uses_bos
from .logging_utils import logger, progress


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    seconds: float
    bos_prepended: bool
    data: dict

    def to_dict(self) -> dict:
        return asdict(self)


def model_device(model) -> torch.device:
    """Where inputs go: the embedding's device (offloaded models keep it on the execution device)."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    return torch.device("cpu") if device.type == "meta" else device


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token NLL over all predicted positions of the windows, and their count."""
    device = model_device(model)
    total, count = 0.0, 0
    for start in progress(range(0, len(windows), batch_size), desc=desc, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += losses.item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, tokenizer, data: str | Text = "builtin", seqlen: int = 512,
               max_windows: int | None = 32, batch_size: int = 4) -> Perplexity:
    """Perplexity of ``model`` on the evaluation split of ``data``.

    The evaluation text is tokenized once; the first ``max_windows`` non-overlapping windows of
    ``seqlen`` tokens are scored (all of them when None). Windows start with BOS when the
    tokenizer uses one. The result says so, along with the text's fingerprint.
    """
    text = data if isinstance(data, Text) else load_text(data, "evaluation")
    check_context(model, seqlen)
    all_windows = token_windows(tokenizer, text, seqlen)
    windows = all_windows[:max_windows] if max_windows else all_windows
    bos = uses_bos(tokenizer)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    total, count = window_nll(model, windows, batch_size)
    model.train(was_training)
    seconds = time.perf_counter() - started
    result = Perplexity(
        perplexity=math.exp(total / count), mean_nll=total / count, tokens=count, windows=len(windows),
        seqlen=seqlen, seconds=seconds, bos_prepended=bos, data=text.describe(),
    )
    logger.info(
        "perplexity %.3f on %d tokens (%d windows of %d%s) of %s/%s in %.1f s",
        result.perplexity, count, len(windows), seqlen, ", BOS first" if bos else ", no BOS",
        text.name, text.split, seconds,
    )
    return result
