"""Async helpers for answers built from several engine streams."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import Response

CLIENT_GONE = 499  # the status access logs give a request whose client left (nginx's)


async def gather(coros) -> list:
    """asyncio.gather that cancels the rest when one fails (their requests are aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def primed(streams: list[AsyncIterator]) -> list[AsyncIterator]:
    """The streams with their first item already taken (and put back in front), so a request
    the engine refuses raises here, before an answer has begun."""
    try:
        firsts = await gather(anext(s) for s in streams)
    except BaseException:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise

    async def with_first(first, rest: AsyncIterator):
        yield first
        async for item in rest:
            yield item
    return [with_first(f, s) for f, s in zip(firsts, streams)]


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's position."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, it: AsyncIterator) -> None:
        try:
            async for item in it:
                await queue.put((k, item))
            await queue.put((k, done))
        except BaseException as e:
            await queue.put((k, e))
            raise

    tasks = [asyncio.ensure_future(pump(k, it)) for k, it in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            k, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


async def unless_disconnected(request: Request, work: Awaitable):
    """`work`'s result; if the client goes away first, `work` is cancelled (its requests are
    aborted, as SGLang and vLLM abort them) and a 499 goes to nobody. Streams need none of
    this: their answer stops when the client does."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=CLIENT_GONE)
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
