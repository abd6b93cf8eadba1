"""The engine as an async Ray actor.

`RolloutActor.options(num_cpus=..., num_gpus=..., scheduling_strategy=...).remote(model, ...)`
starts one; its handle offers the engine's methods. Blocking engine calls (weight updates,
memory) run on a worker thread, so generation requests keep flowing into the engine while they
wait; the engine itself lets control calls in between two steps.
"""

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

import ray
import torch

from integrations import engine_state
from rollout import Engine, RequestOutput, SamplingParams
from weight_sync import DEFAULT_BUCKET_BYTES, ZmqWeightSender

HEALTH_PROBE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=False)


class EngineActor:
    """One engine in a Ray actor. `torch_threads` sets the process's torch thread count
    explicitly (on the CPU, BLAS results depend on it: compare engines with equal counts)."""

    def __init__(self, model: str | None = None, torch_threads: int = 1, **engine_options):
        if torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {torch_threads}")
        torch.set_num_threads(torch_threads)
        self.engine = Engine(model, **engine_options)
        self._receiver_address: str | None = None

    @staticmethod
    async def _blocking(fn: Callable, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ---------------------------------------------------------------- generation

    async def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """`Engine.generate`: the prompts enter the engine together; outputs in input order."""
        return await self._blocking(self.engine.generate, prompts, sampling_params,
                                    use_tqdm=False)

    async def generate_one(self, prompt: str | list[int],
                           sampling_params: SamplingParams | None = None,
                           request_id: str | None = None) -> RequestOutput:
        """One request (all its `n` samples), joining whatever else is running."""
        return await self.engine.generate_async(prompt, sampling_params, request_id)

    async def score(self, sequences: Sequence[list[int]], response_start: int | Sequence[int],
                    temperature: float = 1.0) -> list[list[float]]:
        return await self._blocking(self.engine.score, sequences, response_start, temperature)

    async def abort(self, request_id: str) -> bool:
        return await self._blocking(self.engine.abort, request_id)

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._blocking(self.engine.pause_generation, mode)

    async def continue_generation(self) -> None:
        await self._blocking(self.engine.continue_generation)

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
        """Seconds a one-token generation took; raises TimeoutError past `timeout_s`, and the
        engine's refusal where it takes no work (incomplete weights). While a weight update is
        open the engine steps nothing until it ends (a transport's own timeout ends a stalled
        one), so the answer alone shows it alive: None (no generation was tried)."""
        if engine_state.updating(self.engine):
            return None
        start = time.monotonic()
        try:
            await asyncio.wait_for(self.engine.generate_async([0], HEALTH_PROBE), timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            if engine_state.updating(self.engine):  # the update opened while the probe waited
                return None
            raise
        return time.monotonic() - start

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
