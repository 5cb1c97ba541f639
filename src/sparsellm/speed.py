"""Speed of a pruned model on the kernels against the same weights run densely by transformers.

``compare`` loads the folder three ways (dense float32, dense bfloat16, and on sparsellm's
kernels), then measures greedy decoding at batch 1 and the prefill of a prompt, interleaving the
variants run by run so that a disturbance hits all of them alike; it reports medians and the
ratio to the faster dense variant. ``layer_table`` times each projection alone at batch 1.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import SparseLinear
from .kernels import load as load_kernels
from .kernels.cache import cache_argument
from .logging_utils import logger, progress
from .models import decoder_blocks, linear_layers, load_model, parse_dtype

DENSE = {"dense float32": torch.float32, "dense bfloat16": torch.bfloat16}


@dataclass
class SpeedReport:
    decode_tokens: int
    prefill_tokens: int
    repeats: int
    threads: int
    kernels: str
    cache: str = "dynamic"  # the KV cache while decoding (see decode)
    decode_seconds: dict[str, list[float]] = field(default_factory=dict)
    prefill_seconds: dict[str, list[float]] = field(default_factory=dict)

    def decode_rate(self, variant: str) -> float:
        return self.decode_tokens / statistics.median(self.decode_seconds[variant])

    def prefill_rate(self, variant: str) -> float:
        return self.prefill_tokens / statistics.median(self.prefill_seconds[variant])

    def baseline(self, rate: Callable[[str], float]) -> str:
        return max(DENSE, key=rate)

    def rows(self) -> list[dict]:
        """Per variant: tokens/s of decode and prefill, and the ratio to the faster dense variant."""
        decode_base = self.decode_rate(self.baseline(self.decode_rate))
        prefill_base = self.prefill_rate(self.baseline(self.prefill_rate))
        return [{"variant": name, "decode_tokens_per_s": self.decode_rate(name),
                 "decode_ratio": self.decode_rate(name) / decode_base,
                 "prefill_tokens_per_s": self.prefill_rate(name),
                 "prefill_ratio": self.prefill_rate(name) / prefill_base} for name in self.decode_seconds]

    def to_dict(self) -> dict:
        return asdict(self) | {"rows": self.rows()}


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@torch.no_grad()
def decode(model, prompt: torch.Tensor, tokens: int, cache: str = "dynamic") -> torch.Tensor:
    """Greedy generation of exactly ``tokens`` new tokens after ``prompt`` (1, length).

    ``cache``: a kind of ``kernels.cache.CACHES``, transformers' ``DynamicCache`` or ``growing_cache``.
    """
    return model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=model.config.eos_token_id or 0,
                          **cache_argument(model, cache))


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[:, -1]


def measure(variants: dict[str, nn.Module], *, decode_tokens: int = 128, prefill_tokens: int = 512,
            prompt_tokens: int = 8, repeats: int = 3, kernels: str = "auto", cache: str = "dynamic",
            seed: int = 0) -> SpeedReport:
    """Decode and prefill speed of loaded models (``DENSE`` names among them), interleaved run by run;
    every variant decodes with the same kind of ``cache`` (an unknown kind fails in the first warm-up)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = next(iter(variants.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=generator)
    long_prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=generator)
    report = SpeedReport(decode_tokens, prefill_tokens, repeats, torch.get_num_threads(), kernels, cache)
    for model in variants.values():  # warm up: first-use costs (kernel build, dispatch crossovers)
        decode(model, prompt, 2, cache)
        prefill(model, long_prompt)
    for _ in progress(range(repeats), desc="speed", unit="round"):
        for name, model in variants.items():
            report.decode_seconds.setdefault(name, []).append(_seconds(lambda m=model: decode(m, prompt, decode_tokens, cache)))
        for name, model in variants.items():
            report.prefill_seconds.setdefault(name, []).append(_seconds(lambda m=model: prefill(m, long_prompt)))
    for row in report.rows():
        logger.info("%s: decode %.2f tokens/s (%.2fx), prefill %.1f tokens/s (%.2fx)", row["variant"],
                    row["decode_tokens_per_s"], row["decode_ratio"], row["prefill_tokens_per_s"],
                    row["prefill_ratio"])
    return report


def compare(folder: str | os.PathLike, *, kernels: str = "auto", dtype: torch.dtype | str = "auto",
            **options) -> SpeedReport:
    """Decode and prefill speed of the folder's model: dense (float32, bfloat16) vs the kernels.

    The kernel variant computes in ``dtype`` ("auto": the CPU's, see ``kernels.backend.compute_dtype``)
    and stores its values in bfloat16; ``options`` go to ``measure``.
    """
    if isinstance(dtype, str) and dtype != "auto":
        dtype = parse_dtype(dtype)  # a bad name fails before the dense variants load
    variants = {name: load_model(folder, dtype=value)[0] for name, value in DENSE.items()}
    variants["sparsellm"] = load_kernels(folder, dtype, kernels, weight_dtype=torch.bfloat16)
    return measure(variants, kernels=kernels, **options)


@torch.no_grad()
def layer_table(folder: str | os.PathLike, *, kernels: str = "sparse", repeats: int = 5) -> list[dict]:
    """Batch-1 milliseconds per projection: torch F.linear (float32, bfloat16) vs the kernel layer.

    Each projection is timed across all blocks in turn, so its weights come from memory as they do
    when decoding, not from cache.
    """
    dense = load_model(folder, dtype=torch.float32)[0]
    sparse = load_kernels(folder, torch.float32, kernels, weight_dtype=torch.bfloat16)
    _, dense_blocks = decoder_blocks(dense)
    _, sparse_blocks = decoder_blocks(sparse)
    names = [name.split(".", 1)[1] for name in linear_layers(dense_blocks[0], "0")]
    rows = []
    for name in names:
        weights = [dict(block.named_modules())[name].weight for block in dense_blocks]
        bf16 = [w.to(torch.bfloat16) for w in weights]
        layers = [dict(block.named_modules())[name] for block in sparse_blocks]
        x = torch.randn(1, weights[0].shape[1])
        x16 = x.to(torch.bfloat16)
        sweeps = {"float32": lambda x=x, ws=weights: [F.linear(x, w) for w in ws],
                  "bfloat16": lambda x=x16, ws=bf16: [F.linear(x, w) for w in ws],
                  "sparsellm": lambda x=x, ls=layers: [layer(x) for layer in ls]}
        timings = {variant: [] for variant in sweeps}
        for _ in range(repeats):  # interleaved: one sweep over all blocks per variant, in turn
            for variant, sweep in sweeps.items():
                timings[variant].append(_seconds(sweep) / len(layers))
        median = {variant: statistics.median(values) for variant, values in timings.items()}
        layer = layers[0]
        rows.append({"layer": name, "shape": tuple(weights[0].shape),
                     "format": layer.layout.describe() if isinstance(layer, SparseLinear) else "dense (torch)",
                     **{f"{variant}_ms": seconds * 1e3 for variant, seconds in median.items()},
                     "ratio": min(median["float32"], median["bfloat16"]) / median["sparsellm"]})
    return rows
