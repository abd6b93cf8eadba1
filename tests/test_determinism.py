"""Contract 1: a request's tokens and log-prob bits depend only on the request.

Modeled on SGLang's determinism test: for one target request, count the distinct
(token ids, log-prob bytes) it gets across batch sizes, batch mates, arrival orders and times,
prefix-cache states, chunked-prefill budgets and preemption. There must be exactly one."""

import asyncio
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import cpu
from rollout import Engine, SamplingParams
from rollout.sampler import Sampler, SampleSpec, uniform

TARGET = [(i * 37 + 11) % 512 for i in range(70)]
MODES = {
    "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, seed=42, max_tokens=24, ignore_eos=True),
}


def signature(completion) -> tuple:
    return tuple(completion.token_ids), torch.tensor(completion.logprobs).numpy().tobytes()


def fillers(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.choice([1, 7, 30, 90, 150]))]
            for _ in range(count)]


def filler_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]),
                          max_tokens=rng.choice([3, 20, 40]), seed=rng.randrange(10**6),
                          ignore_eos=True)


@pytest.fixture(scope="module")
def engine(qwen3_path):
    return Engine(str(qwen3_path), block_size=16, num_kv_blocks=512, max_num_batched_tokens=512)


@pytest.mark.parametrize("mode", list(MODES))
def test_single_prompt_at_batch_sizes_1_to_32(engine, mode):
    seen = set()
    for bs in range(1, 33):
        rng = random.Random(bs)
        prompts = [TARGET] + fillers(bs - 1, seed=bs)
        params = [MODES[mode]] + [filler_params(rng) for _ in range(bs - 1)]
        order = list(range(bs))
        rng.shuffle(order)
        outs = engine.generate([prompts[i] for i in order], [params[i] for i in order],
                               use_tqdm=False)
        seen.add(signature(outs[order.index(0)].outputs[0]))
    assert len(seen) == 1


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batches_with_async_arrivals(engine, mode, monkeypatch):
    """The target's output is the same however its steps were shared (the batch sizes it
    shared are recorded: the premise is checked, not assumed), and the same as alone."""
    shared: list[int] = []  # sequences in each step that carried the target
    schedule = engine.scheduler.schedule

    def recorded():
        batch = schedule()
        seqs = [s for s, _ in batch.prefills] + batch.decodes
        if any(s.prompt_token_ids == TARGET for s in seqs):
            shared.append(len(seqs))
        return batch
    monkeypatch.setattr(engine.scheduler, "schedule", recorded)

    async def run(seed: int):
        rng = random.Random(seed)
        prompts = fillers(12, seed=100 + seed)

        async def later(prompt, params, delay):
            await asyncio.sleep(delay)
            return await engine.generate_async(prompt, params)

        tasks = [later(p, filler_params(rng), rng.uniform(0, 0.05)) for p in prompts]
        tasks.insert(rng.randrange(len(tasks) + 1), later(TARGET, MODES[mode],
                                                          rng.uniform(0, 0.05)))
        outs = await asyncio.gather(*tasks)
        return next(signature(o.outputs[0]) for o in outs if o.prompt_token_ids == TARGET)

    seen = {asyncio.run(run(seed)) for seed in range(6)}
    assert len(set(shared)) >= 3 and max(shared) > 1, shared  # steps shared several ways
    alone = engine.generate([TARGET], MODES[mode], use_tqdm=False)[0].outputs[0]
    assert seen == {signature(alone)}


@pytest.mark.parametrize("mode", list(MODES))
def test_prefix_cache_cold_and_warm(qwen3_path, mode):
    seen = set()
    block = 16
    for shared in (1, block - 1, block + 1, 3 * block + 5, len(TARGET) - 1):
        engine = Engine(str(qwen3_path), block_size=block, num_kv_blocks=512)
        rng = random.Random(shared)
        sibling = TARGET[:shared] + [rng.randrange(512) for _ in range(20)]
        cold = engine.generate([TARGET], MODES[mode], use_tqdm=False)[0].outputs[0]
        engine.generate([sibling], filler_params(rng), use_tqdm=False)
        warm = engine.generate([TARGET, sibling], [MODES[mode], filler_params(rng)],
                               use_tqdm=False)[0].outputs[0]
        assert warm.cached_tokens == (len(TARGET) - 1) // block * block
        fresh = Engine(str(qwen3_path), block_size=block, num_kv_blocks=512)
        fresh.generate([sibling], filler_params(rng), use_tqdm=False)
        shared_hit = fresh.generate([TARGET], MODES[mode], use_tqdm=False)[0].outputs[0]
        assert shared_hit.cached_tokens == min(shared, len(TARGET) - 1) // block * block
        seen |= {signature(cold), signature(warm), signature(shared_hit)}
    assert len(seen) == 1


@pytest.mark.parametrize("mode", list(MODES))
def test_chunked_prefill_budgets_and_preemption(qwen3_path, mode):
    seen, preemptions = set(), 0
    others = fillers(10, seed=7)
    rng = random.Random(7)
    params = [filler_params(rng) for _ in others]
    for budget, blocks in ((16, 512), (48, 512), (512, 512), (2048, 512), (64, 14), (512, 12)):
        engine = Engine(str(qwen3_path), block_size=16, num_kv_blocks=blocks,
                        max_num_batched_tokens=budget)
        outs = engine.generate(others[:5] + [TARGET] + others[5:],
                               params[:5] + [MODES[mode]] + params[5:], use_tqdm=False)
        seen.add(signature(outs[5].outputs[0]))
        preemptions += engine.scheduler.stats.preemptions
    assert preemptions > 0
    assert len(seen) == 1


def test_score_returns_the_generation_logprobs_bitwise(engine):
    rng = random.Random(3)
    prompts = [TARGET] + fillers(15, seed=3)
    params = [MODES["greedy"], MODES["seeded"]] + [filler_params(rng) for _ in prompts[2:]]
    outs = engine.generate(prompts, params, use_tqdm=False)
    for temperature in {p.temperature for p in params}:
        chosen = [i for i, p in enumerate(params) if p.temperature == temperature]
        sequences = [prompts[i] + outs[i].outputs[0].token_ids for i in chosen]
        scores = engine.score(sequences, [len(prompts[i]) for i in chosen],
                              temperature=temperature)
        for i, score in zip(chosen, scores):
            expected = torch.tensor(outs[i].outputs[0].logprobs).numpy().tobytes()
            assert torch.tensor(score).numpy().tobytes() == expected


def test_two_processes_give_identical_bytes(qwen3_path):
    script = textwrap.dedent(f"""
        import hashlib, random
        import torch
        from rollout import Engine, SamplingParams
        engine = Engine({str(qwen3_path)!r}, block_size=16, num_kv_blocks=256)
        rng = random.Random(0)
        prompts = [[rng.randrange(512) for _ in range(rng.randrange(1, 80))] for _ in range(12)]
        outs = engine.generate(prompts, SamplingParams(temperature=1.0, seed=5, n=2,
                               max_tokens=20, ignore_eos=True), use_tqdm=False)
        h = hashlib.sha256()
        for o in outs:
            for c in o.outputs:
                h.update(torch.tensor(c.token_ids).numpy().tobytes())
                h.update(torch.tensor(c.logprobs).numpy().tobytes())
        print(h.hexdigest())
    """)
    digests = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_a_draw_does_not_depend_on_batch_mates_sampling_params():
    """Top-p on a row with top_p=1 is not a no-op: it drops every token too small to move the
    rounded running sum. A seeded top_p=1 request whose uniform lands in such a tail (a block of
    tokens at -19 behind one at 0) must draw the same token alone and next to a top_p=0.9 one."""
    seed = next(s for s in range(10**7) if uniform(s, 0) > 1 - 3e-5)
    logits = torch.full((2, 8192), -19.0)
    logits[:, 0] = 0.0

    def spec(row: int, top_p: float) -> SampleSpec:
        return SampleSpec(row=row, seq_id=row, temperature=1.0, top_k=0, top_p=top_p, min_p=0.0,
                          seed=seed, position=0)

    sampler = Sampler(cpu.softmax_parts)
    alone = sampler(logits[:1], [spec(0, 1.0)])[0]
    assert alone.token_id >= 1024  # the premise: the draw lands in the tail
    for mate in (0.9, 1.0):
        assert sampler(logits, [spec(0, 1.0), spec(1, mate)])[0] == alone


def test_top_logprobs_do_not_depend_on_how_many_batch_mates_ask_for():
    """bfloat16 logits tie often; torch.topk breaks ties differently for different k. A row's
    top log-probs (ties by the lower token id) must be the same whatever its mates ask for."""
    logits = torch.zeros(2, 4096)
    logits[:, ::7] = 1.0  # 586 tokens tie for second place
    logits[:, 4001] = 2.0

    def spec(row: int, top: int) -> SampleSpec:
        return SampleSpec(row=row, seq_id=row, temperature=0, top_k=0, top_p=1.0, min_p=0.0,
                          seed=0, position=0, top_logprobs=top)

    sampler = Sampler(cpu.softmax_parts)
    alone = sampler(logits[:1], [spec(0, 3)])[0].top_logprobs
    assert list(alone) == [4001, 0, 7]
    for mate in (0, 1, 3, 20, 600):
        assert sampler(logits, [spec(0, 3), spec(1, mate)])[0].top_logprobs == alone
        assert sampler(logits, [spec(1, mate), spec(0, 3)])[0].top_logprobs == alone
    assert list(sampler(logits[:1], [spec(0, 600)])[0].top_logprobs)[585:589] == [4088, 4095, 1, 2]
