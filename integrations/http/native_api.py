"""SGLang's native endpoints: what slime, SGLang's router and slime's launcher call.

Weight and memory calls answer `{"success": bool, "message": str}`, with a 4xx on failure.
"""

import asyncio
import dataclasses
import gc
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from integrations.http import tensor_payload
from integrations.http.generate import generate
from integrations.http.protocol import (AbortRequest, DestroyGroupRequest, GenerateRequest,
                                        InitGroupRequest, MemoryRequest, PauseRequest,
                                        WeightsFromDiskRequest, WeightsFromDistributedRequest,
                                        WeightsFromTensorRequest, WeightVersionRequest)
from integrations.http.server import ApiError, Server, engine_errors
from rollout import SamplingParams

HEALTH_TIMEOUT_S = 20.0
PER_TENSOR = 1  # bucket size that makes every tensor its own broadcast, as SGLang receives them


async def server_of(request: Request) -> Server:
    # async: a sync dependency takes a worker thread of the pool that engine calls wait in
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]
router = APIRouter()


def ok(message: str, **extra) -> dict:
    return {"success": True, "message": message, **extra}


# ---------------------------------------------------------------------- generation

@router.api_route("/generate", methods=["POST", "PUT"], tags=["generation"])
async def generate_route(req: GenerateRequest, server: ServerDep, request: Request):
    """Generate for `input_ids` or `text` (one prompt, or a batch)."""
    return await generate(server, req, request)


@router.post("/abort_request", tags=["generation"])
async def abort_request(req: AbortRequest, server: ServerDep):
    """Abort one request by `rid`, or all: they return their partial output (finish "abort").
    A rid not in flight (finished already, or never sent) aborts nothing and answers 200, as
    SGLang's does: a client's abort racing its request's end is no error."""
    count = await server.abort(None if req.abort_all else req.rid)
    if not req.abort_all and not count:
        return ok(f"no request {req.rid!r} is in flight: nothing aborted", aborted=0)
    return ok(f"aborted {count} request(s)", aborted=count)


@router.get("/v1/loads", tags=["generation"])
async def loads(server: ServerDep):
    return {"loads": [server.loads()]}


@router.post("/pause_generation", tags=["generation"])
async def pause_generation(server: ServerDep, req: PauseRequest | None = None):
    """Stop generating; in-flight requests are aborted, retracted (recomputed later) or kept
    in place. New requests wait for /continue_generation."""
    mode = (req or PauseRequest()).mode
    await server.pause(mode)
    return ok(f"generation paused (mode {mode})", status="ok")


@router.post("/continue_generation", tags=["generation"])
async def continue_generation(server: ServerDep):
    await server.resume()
    return ok("generation continued", status="ok")


@router.api_route("/flush_cache", methods=["GET", "POST"], tags=["generation"])
async def flush_cache(server: ServerDep):
    """Drop every cached prefix."""
    await server.flush_cache()
    return ok("cache flushed")


# ---------------------------------------------------------------------- weights

@router.post("/update_weights_from_tensor", tags=["weights"])
async def update_weights_from_tensor(req: WeightsFromTensorRequest, server: ServerDep):
    """Tensors by handle from a trainer on this host (a flattened bucket, or (name, tensor)
    pairs with load_format null); one transaction per call."""
    if req.abort_all_requests:
        await server.abort()
    with engine_errors():
        try:
            count, new = await run_in_threadpool(_load_tensors, server.engine,
                                                 req.serialized_named_tensors[0],
                                                 req.load_format, req.weight_version)
        except tensor_payload.PayloadError as e:
            raise ApiError(400, f"serialized_named_tensors[0]: {e}",
                           "serialized_named_tensors") from None
    return ok(f"updated {count} tensors to weight version {new}")


def _load_tensors(engine, serialized: str, load_format: str | None, version):
    """Decode and load in one call that lets go of the sender's tensors (views of its shared
    memory) before it returns, refused or not. A refusal's exception holds them through its
    traceback's frames (and their closures) until the garbage collector runs, and if the
    sender's shared-memory manager was gone by then, freeing them aborted this process: only
    the refusal's message leaves this call, after a collection."""
    try:
        pairs = tensor_payload.decode(serialized, load_format)
        return len(pairs), engine.update_weights(pairs, version)
    except Exception as e:
        kind, message = type(e), str(e)
    pairs = None
    gc.collect()
    for base in (tensor_payload.PayloadError, ValueError, RuntimeError):
        if issubclass(kind, base):
            raise base(message)
    raise RuntimeError(f"{kind.__name__}: {message}")


@router.post("/init_weights_update_group", tags=["weights"])
async def init_weights_update_group(req: InitGroupRequest, server: ServerDep):
    """Join the trainer's process group (blocks until every member joined)."""
    await server.call(server.engine.init_weights_update_group, req.master_address,
                      req.master_port, req.rank_offset, req.world_size, req.group_name,
                      req.backend)
    return ok(f"joined weight update group {req.group_name!r} as rank {req.rank_offset}")


@router.post("/update_weights_from_distributed", tags=["weights"])
async def update_weights_from_distributed(req: WeightsFromDistributedRequest,
                                          server: ServerDep):
    """Receive the trainer's broadcasts of these tensors, one per tensor, in listed order."""
    if req.abort_all_requests:
        await server.abort()
    new = await server.call(server.engine.update_weights_from_distributed, req.names,
                            req.dtypes, req.shapes, req.group_name, req.weight_version,
                            bucket_bytes=PER_TENSOR)
    return ok(f"updated {len(req.names)} tensors to weight version {new}")


@router.post("/destroy_weights_update_group", tags=["weights"])
async def destroy_weights_update_group(req: DestroyGroupRequest, server: ServerDep):
    await server.call(server.engine.destroy_weights_update_group, req.group_name)
    return ok(f"left weight update group {req.group_name!r}")


@router.post("/update_weights_from_disk", tags=["weights"])
async def update_weights_from_disk(req: WeightsFromDiskRequest, server: ServerDep):
    """Load a safetensors checkpoint directory into the existing weights."""
    if req.abort_all_requests:
        await server.abort()
    new = await server.call(server.engine.update_weights_from_disk, req.model_path,
                            req.weight_version)
    return ok(f"loaded {req.model_path} as weight version {new}", num_paused_requests=0)


@router.get("/get_weight_version", tags=["weights"])
async def get_weight_version(server: ServerDep):
    return {"weight_version": str(server.engine.weight_version)}


@router.post("/update_weight_version", tags=["weights"])
async def update_weight_version(req: WeightVersionRequest, server: ServerDep):
    """Name the current weights without changing them."""
    if req.abort_all_requests:
        await server.abort()
    await server.call(server.engine.weights.relabel, req.new_version)
    return ok(f"weight version is now {req.new_version}", new_version=req.new_version)


# ---------------------------------------------------------------------- memory

@router.api_route("/release_memory_occupation", methods=["GET", "POST"], tags=["memory"])
async def release_memory_occupation(server: ServerDep, req: MemoryRequest | None = None):
    """Give memory back (tags: weights, kv_cache; none: all). Requests in flight are
    retracted and resume after the memory comes back."""
    tags = (req or MemoryRequest()).engine_tags()
    if tags != []:
        await server.call(server.engine.release_memory, tags)
    return ok(f"released {_what(tags)}")


@router.api_route("/resume_memory_occupation", methods=["GET", "POST"], tags=["memory"])
async def resume_memory_occupation(server: ServerDep, req: MemoryRequest | None = None):
    tags = (req or MemoryRequest()).engine_tags()
    if tags != []:
        await server.call(server.engine.resume_memory, tags)
    return ok(f"resumed {_what(tags)}")


def _what(tags: list[str] | None) -> str:
    return "all memory" if tags is None else ", ".join(tags) or "nothing (no engine memory tag)"


# ---------------------------------------------------------------------- probes and info

@router.get("/health", tags=["info"])
async def health():
    return {}


@router.get("/health_generate", tags=["info"])
async def health_generate(server: ServerDep):
    """One greedy token, or (as SGLang's) any engine step completed meanwhile: a probe queued
    behind a busy engine's requests must not fail a healthy server (slime's fault tolerance
    kills engines whose probe fails). 503 when the engine cannot generate now (paused,
    released, weights incomplete)."""
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=False)
    stats = server.engine.scheduler.stats
    steps, deadline = stats.steps, asyncio.get_running_loop().time() + HEALTH_TIMEOUT_S
    probe = asyncio.ensure_future(server.generate([0], params, None))
    try:
        while not probe.done():
            if stats.steps > steps + 1:  # a step began and ended after the probe arrived
                return {}
            if asyncio.get_running_loop().time() > deadline:
                raise ApiError(503, f"no token within {HEALTH_TIMEOUT_S:g} s (generation "
                                    "paused?)")
            await asyncio.wait({probe}, timeout=0.02)
        probe.result()
    except ApiError as e:
        raise ApiError(503, e.message if e.status == 503 else f"cannot generate: {e.message}") \
            from None
    finally:
        probe.cancel()  # still queued: aborted, its rid let go
    return {}


@router.get("/model_info", tags=["info"])
@router.get("/get_model_info", tags=["info"])
async def model_info(server: ServerDep):
    engine = server.engine
    return {"model_path": engine.config.model, "tokenizer_path": engine.tokenizer_path,
            "is_generation": True, "preferred_sampling_params": None,
            "weight_version": str(engine.weight_version),
            "model_type": engine.model_config.architecture,
            "architectures": [engine.model_config.architecture],
            "has_image_understanding": False, "has_audio_understanding": False}


@router.get("/server_info", tags=["info"])
@router.get("/get_server_info", tags=["info"])
async def server_info(server: ServerDep):
    engine, config = server.engine, server.engine.config
    return {
        "model_path": config.model, "tokenizer_path": engine.tokenizer_path,
        "served_model_name": server.model_name,
        "tp_size": 1, "dp_size": 1, "pp_size": 1, "ep_size": 1, "disaggregation_mode": "null",
        "encoder_only": False,
        "enable_memory_saver": True, "skip_tokenizer_init": engine.tokenizer is None,
        "dtype": str(engine.runner.dtype).removeprefix("torch."), "device": config.device,
        "weight_version": str(engine.weight_version),
        "context_length": engine.max_model_len, "max_req_input_len": engine.max_model_len - 1,
        "max_running_requests": config.max_num_seqs,
        "max_total_num_tokens": engine.block_manager.num_blocks * config.block_size,
        "page_size": config.block_size, "chunked_prefill_size": config.max_num_batched_tokens,
        "deterministic": config.deterministic, "memory": engine.memory_stats(),
        "threads": engine.determinism_report().threads,  # batch_invariant_mode(expect=...)
        "scheduler": dataclasses.asdict(engine.scheduler.stats),  # steps, tokens since start
        "version": package_version(),
    }


def package_version() -> str:
    try:
        return version("rollout-engine")
    except PackageNotFoundError:
        return "unknown"
