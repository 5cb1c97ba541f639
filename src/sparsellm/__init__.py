"""sparsellm: make large language models sparse, small and fast."""

__version__ = "0.1.0"

from .checkpoint import save
from .evaluation import perplexity
from .format import compress, load
from .models import load_model
from .weights.oneshot import prune
from .weights.quant import QuantScheme

evaluate = perplexity

__all__ = ["QuantScheme", "compress", "evaluate", "load", "load_model", "perplexity", "prune", "save"]
