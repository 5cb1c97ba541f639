"""SparsityCallback prunes a tiny model inside a stock transformers.Trainer loop."""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sparsellm.training import SparsityCallback, prunable_layers
from tiny import make_model

pytestmark = pytest.mark.usefixtures("single_thread")


class Recorder(TrainerCallback):
    """What reporters registered after SparsityCallback (TensorBoard, W&B, the printer) receive."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count=32, length=16):
        self.ids = torch.randint(0, 320, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.mark.parametrize(("method", "options"), [("gmp", {"every": 2}), ("rigl", {"every": 2, "end": 10})])
def test_callback_prunes_inside_a_stock_trainer(tmp_path, method, options):
    model = make_model("llama").train()
    before = {name: module.weight.detach().clone() for name, module in prunable_layers(model).items()}
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                  learning_rate=1e-3, weight_decay=0.1, logging_steps=4, save_strategy="no",
                                  report_to=[], use_cpu=True, disable_tqdm=True)
    callback = SparsityCallback(sparsity=0.6, method=method, **options)
    recorder = Recorder()
    trainer = Trainer(model=model, args=arguments, train_dataset=RandomTokens(), callbacks=[callback, recorder])
    trainer.train()
    for name, module in prunable_layers(model).items():
        zeros = int((module.weight == 0).sum())
        assert zeros == round(0.6 * module.weight.numel()), name
        assert torch.equal(module.weight == 0, ~callback.sparsifier.masks[name])
        assert not torch.equal(module.weight, before[name])
    logged = [entry["sparsity"] for entry in recorder.logs if "sparsity" in entry]
    assert logged and logged[-1] == pytest.approx(0.6, abs=1e-4)
    assert callback.sparsifier.step_count == 12
