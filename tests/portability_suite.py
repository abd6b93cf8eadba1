"""The determinism promises, checked within one BLAS configuration (the process's environment):
run as `python -m tests.portability_suite SPEC_JSON`, it prints one JSON line per
(checkpoint, dtype, check) with the number of distinct signatures seen (1 = invariant) or the
largest sampler-trainer log-prob difference (0.0 = bitwise).

SPEC_JSON: {"threads": int | null, "checkpoints": {name: [architecture, path]},
"dtypes": [...]}. Kept compact so that every configuration runs inside the CI budget."""

import asyncio
import json
import random
import sys

import torch
import transformers

import kernels
from rollout import Engine, SamplingParams

TARGET = [(i * 37 + 11) % 384 for i in range(45)]
MODES = {
    "greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True),
}
BLOCK = 16


def signature(completion) -> tuple:
    return tuple(completion.token_ids), torch.tensor(completion.logprobs).numpy().tobytes()


def fillers(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(384) for _ in range(rng.choice([1, 7, 30, 70]))]
            for _ in range(count)]


def filler_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0, 0.7, 1.3]), max_tokens=rng.choice([3, 15]),
                          seed=rng.randrange(10**6), ignore_eos=True)


def engine_for(path: str, dtype: str, **kwargs) -> Engine:
    return Engine(path, dtype=dtype, block_size=BLOCK, **{"num_kv_blocks": 256, **kwargs})


def batch_sizes(path, dtype, mode) -> set:
    engine, seen = engine_for(path, dtype), set()
    for bs in (1, 2, 3, 4, 5, 8, 13):
        rng = random.Random(bs)
        prompts = [TARGET] + fillers(bs - 1, seed=bs)
        params = [MODES[mode]] + [filler_params(rng) for _ in range(bs - 1)]
        order = list(range(bs))
        rng.shuffle(order)
        outs = engine.generate([prompts[i] for i in order], [params[i] for i in order],
                               use_tqdm=False)
        seen.add(signature(outs[order.index(0)].outputs[0]))
    return seen


def async_arrivals(path, dtype, mode) -> set:
    engine = engine_for(path, dtype)

    async def run(seed: int):
        rng = random.Random(seed)

        async def later(prompt, params, delay):
            await asyncio.sleep(delay)
            return await engine.generate_async(prompt, params)

        tasks = [later(p, filler_params(rng), rng.uniform(0, 0.03))
                 for p in fillers(6, seed=100 + seed)]
        tasks.insert(rng.randrange(len(tasks) + 1), later(TARGET, MODES[mode],
                                                          rng.uniform(0, 0.03)))
        outs = await asyncio.gather(*tasks)
        return next(signature(o.outputs[0]) for o in outs if o.prompt_token_ids == TARGET)

    return {asyncio.run(run(seed)) for seed in range(3)}


def prefix_cold_and_warm(path, dtype, mode) -> set:
    seen = set()
    for shared in (1, BLOCK + 1, len(TARGET) - 1):
        engine = engine_for(path, dtype)
        rng = random.Random(shared)
        sibling = TARGET[:shared] + [rng.randrange(384) for _ in range(10)]
        cold = engine.generate([TARGET], MODES[mode], use_tqdm=False)[0].outputs[0]
        engine.generate([sibling], filler_params(rng), use_tqdm=False)
        warm = engine.generate([TARGET, sibling], [MODES[mode], filler_params(rng)],
                               use_tqdm=False)[0].outputs[0]
        assert warm.cached_tokens == (len(TARGET) - 1) // BLOCK * BLOCK, "no prefix-cache hit"
        seen |= {signature(cold), signature(warm)}
    return seen


def budgets_and_preemption(path, dtype, mode) -> set:
    seen, preemptions = set(), 0
    others = fillers(6, seed=7)
    rng = random.Random(7)
    params = [filler_params(rng) for _ in others]
    for budget, blocks in ((16, 256), (48, 256), (512, 256), (64, 7), (512, 6)):
        engine = engine_for(path, dtype, num_kv_blocks=blocks, max_num_batched_tokens=budget)
        outs = engine.generate(others[:3] + [TARGET] + others[3:],
                               params[:3] + [MODES[mode]] + params[3:], use_tqdm=False)
        seen.add(signature(outs[3].outputs[0]))
        preemptions += engine.scheduler.stats.preemptions
    assert preemptions > 0, "the small cache never preempted"
    return seen


def score_equals_generation(path, dtype) -> float:
    """Largest |score - generation log-prob| over a mixed batch (0.0 = bitwise)."""
    engine = engine_for(path, dtype)
    rng = random.Random(3)
    prompts = [TARGET] + fillers(7, seed=3)
    params = [MODES["greedy"], MODES["seeded"]] + [filler_params(rng) for _ in prompts[2:]]
    outs = engine.generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for temperature in {p.temperature for p in params}:
        chosen = [i for i, p in enumerate(params) if p.temperature == temperature]
        scores = engine.score([prompts[i] + outs[i].outputs[0].token_ids for i in chosen],
                              [len(prompts[i]) for i in chosen], temperature=temperature)
        for i, score in zip(chosen, scores):
            got, want = torch.tensor(score), torch.tensor(outs[i].outputs[0].logprobs)
            if got.numpy().tobytes() != want.numpy().tobytes():
                worst = max(worst, (got - want).abs().max().item(), 1e-30)
    return worst


def trainer_gap(path, arch, dtype) -> float:
    """Largest |trainer - rollout| log-prob, the trainer being the Hugging Face model under
    `kernels.batch_invariant_mode()` on right-padded sequences (0.0 = bitwise)."""
    engine = Engine(path, dtype=dtype, block_size=kernels.DEFAULT_SPLIT_SIZE, num_kv_blocks=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (3, 17, 40, 70, 9)]
    temperature = 0.7
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, seed=1,
                                                   max_tokens=12, ignore_eos=True),
                           use_tqdm=False)
    rows = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    device = engine.config.device  # the trainer runs where the engine does
    model = getattr(transformers, arch).from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=kernels.HF_ATTENTION).to(device)
    with kernels.batch_invariant_mode(), torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    worst = 0.0
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        response = torch.tensor(out.outputs[0].token_ids, device=device)
        picked = logprobs[i, len(prompt) - 1:len(prompt) - 1 + len(response)]
        picked = picked.gather(1, response.unsqueeze(1)).squeeze(1).cpu()
        gap = (picked - torch.tensor(out.outputs[0].logprobs)).abs()
        worst = max(worst, torch.nan_to_num(gap, nan=float("inf")).max().item())  # NaN: never 0
    return worst


INVARIANCE_CHECKS = {"batch_sizes": batch_sizes, "async_arrivals": async_arrivals,
                     "prefix_cold_and_warm": prefix_cold_and_warm,
                     "budgets_and_preemption": budgets_and_preemption}


def main(spec: dict) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    for name, (arch, path) in spec["checkpoints"].items():
        for dtype in spec["dtypes"]:
            where = {"checkpoint": name, "dtype": dtype, "threads": torch.get_num_threads()}
            for check, fn in INVARIANCE_CHECKS.items():
                for mode in MODES:
                    print(json.dumps({**where, "check": f"{check}[{mode}]",
                                      "signatures": len(fn(path, dtype, mode))}), flush=True)
            print(json.dumps({**where, "check": "score_equals_generation",
                              "max_diff": score_equals_generation(path, dtype)}), flush=True)
            print(json.dumps({**where, "check": "trainer_parity",
                              "max_diff": trainer_gap(path, arch, dtype)}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
