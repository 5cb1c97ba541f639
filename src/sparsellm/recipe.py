"""A whole pruning job as data: the YAML recipe that ``sparsellm prune --recipe FILE`` runs.

Every output folder keeps the recipe that made it (``recipe.yaml``), with every option resolved
(method and allocation defaults written out), so running it again reproduces the same weights::

    model: sample
    compute_dtype: float32
    method: sparsegpt
    method_options: {blocksize: 128, percdamp: 0.01, calibration_inputs: pruned}
    pattern: unstructured
    sparsity: 0.7
    allocation: owl
    allocation_options: {m: 5.0, lam: 0.08}
    ignore: []
    calibration: {data: builtin, nsamples: 64, seqlen: 512, seed: 0, sampling: consecutive, batch_size: 8}
    evaluation: {enabled: true, data: builtin, seqlen: 512, windows: 32, batch_size: 4}
    target: {max_ppl_increase: null, max_size: null, search_step: 0.01}
    quantization: {bits: null, group_size: 128, symmetric: true, observer: minmax}
    activations: {sparsity: 0.4, nsamples: 32, held_out_windows: 8}
    format: compact
    save_dtype: null
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from . import checkpoint, evaluation, models
from .checkpoint import RECIPE_FILE
from .errors import SparseLLMError
from .logging_utils import logger
from .weights import oneshot, search
from .weights.allocation import get_allocation
from .weights.allocation.owl import tune_owl
from .weights.base import get_method
from .weights.quant import QuantScheme

CALIBRATION = {"data": "builtin", "nsamples": 64, "seqlen": 512, "seed": 0, "sampling": "consecutive",
               "batch_size": 8}
EVALUATION = {"enabled": False, "data": "builtin", "seqlen": 512, "windows": 32, "batch_size": 4}
TARGET = {"max_ppl_increase": None, "max_size": None, "search_step": 0.01}
QUANTIZATION = {"bits": None, "group_size": 128, "symmetric": True, "observer": "minmax"}
ACTIVATIONS = {"sparsity": None, "nsamples": 32, "held_out_windows": 8}  # TEAL thresholds, calibrated after pruning
SECTIONS = {"calibration": CALIBRATION, "evaluation": EVALUATION, "target": TARGET, "quantization": QUANTIZATION,
            "activations": ACTIVATIONS}


@dataclass
class Recipe:
    model: str
    compute_dtype: str = "float32"
    method: str = "sparsegpt"
    method_options: dict = field(default_factory=dict)
    pattern: str = "unstructured"
    sparsity: float | None = None
    allocation: str = "uniform"
    allocation_options: dict = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)
    format: str = "compact"
    save_dtype: str | None = None

    def __post_init__(self) -> None:
        for name, defaults in SECTIONS.items():
            section = getattr(self, name) or {}
            if not isinstance(section, dict):
                raise SparseLLMError(f"recipe: '{name}' must be a mapping")
            unknown = set(section) - set(defaults)
            if unknown:
                raise SparseLLMError(f"recipe: unknown key(s) in {name}: {', '.join(sorted(unknown))} "
                                     f"(known: {', '.join(defaults)})")
            setattr(self, name, defaults | section)
        self.ignore = list(self.ignore or [])
        self.method_options = dict(self.method_options or {})
        self.allocation_options = dict(self.allocation_options or {})

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise SparseLLMError("a recipe must be a YAML mapping")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SparseLLMError(f"recipe: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        if "model" not in data:
            raise SparseLLMError("recipe: 'model' is missing")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SparseLLMError(f"cannot read recipe {path}: {str(exc).splitlines()[0]}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def run(self, output: str | os.PathLike, overwrite: bool = False, device: str | None = None,
            offload_folder: str | None = None, max_memory: dict | None = None) -> dict:
        """Load the model, prune it as the recipe says, save it with sparsity.json and recipe.yaml.

        ``device``, ``offload_folder`` and ``max_memory`` say where the work happens, not what it computes.
        """
        checkpoint.check_output(output, overwrite)
        method = get_method(self.method, **self.method_options)
        allocation_options = dict(self.allocation_options)
        tune = bool(allocation_options.pop("tune", False))  # OWL's M and lambda chosen for this model
        if tune and (self.allocation != "owl" or self.sparsity is None):
            raise SparseLLMError("tuning OWL needs --allocation owl and a --sparsity")
        strategy = get_allocation(self.allocation, **allocation_options)
        scheme = recipe_scheme(self)
        if self.format not in checkpoint.FORMATS:
            raise SparseLLMError(f"recipe: unknown format '{self.format}': use {' or '.join(checkpoint.FORMATS)}")
        model, tokenizer = models.load_model(self.model, dtype=self.compute_dtype, offload_folder=offload_folder,
                                             max_memory=max_memory)
        calib, ev, target = self.calibration, self.evaluation, self.target
        tuning = {}
        if tune:
            tuned = tune_owl(model, tokenizer, self.sparsity, calib=calib["data"], nsamples=calib["nsamples"],
                             seqlen=calib["seqlen"], batch_size=calib["batch_size"], device=device)
            strategy, tuning = tuned.owl, {"owl_tuning": tuned.to_dict()}
        eval_kwargs = {"data": ev["data"], "seqlen": ev["seqlen"], "max_windows": ev["windows"] or None,
                       "batch_size": ev["batch_size"]}
        common = {"method": self.method, "pattern": self.pattern,
                  "allocation": strategy,
                  "calib": calib["data"], "nsamples": calib["nsamples"], "seqlen": calib["seqlen"],
                  "seed": calib["seed"], "sampling": calib["sampling"], "ignore": self.ignore,
                  "device": device, "batch_size": calib["batch_size"], "quantization": scheme,
                  **self.method_options}
        if sum(v is not None for v in (self.sparsity, target["max_ppl_increase"], target["max_size"])) > 1:
            raise SparseLLMError("give one of a sparsity, a perplexity target or a size target")
        before = evaluation.perplexity(model, tokenizer, **eval_kwargs) \
            if ev["enabled"] and target["max_ppl_increase"] is None else None

        def metadata_for(report, extra: dict) -> dict:
            metadata = {"model": str(self.model)} | (report.to_dict() if report is not None else {}) | extra
            if before is not None:
                after = evaluation.perplexity(model, tokenizer, **eval_kwargs)
                metadata["evaluation"] = {"dense": before.to_dict(), "pruned": after.to_dict()}
            # written after pruning: some defaults (the sensitivity levels) are resolved by it
            metadata["recipe"] = Recipe(**(self.to_dict() | {"method_options": asdict(method),
                                                             "allocation_options": strategy.options()})).to_dict()
            return metadata

        if target["max_size"] is not None:
            if self.activations["sparsity"] is not None:
                raise SparseLLMError("activation sparsity does not change the checkpoint's size: drop it from a "
                                     "size-target job and run sparsellm sparsify-activations on the result")
            if self.format != "compact":
                raise SparseLLMError("a size target counts the compact format's bytes: use format compact")
            saved: list[dict] = []
            # candidates are written where the output will be renamed from, so a failed search leaves nothing
            with checkpoint.atomic_folder(output, overwrite) as staging:
                def save(report, sizes) -> Path:
                    saved.append(metadata_for(report, {"size_search": sizes.to_dict()}))
                    return checkpoint.save(model, tokenizer, staging, saved[-1], overwrite=True, format=self.format,
                                           dtype=self.save_dtype)

                search.least_within_size(model, tokenizer, search.parse_size(target["max_size"]), save,
                                         step=target["search_step"], dtype=models.parse_dtype(self.save_dtype)
                                         if self.save_dtype else None, **common)
            return saved[-1]
        if target["max_ppl_increase"] is not None:
            found = search.sparsest_within(
                model, tokenizer, search.parse_share(target["max_ppl_increase"]), step=target["search_step"],
                eval_data=ev["data"], eval_seqlen=ev["seqlen"], eval_windows=ev["windows"] or None,
                eval_batch_size=ev["batch_size"], **common)
            metadata = metadata_for(found.report, {"search": found.to_dict()})
            metadata["evaluation"] = {"dense": {"perplexity": found.dense_perplexity}, "pruned": found.evaluation}
        else:
            metadata = metadata_for(oneshot.prune(model, tokenizer, sparsity=self.sparsity, **common), tuning)
        thresholds = self._activation_thresholds(model, tokenizer, metadata, eval_kwargs)
        with checkpoint.atomic_folder(output, overwrite) as staging:
            checkpoint.save(model, tokenizer, staging, metadata, overwrite=True, format=self.format,
                            dtype=self.save_dtype)
            if thresholds is not None:
                thresholds.write(staging)
        logger.info("recipe saved as %s", Path(output) / RECIPE_FILE)
        return metadata

    def _activation_thresholds(self, model, tokenizer, metadata: dict, eval_kwargs: dict):
        """TEAL thresholds calibrated on the pruned model (so they see its outputs), or None when not asked."""
        options = self.activations
        if options["sparsity"] is None:
            return None
        from .activations import teal

        thresholds = teal.calibrate(model, tokenizer, options["sparsity"], calib=self.calibration["data"],
                                    nsamples=options["nsamples"], seqlen=self.calibration["seqlen"])
        if options["held_out_windows"]:
            teal.held_out_sparsity(model, tokenizer, thresholds, seqlen=self.calibration["seqlen"],
                                   windows=options["held_out_windows"])
        metadata["activation_sparsity"] = thresholds.to_dict()
        if "evaluation" in metadata:
            thresholds.attach(model)
            metadata["activation_sparsity"]["perplexity"] = evaluation.perplexity(model, tokenizer,
                                                                                  **eval_kwargs).to_dict()
            thresholds.detach()
        return thresholds


def recipe_scheme(recipe: Recipe) -> QuantScheme | None:
    """The recipe's quantization, or None when it does not quantize."""
    return QuantScheme(**recipe.quantization) if recipe.quantization["bits"] else None
