"""OpenAI-compatible endpoints, so any OpenAI client can roll out: `/v1/models`,
`/v1/completions` and `/v1/chat/completions` (streaming or not, with log-probs)."""

import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import lru_cache

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from integrations.http.native_api import ServerDep
from integrations.http.openai_protocol import ChatMessage, ChatRequest, CompletionRequest
from integrations.http.server import ApiError, Server, item_errors
from integrations.http.streams import gather, merge, primed, sse, unless_disconnected
from rollout import RequestOutput, SamplingParams
from rollout.outputs import CompletionOutput

# the fallback when a tokenizer has no chat template (Qwen's ChatML)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
async def models(server: ServerDep):
    return {"object": "list", "data": [{
        "id": server.model_name, "object": "model", "created": 0, "owned_by": "rollout",
        "root": server.engine.config.model, "max_model_len": server.engine.max_model_len}]}


@router.post("/completions")
async def completions(req: CompletionRequest, server: ServerDep, request: Request):
    _check_model(server, req.model)
    answer = Answer(server, req.model, "text_completion", req.n)
    prompts, params = req.prompts(), req.sampling()
    if req.stream:
        return await answer.stream(prompts, params, req.include_usage, req.continuous_usage,
                                   lambda c, new, t: answer.completion_choice(c, new, t,
                                                                              req.logprobs))
    outs = await unless_disconnected(request, gather(
        _named(_where(k, prompts), server.generate(p, params, None))
        for k, p in enumerate(prompts)))
    if isinstance(outs, Response):
        return outs
    choices = [answer.completion_choice(c, c.text or "", slice(None), req.logprobs)
               | {"index": answer.index(k, c)} for k, out in enumerate(outs) for c in out.outputs]
    return answer.body(choices, usage(outs))


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest, server: ServerDep, request: Request):
    _check_model(server, req.model)
    answer = Answer(server, req.model, "chat.completion", req.n)
    prompt = await run_in_threadpool(chat_prompt, server, req.messages)
    params = req.sampling()
    top = req.top_logprobs or 0
    if req.stream:
        return await answer.stream([prompt], params, req.include_usage, req.continuous_usage,
                                   lambda c, new, t: answer.chat_delta(c, new, t, req.logprobs,
                                                                       top))
    out = await unless_disconnected(request, server.generate(prompt, params, None))
    if isinstance(out, Response):
        return out
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text or ""},
                "logprobs": answer.chat_logprobs(c, slice(None), top) if req.logprobs else None,
                "finish_reason": c.finish_reason} for c in out.outputs]
    return answer.body(choices, usage([out]))


def _where(k: int, prompts: list) -> str | None:
    """How a refusal names prompt k of a list ("prompt[1]: ...")."""
    return f"prompt[{k}]" if len(prompts) > 1 else None


async def _named(where: str | None, answer: Awaitable):
    with item_errors(where):
        return await answer


async def _named_stream(where: str | None, stream: AsyncIterator):
    with item_errors(where):
        async for item in stream:
            yield item


def _check_model(server: Server, model: str) -> None:
    if model != server.model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves "
                            f"{server.model_name!r} (see /v1/models)", "model")


def chat_prompt(server: Server, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template (ChatML when it
    has none), ending with the assistant's turn."""
    tok = chat_tokenizer(server)
    try:
        ids = tok.apply_chat_template([m.for_template() for m in messages],
                                      chat_template=tok.chat_template or CHATML,
                                      add_generation_prompt=True, tokenize=True)
    except Exception as e:  # templates raise on conversations they do not accept
        raise ApiError(400, f"the chat template refused these messages: {e}", "messages") \
            from None
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


_loading = threading.Lock()


def chat_tokenizer(server: Server):
    """transformers' tokenizer of the engine's, for its chat template: loaded by the first chat
    request, once (requests arriving together raced on importing transformers: HTTP 500)."""
    path = server.engine.tokenizer_path
    if server.engine.tokenizer is None:
        raise ApiError(400, f"chat needs the checkpoint's tokenizer, and {path!r} has none; "
                            "use /v1/completions with token ids", "messages")
    with _loading:
        return _hf_tokenizer(path)


@lru_cache(maxsize=4)
def _hf_tokenizer(path: str):
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ApiError(400, f"chat needs the checkpoint's tokenizer, and {path!r} has none "
                            f"that loads ({e}); use /v1/completions with token ids") from None


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def usage(outs: list[RequestOutput]) -> dict:
    return _usage(sum(len(o.prompt_token_ids) for o in outs),
                  sum(len(c.token_ids) for o in outs for c in o.outputs))


def sample_usage(out: RequestOutput, c: CompletionOutput) -> dict:
    return _usage(len(out.prompt_token_ids), len(c.token_ids))


class Answer:
    """The id, timestamps and choice shapes of one OpenAI answer."""

    def __init__(self, server: Server, model: str, kind: str, n: int):
        self.server, self.model, self.kind, self.n = server, model, kind, n
        self.id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def index(self, k: int, c: CompletionOutput) -> int:
        return k * self.n + c.index

    def body(self, choices: list[dict], usage: dict | None, chunk: bool = False) -> dict:
        body = {"id": self.id, "object": self.kind + (".chunk" if chunk and "chat" in self.kind
                                                      else ""),
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def token(self, token_id: int) -> str:
        """A token's text; "token_id:N" without a tokenizer (vLLM's return_tokens_as_token_ids:
        every token decoded to "" and top_logprobs collapsed into one entry)."""
        if self.server.engine.tokenizer is None:
            return f"token_id:{token_id}"
        return self.server.decode([token_id], skip_special_tokens=False)

    def completion_choice(self, c: CompletionOutput, text: str, tokens: slice,
                          top: int | None) -> dict:
        return {"text": text, "finish_reason": c.finish_reason,
                "logprobs": None if top is None else self.completion_logprobs(c, tokens, top)}

    def completion_logprobs(self, c: CompletionOutput, tokens: slice, top: int) -> dict:
        strings = [self.token(t) for t in c.token_ids[tokens]]
        start = sum(len(self.token(t)) for t in c.token_ids[:tokens.start or 0])
        offsets = [start + sum(len(s) for s in strings[:i]) for i in range(len(strings))]
        # as OpenAI's and vLLM's: the `top` likeliest and the sampled token (so logprobs=0
        # still lists the sampled one)
        best = (c.top_logprobs or [])[tokens] if top else [{}] * len(strings)
        tops = []
        for d, s, lp in zip(best, strings, c.logprobs[tokens]):
            entry: dict[str, float] = {}  # tokens that decode alike: the likeliest one's
            for t, alp in d.items():
                entry.setdefault(self.token(t), alp)
            entry.setdefault(s, lp)
            tops.append(entry)
        return {"tokens": strings, "token_logprobs": c.logprobs[tokens], "top_logprobs": tops,
                "text_offset": offsets}

    def chat_delta(self, c: CompletionOutput, text: str, tokens: slice, logprobs: bool,
                   top: int) -> dict:
        delta = {"role": "assistant", "content": text} if not tokens.start else {"content": text}
        return {"delta": delta, "finish_reason": c.finish_reason,
                "logprobs": self.chat_logprobs(c, tokens, top) if logprobs else None}

    def chat_logprobs(self, c: CompletionOutput, tokens: slice, top: int) -> dict:
        tops = (c.top_logprobs or [])[tokens] if top else [{}] * len(c.token_ids[tokens])
        return {"content": [
            {**self._entry(t, lp), "top_logprobs": [self._entry(a, alp) for a, alp in d.items()]}
            for t, lp, d in zip(c.token_ids[tokens], c.logprobs[tokens], tops)]}

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self.token(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    async def stream(self, prompts: list, params: SamplingParams, include_usage: bool,
                     continuous: bool, choice: Callable[[CompletionOutput, str, slice], dict]
                     ) -> StreamingResponse:
        """A chunk for each sample after every step that added to it, then usage, [DONE].
        `continuous`: every chunk carries its sample's usage so far (vLLM's
        continuous_usage_stats: its prompt's tokens and the sample's tokens)."""
        streams = await primed([_named_stream(_where(k, prompts),
                                              self.server.stream(p, params, None))
                                for k, p in enumerate(prompts)])
        sent = {}
        finals: dict[int, RequestOutput] = {}

        async def events() -> AsyncIterator[bytes]:
            try:
                async for k, out in merge(streams):
                    if out.finished:
                        finals[k] = out
                    for c in out.outputs:
                        progress = sent.setdefault((k, c.index), Progress(params.stop))
                        new = progress.step(c)
                        if new is not None:
                            body = choice(c, *new) | {"index": self.index(k, c)}
                            yield sse(self.body([body], sample_usage(out, c) if continuous
                                                else None, chunk=True))
            except ApiError as e:
                yield sse({"error": {"message": e.message, "code": e.status}})
            if include_usage:
                yield sse(self.body([], usage(list(finals.values())), chunk=True))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


class Progress:
    """How much of one sample's tokens and text a stream has sent. Text that could still turn
    out to be a stop string, or half of a UTF-8 character, waits for the next step."""

    def __init__(self, stops: list[str]):
        self.tokens, self.text, self.started, self.done = 0, "", False, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def step(self, c: CompletionOutput) -> tuple[str, slice] | None:
        """(new text, slice of new tokens), or None when there is nothing to send."""
        full, done = c.text or "", c.finish_reason is not None
        end = len(full) if done else max(len(full) - self.hold, len(self.text))
        while not done and end > len(self.text) and full[end - 1] == "\ufffd":
            end -= 1
        new = full[len(self.text):end] if full.startswith(self.text) else ""
        tokens = slice(self.tokens, len(c.token_ids))
        if self.done or (self.started and not new and tokens.start == tokens.stop and not done):
            return None
        self.started, self.done = True, done
        self.text, self.tokens = self.text + new, len(c.token_ids)
        return new, tokens
