import inspect
import json
import platform

import pytest
import torch

from sparsellm.data import builtin_corpus, docstring_corpus, load_text, split_text, token_windows, uses_bos
from sparsellm.errors import OfflineError, SparseLLMError
from tiny import make_tokenizer


def test_builtin_split_is_80_20_and_documented_fingerprint():
    corpus = builtin_corpus()
    calib, evaluation = load_text("builtin", "calibration"), load_text("builtin", "evaluation")
    assert calib.text + evaluation.text == corpus
    assert len(calib.text) == int(len(corpus) * 0.8)
    if platform.python_version() == "3.11.7":  # the protocol's reference numbers
        assert len(corpus) == 465_126
        import hashlib

        assert hashlib.sha256(corpus.encode()).hexdigest()[:16] == "71f2ff5d99bdc1f9"


def test_docstrings_corpus_holds_the_stdlibs_docstrings_and_none_of_the_builtin_evaluation_text():
    corpus = docstring_corpus()
    calib, evaluation = load_text("docstrings", "calibration"), load_text("docstrings", "evaluation")
    assert calib.text + evaluation.text == corpus and len(calib.text) == int(len(corpus) * 0.8)
    assert len(corpus) > 500_000
    assert inspect.getdoc(json.dumps).split("\n\n")[0] in corpus  # as Python itself reads it
    flat = " ".join(corpus.split())
    paragraphs = [" ".join(p.split()) for p in load_text("builtin", "evaluation").text.split("\n\n")]
    assert not [p for p in paragraphs if len(p) >= 200 and p in flat]


def test_text_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.txt").write_text("beta " * 100)
    one = load_text(str(tmp_path / "a.txt"), "evaluation")
    assert one.text == split_text("alpha " * 100, "evaluation")
    both = load_text(str(tmp_path), "calibration")
    assert both.text.startswith("alpha") and both.fingerprint != one.fingerprint
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(SparseLLMError, match="empty"):
        load_text(str(tmp_path / "empty.txt"), "calibration")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SparseLLMError, match="cannot read"):
        load_text(str(tmp_path / "bad.txt"), "calibration")
    with pytest.raises(SparseLLMError, match="not found"):
        load_text(str(tmp_path / "missing.txt"), "calibration")


def test_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="wikitext2"):
        load_text("wikitext2", "calibration")


def test_windows_consecutive_random_and_bos():
    text = load_text("builtin", "evaluation")
    plain = make_tokenizer()
    windows = token_windows(plain, text, 64, 5)
    ids = plain(text.text, add_special_tokens=False).input_ids
    assert torch.equal(windows.flatten(), torch.tensor(ids[: 5 * 64]))
    shuffled = token_windows(plain, text, 64, 5, sampling="random", seed=1)
    assert shuffled.shape == (5, 64) and not torch.equal(shuffled, windows)
    assert torch.equal(shuffled, token_windows(plain, text, 64, 5, sampling="random", seed=1))

    gemma_like = make_tokenizer(add_bos=True)
    assert uses_bos(gemma_like) and not uses_bos(plain)
    with_bos = token_windows(gemma_like, text, 64, 3)
    assert (with_bos[:, 0] == gemma_like.bos_token_id).all()
    assert torch.equal(with_bos[:, 1:].flatten(), torch.tensor(ids[: 3 * 63]))


def test_window_errors():
    text = load_text("builtin", "evaluation")
    with pytest.raises(SparseLLMError, match="only"):
        token_windows(make_tokenizer(), text, 512, 10_000)
    with pytest.raises(SparseLLMError, match="at least 1"):
        token_windows(make_tokenizer(), text, 512, 0)
