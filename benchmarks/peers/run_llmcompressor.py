"""Run llm-compressor's one-shot pruning on exactly the calibration windows sparsellm uses.

Runs inside benchmarks/peers/.venv-llmcompressor (see setup_llmcompressor.sh); called by
benchmarks/bench_pruning.py, which evaluates the saved model with sparsellm's perplexity, so both
tools are scored by the same code. Prints one JSON line: wall and CPU seconds of the oneshot call,
peak RSS of this process.
"""

import argparse
import json
import resource
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="safetensors file with input_ids (N, L)")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    input_ids = load_file(args.windows)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(),
                                 "attention_mask": torch.ones_like(input_ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    modifier = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[args.method]
    recipe = modifier(sparsity=args.sparsity, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])

    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=len(input_ids), max_seq_length=input_ids.shape[1],
            shuffle_calibration_samples=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    json.dump({"wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_bytes": peak}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
