"""Sparse attention inside HF models: drop-in equality, generation with the KV cache, padding, the CLI."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sparsellm import attention
from sparsellm.attention import measure
from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from tiny import ARCHITECTURES, make_model, save_tiny

SPECS = ["window:6", "window:6,sinks=2", "bigbird:block=4,global=1,random=2", "performer:features=32"]


def token_ids(batch, length, seed=0):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_window_longer_than_sequence_is_full_attention(arch):
    model = make_model(arch)
    ids = token_ids(2, 12)  # shorter than Gemma 3's own sliding window: its full result is plain causal too
    with torch.no_grad():
        full = model(ids).logits
        method = attention.apply(model, "window", window=64)
        assert method == attention.WindowAttention(64) and model.config._attn_implementation == "sparsellm_window"
        torch.testing.assert_close(model(ids).logits, full, atol=1e-5, rtol=1e-4)
        attention.apply(model, "sdpa")
        assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "sparse_attention")
        assert torch.equal(model(ids).logits, full)


def greedy_scores(model, ids, new_tokens, **kwargs):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=2, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("spec", SPECS)
def test_generation_with_cache_equals_full_recomputation(spec):
    model = make_model("llama")
    attention.apply(model, spec)
    prompt = token_ids(1, 10)
    with torch.no_grad():
        sequences, scores = greedy_scores(model, prompt, 14)
        recomputed = model(sequences).logits[:, prompt.shape[1] - 1 : -1]
        cache = model(sequences, use_cache=True).past_key_values
    torch.testing.assert_close(scores, recomputed, atol=1e-4, rtol=1e-4)
    layer = cache.layers[0]
    if spec == "window:6":  # only what the window needs stays in the cache
        assert type(layer).__name__ == "DynamicSlidingWindowLayer" and layer.keys.shape[2] == 5
    else:
        assert layer.keys.shape[2] == sequences.shape[1]


@pytest.mark.parametrize("spec", SPECS)
def test_left_padded_batch_equals_each_sequence_alone(spec):
    model = make_model("llama")  # with window:6, a sliding cache of 5 keys and a padding mask that slides along
    attention.apply(model, spec)
    short, long = token_ids(1, 9, seed=1), token_ids(1, 16, seed=2)
    batch = torch.full((2, 16), 2)
    batch[0, 7:], batch[1] = short[0], long[0]
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[0, :7] = 0
    with torch.no_grad():
        _, together = greedy_scores(model, batch, 8, attention_mask=padding)
        for row, alone in enumerate((short, long)):
            torch.testing.assert_close(together[row : row + 1], greedy_scores(model, alone, 8)[1], atol=1e-4, rtol=1e-4)


def test_attn_implementation_at_load(tmp_path):
    folder = save_tiny(tmp_path / "llama", "llama")
    ids = token_ids(1, 20)
    with torch.no_grad():
        reference = make_model("llama")
        attention.apply(reference, "window", window=4)
        expected = reference(ids).logits
        config = AutoConfig.from_pretrained(folder)
        config.sparse_attention = {"method": "window", "window": 4}  # as apply() leaves it, and save_pretrained keeps
        loaded = AutoModelForCausalLM.from_pretrained(folder, config=config, attn_implementation="sparsellm_window")
        torch.testing.assert_close(loaded(ids).logits, expected)
        # Without options the method's defaults apply: a 256-token window, longer than this sequence.
        default = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sparsellm_window")
        full = AutoModelForCausalLM.from_pretrained(folder)
        torch.testing.assert_close(default(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-4)


def test_unsupported_attention_features_fail_clearly():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    attention.apply(model, "window:8")
    with pytest.raises(SparseLLMError, match="softcap"):
        model(token_ids(1, 5))
    with pytest.raises(SparseLLMError, match="not both"):
        attention.apply(model, "window:8", window=4)
    llama = make_model("llama")
    attention.apply(llama, "window:8")
    with pytest.raises(SparseLLMError, match=r"full \(1, 1, 5, 5\) attention mask"):
        llama(token_ids(1, 5), attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_eval_cli_compares_with_full_attention(llama_folder, capsys):
    code = main(["eval", "--model", str(llama_folder), "--seqlen", "64", "--windows", "3",
                 "--attention", "window:16", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["attention"] == "window:16"
    full, sparse = result["full"], result["sparse"]
    assert full["tokens"] == sparse["tokens"] == 3 * 63 and full["data"] == sparse["data"]
    assert sparse["perplexity"] != full["perplexity"] and result["speedup"] > 0
    code = main(["eval", "--model", str(llama_folder), "--seqlen", "64", "--windows", "3", "--attention", "window:64"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and "perplexity x1.000" in lines[-1]  # the window covers every window of 64 tokens


def test_compare_scores_full_attention_and_leaves_the_model_as_it_was(llama_folder):
    from sparsellm import load_model, perplexity

    model, tokenizer = load_model(llama_folder)
    options = {"seqlen": 48, "max_windows": 2}
    dense = perplexity(model, tokenizer, **options).perplexity
    attention.apply(model, "bigbird:block=8")
    compared = attention.compare(model, tokenizer, "window:8", **options)
    assert compared["full"].perplexity == pytest.approx(dense, rel=1e-6)
    assert compared["attention"] == "window:8" and compared["sparse"].perplexity != pytest.approx(dense, rel=1e-3)
    assert attention.current(model) == attention.BigBirdAttention(8)


def test_bench_attention_cli(capsys):
    code = main(["bench-attention", "--lengths", "64,128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--attention", "sdpa", "--attention", "window:16", "--attention", "bigbird:block=8,global=1",
                 "--repeats", "1", "--no-memory", "--json"])
    results = json.loads(capsys.readouterr().out)["results"]
    assert code == 0 and [(r["spec"], r["length"]) for r in results] == [
        (spec, length) for length in (64, 128) for spec in ("sdpa", "window:16", "bigbird:block=8,global=1")]
    assert all(r["seconds"] > 0 for r in results)
    code = main(["bench-attention", "--attention", "nope"])
    assert code == 2 and "unknown attention 'nope'" in capsys.readouterr().err


def test_peak_memory_follows_the_tensors():
    shape = measure.Shape(length=4096, heads=4, kv_heads=4, head_dim=64)
    dense = measure.peak_memory("sdpa", shape, threads=1)
    banded = measure.peak_memory("banded:256", shape, threads=1)
    output = 4 * 4096 * 64 * 4 / 2**20
    # The output must be counted; a 4096 x 4096 boolean band mask (16 MiB) is the naive way's extra cost.
    assert dense["peak_extra_mib"] >= 0.9 * output
    assert banded["peak_extra_mib"] >= dense["peak_extra_mib"] + 14
