"""Contract 1 over HTTP: SGLang's determinism procedure (single, mixed and prefix modes with
batch `text` requests, greedy and seeded) gives one output per prompt, and 64 concurrent
clients get, for every request, exactly what that request gets alone. Outputs are compared by
text, token ids and the bits of every log-prob (JSON floats round-trip exactly)."""

import asyncio
import random
import statistics
import time

import pytest

from tests.serving import rollout_serve

PROMPT_1 = "Tell me about Richard Feynman: "
PROMPT_2 = "Generate 1000 random numbers. Go directly into it, don't say Sure. Just start: "
LONG_PROMPT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog. " for i in range(9))
PREFIX_PROMPTS = [LONG_PROMPT[:n] for n in (1, 40, 200, 400)]  # LONG_PROMPT has 477
MODES = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 1.0, "sampling_seed": 42}}
TRIALS = 8


@pytest.fixture(scope="module")
def server(qwen3_path):
    # small prefill chunks, so long prompts are split differently as batches change
    with rollout_serve(qwen3_path, "--max-num-batched-tokens", "64",
                       "--num-kv-blocks", "2048") as served:
        yield served


def signature(answer: dict) -> tuple:
    pairs = answer["meta_info"]["output_token_logprobs"]
    return answer["text"], tuple(answer["output_ids"]), tuple(lp for lp, _, _ in pairs)


def batch(client, texts: list[str], mode: str, max_new_tokens: int = 12) -> list[tuple]:
    reply = client.post("/generate", json={
        "text": texts, "return_logprob": True,
        "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True,
                            "frequency_penalty": 0.0, "presence_penalty": 0.0,
                            **MODES[mode]}})
    assert reply.status_code == 200, reply.text
    answers = reply.json()
    assert len(answers) == len(texts)
    return [signature(a) for a in answers]


@pytest.mark.parametrize("mode", list(MODES))
def test_sglang_determinism_procedure(server, mode):
    rng = random.Random(0)
    seen: dict[str, set] = {}

    def record(texts, signatures):
        for text, sig in zip(texts, signatures):
            seen.setdefault(text, set()).add(sig)

    with server.client() as client:
        for size in range(1, TRIALS + 1):  # single: one prompt, batch sizes 1..N
            texts = [PROMPT_1] * size
            record(texts, batch(client, texts, mode))
        for size in range(1, TRIALS + 1):  # mixed: two short prompts and a long one
            longs = rng.randint(0, min(2, size - 1))
            ones = rng.randint(1, size - longs)
            texts = [PROMPT_1] * ones + [PROMPT_2] * (size - ones - longs) + [LONG_PROMPT] * longs
            rng.shuffle(texts)
            record(texts, batch(client, texts, mode))
        for size in range(1, TRIALS + 1):  # prefix: shared prefixes, from an empty cache
            assert client.post("/flush_cache").status_code == 200
            texts = [rng.choice(PREFIX_PROMPTS) for _ in range(size)]
            record(texts, batch(client, texts, mode))
    assert {text: len(sigs) for text, sigs in seen.items()} == {text: 1 for text in seen}
    assert set(seen) == {PROMPT_1, PROMPT_2, LONG_PROMPT, *PREFIX_PROMPTS}


def distinct_requests(count: int) -> list[dict]:
    rng = random.Random(1)
    requests = []
    for i in range(count):
        params = {"max_new_tokens": rng.randint(3, 6), "ignore_eos": True}
        params |= {"temperature": 0.0} if i % 2 else {"temperature": 1.0, "sampling_seed": i}
        prompt = [rng.randrange(1, 256) for _ in range(rng.randint(2, 40))]
        requests.append({"input_ids": prompt, "sampling_params": params,
                         "return_logprob": True})
    return requests


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_64_clients_each_get_what_the_request_gets_alone(server, report):
    requests = distinct_requests(32)
    with server.client() as client:  # each request alone
        alone = [signature(client.post("/generate", json=r).json()) for r in requests]

    async def run_clients():
        async with server.async_client(connections=64) as client:
            async def one_client(c: int) -> list[tuple]:
                results = []
                for j in range(20):
                    k = (c * 20 + j) % len(requests)
                    start = time.perf_counter()
                    reply = await client.post("/generate", json=requests[k])
                    latency = time.perf_counter() - start
                    assert reply.status_code == 200, reply.text
                    results.append((k, reply.json(), latency))
                return results
            return await asyncio.gather(*(one_client(c) for c in range(64)))

    start = time.perf_counter()
    results = [r for per_client in asyncio.run(run_clients()) for r in per_client]
    elapsed = time.perf_counter() - start
    client_ms = [1000 * latency for _, _, latency in results]
    server_ms = [1000 * answer["meta_info"]["e2e_latency"] for _, answer, _ in results]
    report(f"rollout serve, 64 clients x 20 requests ({len(results)} in {elapsed:.1f} s, "
           f"{len(results) / elapsed:.0f} req/s, 3-6 new tokens each): latency p50 "
           f"{percentile(client_ms, 50):.0f} ms, p99 {percentile(client_ms, 99):.0f} ms at the "
           f"client; server e2e_latency p50 {percentile(server_ms, 50):.0f} ms, p99 "
           f"{percentile(server_ms, 99):.0f} ms")
    assert len(results) == 64 * 20
    assert all(a["meta_info"]["finish_reason"]["type"] == "length" for _, a, _ in results)
    mismatched = [(k, signature(a)) for k, a, _ in results if signature(a) != alone[k]]
    other_tokens = sum(sig[1] != alone[k][1] for k, sig in mismatched)
    assert not mismatched, (f"{len(mismatched)} of {len(results)} answers differ from the "
                            f"request run alone ({other_tokens} in their tokens, the rest in "
                            f"log-prob bits only)")
