"""sparsellm generate: stream text from a pruned model running on sparsellm's kernels."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..errors import SparseLLMError
from ..kernels import load
from ..kernels.cache import CACHES, cache_argument


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="stream generated text from a (pruned) model folder")
    parser.add_argument("folder", help="a model folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    parser.add_argument("--kernels", default="auto", choices=["auto", "sparse", "dense"],
                        help="sparse kernels (auto: dense GEMM for long prompts), or plain dense torch")
    parser.add_argument("--dtype", default="auto",
                        help="compute dtype (auto: bfloat16 where the CPU multiplies bfloat16, else float32)")
    parser.add_argument("--cache", default="growing", choices=CACHES,
                        help="KV cache: sparsellm's, which grows in place, or transformers' DynamicCache (which "
                             "copies the whole cache at every token)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer, TextStreamer

    if args.max_new_tokens < 1:
        raise SparseLLMError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = load(args.folder, args.dtype, args.kernels)  # load parses the dtype's name ("auto" included)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SparseLLMError(f"the tokenizer of {args.folder} has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not args.chat:
        sys.stdout.write(args.prompt)
    options = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if args.sample else {"do_sample": False}
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                **cache_argument(model, args.cache), **options)
    seconds = time.perf_counter() - started
    new = output.shape[1] - ids.shape[1]
    print(f"{new} tokens in {seconds:.1f} s ({new / seconds:.2f} tokens/s)", file=sys.stderr)
    return 0
