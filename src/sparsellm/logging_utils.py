"""Logging and progress bars shared by the library and the CLI."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("sparsellm")


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr that disappears when logging is quiet or SPARSELLM_NO_PROGRESS is set."""
    disable = os.environ.get("SPARSELLM_NO_PROGRESS") == "1" or not logger.isEnabledFor(logging.INFO)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, file=sys.stderr, **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (it may be replaced after configure)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(verbosity: int = 0) -> None:
    """Route sparsellm's log to stderr: 0 = info, 1 = debug, -1 = warnings only."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    # transformers and HF hub are chatty about things users cannot act on.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
