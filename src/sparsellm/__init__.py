"""sparsellm: make large language models sparse, small and fast."""

__version__ = "0.1.0"

from .checkpoint import save
from .evaluation import perplexity
from .format import compress
from .kernels.model import load
from .models import load_model
from .recipe import Recipe
from .weights.allocation import get_allocation
from .weights.oneshot import prune
from .weights.quant import QuantScheme
from .weights.search import least_within_size, sparsest_within

evaluate = perplexity

__all__ = ["QuantScheme", "Recipe", "compress", "evaluate", "get_allocation", "least_within_size", "load", "load_model",
           "perplexity", "prune", "save", "sparsest_within", "write_report"]


def __getattr__(name: str):
    if name == "write_report":  # matplotlib is imported only when a report is written
        from .report import write_report

        return write_report
    # sparsellm.moe is imported on first use: importing it loads transformers (to register the MoE model type)
    if name == "moe":
        from .activations import moe

        return moe
    raise AttributeError(f"module 'sparsellm' has no attribute {name!r}")
