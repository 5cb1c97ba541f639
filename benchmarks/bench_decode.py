"""End-to-end decoding on sparsellm's kernels vs the same pruned weights run densely (issue 4).

Parts (all by default):
- ``tinyllama``: a model with TinyLlama-1.1B's shapes, random weights pruned 50 % by magnitude
  (speed depends on shapes, not on training), with and without 50 % activation sparsity;
- ``sample``: the sample model (SmolLM2-135M) pruned 50 % by magnitude;
- ``quality``: perplexity of the sample model under the protocol with 25 / 40 / 50 % activation
  sparsity, and SparseGPT 50 % weights with and without 40 % activations;
- ``context``: decoding after long prompts (the sample, 50 %): transformers' DynamicCache, which
  copies every layer's cache at each token, against ``kernels.growing_cache``, dense and sparse.

Speed: greedy decoding of 128 tokens at batch 1 and a forward pass over a 512-token prompt,
variants interleaved run by run, medians, ratios to the faster of dense float32 / bfloat16. The
sparsellm rows run the model as ``sparsellm.load(folder, dtype="auto")`` gives it (values in
bfloat16, activations in the CPU's compute dtype: float32 without bfloat16 arithmetic; the output
layer on sparsellm's dense kernel too; RMS norms, a decoded token's attention and the rotary
embedding as compiled calls, a decoded token through each decoder layer in direct calls); one row
keeps transformers' decoder-layer forward, one torch's output layer, one transformers' norms and
attention, to show those shares.

    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_decode.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

import sparsellm
from sparsellm import speed
from sparsellm.activations import calibrate, held_out_sparsity
from sparsellm.kernels import backend, cache_argument, growing_cache, use_kernels
from sparsellm.logging_utils import configure
from sparsellm.models import decoder_blocks, load_model, sample_model_path

PARTS = ("tinyllama", "sample", "quality", "context")
CONTEXTS = (128, 1024, 2048)


def tinyllama_folder(work: Path) -> Path:
    """TinyLlama-1.1B's shapes with random weights, pruned 50 % by magnitude, saved in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder = work / "tinyllama-shaped-50"
    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sparsellm.prune(model, method="magnitude", sparsity=0.5)
    model.to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(sample_model_path()).save_pretrained(folder)  # only its files are needed
    return folder


def sample_folder(work: Path) -> Path:
    folder = work / "smollm2-magnitude-50"
    if not (folder / "config.json").exists():
        model, tokenizer = load_model("sample")
        sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
        sparsellm.save(model, tokenizer, folder)
    return folder


def speed_rows(folder: Path, activation_sparsity: float | None, repeats: int, tokens: int, prefill: int,
               windows: torch.Tensor | None) -> list[dict]:
    variants = {name: load_model(folder, dtype=dtype)[0] for name, dtype in speed.DENSE.items()}
    # as sparsellm.load runs bfloat16 (values stored in bfloat16 whatever the folder holds): the output
    # layer, and any unpruned linear, on sparsellm's dense kernel too; the next row leaves them to torch
    compute = backend.compute_dtype()  # activations: float32 on CPUs without bfloat16 arithmetic
    variants["sparsellm 50%"] = sparsellm.load(folder, dtype="auto", kernels="auto")
    # transformers' decoder-layer forward around the same kernels, without kernels.decoder's direct calls
    variants["sparsellm 50%, transformers' layer forward"] = sparsellm.load(folder, dtype="auto", kernels="auto")
    for layer in decoder_blocks(variants["sparsellm 50%, transformers' layer forward"])[1]:
        layer.__dict__.pop("forward", None)
    variants["sparsellm 50%, torch output layer"] = load_model(folder, dtype=compute)[0]
    use_kernels(variants["sparsellm 50%, torch output layer"], "auto", dtype=torch.bfloat16)
    # the linear layers alone on the kernels: transformers' RMS norms and attention, not the fused calls
    variants["sparsellm 50%, linears only"] = load_model(folder, dtype=compute)[0]
    use_kernels(variants["sparsellm 50%, linears only"], "auto", dtype=torch.bfloat16, dense_layers=True, fuse=False)
    if activation_sparsity:
        model = load_model(folder, dtype=compute)[0]
        result = calibrate(model, None, activation_sparsity, windows=windows)
        use_kernels(model, "auto", dtype=torch.bfloat16, thresholds=result.thresholds,
                    activation_sparsity=result.targets, dense_layers=True)
        variants[f"sparsellm 50% + {activation_sparsity:.0%} act."] = model
    report = speed.measure(variants, decode_tokens=tokens, prefill_tokens=prefill, repeats=repeats)
    return report.rows()


def print_speed(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| variant | decode tokens/s | decode ratio | prefill tokens/s | prefill ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['decode_tokens_per_s']:.2f} | {row['decode_ratio']:.2f} | "
              f"{row['prefill_tokens_per_s']:.1f} | {row['prefill_ratio']:.2f} |", flush=True)


def greedy(model, cache, token: torch.Tensor, tokens: int) -> None:
    """Decode ``tokens`` tokens greedily after ``token`` (1, 1), the prompt's keys and values in ``cache``."""
    argument = cache_argument(model, cache)  # inspects model.forward's signature: once, not per token
    for _ in range(tokens):
        logits = model(input_ids=token, use_cache=True, **argument).logits
        token = logits[:, -1:].argmax(-1)


@torch.no_grad()
def context_rows(folder: Path, repeats: int, tokens: int) -> list[dict]:
    """Decoding ``tokens`` after a prompt of each of CONTEXTS, with each cache: tokens/s, medians.

    The prompt is run into a cache once per (model, context, cache); each timed run decodes greedily
    from a copy of it, so only decoding is timed. Runs interleave models and caches.
    """
    models = {"dense bfloat16": load_model(folder, dtype=torch.bfloat16)[0],
              "sparsellm 50%": sparsellm.load(folder, dtype="auto", kernels="auto")}
    caches = {"dynamic": lambda model: DynamicCache(config=model.config), "growing": growing_cache}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for context in CONTEXTS:
        prompt = torch.randint(3, 32000, (1, context), generator=generator)
        prefilled = {}
        for name, model in models.items():
            for kind, make in caches.items():
                cache = make(model)
                logits = model(input_ids=prompt, use_cache=True, **cache_argument(model, cache)).logits
                prefilled[name, kind] = (cache, logits[:, -1:].argmax(-1))

        seconds = {key: [] for key in prefilled}
        for _ in range(repeats + 1):  # the first round warms up
            for (name, kind), (cache, token) in prefilled.items():
                copied = copy.deepcopy(cache)
                started = time.perf_counter()
                greedy(models[name], copied, token, tokens)
                seconds[name, kind].append(time.perf_counter() - started)
        for name in models:
            rates = {kind: tokens / statistics.median(seconds[name, kind][1:]) for kind in caches}
            rows.append({"context": context, "model": name, **{f"{kind}_tokens_per_s": rate for kind, rate in rates.items()},
                         "ratio": rates["growing"] / rates["dynamic"]})
            print(f"| {context} | {name} | {rates['dynamic']:.2f} | {rates['growing']:.2f} | "
                  f"{rates['growing'] / rates['dynamic']:.2f}x |", flush=True)
    return rows


def quality_rows(work: Path, windows: int) -> list[dict]:
    rows = []
    model, tokenizer = load_model("sample")

    def evaluate(name: str, achieved: float | None = None) -> None:
        started = time.perf_counter()
        result = sparsellm.evaluate(model, tokenizer, max_windows=windows)
        rows.append({"model": name, "perplexity": result.perplexity, "tokens": result.tokens,
                     "held_out_activation_sparsity": achieved, "seconds": time.perf_counter() - started})
        print(f"| {name} | {result.perplexity:.3f} | {'' if achieved is None else f'{achieved:.3f}'} |", flush=True)

    print("\n| sample model | perplexity | activation sparsity reached (held-out) |\n|---|---|---|")
    evaluate("dense")
    for target in (0.25, 0.4, 0.5):
        activations = calibrate(model, tokenizer, target)
        reached = held_out_sparsity(model, tokenizer, activations)
        activations.attach(model)
        evaluate(f"dense + {target:.0%} activations", sum(reached.values()) / len(reached))
        activations.detach()
    sparsellm.prune(model, tokenizer, method="sparsegpt", sparsity=0.5)
    evaluate("SparseGPT 50%")
    activations = calibrate(model, tokenizer, 0.4)
    reached = held_out_sparsity(model, tokenizer, activations)
    activations.attach(model)
    evaluate("SparseGPT 50% + 40% activations", sum(reached.values()) / len(reached))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", action="append", choices=PARTS, help="repeatable; default all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per run")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    parser.add_argument("--windows", type=int, default=32, help="perplexity windows (protocol: 32)")
    parser.add_argument("--work", default=None, help="folder for the pruned models (default: a temporary one)")
    parser.add_argument("--json", help="also write all rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configure(-1)
    print(f"kernels: {backend.current().name} ({backend.current().reason}); {args.threads} threads; "
          f"compute dtype {backend.compute_dtype()}; torch {torch.__version__}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        parts = args.part or PARTS
        if "tinyllama" in parts:
            windows = torch.randint(3, 32000, (8, 256), generator=torch.Generator().manual_seed(0))
            results["tinyllama"] = speed_rows(tinyllama_folder(work), 0.5, args.repeats, args.tokens, args.prefill,
                                              windows)
            print_speed("TinyLlama-1.1B shapes, random weights, 50 % magnitude", results["tinyllama"])
        if "sample" in parts:
            results["sample"] = speed_rows(sample_folder(work), None, args.repeats, args.tokens, args.prefill, None)
            print_speed("Sample model (SmolLM2-135M), 50 % magnitude", results["sample"])
        if "quality" in parts:
            results["quality"] = quality_rows(work, args.windows)
        if "context" in parts:
            print(f"\nSample model (SmolLM2-135M), 50 % magnitude: {args.tokens} tokens decoded after a prompt\n")
            print("| prompt tokens | model | DynamicCache tokens/s | growing cache tokens/s | ratio |\n|---|---|---|---|---|")
            results["context"] = context_rows(sample_folder(work), args.repeats, args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
