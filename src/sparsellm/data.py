"""Text for calibration and evaluation, and the token windows cut from it.

``builtin`` is the ``pydoc_data.topics`` corpus that ships with CPython: its values joined with two
newlines in sorted key order; the first 80 % of the characters are the calibration split, the last
20 % the evaluation split. ``docstrings`` is more prose of the same register, also offline: the
docstrings of CPython's standard library (see ``docstring_corpus``), split the same way, for runs
that need more text than the built-in split (long distillation runs). Text files are split the
same way, so giving one file to both ``--calib`` and ``--data`` never evaluates on calibration
text. ``wikitext2`` and ``c4`` (or any ``datasets`` name) use the dataset's own train / test splits
and need the network.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OfflineError, SparseLLMError

CALIBRATION_FRACTION = 0.8
SPLITS = ("calibration", "evaluation")

# Named public datasets: (path, config, calibration split, evaluation split, text column).
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}


@dataclass(frozen=True)
class Text:
    """A split of a corpus, with a fingerprint of the exact characters used."""

    name: str
    split: str
    text: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "characters": len(self.text),
                "sha256_16": self.fingerprint}


def builtin_corpus() -> str:
    """All of ``pydoc_data.topics`` joined in sorted key order (465,126 characters on CPython 3.11.7)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@functools.cache
def docstring_corpus() -> str:
    """The docstrings (of at least 80 characters) of the modules, classes and functions in CPython's
    standard library, read with ``ast`` (nothing is imported), in sorted file order, test packages
    and site-packages left out; a paragraph that also appears in ``pydoc_data.topics`` (whitespace
    aside) is dropped, so no evaluation text of ``builtin`` hides in it (1.61 M characters, 418 k
    tokens of the sample's tokenizer, on CPython 3.11.7)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages"}
    topics = " ".join(builtin_corpus().split())
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skipped]  # never walk site-packages' thousands
        paths += [Path(folder) / name for name in files if name.endswith(".py")]
    docstrings = []
    for path in sorted(paths):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) >= 80:
                    kept = [p for p in re.split(r"\n\s*\n", docstring) if " ".join(p.split()) not in topics]
                    docstrings.append("\n\n".join(kept))
    return "\n\n".join(d for d in docstrings if d)


def split_text(text: str, split: str) -> str:
    """The calibration (first 80 %) or evaluation (last 20 %) characters of a text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    cut = int(len(text) * CALIBRATION_FRACTION)
    return text[:cut] if split == "calibration" else text[cut:]


def load_text(spec: str, split: str) -> Text:
    """Resolve ``--calib`` / ``--data``: ``builtin``, ``docstrings``, a .txt file, a folder of .txt files, or a dataset."""
    if spec == "builtin":
        return Text("builtin", split, split_text(builtin_corpus(), split))
    if spec == "docstrings":
        return Text("docstrings", split, split_text(docstring_corpus(), split))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SparseLLMError(f"text folder {path} holds no .txt files")
        return Text(str(path), split, split_text("\n\n".join(_read(f) for f in files), split))
    if path.is_file():
        return Text(str(path), split, split_text(_read(path), split))
    if spec.endswith(".txt") or ("/" in spec and spec not in DATASETS and not _looks_like_dataset(spec)):
        raise SparseLLMError(f"text file not found: {spec}")
    return _load_dataset(spec, split)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SparseLLMError(f"cannot read text file {path}: {exc}") from exc
    if not text.strip():
        raise SparseLLMError(f"text file {path} is empty")
    return text


def _looks_like_dataset(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def _load_dataset(spec: str, split: str) -> Text:
    path, config, calib_split, eval_split, column = DATASETS.get(spec, (spec, None, "train", "test", "text"))
    try:
        import datasets
    except ImportError as exc:
        raise OfflineError(
            f"'{spec}' is not a file or folder; loading it as a dataset needs the datasets library "
            "(pip install datasets) and the network; offline, use --calib builtin or a .txt file"
        ) from exc
    hf_split = calib_split if split == "calibration" else eval_split
    try:
        if spec == "c4":  # one shard is plenty and avoids downloading 300 GB
            shard = "en/c4-train.00000-of-01024.json.gz" if split == "calibration" else \
                "en/c4-validation.00000-of-00008.json.gz"
            rows = datasets.load_dataset(path, data_files={hf_split: shard}, split=hf_split)
        else:
            rows = datasets.load_dataset(path, config, split=hf_split)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OfflineError(
            f"cannot load dataset '{spec}' (offline, or no such dataset): {first}; "
            "offline, use --calib builtin or a .txt file"
        ) from exc
    separator = "\n\n" if spec != "wikitext2" else ""  # wikitext rows already end in newlines
    return Text(spec, split, separator.join(rows[column]))


def uses_bos(tokenizer) -> bool:
    """Whether the tokenizer starts sequences with a BOS token by default (Gemma, Llama 2/3 do)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The text's token ids (1-D) without special tokens; windows add BOS themselves where it is used."""
    ids = tokenizer(text.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def token_windows(tokenizer, text: Text, seqlen: int, count: int | None = None, *,
                  sampling: str = "consecutive", seed: int = 0) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens, shape (count, seqlen).

    When the tokenizer uses BOS, every window is BOS followed by ``seqlen - 1`` text tokens.
    ``sampling="consecutive"`` takes windows in order from the start (the protocol);
    ``"random"`` draws ``count`` distinct window positions with ``seed``.
    """
    if seqlen < 2:
        raise SparseLLMError(f"sequence length must be at least 2, got {seqlen}")
    if count is not None and count < 1:
        raise SparseLLMError(f"the number of samples must be at least 1, got {count}")
    ids = tokenize(tokenizer, text)
    bos = uses_bos(tokenizer)
    body = seqlen - 1 if bos else seqlen
    available = len(ids) // body
    if available == 0:
        raise SparseLLMError(
            f"{text.name} ({text.split}) has {len(ids)} tokens, fewer than one window of {seqlen}"
        )
    if count is None:
        count = available
    if count > available:
        raise SparseLLMError(
            f"{text.name} ({text.split}) has {len(ids)} tokens: only {available} windows of {seqlen}, "
            f"{count} asked; lower --nsamples or --seqlen"
        )
    if sampling == "consecutive":
        starts = torch.arange(count) * body
    elif sampling == "random":
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randperm(available, generator=generator)[:count].sort().values * body
    else:
        raise SparseLLMError(f"unknown sampling '{sampling}': use consecutive or random")
    windows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos:
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=windows.dtype), windows], 1)
    return windows


def check_context(model, seqlen: int) -> None:
    """Refuse windows longer than the model's context."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context is not None and seqlen > context:
        raise SparseLLMError(f"sequence length {seqlen} is longer than the model's context of {context} tokens")
