"""The engine as an async Ray actor.

`RolloutActor.options(num_cpus=..., num_gpus=..., scheduling_strategy=...).remote(model, ...)`
starts one; its handle offers the engine's methods. Generation and scoring go through the
engine's async API and hold no thread while they wait (out a pause, say); blocking engine calls
(weight updates, memory, pause) run on a worker thread, so generation requests keep flowing into
the engine while they wait; the engine itself lets control calls in between two steps.
"""

import asyncio
import numbers
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import ray
import torch

from integrations import engine_state
from rollout import Engine, RequestOutput, SamplingParams
from weight_sync import DEFAULT_BUCKET_BYTES, ZmqWeightSender

HEALTH_PROBE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=False)

Prompt = str | list[int]


def as_batch(prompts: Prompt | Sequence[Prompt],
             sampling_params: SamplingParams | Sequence[SamplingParams | None] | None
             ) -> tuple[list[Prompt], list[SamplingParams | None]]:
    """The prompts and one sampling params per prompt, as `Engine.generate` takes them: one
    prompt (a string or token ids) or several; one params (or None) or one per prompt."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], numbers.Integral)):
        prompts = [prompts]  # one prompt of token ids
    prompts = list(prompts)
    if isinstance(sampling_params, SamplingParams) or sampling_params is None:
        sampling_params = [sampling_params] * len(prompts)
    if not all(p is None or isinstance(p, SamplingParams) for p in sampling_params):
        raise ValueError(f"sampling params must be SamplingParams (or a list of them), got "
                         f"{type(sampling_params).__name__}")
    if len(sampling_params) != len(prompts):
        raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} "
                         "prompts; pass one, or one per prompt")
    return prompts, list(sampling_params)


async def gather_or_cancel(calls: Iterable[Awaitable]) -> list:
    """`asyncio.gather`, except that the first failure cancels the other calls (a cancelled
    request is aborted on its engine) and waits for them to end before it is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class EngineActor:
    """One engine in a Ray actor. `torch_threads` sets the process's torch thread count
    explicitly (on the CPU, BLAS results depend on it: compare engines with equal counts)."""

    def __init__(self, model: str | None = None, torch_threads: int = 1, **engine_options):
        if torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {torch_threads}")
        torch.set_num_threads(torch_threads)
        self.engine = Engine(model, **engine_options)
        self._receiver_address: str | None = None
        self._paused = False  # by pause_generation: the engine steps nothing, by request

    @staticmethod
    async def _blocking(fn: Callable, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ---------------------------------------------------------------- generation

    async def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """What `Engine.generate` returns, in input order; where one prompt fails, the others
        are aborted."""
        prompts, params = as_batch(prompts, sampling_params)
        return await gather_or_cancel(self.engine.generate_async(p, sp)
                                      for p, sp in zip(prompts, params))

    async def generate_one(self, prompt: str | list[int],
                           sampling_params: SamplingParams | None = None,
                           request_id: str | None = None) -> RequestOutput:
        """One request (all its `n` samples), joining whatever else is running."""
        return await self.engine.generate_async(prompt, sampling_params, request_id)

    async def score(self, sequences: Sequence[list[int]], response_start: int | Sequence[int],
                    temperature: float = 1.0) -> list[list[float]]:
        return await self.engine.score_async(sequences, response_start, temperature)

    async def abort(self, request_id: str) -> bool:
        return await self._blocking(self.engine.abort, request_id)

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._blocking(self.engine.pause_generation, mode)
        self._paused = True

    async def continue_generation(self) -> None:
        await self._blocking(self.engine.continue_generation)
        self._paused = False

    # ---------------------------------------------------------------- weights

    async def update_weights(self, named_tensors: Iterable,
                             version: int | str | None = None) -> int | str:
        return await self._blocking(self.engine.update_weights, named_tensors, version)

    async def update_weights_from_disk(self, path: str,
                                       version: int | str | None = None) -> int | str:
        return await self._blocking(self.engine.update_weights_from_disk, path, version)

    async def start_weight_receiver(self, address: str | None = None,
                                    timeout_s: float = 60.0) -> str:
        """Bind the engine's ZMQ receiver (default: this node's address, a free port) and
        return its address; asked again, returns the address already bound."""
        if self._receiver_address is None:
            address = address or f"tcp://{ray.util.get_node_ip_address()}:0"
            self._receiver_address = self.engine.start_weight_receiver(address, timeout_s)
        return self._receiver_address

    async def init_weights_update_group(self, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, group_name: str,
                                        backend: str | None = None,
                                        timeout_s: float = 300.0) -> None:
        await self._blocking(self.engine.init_weights_update_group, master_address, master_port,
                             rank_offset, world_size, group_name, backend, timeout_s)

    async def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list,
                                              group_name: str, version: int | str | None = None,
                                              bucket_bytes: int = DEFAULT_BUCKET_BYTES
                                              ) -> int | str:
        return await self._blocking(self.engine.update_weights_from_distributed, names, dtypes,
                                    shapes, group_name, version, bucket_bytes)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._blocking(self.engine.destroy_weights_update_group, group_name)

    async def send_weights(self, address: str, mode: str = "bytes") -> int | str:
        """Push this engine's weights and version to another engine's receiver at `address`
        (how a replacement engine catches up with its group). Returns the receiver's version."""
        state = engine_state.weights_state(self.engine)
        if state != "complete":
            raise RuntimeError(f"this engine's weights are {state}: only complete, resident "
                               "weights are sent")
        def send() -> int:
            with ZmqWeightSender(address, mode=mode) as sender:
                return sender.send(engine_state.named_weights(self.engine),
                                   version=self.engine.weight_version)
        return await self._blocking(send)

    async def weights_state(self) -> str:
        """"complete", "released", "incomplete" or "updating" (see
        `engine_state.weights_state`)."""
        return engine_state.weights_state(self.engine)

    async def weights_checksum(self) -> str:
        return await self._blocking(self.engine.weights_checksum)

    async def weight_version(self) -> int | str:
        return self.engine.weight_version

    async def update_weight_version(self, new_version: int | str) -> int | str:
        """Name the current weights `new_version` without changing them (SGLang's
        /update_weight_version); refused while an update is open."""
        await self._blocking(self.engine.weights.relabel, new_version)
        return self.engine.weight_version

    # ---------------------------------------------------------------- memory

    async def release_memory(self, tags: Sequence[str] | str | None = None,
                             weights: str = "backup", pause_mode: str = "retract") -> None:
        await self._blocking(self.engine.release_memory, tags, weights, pause_mode)

    async def resume_memory(self, tags: Sequence[str] | str | None = None) -> None:
        await self._blocking(self.engine.resume_memory, tags)

    async def memory_stats(self) -> dict:
        return self.engine.memory_stats()

    # ---------------------------------------------------------------- health and load

    async def health(self, timeout_s: float = 30.0) -> float | None:
        """Seconds until the engine showed progress: a one-token generation, or (as SGLang's
        /health_generate) an engine step begun and ended while the probe waited behind busy
        work. Raises TimeoutError past `timeout_s`, and the engine's refusal where it takes no
        work (incomplete weights). None where the engine steps nothing by request, so the
        answer alone shows it alive: a weight update open (a transport's own timeout ends a
        stalled one), generation paused or memory released."""
        if self._idle():
            return None
        stats, start = self.engine.scheduler.stats, time.monotonic()
        steps = stats.steps
        probe = asyncio.ensure_future(self.engine.generate_async([0], HEALTH_PROBE))
        try:
            while not probe.done():
                if stats.steps > steps + 1:  # a step began and ended after the probe arrived
                    return time.monotonic() - start
                if time.monotonic() - start > timeout_s:
                    if self._idle():  # paused, released or updating while the probe waited
                        return None
                    raise TimeoutError(f"no engine step in {timeout_s:g} s")
                await asyncio.wait({probe}, timeout=0.02)
            probe.result()
        finally:
            probe.cancel()  # still queued: aborted
        return time.monotonic() - start

    def _idle(self) -> bool:
        """The engine steps nothing by request: an update open, paused, or memory released."""
        released = any(self.engine.memory_stats()["released"].values())
        return engine_state.updating(self.engine) or self._paused or released

    async def load(self) -> dict[str, int]:
        """Sequences running and waiting in this engine."""
        return engine_state.load(self.engine)

    async def determinism_report(self):
        """The engine's `DeterminismReport` (a trainer passes it to
        `kernels.batch_invariant_mode(expect=...)`)."""
        return self.engine.determinism_report()

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def shutdown(self) -> None:
        await self._blocking(self.engine.shutdown)


RolloutActor = ray.remote(EngineActor)
