"""Recovery with the dense model as teacher: a distillation loss, and training text the teacher writes itself.

Loss: ``alpha · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 - alpha) · CE(z_s, next token)``,
both averaged over the predicted tokens (Hinton et al.'s T² keeps the gradient scale independent
of the temperature).

Data: with no corpus at hand, the teacher samples continuations of short prompts; the sparse
student then learns the teacher's distribution on the teacher's own text.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from ..errors import SparseLLMError
from ..logging_utils import logger, progress

SAMPLING = {"temperature": 1.0, "top_p": 0.95}  # how the teacher writes: nucleus sampling at T = 1
# Openers of several kinds of text, so the sampled corpus is not all one register.
DEFAULT_PROMPTS = (
    "The", "In this section", "def ", "import ", "Once upon a time", "A", "The following example",
    "class ", "Note:", "When", "# ", "It is", "If you", "There are", "For example,", "1.",
)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token i+1 from position i."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      temperature: float = 1.0, alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """The mixed loss and its parts (``kl``, ``lm``) for logging; positions are the predicted ones."""
    student = student_logits[:, :-1].flatten(0, 1).float()
    teacher = teacher_logits[:, :-1].flatten(0, 1).float()
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    lm = F.cross_entropy(student, input_ids[:, 1:].flatten())
    loss = alpha * kl + (1.0 - alpha) * lm
    return loss, {"kl": kl.item(), "lm": lm.item()}


@torch.no_grad()
def generate_windows(teacher, tokenizer, count: int, seqlen: int,
                     prompts: tuple[str, ...] | torch.Tensor = DEFAULT_PROMPTS, seed: int = 0,
                     batch_size: int = 8) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens sampled from the teacher, each a prompt and its continuation.

    ``prompts``: strings, taken in turn, one per batch of ``batch_size`` continuations; or token ids
    (P, L), window i continuing row i mod P (so a batch holds many prompts). Sampling uses its own
    seeded RNG, so the same call gives the same windows. Shape (count, seqlen), with BOS first when
    the tokenizer uses one and the prompts are strings.
    """
    if count < 1:
        raise SparseLLMError(f"the number of generated windows must be at least 1, got {count}")
    if len(prompts) == 0:
        raise SparseLLMError("teacher-generated data needs at least one prompt")
    encoded = prompts if isinstance(prompts, torch.Tensor) else \
        [tokenizer(prompt, return_tensors="pt").input_ids[0] for prompt in prompts]
    longest = max(len(ids) for ids in encoded)
    if longest >= seqlen:
        raise SparseLLMError(f"a prompt of {longest} tokens is not shorter than the sequence length {seqlen}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = teacher.training
    teacher.eval()
    device = teacher.get_input_embeddings().weight.device
    windows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        bar = progress(total=count, desc="teacher writes", unit="window")
        while len(windows) < count:
            batch = min(batch_size, count - len(windows))
            if isinstance(encoded, torch.Tensor):
                input_ids = encoded[torch.arange(len(windows), len(windows) + batch) % len(encoded)]
            else:
                prompt = encoded[len(windows) // batch_size % len(encoded)]
                input_ids = prompt.unsqueeze(0).expand(batch, -1)
            new_tokens = seqlen - input_ids.shape[1]
            output = teacher.generate(
                input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids, device=device),
                do_sample=True, top_k=0, **SAMPLING, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=pad,
            )
            windows.extend(output.cpu())
            bar.update(batch)
        bar.close()
    teacher.train(was_training)
    result = torch.stack(windows)
    used = min(len(encoded), count if isinstance(encoded, torch.Tensor) else -(-count // batch_size))
    logger.info("the teacher wrote %d windows of %d tokens from %d prompts", count, seqlen, used)
    return result


def describe_generated(windows: torch.Tensor, prompts: tuple[str, ...], seed: int) -> dict:
    """What the metadata says about teacher-written data: prompts, sampling and a fingerprint."""
    digest = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {"name": "teacher-generated", "windows": windows.shape[0], "seqlen": windows.shape[1],
            "tokens": windows.numel(), "prompts": list(prompts), "sampling": SAMPLING | {"seed": seed},
            "sha256_16": digest}
