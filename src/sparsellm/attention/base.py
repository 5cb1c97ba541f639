"""The interface every sparse attention method implements, its registry and the ``--attention`` spec.

A method is a small frozen dataclass whose fields are its options; calling it computes attention
on (batch, heads, length, head_dim) tensors, with grouped-query key/value heads. A new method is
one module that subclasses ``SparseAttention`` and decorates itself with ``@register``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from ..errors import SparseLLMError


@dataclass(frozen=True)
class SparseAttention:
    """Base class: subclasses set ``name`` and ``primary`` and implement ``__call__``."""

    name: ClassVar[str] = ""
    primary: ClassVar[str] = ""  # the option a bare value sets, as in "window:256"
    aliases: ClassVar[dict[str, str]] = {}  # short spellings in a spec, as "global" for global_blocks

    @property
    def cache_window(self) -> int | None:
        """How many of the latest keys a KV cache must keep per layer (None: all of them)."""
        return None

    @property
    def counts_positions(self) -> bool:
        """Whether the pattern depends on positions counted from the first key (sinks, block grids)."""
        return False

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool = True,
                 scale: float | None = None, key_mask: torch.Tensor | None = None,
                 module: torch.nn.Module | None = None) -> torch.Tensor:
        """Attention output (B, H, Lq, d) for query (B, H, Lq, d) and key, value (B, Hkv, Lk, d).

        The queries are the last ``Lq`` of the ``Lk`` positions (earlier ones come from a KV
        cache). ``key_mask`` (B, Lk), True where a key may be attended, marks padding.
        ``module`` is the model's attention layer, when there is one: methods that draw
        random numbers use its layer index so every layer gets its own draw.
        """
        raise NotImplementedError

    def options(self) -> dict:
        return asdict(self)

    def spec(self) -> str:
        """The ``--attention`` string that rebuilds this method (options that differ from the defaults)."""
        changed = [f"{getattr(self, field.name)}" if field.name == self.primary else
                   f"{field.name}={getattr(self, field.name)}" for field in fields(self)
                   if getattr(self, field.name) != field.default]
        return ":".join([self.name, ",".join(changed)]) if changed else self.name

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise SparseLLMError(f"{self.name} attention: {message}")


METHODS: dict[str, type[SparseAttention]] = {}


def register(cls: type[SparseAttention]) -> type[SparseAttention]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options) -> SparseAttention:
    """Instantiate a registered method with its options (unknown options are an error)."""
    if name not in METHODS:
        raise SparseLLMError(f"unknown attention method '{name}': choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    known = {field.name for field in fields(cls)}
    options = {cls.aliases.get(key, key): value for key, value in options.items()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SparseLLMError(f"{name} attention has no option {', '.join(unknown)}: it takes {', '.join(sorted(known))}")
    return cls(**options)


def parse_spec(spec: str) -> SparseAttention:
    """``window:256``, ``bigbird:block=64,global=2,random=3``, ``performer:features=256`` or a bare name."""
    name, _, rest = spec.partition(":")
    cls = METHODS.get(name.strip())
    if cls is None:
        raise SparseLLMError(f"unknown attention method '{name}' in '{spec}': choose one of {', '.join(sorted(METHODS))}")
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key, value = (key.strip(), value.strip()) if sep else (cls.primary, key.strip())
        try:
            options[key] = int(value)
        except ValueError:
            raise SparseLLMError(f"attention option '{item}' in '{spec}' is not an integer") from None
    return get_method(cls.name, **options)
