"""The CLI end to end on a tiny model, and one clear line for each kind of bad input."""

import json

import pytest

from sparsellm.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_eval_info(llama_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", "--model", str(llama_folder), "--method", "sparsegpt",
                              "--pattern", "2:4", "--nsamples", "4", "--seqlen", "64", "--output", str(out),
                              "--eval", "--eval-seqlen", "64", "--eval-windows", "4")
    assert code == 0, stdout
    assert "sparsity 0.5000" in stdout and "perplexity: dense" in stdout
    assert (out / "model.safetensors").exists() and (out / "sparsity.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    code, stdout, _ = run_cli(capsys, "eval", "--model", str(out), "--seqlen", "64", "--windows", "3", "--json")
    result = json.loads(stdout)
    assert code == 0 and result["windows"] == 3 and result["tokens"] == 3 * 63 and result["perplexity"] > 1

    code, stdout, _ = run_cli(capsys, "info", str(out))
    assert code == 0 and "0.5000" in stdout and "sparsegpt 2:4" in stdout

    code, _, err = run_cli(capsys, "prune", "--model", str(llama_folder), "--method", "magnitude",
                           "--sparsity", "0.5", "--output", str(out))
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/no/such/model"], "model path not found"),
    (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "2:5", "--sparsity", "0.6"], "not divisible by M=5"),
    (["--nsamples", "0"], "at least 1"),
    (["--seqlen", "4096"], "longer than the model's context"),
    (["--calib", "missing.txt"], "text file not found"),
])
def test_bad_input_is_one_line_and_nonzero(llama_folder, tmp_path, capsys, args, message):
    base = {"--model": str(llama_folder), "--method": "wanda", "--sparsity": "0.5",
            "--output": str(tmp_path / "o")}
    argv = ["prune"]
    for key, value in base.items():
        if key not in args:
            argv += [key, value]
    code, _, err = run_cli(capsys, *argv, *args)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o").exists()


def test_unreadable_and_non_causal_models(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "bert"))
    assert code == 2 and "holds a BertModel, not a decoder-only causal language model" in err

    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                        vocab_size=100)).save_pretrained(tmp_path / "t5")
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "t5"))
    assert code == 2 and "model_type 't5' is not a decoder-only" in err

    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "empty"))
    assert code == 2 and "no config.json" in err

    code, _, err = run_cli(capsys, "eval", "--model", "someone/not-cached-model")
    assert code == 2 and "Hugging Face Hub" in err


def test_truncated_checkpoint(llama_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, "eval", "--model", str(broken))
    assert code == 2 and "cannot load model" in err
    code, _, err = run_cli(capsys, "info", str(broken))
    assert code == 2 and "cannot read" in err
