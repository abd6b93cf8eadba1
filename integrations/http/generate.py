"""`POST /generate`: SGLang's native generation, answered in SGLang's shapes.

One prompt answers an object (a list of n with n > 1), a batch answers a list in input order
(prompt-major, n per prompt). `stream: true` answers server-sent events with the cumulative
output of each sample (`index` names it when there are several), ending `data: [DONE]`.
"""

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from integrations.http.protocol import GenerateRequest, Prompt, SglSamplingParams
from integrations.http.server import ApiError, Server, engine_errors, item_errors
from integrations.http.streams import gather, merge, primed, sse, unless_disconnected
from rollout import RequestOutput, SamplingParams
from rollout.outputs import CompletionOutput


def engine_params(sp: SglSamplingParams, req: GenerateRequest) -> SamplingParams:
    return SamplingParams(
        temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0), min_p=sp.min_p,
        max_tokens=sp.max_new_tokens, min_tokens=sp.min_new_tokens, stop=sp.stops,
        stop_token_ids=sp.stop_token_ids or [], ignore_eos=sp.ignore_eos, n=sp.n,
        seed=sp.sampling_seed, logprobs=req.return_logprob,
        top_logprobs=req.top_logprobs_num if req.return_logprob else 0)


class Job:
    """One prompt of a /generate request: runs it and shapes its samples."""

    def __init__(self, server: Server, req: GenerateRequest, i: int, prompt: Prompt,
                 batch: bool = False):
        self.server, self.req, self.prompt = server, req, prompt
        # a refusal names the batch item: "input_ids[1]: ..."
        self.where = f"{'text' if req.text is not None else 'input_ids'}[{i}]" if batch else None
        self.sp = req.params(i)
        self.rid = req.request_id(i)
        self.started = time.perf_counter()
        self.input_logprobs: list | None = None
        self.scoring_aborted = False
        self.scoring_versions: list = []

    @property
    def scoring_only(self) -> bool:
        return self.sp.max_new_tokens == 0

    @property
    def wants_input_logprobs(self) -> bool:
        start = self.req.logprob_start_len
        return self.req.return_logprob and start is not None and start >= 0

    async def check_logprob_start(self) -> None:
        """Before any generation: logprob_start_len must fall inside the prompt."""
        if not self.wants_input_logprobs:
            return
        length = len(await run_in_threadpool(self.server.token_ids, self.prompt))
        if self.req.logprob_start_len >= length:
            raise ApiError(400, f"logprob_start_len ({self.req.logprob_start_len}) must be below "
                                f"the prompt length ({length})", "logprob_start_len")

    async def run(self) -> list[dict]:
        with self.named():
            return await self._run()

    async def stream(self) -> AsyncIterator[tuple[int, dict]]:
        """(sample index, cumulative sample) after each step that changed it."""
        with self.named():
            async for change in self._stream():
                yield change

    def named(self):
        return item_errors(self.where)

    async def _run(self) -> list[dict]:
        await self.check_logprob_start()
        if self.scoring_only:
            out = self.empty_output()
        else:
            out = await self.server.generate(self.prompt, engine_params(self.sp, self.req),
                                             self.rid)
        await self.score_prompt(out)
        return [self.render(out, c) for c in out.outputs]

    async def _stream(self) -> AsyncIterator[tuple[int, dict]]:
        await self.check_logprob_start()
        if self.scoring_only:
            out = self.empty_output()
            await self.score_prompt(out)
            for c in out.outputs:
                yield c.index, self.render(out, c)
            return
        sent: dict[int, tuple[int, bool]] = {}
        final = None
        async for out in self.server.stream(self.prompt, engine_params(self.sp, self.req),
                                            self.rid):
            if out.finished:  # scored once the generation has let its rid go
                final = out
                continue
            for change in self.changes(out, sent):
                yield change
        if final is not None:
            await self.score_prompt(final)
            for change in self.changes(final, sent):
                yield change

    def changes(self, out: RequestOutput, sent: dict[int, tuple[int, bool]]):
        """(index, sample) of the samples that changed since `sent` recorded them."""
        for c in out.outputs:
            state = (len(c.token_ids), c.finish_reason is not None)
            if sent.get(c.index) != state:
                sent[c.index] = state
                yield c.index, self.render(out, c)

    def empty_output(self) -> RequestOutput:
        """max_new_tokens 0: no completion tokens (the prompt may still be scored)."""
        out = self.server.aborted_output(self.prompt, SamplingParams(n=self.sp.n),
                                         self.rid or uuid.uuid4().hex)
        for c in out.outputs:
            c.finish_reason, c.logprobs = "length", []
        return out

    async def score_prompt(self, out: RequestOutput) -> None:
        """input_token_logprobs from logprob_start_len on: the first token has none, the rest
        come from the engine's teacher-forced scoring, which waits while generation is paused
        and is found by /abort_request under the request's rid, like generation. Aborted, the
        answer says so (finish_reason abort, no input log-probs)."""
        if not self.wants_input_logprobs or self.input_logprobs is not None \
                or self.scoring_aborted:
            return
        if any(c.finish_reason == "abort" for c in out.outputs):  # the request was aborted
            self.scoring_aborted = True
            return
        ids, start, scored = out.prompt_token_ids, self.req.logprob_start_len, []
        if len(ids) > 1:
            async with self.server.admit(self.rid) as (rid, aborted):
                if aborted:
                    self.scoring_aborted = True
                    return
                with engine_errors():
                    (priced,) = await self.server.engine.score_outputs_async(
                        [ids], max(start, 1), self.sp.temperature, request_ids=[rid])
            priced = priced.outputs[0]
            if priced.finish_reason == "abort":
                self.scoring_aborted = True
                return
            scored, self.scoring_versions = priced.logprobs, priced.weight_versions
        logprobs = [None] * (start == 0) + scored
        self.input_logprobs = [[lp, t, self.token_text(t)]
                               for lp, t in zip(logprobs, ids[start:])]

    def render(self, out: RequestOutput, c: CompletionOutput) -> dict:
        if self.scoring_aborted:
            c = dataclasses.replace(c, finish_reason="abort")
        ids, logprobs, tops = c.token_ids, c.logprobs or [], c.top_logprobs or []
        matched = c.stop_reason
        if (c.finish_reason == "stop" and isinstance(matched, int) and not self.sp.no_stop_trim
                and ids and ids[-1] == matched):
            ids, logprobs, tops = ids[:-1], logprobs[:-1], tops[:-1]
        if c.finish_reason == "stop" and isinstance(matched, str) and not self.sp.no_stop_trim:
            text = c.text or ""  # the engine cut it before the stop string
        else:
            text = self.server.decode(ids, self.sp.skip_special_tokens)
        version = c.weight_version if c.weight_version is not None \
            else self.server.engine.weight_version
        meta = {"id": out.request_id, "finish_reason": finish_reason(c, len(ids)),
                "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(ids),
                "cached_tokens": c.cached_tokens, "weight_version": str(version),
                # more than one: the sample's K/V, tokens and prompt log-probs came from
                # several versions
                "weight_versions": [str(v) for v in self.versions(c, version)],
                "e2e_latency": time.perf_counter() - self.started}
        if self.req.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, self.token_text(t)]
                                             for lp, t in zip(logprobs, ids)]
            if self.req.top_logprobs_num:
                meta["output_top_logprobs"] = [[[lp, t, self.token_text(t)]
                                                for t, lp in top.items()] for top in tops]
            if self.input_logprobs is not None:
                meta["input_token_logprobs"] = self.input_logprobs
        return {"text": text, "output_ids": ids, "meta_info": meta}

    def versions(self, c: CompletionOutput, version) -> list:
        """The sample's weight versions, then those that priced its prompt where they differ
        (scoring runs after the generation: an update between them shows here)."""
        versions = list(c.weight_versions or [version])
        for v in self.scoring_versions:
            if v != versions[-1]:
                versions.append(v)
        return versions

    def token_text(self, token_id: int) -> str | None:
        if not self.req.return_text_in_logprobs:
            return None
        return self.server.decode([token_id], skip_special_tokens=False)


def finish_reason(c: CompletionOutput, length: int) -> dict | None:
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.stop_reason}
    if c.finish_reason == "length":
        return {"type": "length", "length": length}
    if c.finish_reason == "abort":
        return {"type": "abort", "message": "aborted (abort_request or pause_generation)"}
    return None


async def generate(server: Server, req: GenerateRequest, request: Request):
    prompts, batch = req.prompts()
    jobs = [Job(server, req, i, p, batch) for i, p in enumerate(prompts)]
    if req.stream:
        return await stream_response(jobs, indexed=batch or any(j.sp.n > 1 for j in jobs))
    done = await unless_disconnected(request, gather(j.run() for j in jobs))
    if isinstance(done, Response):
        return done
    samples = [s for per_prompt in done for s in per_prompt]
    single = not batch and len(samples) == 1
    return JSONResponse(samples[0] if single else samples)


async def stream_response(jobs: list[Job], indexed: bool) -> StreamingResponse:
    n = [j.sp.n for j in jobs]
    offsets = [sum(n[:i]) for i in range(len(jobs))]
    streams = await primed([j.stream() for j in jobs])

    async def events() -> AsyncIterator[bytes]:
        try:
            async for k, (index, sample) in merge(streams):
                if indexed:
                    sample = {**sample, "index": offsets[k] + index}
                yield sse(sample)
        except ApiError as e:  # the answer has begun: the error becomes the last event
            yield sse({"error": {"message": e.message, "code": e.status}})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
