"""Tiny tokenizer, tiny llama-style policy and tiny preference data built from the synthetic world."""
import pytest
import torch
from align_helpers import make_policy

from lmstack.world import World
from lmstack.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def world():
    return World(seed=0, n_people=30, n_preferences=200, n_arithmetic=60, n_instructions=60)


@pytest.fixture(scope="session")
def tok(world):
    texts = [r["text"] for r in world.corpus("preferences")] + [r["text"] for r in world.corpus("arithmetic")]
    return train_tokenizer(texts=texts, type="bpe", vocab_size=400, special_tokens="chat", show_progress=False)


@pytest.fixture
def policy(tok):
    return make_policy(tok)


@pytest.fixture
def records(world):
    """Arithmetic chat records: prompts for the online RL tests."""
    return [r for r in world.corpus("chat") if r["kind"] == "arithmetic"][:8]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box two threads stall each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
