"""Which distillation settings recover a 50 % MoEfied sample model fastest? A short probe.

    python benchmarks/bench_moe_distill_probe.py --steps 40     # ~30 min here

MoEfies SmolLM2-135M at 8 of 16 experts (least-squares routers, dense down projections as at the
stop that ran it, 32 x 512 calibration tokens), then
from that same starting point trains ``--steps`` steps of distillation (KL from the dense model,
4 x 256 tokens per step, the same seeded windows for every setting, constant learning rate) with:
the experts alone at lr 3e-4 and 1e-3, every parameter at 3e-4; and, MoEfied at 16 of 32 experts
(the same 50 % of the MLP neurons in smaller experts), the experts alone at 3e-4. Prints the mean
KL of the last 10 steps of each (the setting that reaches a lower KL sooner is the better start for
a long run) and, for the 32-expert model, its perplexity before training.
"""

import argparse
import copy
import statistics

import torch

from sparsellm import load_model, perplexity
from sparsellm.activations.moe import moefy
from sparsellm.activations.moe.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = load_model("sample")
    teacher = copy.deepcopy(model).eval()

    def last_kl(student, lr: float, only_moe: bool) -> float:
        log = train(student, tokenizer, steps=args.steps, lr=lr, balance_weight=0.0, z_weight=0.0,
                    only_moe=only_moe, teacher=teacher)
        return statistics.mean(s["task_loss"] for s in log.steps[-10:])

    start = copy.deepcopy(model)
    moefy(start, tokenizer, 16, 8, router_steps=0, refit_down=False, nsamples=32)
    for label, lr, only_moe in (("experts, lr 3e-4", 3e-4, True), ("experts, lr 1e-3", 1e-3, True),
                                ("all parameters, lr 3e-4", 3e-4, False)):
        print(f"8 of 16 experts, {label}: KL of the last 10 steps {last_kl(copy.deepcopy(start), lr, only_moe):.3f}",
              flush=True)
    del start
    moefy(model, tokenizer, 32, 16, router_steps=0, refit_down=False, nsamples=32)
    print(f"16 of 32 experts: perplexity before training {perplexity(model, tokenizer, max_windows=32).perplexity:.2f}",
          flush=True)
    print(f"16 of 32 experts, experts, lr 3e-4: KL of the last 10 steps {last_kl(model, 3e-4, True):.3f}", flush=True)


if __name__ == "__main__":
    main()
