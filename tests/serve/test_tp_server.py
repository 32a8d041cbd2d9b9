"""A server with tensor_parallel_size=2 (two gloo processes on the CPU) answers what the single-process server
answers; when its worker is killed, /health turns 503, the request in flight ends with an error and new requests
get 503, each within seconds; stopping it leaves no process behind. The torchrun form (rank 0 serves HTTP, rank 1
runs the worker loop) answers the same."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import lmstack
from lmstack.model.presets import preset
from lmstack.tokenizer import train_tokenizer

from serve_helpers import free_port, make_text, start_server

BODY = {"prompt": "the cat sat on the mat and", "max_tokens": 16, "temperature": 0.0}


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    # 4 query heads over 2 KV heads: each of 2 ranks keeps 2 query heads and 1 KV head
    tok = train_tokenizer(texts=make_text(), type="bpe", vocab_size=300, special_tokens="chat", show_progress=False)
    torch.manual_seed(0)
    model = lmstack.Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=256, n_kv_heads=2))
    path = tmp_path_factory.mktemp("tp_serve") / "tiny-gqa"
    lmstack.save_model(model.eval(), path, tokenizer=tok)
    return path


def _complete(server, body, timeout=30.0):
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=timeout)


def _reference_text(gqa_dir):
    one = start_server(gqa_dir)
    try:
        return _complete(one, BODY).json()["choices"][0]["text"]
    finally:
        one.stop()


def test_tp_server_answers_like_one_process_and_fails_cleanly_when_a_worker_dies(gqa_dir):
    want = _reference_text(gqa_dir)
    srv = start_server(gqa_dir, engine={"tensor_parallel_size": 2})
    engine = srv.aengine.engine
    try:
        r = _complete(srv, BODY)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert httpx.get(f"{srv.url}/health").status_code == 200

        # a long request is decoding when the worker dies: it must end, with an error, not hang
        in_flight = {}
        long_body = {"prompt": ["the cat"] * 4, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
        t = threading.Thread(target=lambda: in_flight.update(r=_complete(srv, long_body, timeout=20.0)))
        t.start()
        deadline = time.monotonic() + 10
        while engine.stats()["generation_tokens"] < 20 + 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker = engine.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()

        while httpx.get(f"{srv.url}/health").status_code != 503:
            assert time.monotonic() - killed < 5, "/health did not turn unhealthy within 5 s"
            time.sleep(0.05)
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "tensor-parallel serving failed" in health.json()["error"]
        t.join(10)
        assert not t.is_alive(), "the request in flight hung after the worker died"
        assert in_flight["r"].status_code == 500 and "tensor-parallel" in in_flight["r"].text

        start = time.monotonic()
        refused = _complete(srv, BODY, timeout=5.0)
        assert refused.status_code == 503 and "unhealthy" in refused.json()["error"]["message"]
        assert time.monotonic() - start < 5
    finally:
        srv.stop()
        engine.close()
    assert all(p.poll() is not None for p in engine.tp.procs)


def test_torchrun_form_serves_from_rank_0(gqa_dir):
    want = _reference_text(gqa_dir)
    port = free_port()
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lmstack.cli", "serve",
                             "--model", str(gqa_dir), "--tensor-parallel-size", "2", "--port", str(port),
                             "--log_level", "warning"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "torchrun exited before serving"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the torchrun server did not come up within 120 s"
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks: the session this test started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
