"""The per-step metrics of a run: a JSON-lines or CSV log, and a plot of loss and sparsity."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from ..errors import SparseLLMError

FIELDS = ("step", "loss", "lm_loss", "kl_loss", "sparsity", "lr", "grad_norm", "tokens", "seconds",
          "tokens_per_second")
FORMATS = ("jsonl", "csv", "none")


class MetricsLog:
    """Append-only per-step records; resuming at step s keeps exactly the records of steps before s."""

    def __init__(self, folder: Path, fmt: str = "jsonl", resume_step: int = 0) -> None:
        if fmt not in FORMATS:
            raise SparseLLMError(f"unknown metrics format '{fmt}': use one of {', '.join(FORMATS)}")
        self.path = None if fmt == "none" else folder / f"metrics.{fmt}"
        self.format = fmt
        self.records: list[dict] = []
        if self.path is not None and self.path.exists() and resume_step > 0:
            self.records = [record for record in self._read() if record["step"] < resume_step]
        if self.path is not None:
            self._rewrite()

    def _read(self) -> list[dict]:
        with open(self.path, newline="") as handle:
            if self.format == "jsonl":
                return [json.loads(line) for line in handle if line.strip()]
            return [{key: float(value) if key != "step" else int(value) for key, value in row.items()}
                    for row in csv.DictReader(handle)]

    def _rewrite(self) -> None:
        staging = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(staging, "w", newline="") as handle:
            if self.format == "csv":
                csv.DictWriter(handle, FIELDS).writeheader()
            for record in self.records:
                self._write_one(handle, record)
        os.replace(staging, self.path)

    def _write_one(self, handle, record: dict) -> None:
        if self.format == "jsonl":
            handle.write(json.dumps(record) + "\n")
        else:
            csv.DictWriter(handle, FIELDS).writerow(record)

    def append(self, record: dict) -> None:
        record = {key: record.get(key, math.nan) for key in FIELDS}
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", newline="") as handle:
                self._write_one(handle, record)


def plot(records: list[dict], path: Path, title: str) -> Path:
    """Loss (left axis) and sparsity (right axis) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in records]
    figure, loss_axis = plt.subplots(figsize=(8, 4.5))
    loss_axis.plot(steps, [record["loss"] for record in records], color="tab:blue", linewidth=1, label="loss")
    if any(not math.isnan(record["kl_loss"]) for record in records):
        loss_axis.plot(steps, [record["lm_loss"] for record in records], color="tab:green", linewidth=1,
                       alpha=0.7, label="LM loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.legend(loc="upper left")
    sparsity_axis = loss_axis.twinx()
    sparsity_axis.plot(steps, [record["sparsity"] for record in records], color="tab:red", label="sparsity")
    sparsity_axis.set_ylabel("sparsity", color="tab:red")
    sparsity_axis.set_ylim(0, 1)
    loss_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
