"""A user's table: layer-name regex -> sparsity, first match wins; other layers get the target (or stay dense).

In YAML (``--table FILE``, or inline under ``allocation: {name: table, rules: ...}`` in a recipe)::

    'mlp\\.down_proj$': 0.5
    'layers\\.(0|1)\\.': 0.3
    'self_attn': 0.75

For an N:M pattern a ratio r prunes round(r x M) of every M inputs (0 keeps the layer dense).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...errors import SparseLLMError
from ..masks import check_sparsity
from .base import Allocation, LayerSlot, register


def read_table(path: str | Path) -> dict[str, float]:
    """A YAML mapping of regex -> sparsity."""
    try:
        rules = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SparseLLMError(f"cannot read sparsity table {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(rules, dict):
        raise SparseLLMError(f"sparsity table {path} must be a mapping of layer regex -> sparsity")
    return rules


@register
@dataclass
class Table(Allocation):
    name = "table"
    exact_budget = False
    needs_target = False
    rules: Mapping[str, float] | str = field(default_factory=dict)  # or the path of a YAML file

    def __post_init__(self) -> None:
        if isinstance(self.rules, str | Path):
            self.rules = read_table(self.rules)
        checked = {}
        for expr, value in self.rules.items():
            try:
                re.compile(expr)
            except re.error as exc:
                raise SparseLLMError(f"sparsity table: bad regex {expr!r}: {exc}") from exc
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise SparseLLMError(f"sparsity table: {expr!r} maps to {value!r}, not a number")
            checked[str(expr)] = check_sparsity(value)
        self.rules = checked

    def options(self) -> dict:
        return {"rules": dict(self.rules)}

    def solve(self, slots: Sequence[LayerSlot], target: float | None) -> dict[str, float]:
        compiled = [(re.compile(expr), value) for expr, value in self.rules.items()]
        chosen = {}
        for slot in slots:
            value = next((v for expr, v in compiled if expr.search(slot.name)), target)
            if value is not None:
                chosen[slot.name] = value
        return chosen
