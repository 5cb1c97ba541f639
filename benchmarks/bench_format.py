"""Compact checkpoints of the sample model: bytes on disk, perplexity, save and load time vs dense safetensors.

    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_format.py
    python benchmarks/bench_format.py --nsamples 4 --windows 2 --configs sparsegpt:2:4+4 --sizes --timed  # a quick look

Each ``--configs`` configuration prunes a fresh copy of SmolLM2-135M with SparseGPT on the
protocol's 64 x 512 calibration windows (``+4``: 4-bit, group 128, symmetric, min-max ranges,
quantized jointly in the sweep; ``+4/g32/asym/mse`` changes each of those), scores it under docs/PROTOCOL.md, and saves it compact in bfloat16. ``--sizes``
configurations are pruned by magnitude and quantized round-to-nearest, and only measured for
size: with exact per-layer sparsity, which method chose the zeros does not change the bytes. Bytes: the decoder-block linear layers
(the pruned ones) on disk against the same tensors dense in bfloat16, and the whole weights file
against the dense bfloat16 ``model.safetensors``. Timing (``--timed`` configurations, pruned by
magnitude and quantized round-to-nearest, since which method chose the zeros does not change the
bytes to write): the same bfloat16 model saved and loaded compact (``sparsellm.save`` /
``sparsellm.load``, checksums included) and dense (``save_pretrained`` / ``from_pretrained``),
interleaved ``--repeats`` times; ratios of medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import sparsellm
from sparsellm.format.manifest import MANIFEST_FILE

HERE = Path(__file__).parent
DEFAULT_CONFIGS = ["sparsegpt:2:4", "sparsegpt:2:4+4", "sparsegpt:2:4+4/g128/asym/mse"]
SIZES = ["magnitude:0.5", "magnitude:0.7", "magnitude:2:4", "magnitude:2:4+4", "magnitude:0.5+4"]
TIMED = ["magnitude:0.5", "magnitude:2:4", "magnitude:2:4+4"]


def parse_config(config: str) -> tuple[str, str, float | None, sparsellm.QuantScheme | None]:
    """method:sparsity or method:N:M, then +BITS[/gGROUP][/sym|/asym][/minmax|/mse] (default g128, sym, minmax)."""
    config, _, quantization = config.partition("+")
    method, rest = config.split(":", 1)
    pattern, sparsity = (rest, None) if ":" in rest else ("unstructured", float(rest))
    if not quantization:
        return method, pattern, sparsity, None
    bits, *options = quantization.split("/")
    scheme = {"bits": int(bits)}
    for option in options:
        if option in ("sym", "asym"):
            scheme["symmetric"] = option == "sym"
        elif option in ("minmax", "mse"):
            scheme["observer"] = option
        else:
            scheme["group_size"] = int(option.removeprefix("g"))
    return method, pattern, sparsity, sparsellm.QuantScheme(**scheme)


def weight_files_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def time_save_load(model, workdir: Path, repeats: int) -> dict:
    """Compact vs dense safetensors, both bfloat16, interleaved."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # deepcopy keeps the quantization grids
    seconds = {"compact_save": [], "dense_save": [], "compact_load": [], "dense_load": []}
    for repeat in range(repeats):
        compact, dense = workdir / f"compact-{repeat}", workdir / f"dense-{repeat}"
        seconds["compact_save"].append(timed(sparsellm.save, bf16, None, compact))
        seconds["dense_save"].append(timed(bf16.save_pretrained, dense))
        seconds["compact_load"].append(timed(sparsellm.load, compact, dtype=torch.bfloat16, kernels="dense"))
        seconds["dense_load"].append(timed(AutoModelForCausalLM.from_pretrained, dense, dtype=torch.bfloat16))
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    return medians | {"save_ratio": medians["compact_save"] / medians["dense_save"],
                      "load_ratio": medians["compact_load"] / medians["dense_load"]}


def prepare_fast(config: str):
    """The sample pruned by magnitude (no data) and, with +BITS, quantized round-to-nearest."""
    from sparsellm.weights.quant import round_to_nearest

    method, pattern, sparsity, scheme = parse_config(config)
    model, tokenizer = sparsellm.load_model("sample")
    report = sparsellm.prune(model, tokenizer, method=method, pattern=pattern, sparsity=sparsity)
    if scheme:
        round_to_nearest(model, scheme)
    return model, tokenizer, report


def run(config: str, args: argparse.Namespace, workdir: Path, size_only: bool = False) -> dict:
    method, pattern, sparsity, scheme = parse_config(config)
    if size_only:
        model, tokenizer, report = prepare_fast(config)
        quality = None
    else:
        model, tokenizer = sparsellm.load_model("sample")
        report = sparsellm.prune(model, tokenizer, method=method, pattern=pattern, sparsity=sparsity,
                                 nsamples=args.nsamples, seqlen=512, quantization=scheme)
        quality = sparsellm.evaluate(model, tokenizer, max_windows=args.windows)
    folder = sparsellm.save(model, tokenizer, workdir / config.replace(":", "_"), report.to_dict(),
                            dtype="bfloat16")
    dense = workdir / (config.replace(":", "_") + "-dense")
    sparsellm.save(model, tokenizer, dense, format="dense", dtype="bfloat16")
    layers = json.loads((folder / MANIFEST_FILE).read_text())["layers"]
    packed = sum(entry["bytes"] for entry in layers.values())
    dense_layers = sum(entry["shape"][0] * entry["shape"][1] * 2 for entry in layers.values())
    result = {"config": config, "pattern": pattern, "sparsity": report.achieved_sparsity,
              "bits": scheme.bits if scheme else 16, "quantization": scheme.describe() if scheme else None,
              "perplexity": quality.perplexity if quality else None, "prune_seconds": report.seconds,
              "layers_bytes": packed, "layers_dense_bf16_bytes": dense_layers, "layers_ratio": packed / dense_layers,
              "file_bytes": weight_files_bytes(folder), "file_dense_bf16_bytes": weight_files_bytes(dense)}
    result["file_ratio"] = result["file_bytes"] / result["file_dense_bf16_bytes"]
    print(json.dumps(result), flush=True)
    return result


def run_timing(config: str, args: argparse.Namespace, workdir: Path) -> dict:
    model, _, _ = prepare_fast(config)
    result = {"config": config, "timing": time_save_load(model, workdir / config.replace(":", "_"), args.repeats)}
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict], timings: list[dict]) -> str:
    lines = ["| configuration | sparsity | bits | ppl | linear layers MB (of dense bf16) | weights file MB "
             "(of dense bf16) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['sparsity']:.3f} | {r['bits']} | "
                     f"{'-' if r['perplexity'] is None else format(r['perplexity'], '.3f')} | "
                     f"{r['layers_bytes'] / 1e6:.1f} ({100 * r['layers_ratio']:.1f} %) | "
                     f"{r['file_bytes'] / 1e6:.1f} ({100 * r['file_ratio']:.1f} %) |")
    timed_rows = timings
    if timed_rows:
        lines += ["", "| configuration | compact save s | dense save s | ratio | compact load s | dense load s | "
                      "ratio |", "|---|---|---|---|---|---|---|"]
        for r in timed_rows:
            t = r["timing"]
            lines.append(f"| {r['config']} | {t['compact_save']:.2f} | {t['dense_save']:.2f} | "
                         f"{t['save_ratio']:.2f} | {t['compact_load']:.2f} | {t['dense_load']:.2f} | "
                         f"{t['load_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                        help="method:sparsity or method:N:M, optionally +BITS[/gGROUP][/asym][/mse] "
                             "(e.g. sparsegpt:2:4+4, sparsegpt:2:4+4/g32/asym/mse)")
    parser.add_argument("--sizes", nargs="*", default=SIZES, help="configurations measured for size only")
    parser.add_argument("--timed", nargs="*", default=TIMED, help="configurations whose save/load is timed")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "raw" / "format.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-format-") as tmp:
        results = [run(config, args, Path(tmp)) for config in args.configs]
        results += [run(config, args, Path(tmp), size_only=True) for config in args.sizes]
        timings = [run_timing(config, args, Path(tmp)) for config in args.timed]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"quality": results, "timing": timings}, indent=2))
    print(table(results, timings))


if __name__ == "__main__":
    main()
