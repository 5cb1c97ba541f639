"""sparsellm train end to end on tiny models: outputs, fine-tuning a pruned folder, teacher data, resume, 2 processes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsellm
from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.training import checkpoints
from sparsellm.training.distill import distillation_loss, generate_windows
from sparsellm.training.trainer import TrainingWindows

pytestmark = pytest.mark.usefixtures("single_thread")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def small(*extra):
    return ["--batch-size", "2", "--seqlen", "32", "--threads", "1", *extra]


def weights(folder):
    return sparsellm.load(folder, kernels="dense").state_dict()


def test_gmp_run_writes_model_metrics_plot_and_metadata(llama_folder, tmp_path, capsys):
    out = tmp_path / "gmp"
    code, stdout, err = run_cli(capsys, "train", "--model", str(llama_folder), "--method", "gmp", "--sparsity", "0.5",
                                "--steps", "8", "--save-every", "3", "--metrics", "csv", "--output", str(out), "--eval",
                                "--eval-seqlen", "32", "--eval-windows", "2", *small())
    assert code == 0, err
    assert "trained 8 steps of gmp unstructured" in stdout and "sparsity 0.5000" in stdout and "perplexity" in stdout
    metadata = json.loads((out / "sparsity.json").read_text())
    assert metadata["method"] == "gmp" and len(metadata["layers"]) == 3 * 7
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=1e-6) for layer in metadata["layers"])
    training = metadata["training"]
    assert training["tokens"] == 8 * 2 * 32 and training["data"]["name"] == "builtin"
    assert training["data"]["split"] == "calibration"  # never the evaluation text
    assert metadata["evaluation"]["data"]["split"] == "evaluation"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 1 + 8
    assert (out / "training.png").stat().st_size > 10_000
    assert not (out / "checkpoints").exists()  # removed once the model is saved
    assert not [path for path in out.iterdir() if path.name.startswith(".")]
    code, stdout, _ = run_cli(capsys, "info", str(out))
    assert code == 0 and "gmp unstructured" in stdout


def test_finetune_keeps_the_mask_of_a_pruned_folder_and_distills(llama_folder, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(llama_folder), "--method", "magnitude", "--sparsity", "0.6",
                 "--output", str(pruned)]) == 0
    out = tmp_path / "finetuned"
    code, _, err = run_cli(capsys, "train", "--model", str(pruned), "--method", "finetune", "--steps", "6",
                           "--distill", "--alpha", "0.7", "--temperature", "2", "--lr", "1e-3",
                           "--output", str(out), *small())
    assert code == 0, err
    before, after = weights(pruned), weights(out)
    linear = [name for name in before if ".layers." in name and name.endswith("proj.weight")]
    assert len(linear) == 21
    for name in linear:
        assert torch.equal(before[name] == 0, after[name] == 0), name  # the same zeros, exactly
        assert not torch.equal(before[name], after[name])  # and the kept weights trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(record["kl_loss"] > 0 for record in records)
    assert all(record["loss"] == pytest.approx(0.7 * record["kl_loss"] + 0.3 * record["lm_loss"], rel=1e-5)
               for record in records)


def test_rigl_with_teacher_written_data(llama_folder, tmp_path, capsys):
    out = tmp_path / "rigl"
    code, _, err = run_cli(capsys, "train", "--model", str(llama_folder), "--method", "rigl", "--sparsity", "0.7",
                           "--init", "wanda", "--init-nsamples", "2", "--data", "teacher", "--teacher-windows", "4",
                           "--distill", "--steps", "6", "--update-every", "2", "--end", "5", "--output", str(out),
                           *small())
    assert code == 0, err
    training = json.loads((out / "sparsity.json").read_text())["training"]
    assert training["data"]["name"] == "teacher-generated" and training["data"]["windows"] == 4
    assert training["init"]["method"] == "wanda"
    assert [update["step"] for update in training["mask_updates"]] == [2, 4]
    assert all(update["changed"] > 0 for update in training["mask_updates"])


def test_teacher_writes_the_same_windows_from_the_same_seed(tokenizer):
    from tiny import make_model

    teacher = make_model("llama")
    first = generate_windows(teacher, tokenizer, 3, 24, prompts=("def ", "The"), seed=5, batch_size=2)
    again = generate_windows(teacher, tokenizer, 3, 24, prompts=("def ", "The"), seed=5, batch_size=2)
    assert first.shape == (3, 24) and torch.equal(first, again)
    prompt = tokenizer("def ").input_ids
    assert first[0, : len(prompt)].tolist() == prompt and first[2, : len(tokenizer("The").input_ids)].tolist() == \
        tokenizer("The").input_ids


def test_teacher_continues_token_prompts_row_by_row(tokenizer):
    from tiny import make_model

    teacher = make_model("llama")
    prompts = torch.randint(3, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    windows = generate_windows(teacher, tokenizer, 7, 16, prompts=prompts, seed=1, batch_size=4)
    assert windows.shape == (7, 16)
    assert torch.equal(windows[:, :5], prompts[torch.arange(7) % 3])
    assert torch.equal(windows, generate_windows(teacher, tokenizer, 7, 16, prompts=prompts, seed=1, batch_size=4))
    with pytest.raises(SparseLLMError, match="a prompt of 5 tokens is not shorter than the sequence length 5"):
        generate_windows(teacher, tokenizer, 1, 5, prompts=prompts)


def test_distillation_loss_against_explicit_sums():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    ids = torch.randint(0, 7, (2, 5), generator=generator)
    temperature, alpha = 2.0, 0.3
    loss, parts = distillation_loss(student, teacher, ids, temperature, alpha)
    kl_terms, ce_terms = [], []
    for b in range(2):
        for t in range(4):  # the last position predicts nothing
            p = [float(x) for x in torch.softmax(teacher[b, t] / temperature, -1)]
            q = [float(x) for x in torch.softmax(student[b, t] / temperature, -1)]
            kl_terms.append(sum(pi * (torch.tensor(pi).log() - torch.tensor(qi).log()).item()
                                for pi, qi in zip(p, q, strict=True)))
            ce_terms.append(-torch.log_softmax(student[b, t], -1)[ids[b, t + 1]].item())
    kl = temperature**2 * sum(kl_terms) / len(kl_terms)
    ce = sum(ce_terms) / len(ce_terms)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5) and parts["lm"] == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * kl + (1 - alpha) * ce, rel=1e-5)


def test_batches_are_the_same_for_any_number_of_processes():
    windows = TrainingWindows(torch.arange(1000), seqlen=10, bos_token_id=7, seed=3)
    assert windows.body == 9 and windows.per_epoch == (1000 - 8) // 9
    for step in range(5):
        whole = windows.batch(step, 4)
        parts = torch.cat([windows.batch(step, 4, part, 4) for part in range(4)])
        assert torch.equal(whole, parts) and (whole[:, 0] == 7).all()
    epoch = torch.stack([windows.window(i) for i in range(windows.per_epoch)])[:, 1:]
    starts = sorted(epoch[:, 0].tolist())  # every window of the epoch once, on one shifted grid
    assert len(set(starts)) == windows.per_epoch and {s % 9 for s in starts} == {starts[0] % 9}
    assert all((row == torch.arange(row[0], row[0] + 9)).all() for row in epoch)


def _train_args(model, out, steps=40):
    return ["train", "--model", str(model), "--method", "rigl", "--sparsity", "0.5", "--init", "magnitude",
            "--steps", str(steps), "--update-every", "3", "--distill", "--save-every", "4", "--output", str(out),
            *small()]


def test_killed_run_resumes_to_the_uninterrupted_result(llama_folder, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(_train_args(llama_folder, reference)) == 0
    killed = tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": SRC, "SPARSELLM_NO_PROGRESS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sparsellm", "-q", *_train_args(llama_folder, killed)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        done = checkpoints.complete(killed / "checkpoints")
        if done and int(done[-1].name.split("-")[1]) >= 12:
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert not (killed / "sparsity.json").exists()

    code, _, err = run_cli(capsys, *_train_args(llama_folder, killed), "--resume")
    assert code == 0, err
    expected, resumed = weights(reference), weights(killed)
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    metadata = json.loads((killed / "sparsity.json").read_text())["training"]
    assert metadata["resumed"] and metadata["tokens"] == 40 * 2 * 32
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(40))
    reference_updates = json.loads((reference / "sparsity.json").read_text())["training"]["mask_updates"]
    assert [u["digest"] for u in metadata["mask_updates"]] == [u["digest"] for u in reference_updates]


def test_two_gloo_processes_match_one(llama_folder, tmp_path):
    args = ["train", "--model", str(llama_folder), "--method", "gmp", "--sparsity", "0.6", "--steps", "6",
            "--update-every", "2", "--end", "4", "--batch-size", "4", "--micro-batch-size", "1", "--seqlen", "32",
            "--threads", "1", "--metrics", "none"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    env = os.environ | {"PYTHONPATH": SRC, "SPARSELLM_NO_PROGRESS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                                 "-m", "sparsellm", "-q", *args, "--output", str(tmp_path / "two")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=600)
    finally:  # never leave workers behind, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    updates_one = json.loads((tmp_path / "one" / "sparsity.json").read_text())["training"]["mask_updates"]
    updates_two = json.loads((tmp_path / "two" / "sparsity.json").read_text())["training"]
    assert updates_two["processes"] == 2
    assert all(update["ranks"] == 2 for update in updates_two["mask_updates"])  # both ranks' digests agreed
    assert [u["digest"] for u in updates_two["mask_updates"]] == [u["digest"] for u in updates_one]


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "rigl", "--sparsity", "0.5", "--pattern", "2:4"], "unstructured masks"),
    (["--method", "finetune"], "prune it first"),
    (["--method", "gmp"], "needs a target sparsity"),
    (["--method", "gmp", "--sparsity", "0.5", "--batch-size", "3", "--micro-batch-size", "2"], "does not divide"),
    (["--method", "gmp", "--sparsity", "0.5", "--resume"], "nothing to resume"),
    (["--method", "gmp", "--sparsity", "0.5", "--data", "missing.txt"], "text file not found"),
    (["--method", "gmp", "--sparsity", "0.5", "--seqlen", "5000"], "longer than the model's context"),
])
def test_bad_input_is_one_line(llama_folder, tmp_path, capsys, args, message):
    argv = ["train", "--model", str(llama_folder), "--steps", "2", "--output", str(tmp_path / "o"), *args]
    if "--batch-size" not in args:
        argv += ["--batch-size", "2"]
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_resume_refuses_a_different_configuration(llama_folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", str(llama_folder), "--method", "gmp", "--sparsity", "0.5", "--steps", "4",
            "--save-every", "2", "--keep-checkpoints", "--output", str(out), *small()]
    assert main(base) == 0
    code, _, err = run_cli(capsys, *base, "--resume", "--lr", "0.5")
    assert code == 2 and "lr=0.0001" in err and "0.5" in err


def test_fsdp_launch_is_refused_with_a_reason(llama_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code, _, err = run_cli(capsys, "train", "--model", str(llama_folder), "--sparsity", "0.5", "--output",
                           str(tmp_path / "o"))
    assert code == 2 and "not FSDP" in err
