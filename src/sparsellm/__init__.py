"""sparsellm: make large language models sparse, small and fast."""

__version__ = "0.1.0"

from .checkpoint import save
from .evaluation import perplexity
from .models import load_model
from .weights.oneshot import prune

evaluate = perplexity

__all__ = ["evaluate", "load_model", "perplexity", "prune", "save"]


def __getattr__(name: str):
    # sparsellm.moe is imported on first use: importing it loads transformers (to register the MoE model type)
    if name == "moe":
        from .activations import moe

        return moe
    raise AttributeError(f"module 'sparsellm' has no attribute {name!r}")
