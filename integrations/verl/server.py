"""The server actor of a verl replica: one engine answering verl's agent loop
(`generate(prompt_ids, sampling_params, request_id) -> TokenOutput`) and its memory calls."""

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass

import ray
import torch
from verl.workers.rollout.replica import TokenOutput

from integrations import engine_state
from rollout import Engine, SamplingParams

log = logging.getLogger(__name__)

MEMORY_MODES = ("hybrid", "colocated", "standalone")


@dataclass(frozen=True)
class ServerSettings:
    """What the server takes from verl's RolloutConfig."""
    mode: str  # verl's RolloutMode value: what `sleep` gives back
    prompt_length: int
    response_length: int
    free_cache_engine: bool = True
    ignore_eos: bool = False
    seed: int | None = None  # verl's full_determinism: each request's seed comes from this

    def __post_init__(self):
        if self.mode not in MEMORY_MODES:
            raise ValueError(f"rollout mode {self.mode!r} is not one of {', '.join(MEMORY_MODES)}")


class RolloutEngineServer:
    def __init__(self, model: str, settings: ServerSettings, torch_threads: int = 1,
                 cuda_visible_devices: str | None = None, **engine_options):
        if cuda_visible_devices is not None:  # the GPU of the trainer worker it shares
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        torch.set_num_threads(torch_threads)
        self.engine = Engine(model, **engine_options)
        self.settings = settings
        self._admitting = asyncio.Event()  # cleared by abort_all_requests until resume_generation
        self._admitting.set()
        self._control = asyncio.Lock()  # aborts and resumes one at a time: the last one wins
        self._reject_requests = False
        self._receiver_address: str | None = None

    # ---------------------------------------------------------------- generation

    async def generate(self, prompt_ids, sampling_params: dict, request_id: str,
                       image_data=None, video_data=None, **kwargs) -> TokenOutput:
        """One sample for verl's agent loop. `sampling_params`: temperature, top_p, top_k,
        repetition_penalty (1.0 only), logprobs, optional max_tokens or max_new_tokens (else up
        to the response length), stop_token_ids, ignore_eos, seed."""
        unsupported = {"image_data": image_data, "video_data": video_data, **kwargs}
        unsupported = sorted(k for k, v in unsupported.items() if v is not None)
        if unsupported:
            raise ValueError(f"rollout_engine serves text-only models; unsupported generate "
                             f"arguments: {unsupported}")
        # ids as given (a tensor or an array as a list): the engine refuses non-integers
        prompt = prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else list(prompt_ids)
        params, want_logprobs = self._sampling_params(dict(sampling_params), len(prompt),
                                                      request_id)
        while not self._admitting.is_set():  # between abort_all_requests and resume_generation
            if self._reject_requests:  # verl's client sends an aborted request elsewhere
                return _token_output([], None, "aborted", [self.engine.weight_version])
            await self._admitting.wait()
        # no await between the gate and the engine taking the request: an abort_all_requests
        # that closes the gate finds it in the engine and aborts it
        out = (await self.engine.generate_async(prompt, params, request_id)).outputs[0]
        return _token_output(out.token_ids, out.logprobs if want_logprobs else None,
                             "aborted" if out.finish_reason == "abort" else "completed",
                             out.weight_versions or [self.engine.weight_version])

    def _sampling_params(self, params: dict, prompt_len: int,
                         request_id: str) -> tuple[SamplingParams, bool]:
        penalty = params.pop("repetition_penalty", 1.0)
        if penalty != 1.0:
            raise ValueError(f"repetition_penalty={penalty} is not supported by rollout_engine; "
                             "only 1.0 (its log-probs are what the trainer recomputes)")
        want_logprobs = bool(params.pop("logprobs", False))
        new_tokens, tokens = params.pop("max_new_tokens", None), params.pop("max_tokens", None)
        limit = new_tokens if new_tokens is not None else tokens
        if limit is None:
            s = self.settings
            limit = min(s.response_length, s.prompt_length + s.response_length - prompt_len)
        room = self.engine.max_model_len - prompt_len
        if room < 1:  # as verl's vLLM server: an error, not an empty response
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room for a response in "
                             f"max_model_len {self.engine.max_model_len}")
        max_tokens = min(limit, room)  # a limit under 1 is refused below, naming it
        params.setdefault("ignore_eos", self.settings.ignore_eos)
        if self.settings.seed is not None:  # full_determinism: verl's request ids are stable
            params.setdefault("seed", request_seed(self.settings.seed, request_id))
        return SamplingParams.from_dict({**params, "max_tokens": max_tokens}), want_logprobs

    async def abort_all_requests(self, reject_request: bool = False) -> None:
        """End running requests now (stop reason "aborted", partial tokens kept). New ones
        wait for `resume_generation` (memory may be released and weights updated meanwhile),
        or with reject_request=True are answered at once as aborted, with no tokens (verl's
        client then sends them to another replica), as verl's vLLM server does."""
        async with self._control:
            self._admitting.clear()
            self._reject_requests = reject_request
            await asyncio.to_thread(self.engine.pause_generation, "abort")

    async def resume_generation(self) -> None:
        async with self._control:
            await asyncio.to_thread(self.engine.continue_generation)
            self._reject_requests = False
            self._admitting.set()

    # ---------------------------------------------------------------- memory

    async def wake_up(self) -> None:
        tags = ["kv_cache"] if self.settings.mode == "standalone" else None
        await asyncio.to_thread(self.engine.resume_memory, tags)

    async def sleep(self) -> None:
        """Give memory back: both weights and KV cache in hybrid mode (the weights are dropped:
        verl updates them before the next rollout) and colocated mode (kept in host memory);
        only the KV cache in standalone mode."""
        if not self.settings.free_cache_engine:
            return
        if self.settings.mode == "standalone":
            await asyncio.to_thread(self.engine.release_memory, ["kv_cache"])
        else:
            weights = "discard" if self.settings.mode == "hybrid" else "backup"
            await asyncio.to_thread(self.engine.release_memory, None, weights)

    async def resume_memory(self, tags: list[str]) -> None:
        await asyncio.to_thread(self.engine.resume_memory, tags)

    async def release_kv_cache(self) -> None:
        if self.settings.free_cache_engine:
            await asyncio.to_thread(self.engine.release_memory, ["kv_cache"])

    async def resume_kv_cache(self) -> None:
        await asyncio.to_thread(self.engine.resume_memory, ["kv_cache"])

    async def clear_kv_cache(self) -> None:
        """Drop cached prefixes (releasing the KV cache flushes it; running requests are
        recomputed afterwards, with the same results)."""
        if self.engine.memory_stats()["released"]["kv_cache"]:
            return
        await asyncio.to_thread(self.engine.release_memory, ["kv_cache"])
        await asyncio.to_thread(self.engine.resume_memory, ["kv_cache"])

    async def memory_stats(self) -> dict:
        return self.engine.memory_stats()

    # ---------------------------------------------------------------- weights

    async def weight_receiver(self) -> dict:
        """Where and what the adapter sends: the ZMQ receiver's address (bound on first use),
        the complete manifest in the engine's dtype, names that alias another tensor (a tied
        lm_head), and this node's id (same node: shared-memory or CUDA IPC handles)."""
        if self._receiver_address is None:
            address = f"tcp://{ray.util.get_node_ip_address()}:0"
            self._receiver_address = self.engine.start_weight_receiver(address)
        manifest, aliases = engine_state.weights_manifest(self.engine)
        return {"address": self._receiver_address, "manifest": [m.to_wire() for m in manifest],
                "aliases": aliases, "node_id": ray.get_runtime_context().get_node_id()}

    async def weights_checksum(self) -> str:
        return await asyncio.to_thread(self.engine.weights_checksum)

    async def weight_version(self) -> int:
        return self.engine.weight_version

    async def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    # ---------------------------------------------------------------- profiling

    async def start_profile(self, **kwargs) -> None:
        log.warning("rollout_engine has no profiler hooks; start_profile does nothing")

    async def stop_profile(self) -> None:
        pass


def _token_output(token_ids: list[int], log_probs: list[float] | None, stop_reason: str,
                  versions: list[int]) -> TokenOutput:
    return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason=stop_reason,
                       extra_fields={"global_steps": versions[-1], "min_global_steps": versions[0],
                                     "max_global_steps": versions[-1]})  # in the order they came


def request_seed(seed: int, request_id: str) -> int:
    """verl's full_determinism: a seed from the rollout seed and the request id (verl makes
    the ids stable, one per sample), so a run replays and a group's samples still differ."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
