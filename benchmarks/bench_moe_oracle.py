"""How good can 50 % MoEfication of the sample model be? The fitted router against an oracle.

    python benchmarks/bench_moe_oracle.py

MoEfies SmolLM2-135M into 16 experts (co-activation clustering, least-squares router on 8 x 256
calibration tokens), then scores 2 x 256 evaluation tokens with 8 experts per token chosen by the
fitted router, and by an oracle that picks each token's 8 experts by the norms of their true
outputs (the best any router choosing by output size can do).
"""

import torch

from sparsellm import load_model, perplexity
from sparsellm.activations.moe import moe_layers, moefy, set_top_k


def oracle_logits(layer):
    def logits(x: torch.Tensor) -> torch.Tensor:
        weights = x.to(layer.experts.down_proj.dtype)
        return torch.stack([layer.experts(e, weights).float().norm(dim=-1)
                            for e in range(layer.moe_config.num_experts)], dim=1)
    return logits


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_model("sample")
    dense = perplexity(model, tokenizer, seqlen=256, max_windows=2).perplexity
    moefy(model, tokenizer, num_experts=16, top_k=16, nsamples=8, seqlen=256)
    set_top_k(model, 8)
    fitted = perplexity(model, tokenizer, seqlen=256, max_windows=2).perplexity
    for layer in moe_layers(model).values():
        layer.router.forward = oracle_logits(layer)
    oracle = perplexity(model, tokenizer, seqlen=256, max_windows=2).perplexity
    print(f"dense {dense:.2f}  8 of 16 experts: fitted router {fitted:.2f}, oracle router {oracle:.2f}")


if __name__ == "__main__":
    main()
