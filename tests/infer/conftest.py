"""Tiny models and a small BPE tokenizer (with chat tokens) made in the test process, shared by tests/infer."""
import pytest
import torch

from infer_helpers import make_text, tiny_model
from lmstack.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(texts=[make_text()], type="bpe", vocab_size=400, show_progress=False, special_tokens="chat")


@pytest.fixture(scope="session")
def model(tok):
    return tiny_model(tok.vocab_size)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run tiny models, where OpenMP's thread joins cost more than the ops (see infer/threads.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
