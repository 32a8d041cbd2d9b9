"""`lmstack eval` in-process and through a live `lmstack serve` server agree per item on padded-vocabulary
models; a server with an API key is reached with --api_key / $LMSTACK_API_KEY, and a 401 is reported as one.

Servers run on 127.0.0.1 on a free port and are stopped by each test: the app in a thread
(serve_helpers.LiveServer), or `lmstack serve` itself as a child process (cli_server)."""
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

import lmstack
from lmstack.cli import main
from lmstack.model.presets import preset
from lmstack.tokenizer import train_tokenizer

from serve_helpers import free_port, make_text, start_server

PAD = 40
ROWS = [{"query": f"Question: What comes after {w}?", "choices": ["the cat", "a dog", "one two"], "gold": i % 3}
        for i, w in enumerate(["one", "two", "three", "four", "five"])]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)


def padded_dir(tok, path, masked: bool):
    """A padded model whose padded rows are loud: left unmasked and uncut, they hold most of the mass."""
    torch.manual_seed(0)
    extra = {"real_vocab_size": tok.vocab_size} if masked else {}
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size + PAD, max_seq_len=128,
                                       init_std=0.1, **extra))
    with torch.no_grad():
        w = model.lm_head.weight
        w[tok.vocab_size:] = torch.randn(PAD, w.shape[1]) * w[:tok.vocab_size].std() * 10
    return lmstack.save_model(model.eval(), path, tokenizer=tok), model


@pytest.fixture
def arc_data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "arc").mkdir(parents=True)
    (root / "arc" / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setenv("LMSTACK_DATA", str(root))
    return root


def _responses(out_dir):
    rows = [json.loads(x) for x in (out_dir / "samples_arc_easy.jsonl").read_text().splitlines()]
    return [resp for r in sorted(rows, key=lambda r: r["doc_id"]) for resp in r["responses"]]


EVAL = ["--tasks", "arc_easy", "--progress", "false", "--bootstrap_iters", "0", "--batch_size", "4"]


@contextlib.contextmanager
def thread_server(model_dir, **config):
    srv = start_server(model_dir, **config)
    try:
        yield srv.url
    finally:
        srv.stop()


@contextlib.contextmanager
def cli_server(model_dir, *flags, env=None):
    """`lmstack serve` itself, as a child process on a free loopback port; terminated on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--threads", "1", "--log_level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(url + "/health", timeout=1.0)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lmstack serve did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.parametrize("kind", ["legacy", "masked"])
def test_eval_in_process_and_through_serve_agree_per_item(tok, tmp_path, arc_data, kind, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("LMSTACK_API_KEY", raising=False)
    path, model = padded_dir(tok, tmp_path / kind, masked=kind == "masked")
    # Without one shared definition the two sides differ by the padded rows' mass, which is large here.
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("the cat sat on")]))[0, -1]
    full, cut = torch.logsumexp(logits, -1), torch.logsumexp(logits[:tok.vocab_size], -1)
    assert (full - cut > 1.0) if kind == "legacy" else (full - cut).abs() < 1e-5
    assert main(["eval", "--model", str(path), "--out", str(tmp_path / "local"), *EVAL]) == 0
    # The masked model goes through `lmstack serve` itself (a child process); the legacy one through the same
    # app in a thread, which starts in a fraction of the time.
    with (cli_server(path) if kind == "masked" else thread_server(path)) as url:
        assert main(["eval", "--model", url, "--tokenizer", str(path), "--out", str(tmp_path / "served"),
                     "--max_length", "127", *EVAL]) == 0
    local, served = _responses(tmp_path / "local"), _responses(tmp_path / "served")
    assert len(local) == len(served) == 3 * len(ROWS)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(local, served):
        assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b


def test_rolling_and_empty_context_scores_agree_on_a_padded_model(tok, tmp_path):
    from lmstack.eval.local_lm import LocalLM
    from lmstack.eval.openai_lm import OpenAICompletionsLM

    path, _ = padded_dir(tok, tmp_path / "m", masked=False)
    local = LocalLM(path, batch_size=4, device="cpu")
    srv = start_server(path)
    try:
        remote = OpenAICompletionsLM(srv.url, "tiny-llama", tokenizer=path, max_length=127)
        text = "the cat sat on a mat and the dog ran to the park"
        a = local.loglikelihood_rolling([text]) + [ll for ll, _ in local.loglikelihood([("", " the cat")])]
        b = remote.loglikelihood_rolling([text]) + [ll for ll, _ in remote.loglikelihood([("", " the cat")])]
        remote.close()
    finally:
        srv.stop()
    assert a == pytest.approx(b, abs=1e-4)


def test_eval_against_a_keyed_server(tok, tmp_path, arc_data, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("LMSTACK_API_KEY", raising=False)
    path, _ = padded_dir(tok, tmp_path / "m", masked=True)
    # The key reaches `lmstack serve` through $LMSTACK_API_KEY (kept out of `ps`), as the README shows.
    with cli_server(path, env={"LMSTACK_API_KEY": "sk-test"}) as url:
        args = ["eval", "--model", url, "--tokenizer", str(path), "--max_length", "127", "--limit", "1", *EVAL]
        assert main(args) != 0
        err = capsys.readouterr().err.strip()
        assert "401 Unauthorized: no API key was sent" in err and f"{url}/v1/models" in err
        assert "--api_key" in err and "LMSTACK_API_KEY" in err and "\n" not in err
        assert main(args + ["--api_key", "sk-wrong"]) != 0
        assert "the key sent was refused (wrong key)" in capsys.readouterr().err
        # --model_name skips /v1/models: the completions call itself must say 401, not fail later
        assert main(args + ["--model_name", "m"]) != 0
        assert f"{url}/v1/completions answered 401 Unauthorized" in capsys.readouterr().err
        assert main(args + ["--api_key", "sk-test"]) == 0
        assert "arc_easy" in capsys.readouterr().out
        monkeypatch.setenv("LMSTACK_API_KEY", "sk-test")
        assert main(args) == 0
        monkeypatch.delenv("LMSTACK_API_KEY")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        assert main(args) == 0


def test_eval_with_a_tokenizer_larger_than_the_model_is_one_clear_line(tok, tmp_path, arc_data, capsys):
    torch.manual_seed(0)
    small = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size - 20, max_seq_len=64))
    model_dir = lmstack.save_model(small, tmp_path / "small")
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    assert main(["eval", "--model", str(model_dir), "--tokenizer", str(tok_dir), *EVAL]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: error: eval: ") and "\n" not in err and "IndexError" not in err
    assert f"has {tok.vocab_size} tokens" in err and f"has {tok.vocab_size - 20} tokens" in err
    assert str(model_dir) in err and str(tok_dir) in err
