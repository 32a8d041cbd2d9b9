"""Fixtures: a tiny random llama + small BPE tokenizer saved as a model dir, and a live server on loopback.

The server fixture always stops the server in its finalizer (should_exit, bounded join).
"""
import httpx
import pytest

from serve_helpers import make_text, start_server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    import torch

    import lmstack
    from lmstack.model.presets import preset
    from lmstack.tokenizer import train_tokenizer

    tok = train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256)
    model = lmstack.Transformer(cfg)
    path = tmp_path_factory.mktemp("serve_model") / "tiny-llama"
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client
