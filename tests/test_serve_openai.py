"""The official `openai` client rolls out through `rollout serve`: completions and chat
completions with log-probs, streaming and not, behind an API key. Answers are checked against
the native /generate for the same prompt: same tokens, same log-prob bits."""

import openai
import pytest

from tests.serving import rollout_serve

KEY = "test-key-9"
PROMPT = "The engine answers: "


@pytest.fixture(scope="module")
def server(qwen3_path):
    with rollout_serve(qwen3_path, "--served-model-name", "tiny-qwen3", api_key=KEY) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


def native(server, text: str, max_new_tokens: int, n: int = 1, **params) -> list[dict]:
    """The native /generate answer for the same request, one entry per sample."""
    with server.client() as http:
        reply = http.post("/generate", json={
            "text": text, "return_logprob": True, "return_text_in_logprobs": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "n": n, **params}})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    return answer if isinstance(answer, list) else [answer]


def logprobs_of(answer: dict) -> list[float]:
    return [lp for lp, _, _ in answer["meta_info"]["output_token_logprobs"]]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3"]


def test_completions_with_logprobs_match_generate(client, server):
    want = native(server, PROMPT, 8, temperature=0, ignore_eos=True)[0]
    got = client.completions.create(model="tiny-qwen3", prompt=PROMPT, max_tokens=8,
                                    temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.text == want["text"] and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == logprobs_of(want)
    assert choice.logprobs.tokens == [t for _, _, t in
                                      want["meta_info"]["output_token_logprobs"]]
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                   choice.logprobs.top_logprobs):
        assert top[token] == logprob and 1 <= len(top) <= 3  # the 2 likeliest and the sample
    sampled_only = client.completions.create(model="tiny-qwen3", prompt=PROMPT, max_tokens=8,
                                             seed=3, logprobs=0).choices[0].logprobs
    assert sampled_only.top_logprobs == [{t: lp} for t, lp in zip(sampled_only.tokens,
                                                                   sampled_only.token_logprobs)]
    assert got.usage.completion_tokens == 8
    assert got.usage.prompt_tokens == want["meta_info"]["prompt_tokens"]

    chunks = list(client.completions.create(model="tiny-qwen3", prompt=PROMPT, max_tokens=8,
                                            temperature=0, logprobs=2, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want["text"]
    assert [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs] == \
        logprobs_of(want)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stream_never_sends_text_a_stop_string_then_cuts(client):
    """Streamed text equals the unstreamed answer when a long stop string matches: text that
    could still be the start of one waits (the stream sent it while the text was shorter than
    the stop string)."""
    for seed, length in [(seed, length) for seed in range(3) for length in (8, 12)]:
        free = client.completions.create(model="tiny-qwen3", prompt=PROMPT, max_tokens=12,
                                         seed=seed).choices[0].text
        stop = free[1:1 + length]
        kwargs = dict(model="tiny-qwen3", prompt=PROMPT, max_tokens=12, seed=seed, stop=[stop])
        whole = client.completions.create(**kwargs).choices[0]
        chunks = list(client.completions.create(**kwargs, stream=True))
        assert whole.finish_reason == "stop" and chunks[-1].choices[0].finish_reason == "stop"
        assert "".join(c.choices[0].text for c in chunks) == whole.text == free[:1]


def test_the_first_chat_requests_arriving_together_are_all_answered(server):
    """The first chat loads the chat template's tokenizer (importing transformers): requests
    that came together raced on the import and 15 of 16 got HTTP 500. Runs before this module's
    other chat requests."""
    import asyncio

    async def together() -> list[int]:
        body = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2}
        async with server.async_client() as http:
            replies = await asyncio.gather(*(http.post("/v1/chat/completions", json=body)
                                             for _ in range(16)))
        return [r.status_code for r in replies]
    assert asyncio.run(together()) == [200] * 16


def test_chat_completions_with_logprobs_match_generate(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    rendered += "<|im_start|>assistant\n"  # the ChatML fallback: this tokenizer has no template
    want = native(server, rendered, 6, n=2, temperature=1.0, sampling_seed=5, ignore_eos=True)
    got = client.chat.completions.create(model="tiny-qwen3", messages=messages, max_tokens=6,
                                         n=2, seed=5, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    assert len(got.choices) == 2
    for choice, answer in zip(got.choices, want):
        assert choice.message.role == "assistant"
        assert choice.message.content == answer["text"]
        assert [t.logprob for t in choice.logprobs.content] == logprobs_of(answer)
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    stream = client.chat.completions.create(model="tiny-qwen3", messages=messages, max_tokens=6,
                                            n=2, seed=5, logprobs=True, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    text, logprobs, usage = {0: "", 1: ""}, {0: [], 1: []}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            logprobs[c.index] += [t.logprob for t in (c.logprobs.content if c.logprobs else [])]
    assert [text[0], text[1]] == [a["text"] for a in want]
    assert [logprobs[0], logprobs[1]] == [logprobs_of(a) for a in want]
    assert usage.completion_tokens == 12


def test_nulls_and_neutral_values_are_taken_as_openai_clients_send_them(client):
    """The client sends null for a None argument (OpenAI types these fields 'or null'); the
    neutral values of fields the engine does not act on are accepted, others refused by name."""
    messages = [{"role": "user", "content": "Hi!"}]
    base = dict(model="tiny-qwen3", messages=messages, max_tokens=4, seed=2)
    want = client.chat.completions.create(**base).choices[0].message.content
    got = client.chat.completions.create(**base, temperature=None, top_p=None, n=None,
                                         presence_penalty=None, logprobs=None,
                                         response_format={"type": "text"}, tool_choice="none",
                                         parallel_tool_calls=False, store=False)
    assert got.choices[0].message.content == want
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(**base, response_format={"type": "json_object"})


def test_every_call_needs_the_api_key(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with server.client() as http:
        http.headers.pop("Authorization")
        for path in ("/health", "/get_model_info", "/v1/models"):
            reply = http.get(path)
            assert reply.status_code == 401 and "Authorization: Bearer" in reply.text
        assert http.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_chat_takes_messages_as_openai_clients_send_them_back(client):
    """An answer's message sent back as the next turn (model_dump(): refusal, tool_calls, audio,
    annotations, function_call null) and a tool message with its tool_call_id; both were
    refused ('Extra inputs are not permitted')."""
    base = dict(model="tiny-qwen3", max_tokens=3, seed=1)
    turn = [{"role": "user", "content": "Hi!"}]
    answer = client.chat.completions.create(messages=turn, **base).choices[0].message
    sent_back = answer.model_dump()
    assert {"refusal", "tool_calls", "audio"} <= set(sent_back)
    again = client.chat.completions.create(
        messages=turn + [sent_back, {"role": "user", "content": "And?"}], **base)
    assert again.choices[0].finish_reason in ("length", "stop")
    tool = client.chat.completions.create(messages=turn + [
        {"role": "assistant", "content": None, "tool_calls": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"}], **base)
    assert tool.choices[0].message.role == "assistant"


def test_a_refused_prompt_of_a_list_is_named_and_stream_options_need_a_stream(client):
    base = dict(model="tiny-qwen3", max_tokens=2)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="prompt\\[1\\]: prompt token id 9999"):
            client.completions.create(prompt=[[1, 2], [9999]], stream=stream, **base)
    assert client.completions.create(prompt="a", echo=None, **base).choices[0].text is not None
    with pytest.raises(openai.BadRequestError, match="stream_options needs stream: true"):
        client.completions.create(prompt="a", stream_options={"include_usage": True}, **base)
    chunks = list(client.completions.create(prompt="a", stream=True, **base,
                                            stream_options={"include_usage": None}))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_continuous_usage_stats_give_each_chunk_its_samples_count_so_far(client):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries
    usage of its sample so far; without include_usage none does. It was refused."""
    base = dict(model="tiny-qwen3", prompt=[[1, 2, 3]], max_tokens=5, n=2, seed=4, stream=True,
                extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        **base, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    *per_sample, last = chunks
    made = {0: 0, 1: 0}
    for chunk in per_sample:
        (c,) = chunk.choices
        made[c.index] += 1  # one token per chunk here (no stop strings hold text back)
        assert chunk.usage.prompt_tokens == 3
        assert chunk.usage.completion_tokens == made[c.index]
        assert chunk.usage.total_tokens == 3 + made[c.index]
    assert made == {0: 5, 1: 5} and last.usage.completion_tokens == 10 and not last.choices
    quiet = list(client.completions.create(**base, stream_options={
        "include_usage": False, "continuous_usage_stats": True}))
    assert all(chunk.usage is None for chunk in quiet)


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    from rollout.presets import make_checkpoint
    from tests.conftest import SMALL
    path = make_checkpoint(tmp_path_factory.mktemp("no-tokenizer"), tokenizer=None, head_dim=32,
                           **SMALL)
    with rollout_serve(path, "--served-model-name", "bare") as served:
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0) as c:
            yield c


def test_without_a_tokenizer_chat_says_so_and_logprobs_name_token_ids(no_tokenizer):
    """Chat answered 'prompt is empty' (transformers loads an empty tokenizer from a directory
    with none); completion log-probs named every token '' and merged the alternatives into
    one entry. Tokens are now 'token_id:N', as vLLM's return_tokens_as_token_ids."""
    with pytest.raises(openai.BadRequestError, match="chat needs the checkpoint's tokenizer"):
        no_tokenizer.chat.completions.create(model="bare", max_tokens=2,
                                             messages=[{"role": "user", "content": "Hi"}])
    got = no_tokenizer.completions.create(model="bare", prompt=[1, 2, 3], max_tokens=3,
                                          logprobs=2, seed=0).choices[0].logprobs
    assert all(t.startswith("token_id:") for t in got.tokens)
    for token, logprob, top in zip(got.tokens, got.token_logprobs, got.top_logprobs):
        assert top[token] == logprob and len(top) in (2, 3)
