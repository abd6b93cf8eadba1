"""Engine behaviour: batching, preemption, chunked prefill, prefix sharing, sampling params,
bad input."""

import asyncio
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.engine import ScoringAborted


def prompts_of(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def logprob_bits(outputs):
    return [[torch.tensor(c.logprobs).numpy().tobytes() for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def engine(qwen3_path):
    return Engine(str(qwen3_path), block_size=16, num_kv_blocks=256, max_num_batched_tokens=256)


def test_preemption_and_chunked_prefill_give_the_roomy_tokens(qwen3_path):
    prompts = prompts_of([5, 40, 77, 130, 21, 64, 99, 150], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True)] * 4
    roomy = Engine(str(qwen3_path), block_size=16, num_kv_blocks=512,
                   max_num_batched_tokens=4096)
    expected = roomy.generate(prompts, params, use_tqdm=False)
    assert roomy.scheduler.stats.preemptions == 0

    tight = Engine(str(qwen3_path), block_size=16, num_kv_blocks=16, max_num_batched_tokens=4096)
    assert tokens(tight.generate(prompts, params, use_tqdm=False)) == tokens(expected)
    assert tight.scheduler.stats.preemptions > 0

    chunked = Engine(str(qwen3_path), block_size=16, num_kv_blocks=512,
                     max_num_batched_tokens=32)
    out = chunked.generate(prompts, params, use_tqdm=False)
    assert tokens(out) == tokens(expected)
    assert logprob_bits(out) == logprob_bits(expected)
    assert all(o.outputs[0].finish_reason == "length" for o in out)


def test_scoring_preempted_or_retracted_midway_gives_the_roomy_logprobs(qwen3_path):
    """A scored sequence recomputed after preemption (or a retract) is scored again from its
    first response token: its log-probs were appended twice."""
    sequences = prompts_of([150, 170, 190], seed=9)
    expected = Engine(str(qwen3_path), block_size=16, num_kv_blocks=512).score(sequences, 1)
    tight = Engine(str(qwen3_path), block_size=16, num_kv_blocks=40, max_num_batched_tokens=64)
    growing = threading.Thread(target=tight.generate, args=(
        prompts_of([20, 25, 30, 35], seed=1), SamplingParams(temperature=0, max_tokens=150,
                                                              ignore_eos=True)),
                               kwargs={"use_tqdm": False})
    growing.start()  # decodes that grow into the blocks the scored sequences hold
    deadline = time.monotonic() + 60
    while tight.scheduler.stats.steps < 3:
        assert time.monotonic() < deadline and growing.is_alive()
        time.sleep(0.001)
    assert tight.score(sequences, 1) == expected
    growing.join(timeout=120)
    assert tight.scheduler.stats.preemptions > 0

    engine = Engine(str(qwen3_path), block_size=16, num_kv_blocks=64, max_num_batched_tokens=16)
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=engine.score(sequences, 1)))
    thread.start()
    deadline = time.monotonic() + 60
    while not any(s.num_computed_tokens > 40 for s in list(engine.scheduler.running)):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.001)
    engine.pause_generation("retract")
    preempted = engine.scheduler.stats.preemptions
    engine.continue_generation()
    thread.join(timeout=120)
    assert box["out"] == expected and preempted > 0

    # aborted midway (pause mode abort): refused, not a short list that looks whole
    thread = threading.Thread(target=lambda: box.update(out=_raised(engine.score, sequences, 1)))
    thread.start()
    while not any(s.num_computed_tokens > 40 for s in list(engine.scheduler.running)):
        assert time.monotonic() < deadline + 60 and thread.is_alive()
        time.sleep(0.001)
    engine.pause_generation("abort")
    engine.continue_generation()
    thread.join(timeout=120)
    assert isinstance(box["out"], ScoringAborted) and "aborted" in str(box["out"])


def _raised(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_group_of_eight_prefills_the_prompt_once(qwen3_path):
    engine = Engine(str(qwen3_path), block_size=16, num_kv_blocks=256)
    prompt = prompts_of([200], seed=5)[0]
    out = engine.generate([prompt], SamplingParams(n=8, temperature=1.0, max_tokens=8,
                                                   ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 8
    assert engine.scheduler.stats.prefill_tokens <= 200 + engine.config.block_size
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert [c.cached_tokens for c in out.outputs[1:]] == [200] * 7


def test_later_requests_reuse_cached_prefix_blocks(engine):
    shared = prompts_of([64], seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=4)
    first = engine.generate([shared + [1, 2, 3]], params, use_tqdm=False)[0]
    second = engine.generate([shared + [4, 5]], params, use_tqdm=False)[0]
    assert first.outputs[0].cached_tokens == 0
    assert second.outputs[0].cached_tokens == 64


# ------------------------------------------------------------------ sampling parameters

def test_samples_of_a_group_respect_max_num_seqs(qwen3_path, engine):
    small = Engine(str(qwen3_path), block_size=16, num_kv_blocks=256, max_num_seqs=2)
    params = SamplingParams(n=6, seed=3, max_tokens=5, ignore_eos=True)
    small.pause_generation("in_place")
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=small.generate(
        [[1, 2, 3]], params, use_tqdm=False)))
    thread.start()
    while not small.scheduler.has_work():
        time.sleep(0.002)
    widest = 0
    while small.scheduler.has_work():
        small.step()
        widest = max(widest, len(small.scheduler.running))
    small.continue_generation()
    thread.join(timeout=60)
    assert widest == 2
    assert tokens(box["out"]) == tokens(engine.generate([[1, 2, 3]], params, use_tqdm=False))


def test_top_k_one_equals_greedy(engine):
    prompts = prompts_of([9, 33], seed=1)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    top1 = engine.generate(prompts, SamplingParams(temperature=1.5, top_k=1, seed=3,
                                                   max_tokens=12), use_tqdm=False)
    assert tokens(top1) == tokens(greedy)


def test_tiny_top_p_and_full_min_p_equal_greedy(engine):
    prompts = prompts_of([17], seed=2)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for params in (SamplingParams(temperature=1.0, top_p=1e-6, seed=1, max_tokens=10),
                   SamplingParams(temperature=1.0, min_p=1.0, seed=1, max_tokens=10)):
        assert tokens(engine.generate(prompts, params, use_tqdm=False)) == tokens(greedy)


def test_top_k_past_the_vocabulary_and_top_p_under_float32s_range(engine):
    prompt = prompts_of([12], seed=4)[0]
    sampled = SamplingParams(seed=5, max_tokens=6, ignore_eos=True)
    free = engine.generate([prompt], sampled, use_tqdm=False)
    wide = engine.generate([prompt], SamplingParams(**{**sampled.__dict__, "top_k": 2**63}),
                           use_tqdm=False)
    assert tokens(wide) == tokens(free) and logprob_bits(wide) == logprob_bits(free)
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                      ignore_eos=True), use_tqdm=False)
    narrow = engine.generate([prompt], SamplingParams(**{**sampled.__dict__, "top_p": 1e-300}),
                             use_tqdm=False)
    assert tokens(narrow) == tokens(greedy)


def test_top_k_limits_choices_to_the_k_best(engine):
    prompt = prompts_of([12], seed=4)[0]
    out = engine.generate([prompt], SamplingParams(temperature=5.0, top_k=3, n=16, max_tokens=1,
                                                   seed=0, top_logprobs=3), use_tqdm=False)[0]
    best3 = set(out.outputs[0].top_logprobs[0])
    firsts = {c.token_ids[0] for c in out.outputs}
    assert firsts <= best3 and len(firsts) > 1


def test_stop_token_ends_with_reason_stop(engine):
    prompt = prompts_of([20], seed=6)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12),
                           use_tqdm=False)[0].outputs[0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                   stop_token_ids=[stop_at]),
                          use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_string_truncates_text(engine):
    prompt = prompts_of([25], seed=8)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16),
                           use_tqdm=False)[0].outputs[0]
    stop = next(ch for ch in free.text[2:] if ch.strip() and ch != "\ufffd")
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
                          use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and free.text.startswith(out.text)


def test_stop_strings_wait_for_min_tokens(engine):
    """As vLLM: a stop string ends a response only where it ends past the first min_tokens
    tokens' text."""
    prompt = prompts_of([25], seed=8)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16),
                           use_tqdm=False)[0].outputs[0]
    stop = next(ch for ch in free.text if ch.strip() and ch != "\ufffd")
    early = len(engine.tokenizer.decode(free.token_ids[:6]))
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                   min_tokens=6), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > 6 and out.token_ids == free.token_ids[:len(out.token_ids)]
    at = free.text.find(stop, early - len(stop) + 1)
    assert out.text == (free.text[:at] if at != -1 else free.text)


def test_text_with_stop_strings_is_the_text_of_the_returned_tokens(engine):
    """A request with stop strings that ends otherwise (length, a stop id) returns its tokens'
    text: it returned '' where min_tokens = max_tokens (no search ran) and lagged a token
    behind after a stop id."""
    prompt = prompts_of([25], seed=8)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6),
                           use_tqdm=False)[0].outputs[0]
    never = "\x00never"
    held = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, min_tokens=6,
                                                    stop=[never]), use_tqdm=False)[0].outputs[0]
    assert held.token_ids == free.token_ids and held.text == free.text != ""
    stop_id = free.token_ids[3]
    by_id = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, stop=[never],
                                                     stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    cut = free.token_ids.index(stop_id) + 1
    assert by_id.stop_reason == stop_id and by_id.token_ids == free.token_ids[:cut]
    assert by_id.text == engine.tokenizer.decode(free.token_ids[:cut])


def test_stop_strings_search_only_the_new_text(engine, monkeypatch):
    """Each step decodes a few tokens, not the whole response again (that made one stop string
    that never matches cost 3.4x the generation at 1000 tokens), and the text stays the
    text of all the tokens."""
    from rollout.sequence import Sequence
    response = engine.tokenizer.encode("a stop string that never matches, €, é; " * 20)
    seq = Sequence(0, "r", 0, [1, 2, 3], SamplingParams(stop=["\x00never"],
                                                        max_tokens=len(response)), 0, 16)
    decoded = []
    detokenize = engine.scheduler.detokenize
    monkeypatch.setattr(engine.scheduler, "detokenize",
                        lambda ids: decoded.append(len(ids)) or detokenize(ids))
    for n, token in enumerate(response, 1):
        seq.token_ids.append(token)
        assert engine.scheduler._stop_reason(seq) == (None if n < len(response) else "length")
        assert engine.tokenizer.decode(response[:n]).startswith(seq.text)
    assert seq.text == engine.tokenizer.decode(response) and len(response) > 800
    assert max(decoded) < 8, max(decoded)


@pytest.mark.parametrize("character, skipped", [("€", 0), ("€", 2), ("€", 3), ("😀", 1)])
def test_a_stop_string_over_a_character_split_by_skipped_tokens_is_found(engine, character,
                                                                         skipped):
    """A character whose bytes are split by tokens of no text (special ones) is shown
    incomplete (U+FFFD) for a while: the stop string over it is found once it completes, and
    the text cut before a stop string after it holds the character (the search had moved past
    it; the stop was missed and the request ran to its length)."""
    from rollout.sequence import Sequence
    tok = engine.tokenizer
    (special,) = tok.encode("<|im_start|>")
    assert tok.decode([special]) == ""
    whole = tok.encode(character)
    response = tok.encode("ab") + whole[:2] + [special] * skipped + whole[2:] + tok.encode("x yz")
    for stop, cut in ((character + "x", "ab"), ("x", "ab" + character)):
        seq = Sequence(0, "r", 0, [1, 2], SamplingParams(stop=[stop], max_tokens=99), 0, 16)
        for token in response:
            seq.token_ids.append(token)
            if engine.scheduler._stop_reason(seq) is not None:
                break
        assert (seq.stop_reason, seq.text) == (stop, cut)


def test_min_tokens_draws_from_the_other_tokens_when_a_stop_id_leads_by_far(engine):
    """While min_tokens holds a stop id back, the draw renormalizes over the other tokens. It
    zeroed the stop id's probability after the softmax: where the stop id led by far the rest
    had underflowed to 0 and the draw took token 0."""
    prompt = prompts_of([20], seed=6)[0]
    first = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                            use_tqdm=False)[0].outputs[0].token_ids[0]
    held = dict(max_tokens=4, min_tokens=4, stop_token_ids=[first], ignore_eos=True)
    greedy = engine.generate([prompt], SamplingParams(temperature=0, **held),
                             use_tqdm=False)[0].outputs[0]
    cold = engine.generate([prompt], SamplingParams(temperature=1e-6, seed=1, **held),
                           use_tqdm=False)[0].outputs[0]
    assert greedy.token_ids[0] != first and cold.token_ids == greedy.token_ids


def test_min_p_comes_before_top_p_as_in_vllm(engine):
    """Probabilities [0.4, 0.3, 0.2, 0.1]: min_p 0.6 keeps the first two ([0.57, 0.43]), then
    top_p 0.5 keeps the first only. Top-p first kept two."""
    from rollout.sampler import SampleSpec
    logits = torch.full((1, 512), -1e4)
    logits[0, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    specs = [SampleSpec(row=0, seq_id=i, temperature=1.0, top_k=0, top_p=0.5, min_p=0.6,
                        seed=i, position=0) for i in range(200)]
    drawn = {s.token_id for s in engine.runner.sampler(logits, specs).values()}
    assert drawn == {0}


def eos_checkpoint(src, dst, eos: int):
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((dst / name).read_text())
        cfg["eos_token_id"] = eos
        (dst / name).write_text(json.dumps(cfg))
    return dst


def test_eos_min_tokens_and_ignore_eos(qwen3_path, tmp_path):
    prompt = prompts_of([15], seed=9)[0]
    base = Engine(str(qwen3_path), block_size=16, num_kv_blocks=64)
    free = base.generate([prompt], SamplingParams(temperature=0, max_tokens=8),
                         use_tqdm=False)[0].outputs[0]
    eos = free.token_ids[0]
    engine = Engine(str(eos_checkpoint(qwen3_path, tmp_path / "ckpt", eos)), block_size=16,
                    num_kv_blocks=64)
    stopped = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8),
                              use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [eos] and stopped.finish_reason == "stop"
    held = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=4),
                           use_tqdm=False)[0].outputs[0]
    assert eos not in held.token_ids[:4] and len(held.token_ids) >= 4
    ignored = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                       ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_n_and_seed(engine):
    prompt = prompts_of([30], seed=10)[0]
    params = SamplingParams(temperature=1.0, n=4, seed=1234, max_tokens=12, ignore_eos=True)
    a = engine.generate([prompt], params, use_tqdm=False)[0]
    b = engine.generate([prompt], params, use_tqdm=False)[0]
    assert len(a.outputs) == 4 and [c.index for c in a.outputs] == [0, 1, 2, 3]
    assert tokens([a]) == tokens([b]) and logprob_bits([a]) == logprob_bits([b])
    assert len({tuple(c.token_ids) for c in a.outputs}) == 4
    replay = engine.generate([prompt], SamplingParams(temperature=1.0, seed=a.outputs[2].seed,
                                                      max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert replay.token_ids == a.outputs[2].token_ids


def test_unseeded_requests_get_a_seed_that_replays(engine):
    prompt = prompts_of([14], seed=12)[0]
    first = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=10,
                                                     ignore_eos=True), use_tqdm=False)[0]
    seed = first.outputs[0].seed
    again = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=10, seed=seed,
                                                     ignore_eos=True), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_max_tokens_and_top_logprobs(engine):
    prompt = prompts_of([11], seed=13)[0]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=5, top_logprobs=4),
                          use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert len(out.top_logprobs) == 5
    for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 4
        assert max(top, key=top.get) == token and top[token] == logprob
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_logprobs_flag(engine):
    prompt = prompts_of([8], seed=15)[0]
    with_lp = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4),
                              use_tqdm=False)[0].outputs[0]
    without = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4,
                                                       logprobs=False), use_tqdm=False)[0].outputs[0]
    assert len(with_lp.logprobs) == 4 and without.logprobs is None
    assert without.token_ids == with_lp.token_ids


def test_sharded_checkpoint_loads_like_a_single_file(qwen3_path, tmp_path):
    import transformers
    model = transformers.Qwen3ForCausalLM.from_pretrained(qwen3_path, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_path / f, tmp_path / "sharded" / f)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    params = SamplingParams(temperature=0, max_tokens=8)
    single = Engine(str(qwen3_path), num_kv_blocks=32).generate([[3, 4, 5]], params,
                                                                 use_tqdm=False)
    sharded = Engine(str(tmp_path / "sharded"), num_kv_blocks=32).generate([[3, 4, 5]], params,
                                                                          use_tqdm=False)
    assert tokens(sharded) == tokens(single) and logprob_bits(sharded) == logprob_bits(single)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_follow_the_float32_one(qwen3_path, dtype):
    engine = Engine(str(qwen3_path), dtype=dtype, num_kv_blocks=32)
    assert engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    prompt = prompts_of([20], seed=16)[0]
    half = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6),
                           use_tqdm=False)[0].outputs[0]
    full = Engine(str(qwen3_path), num_kv_blocks=32)
    scores = full.score([prompt + half.token_ids], len(prompt))[0]
    assert max(abs(a - b) for a, b in zip(scores, half.logprobs)) < 0.1


def test_temperature_scales_the_reported_logprobs(engine, qwen3_path):
    import transformers
    prompt = prompts_of([16], seed=14)[0]
    hf = transformers.Qwen3ForCausalLM.from_pretrained(qwen3_path, dtype=torch.float32)
    for temperature in (0.5, 2.0):
        out = engine.generate([prompt], SamplingParams(temperature=temperature, seed=5,
                                                       max_tokens=6, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits / temperature, -1)
        for i, t in enumerate(out.token_ids):
            assert abs(ref[i, t].item() - out.logprobs[i]) < 1e-4


def test_strings_in_text_out(engine):
    out = engine.generate("hello", SamplingParams(temperature=0, max_tokens=4),
                          use_tqdm=False)[0]
    assert out.prompt == "hello"
    assert out.prompt_token_ids == engine.tokenizer.encode("hello") and len(out.prompt_token_ids) == 5
    completion = out.outputs[0]
    assert completion.text == engine.tokenizer.decode(completion.token_ids)


# ------------------------------------------------------------------ bad input

def test_max_tokens_left_out_fills_what_the_kv_cache_holds_when_it_is_under_the_context(
        qwen3_path):
    """A KV cache smaller than the context (the default preset's on the CPU in bfloat16): a
    request that leaves max_tokens out runs up to what the cache holds (it was refused,
    'lower max_tokens', a parameter it never sent)."""
    small = Engine(str(qwen3_path), block_size=16, num_kv_blocks=30)  # 480 of 1024 tokens
    out = small.generate([[1] * 100], SamplingParams(temperature=0, max_tokens=None,
                                                     ignore_eos=True), use_tqdm=False)
    out = out[0].outputs[0]
    assert len(out.token_ids) == 380 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt of 480 tokens leaves no room in the KV cache "
                                         "\\(raise kv_cache_memory\\) of 480 tokens"):
        small.generate([[1] * 480], SamplingParams(max_tokens=None), use_tqdm=False)


@pytest.mark.parametrize("prompt, params, message", [
    ([600], SamplingParams(), "token id 600 at position 0 is out of range"),
    ([1, -3], SamplingParams(), "token id -3 at position 1"),
    ([], SamplingParams(), "prompt is empty"),
    ([1] * 1000, SamplingParams(max_tokens=100), "exceeds the model's context of 1024"),
    ([1] * 1000, SamplingParams(max_tokens=None, min_tokens=30),
     "prompt \\(1000 tokens\\) \\+ min_tokens \\(30\\) exceeds the model's context of 1024"),
    ([1, 2.5], SamplingParams(), "prompt token 1 is 2.5 \\(float\\): token ids are integers"),
    ([True, 2], SamplingParams(), "prompt token 0 is True \\(bool\\)"),
    ({1: 2}, SamplingParams(), "a prompt must be a string or a list of token ids, got dict"),
    ([1, 2], SamplingParams(min_tokens=2, stop_token_ids=[600]),
     "stop_token_ids token id 600 at position 0 is out of range"),
    ([1, 2], SamplingParams(min_tokens=2, stop_token_ids=list(range(512))),
     "min_tokens=2 holds back every token of the vocabulary \\(512\\)"),
])
def test_bad_request_is_refused_and_engine_keeps_serving(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([prompt], params, use_tqdm=False)
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3),
                          use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("sequence, start, message", [
    ([1, 2, 3, 600], 2, "sequence 0 token id 600 at position 3 is out of range"),
    ([1, 2, 3, -1], 2, "sequence 0 token id -1 at position 3"),
    ([1, 2.5, 3], 1, "token 1 is 2.5 \\(float\\)"),
    ([1, 2, 3], True, "response_start True of sequence 0 must be an int in \\[1, 3\\)"),
    ([1, 2, 3], 3, "response_start 3 of sequence 0"),
])
def test_bad_score_request_is_refused_and_engine_keeps_serving(engine, sequence, start, message):
    with pytest.raises(ValueError, match=message):
        engine.score([sequence], start)
    assert len(engine.score([[1, 2, 3, 4]], 2)[0]) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be 0 \\(greedy\\) or finite and >= 1e-06, got -0.5"),
    (dict(temperature=1e-45), "temperature must be 0 .* got 1e-45"),
    (dict(temperature=float("inf")), "temperature must be 0 .* got inf"),
    (dict(temperature=float("nan")), "temperature must be 0 .* got nan"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\], got 1.5"),
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(min_p=2.0), "min_p must be in \\[0, 1\\], got 2.0"),
    (dict(n=2.5), "n must be an integer, got 2.5 \\(float\\)"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(top_k=True), "top_k must be an integer, got True \\(bool\\)"),
    (dict(max_tokens=2.5), "max_tokens must be an integer"),
    (dict(top_logprobs=2.5), "top_logprobs must be an integer"),
    (dict(temperature="1"), "temperature must be a number, got '1'"),
    (dict(logprobs=5), "logprobs must be True or False, got 5 \\(top_logprobs=k"),
    (dict(stop_token_ids=7), "stop_token_ids must be a list, got 7"),
])
def test_bad_sampling_params_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_bad_request_in_a_batch_queues_none_of_it(engine):
    with pytest.raises(ValueError, match="stop_token_ids token id 512"):
        engine.generate([[1, 2, 3], [4, 5, 6]],
                        [SamplingParams(max_tokens=300, ignore_eos=True),
                         SamplingParams(stop_token_ids=[512])], use_tqdm=False)
    assert not engine.scheduler.has_work()


def test_a_request_id_in_use_is_refused_and_the_first_request_kept(engine):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = engine.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids

    async def run():
        first = asyncio.ensure_future(engine.generate_async([1, 2, 3], params, request_id="r"))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="request id 'r' is already in use"):
            await engine.generate_async([4, 5], params, request_id="r")
        return await first
    out = asyncio.run(run()).outputs[0]
    assert out.finish_reason == "length" and out.token_ids == want


def test_automatic_request_ids_pass_over_ids_callers_chose(qwen3_path):
    """Another client may have named its request "req-N" before the engine's own numbering got
    there: a request without an id skips it (it was refused as already in use)."""
    engine = Engine(str(qwen3_path), block_size=16, num_kv_blocks=256)
    short, long = SamplingParams(max_tokens=1), SamplingParams(max_tokens=1000, ignore_eos=True)
    number = int(engine.generate([[5, 6]], short, use_tqdm=False)[0].request_id.split("-")[1])
    named = {f"req-{number + k}" for k in range(60, 80)}
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(engine.generate_async([1, 2, 3], long, request_id=r))
             for r in sorted(named)]
    loop.run_until_complete(asyncio.sleep(0.05))  # every named request is in flight
    # one batch numbered past every named number
    ids = [o.request_id for o in engine.generate([[7, 8]] * 100, short, use_tqdm=False)]
    assert not named & set(ids) and len(set(ids)) == len(ids)
    for request_id in named:
        assert engine.abort(request_id)
    outs = loop.run_until_complete(asyncio.gather(*tasks))
    assert {o.request_id for o in outs} == named
    loop.close()


def test_a_stream_yields_every_token_as_it_comes(engine):
    async def run():
        return [len(out.outputs[0].token_ids) async for out in engine.generate_stream(
            [1, 2, 3], SamplingParams(max_tokens=5, seed=1, ignore_eos=True))]
    assert asyncio.run(run()) == [1, 2, 3, 4, 5]


def test_numpy_token_ids_are_one_prompt(engine):
    ids = np.array([7, 8, 9])
    want = engine.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=2),
                           use_tqdm=False)[0].outputs[0].token_ids
    for prompt in (list(ids), tuple(ids.tolist())):
        out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=2),
                              use_tqdm=False)
        assert len(out) == 1 and out[0].outputs[0].token_ids == want


def test_unknown_keyword_is_named():
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=1.0)
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 1.0})


def test_string_prompt_without_tokenizer(qwen3_path, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(qwen3_path, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    engine = Engine(str(bare), num_kv_blocks=16)
    with pytest.raises(ValueError, match="has no tokenizer; pass token ids"):
        engine.generate("hi", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings \\['a'\\] need the checkpoint's tokenizer"):
        engine.generate([[5, 6]], SamplingParams(stop=["a"]), use_tqdm=False)
    assert engine.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="/no/such/model.*does not exist"):
        Engine("/no/such/model")


def test_unsupported_architecture_lists_supported(qwen3_path, tmp_path):
    ckpt = tmp_path / "gpt2"
    shutil.copytree(qwen3_path, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Qwen3ForCausalLM, Qwen2ForCausalLM, "
                                         "LlamaForCausalLM"):
        Engine(str(ckpt))


def test_truncated_safetensors_file(qwen3_path, tmp_path):
    ckpt = tmp_path / "truncated"
    shutil.copytree(qwen3_path, ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        Engine(str(ckpt))
