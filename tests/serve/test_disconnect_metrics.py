"""Client disconnects free KV blocks at once; /metrics shows tokens, TTFT, queue and KV state, prefix-cache hits."""
import asyncio
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import start_server


def scrape(http: httpx.Client) -> dict[str, float]:
    """/metrics -> {sample name (with labels): value}, through Prometheus' own parser."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture
def slow_server(model_dir):
    """A server whose engine sleeps 5 ms per step, so a 200-token request surely outlives the test's actions."""
    srv = start_server(model_dir, engine={"max_num_seqs": 8})
    engine = srv.aengine.engine
    step = engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    yield srv
    srv.stop()


def wait_blocks_free(srv, timeout: float = 5.0) -> tuple[dict, float]:
    start = time.monotonic()
    while True:
        s = srv.stats()
        if s["num_blocks_free"] == s["num_blocks_total"] and s["running"] == 0 and s["waiting"] == 0:
            return s, time.monotonic() - start
        if time.monotonic() - start > timeout:
            return s, time.monotonic() - start
        time.sleep(0.01)


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "the cat sat", "max_tokens": 200, "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                              "ignore_eos": True, "stream": True}),
])
def test_closing_a_stream_aborts_and_frees_blocks(slow_server, route, body):
    srv = slow_server
    before = srv.stats()
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        with http.stream("POST", route, json=body) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 3:
                    break
            assert srv.stats()["num_blocks_free"] < srv.stats()["num_blocks_total"]  # it holds blocks now
        # leaving the `with` closes the connection mid-stream
        stats, waited = wait_blocks_free(srv)
        assert stats["num_blocks_free"] == stats["num_blocks_total"], stats
        assert waited < 1.0  # freed at once, not when 200 tokens (>= 1 s at 5 ms a step) would be done
        assert stats["requests_aborted"] == before["requests_aborted"] + 1
        assert stats["generation_tokens"] - before["generation_tokens"] < 200
        assert scrape(http)["lmstack_requests_aborted_total"] >= 1


def test_non_streaming_client_timeout_aborts(slow_server):
    srv = slow_server
    before = srv.stats()
    with httpx.Client(base_url=srv.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 200, "ignore_eos": True})
    stats, waited = wait_blocks_free(srv)
    assert stats["num_blocks_free"] == stats["num_blocks_total"] and waited < 1.0
    assert stats["requests_aborted"] == before["requests_aborted"] + 1


def test_random_cancellations_leave_every_block_free(server):
    """40 concurrent streamed requests of mixed lengths; about half are dropped after a few chunks."""
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(rng.randint(2, 40))),
                "max_tokens": rng.randint(4, 60), "stream": True, "temperature": 1.0, "seed": i,
                "n": rng.choice([1, 1, 2])}
        cancel_after = rng.choice([None, 1, 2, 5])
        chunks = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "done"
                chunks += line.startswith("data: ")
                if cancel_after is not None and chunks >= cancel_after:
                    return "cancelled"  # leaving the block closes this connection
        return "ended"

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=50)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(40)))

    results = asyncio.run(main())
    assert results.count("done") + results.count("cancelled") == 40
    assert results.count("cancelled") > 5
    stats, _ = wait_blocks_free(server, timeout=10)
    assert stats["num_blocks_free"] == stats["num_blocks_total"], stats
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert server.aengine.engine.requests == {}
    state = server.app.state.lmstack
    deadline = time.monotonic() + 5  # a ticket is returned when its response ends, just after the engine request
    while state.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.in_flight == 0


def test_metrics_count_tokens_ttft_and_prefix_hits(server, http):
    before = scrape(http)
    prompt = "the cat sat on a mat and the dog ran to the park while birds sang in old trees " * 2
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(ids) >= 48
    r1 = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0})
    mid = scrape(http)
    r2 = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0})
    after = scrape(http)
    assert r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]  # the cache changes no output
    gen = r1.json()["usage"]["completion_tokens"] + r2.json()["usage"]["completion_tokens"]
    assert after["lmstack_prompt_tokens_total"] - before["lmstack_prompt_tokens_total"] == 2 * len(ids)
    assert after["lmstack_generation_tokens_total"] - before["lmstack_generation_tokens_total"] == gen
    ttft = "lmstack_time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 2
    assert after['lmstack_time_to_first_token_seconds_bucket{le=+Inf}'] == after[ttft]
    # the second, identical prompt reuses every full cached block: far fewer prefill tokens
    first_prefill = mid["lmstack_prefill_tokens"] - before["lmstack_prefill_tokens"]
    second_prefill = after["lmstack_prefill_tokens"] - mid["lmstack_prefill_tokens"]
    hits = after["lmstack_prefix_cache_hit_tokens"] - mid["lmstack_prefix_cache_hit_tokens"]
    block = server.stats()["block_size"]
    assert first_prefill == len(ids)
    assert hits >= (len(ids) - 1) // block * block - block and second_prefill <= len(ids) - hits
    assert second_prefill < first_prefill / 2
    assert after["lmstack_kv_blocks_used"] + after["lmstack_kv_blocks_free"] == after["lmstack_kv_blocks_total"]
    assert after["lmstack_num_requests_running"] == 0 and after["lmstack_num_requests_waiting"] == 0
    assert after['lmstack_requests_total{route=/v1/completions,status=200}'] >= 2
