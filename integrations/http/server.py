"""What every route shares: the engine, the generation gate (closed while paused) and the
requests in flight, so aborts find them before and after they reach the engine."""

import asyncio
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from rollout import Engine, RequestOutput, SamplingParams
from rollout.engine import Prompt
from rollout.outputs import CompletionOutput


class ApiError(Exception):
    """Answered as `status` with a JSON body naming what was wrong."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@contextmanager
def item_errors(where: str | None):
    """A refusal of one item of a batch names it ("input_ids[1]: ..."); None: not a batch."""
    try:
        yield
    except ApiError as e:
        if where is None:
            raise
        raise ApiError(e.status, f"{where}: {e.message}", e.param or where) from None


@contextmanager
def engine_errors():
    """The engine's refusals as 4xx: bad input 400, a state that forbids the call 409."""
    try:
        yield
    except ApiError:
        raise
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise ApiError(400, str(e)) from None
    except RuntimeError as e:  # released memory, incomplete weights, an update in progress
        raise ApiError(409, str(e)) from None


@dataclass
class Server:
    engine: Engine
    model_name: str
    open: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: dict[str, asyncio.Event] = field(default_factory=dict)  # rid -> aborted
    at_gate: int = 0
    control: asyncio.Lock = field(default_factory=asyncio.Lock)  # pause, continue, flush

    def __post_init__(self):
        self.open.set()

    @property
    def paused(self) -> bool:
        return not self.open.is_set()

    async def call(self, fn: Callable, *args, **kwargs):
        """A blocking engine call, off the event loop, its refusals as 4xx."""
        with engine_errors():
            return await run_in_threadpool(fn, *args, **kwargs)

    # ------------------------------------------------------------------ requests

    @asynccontextmanager
    async def admit(self, rid: str | None):
        """Register a request under `rid` (made up when None) and wait while generation is
        paused; yields (rid, aborted): aborted means /abort_request came first."""
        rid = rid or uuid.uuid4().hex
        if rid in self.inflight:
            raise ApiError(400, f"rid {rid!r} is already in flight", "rid")
        aborted = self.inflight[rid] = asyncio.Event()
        try:
            if not self.open.is_set():
                waits = [asyncio.ensure_future(e.wait()) for e in (self.open, aborted)]
                self.at_gate += 1
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self.at_gate -= 1
                    for w in waits:
                        w.cancel()
            yield rid, aborted.is_set()
        finally:
            del self.inflight[rid]

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       rid: str | None) -> RequestOutput:
        async with self.admit(rid) as (rid, aborted):
            if aborted:
                return self.aborted_output(prompt, params, rid)
            with engine_errors():
                return await self.engine.generate_async(prompt, params, rid)

    async def stream(self, prompt: Prompt, params: SamplingParams, rid: str | None):
        """Cumulative outputs after every step that adds tokens; the last one is final."""
        async with self.admit(rid) as (rid, aborted):
            if aborted:
                yield self.aborted_output(prompt, params, rid)
                return
            with engine_errors():
                async for out in self.engine.generate_stream(prompt, params, rid):
                    yield out

    def aborted_output(self, prompt: Prompt, params: SamplingParams, rid: str) -> RequestOutput:
        """What a request aborted before it reached the engine returns: no tokens."""
        ids = self.token_ids(prompt)
        outs = [CompletionOutput(index=i, token_ids=[], logprobs=[] if params.logprobs else None,
                                 finish_reason="abort", cached_tokens=0,
                                 seed=params.seed + i if params.seed is not None else 0,
                                 weight_version=None, text="")
                for i in range(params.n)]
        return RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, outs, True)

    async def abort(self, rid: str | None = None) -> int:
        """Abort `rid` (None: every request in flight); returns how many were found."""
        rids = list(self.inflight) if rid is None else [rid] if rid in self.inflight else []
        for r in rids:
            self.inflight[r].set()  # before the engine call: one still at the gate stays out
        for r in rids:
            await run_in_threadpool(self.engine.abort, r)
        return len(rids)

    def token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's ids, checked as the engine checks a prompt it generates for."""
        if isinstance(prompt, str) and self.engine.tokenizer is None:
            raise ApiError(400, f"the model at {self.engine.config.model!r} has no tokenizer: "
                                "send input_ids, not text", "text")
        with engine_errors():
            return self.engine.check_prompt(prompt)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        tok = self.engine.tokenizer
        return tok.decode(token_ids, skip_special_tokens) if tok is not None else ""

    # ------------------------------------------------------------------ generation control

    async def pause(self, mode: str) -> None:
        async with self.control:
            self.open.clear()  # first: a request arriving now waits at the gate
            await self.call(self.engine.pause_generation, mode)

    async def resume(self) -> None:
        async with self.control:
            await self.call(self.engine.continue_generation)
            self.open.set()

    async def flush_cache(self) -> None:
        async with self.control:
            await self.call(self._flush, self.paused)

    def _flush(self, paused: bool) -> None:
        """Drop every cached prefix, with the engine held between two steps."""
        if not paused:
            self.engine.pause_generation("in_place")
        try:
            self.engine.block_manager.reset_prefix_cache()
        finally:
            if not paused:
                self.engine.continue_generation()

    def loads(self) -> dict:
        scheduler = self.engine.scheduler
        return {"num_running_reqs": len(scheduler.running),
                "num_waiting_reqs": len(scheduler.waiting) + self.at_gate}
