"""integrations/verl with verl 0.9.1 itself: the plugin registers through verl's extension
points, a replica launched on Ray answers verl's generate with verl's TokenOutput, and the
trainer-side adapter runs verl's weight-sync cycle. verl's own trainer workers are not started:
the adapter runs in this test process, as it does in a trainer worker."""

import asyncio
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import ray

import weight_sync
from rollout import SamplingParams
from tests.peers import trained
from tests.ray_helpers import ENGINE_OPTIONS, local_generate, torch_threads
from tests.test_weight_sync import REPO

PROMPT = [7, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309]
VERL_PARAMS = dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)
RESPONSE_LENGTH = 8


def test_verl_finds_our_classes_through_verl_use_external_modules():
    code = ("import json; from verl.workers.rollout.base import get_rollout_class; "
            "from verl.workers.rollout.replica import get_rollout_replica_class; "
            "print(json.dumps([c.__module__ + '.' + c.__qualname__ for c in "
            "(get_rollout_class('rollout_engine'), get_rollout_replica_class('rollout_engine'))]))")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "integrations.verl",
           "VERL_USE_EXTERNAL_PLUGINS": "none"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        "integrations.verl.adapter.RolloutEngineAdapter",
        "integrations.verl.replica.RolloutEngineReplica"]


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints("llama-tied")  # a tied lm_head: verl's state_dict names it as well


@pytest.fixture(scope="module")
def verl():
    """verl's API, with our plugin registered (imported here, not when tests are collected:
    importing verl sets up logging and environment variables of its own)."""
    import integrations.verl  # noqa: F401  (registers, as VERL_USE_EXTERNAL_MODULES does)
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import TokenOutput, get_rollout_replica_class
    return SimpleNamespace(HFModelConfig=HFModelConfig, RolloutConfig=RolloutConfig,
                           get_rollout_class=get_rollout_class, TokenOutput=TokenOutput,
                           get_rollout_replica_class=get_rollout_replica_class)


@pytest.fixture(scope="module")
def configs(verl, path):
    rollout = verl.RolloutConfig(
        name="rollout_engine", dtype="float32", tensor_model_parallel_size=1, prompt_length=32,
        response_length=RESPONSE_LENGTH, ignore_eos=True,
        engine_kwargs={"rollout_engine": {**ENGINE_OPTIONS, "num_cpus": 1}})
    return rollout, verl.HFModelConfig(path=str(path))


@pytest.fixture(scope="module")
def replica(verl, configs):
    ray.init(num_cpus=2, include_dashboard=False)
    rollout, model = configs
    replica = verl.get_rollout_replica_class("rollout_engine")(
        replica_rank=0, config=rollout, model_config=model, gpus_per_node=1)
    asyncio.run(replica.init_hybrid(SimpleNamespace(workers=[])))  # what verl calls
    yield replica
    ray.shutdown()


def generate(replica, request_id: str, **params):
    return ray.get(replica.server_handle.generate.remote(
        prompt_ids=PROMPT, sampling_params={**VERL_PARAMS, **params}, request_id=request_id))


def local_engine_scores(path, tokens: list[int], temperature: float, weights=None) -> list[float]:
    from rollout import Engine
    with torch_threads(1):
        engine = Engine(str(path), **ENGINE_OPTIONS)
        if weights is not None:
            engine.update_weights(weights)
        return engine.score([PROMPT + tokens], len(PROMPT), temperature)[0]


def test_replica_answers_generate_with_verls_token_output(verl, replica, path):
    assert verl.get_rollout_replica_class("rollout_engine") is type(replica)
    assert replica.servers == [replica.server_handle] and replica.server_address

    sampled = generate(replica, "a")
    assert isinstance(sampled, verl.TokenOutput)
    assert len(sampled.token_ids) == RESPONSE_LENGTH  # no max_tokens: up to the response length
    assert sampled.stop_reason == "completed"
    assert sampled.extra_fields["global_steps"] == 0
    assert sampled.log_probs == local_engine_scores(path, sampled.token_ids, 1.0)

    greedy = generate(replica, "b", temperature=0, max_tokens=3)
    want = local_generate(path, [PROMPT], SamplingParams(temperature=0, max_tokens=3,
                                                         ignore_eos=True))[0].outputs[0]
    assert (greedy.token_ids, greedy.log_probs) == (want.token_ids, want.logprobs)
    assert generate(replica, "c", logprobs=False).log_probs is None
    with pytest.raises(ValueError, match="repetition_penalty=1.1 is not supported"):
        generate(replica, "d", repetition_penalty=1.1)


def test_abort_all_requests_returns_partial_outputs_marked_aborted(replica):
    server = replica.server_handle
    running = server.generate.remote(prompt_ids=PROMPT, request_id="long",
                                     sampling_params={**VERL_PARAMS, "max_tokens": 900})
    deadline = time.monotonic() + 60
    while not ray.get(server.__ray_call__.remote(lambda actor: actor.engine.scheduler.running)):
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    asyncio.run(replica.abort_all_requests())
    out = ray.get(running)
    assert out.stop_reason == "aborted" and 0 < len(out.token_ids) < 900
    assert len(out.log_probs) == len(out.token_ids)
    asyncio.run(replica.resume_generation())
    assert generate(replica, "after").stop_reason == "completed"


def cached_tokens(server, prompt: list[int]) -> int:
    """Prefix-cache hits of one more request (asked of the engine in the server actor)."""
    from rollout import SamplingParams
    return ray.get(server.__ray_call__.remote(lambda actor: actor.engine.generate(
        [prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0].outputs[0].cached_tokens))


def test_kv_cache_calls_release_resume_and_clear_it(replica):
    server, prompt = replica.server_handle, list(range(100, 180))
    cached_tokens(server, prompt)
    assert cached_tokens(server, prompt) == 64  # two full blocks came from the cache
    asyncio.run(replica.clear_kv_cache())
    assert cached_tokens(server, prompt) == 0
    asyncio.run(replica.release_kv_cache())
    stats = ray.get(server.memory_stats.remote())
    assert stats["kv_cache"] == 0 and stats["weights"] > 0
    asyncio.run(replica.resume_kv_cache())
    assert ray.get(server.memory_stats.remote())["kv_cache"] > 0
    assert generate(replica, "after").stop_reason == "completed"


def test_a_tensor_the_engine_lacks_fails_the_update_by_name_and_changes_nothing(
        verl, replica, configs, path):
    rollout, model_config = configs
    adapter = verl.get_rollout_class("rollout_engine")(config=rollout, model_config=model_config,
                                                       device_mesh=None, replica_rank=0)
    server = replica.server_handle
    before = ray.get([server.weights_checksum.remote(), server.weight_version.remote()])
    state = trained(path, 40).state_dict()
    bad = [("model.not_a_layer.weight", next(iter(state.values())))] + list(state.items())
    with pytest.raises(ValueError, match="sent 'model.not_a_layer.weight', which the rollout "
                                         "engine's model does not have"):
        asyncio.run(adapter.update_weights(iter(bad), global_steps=40))
    assert ray.get([server.weights_checksum.remote(), server.weight_version.remote()]) == before
    assert generate(replica, "still-serving").stop_reason == "completed"


def test_tensors_the_conversion_would_hide_are_refused_and_no_steps_keep_the_version(
        verl, replica, configs, path):
    """The adapter casts to the engine's dtypes: an integer tensor, or a name sent twice, must
    be refused before the cast hides them; an update without global_steps keeps the label
    (as verl's vLLM and SGLang servers do)."""
    rollout, model_config = configs
    adapter = verl.get_rollout_class("rollout_engine")(config=rollout, model_config=model_config,
                                                       device_mesh=None, replica_rank=0)
    server = replica.server_handle
    before = ray.get([server.weights_checksum.remote(), server.weight_version.remote()])
    state = list(trained(path, 41).state_dict().items())
    name, tensor = state[0]
    for bad, message in [([(name, tensor.long())] + state[1:], "is not a floating-point type"),
                         ([(name, tensor), (name, tensor * 0)] + state[1:], "sent .* twice")]:
        with pytest.raises(ValueError, match=message):
            asyncio.run(adapter.update_weights(iter(bad), global_steps=41))
        assert ray.get([server.weights_checksum.remote(),
                        server.weight_version.remote()]) == before
    asyncio.run(adapter.update_weights(iter(state), global_steps=None))
    assert ray.get(server.weight_version.remote()) == before[1]
    with pytest.raises(ValueError, match="prompt token 0 is 7.5"):
        ray.get(server.generate.remote(prompt_ids=[7.5, 8], request_id="floats",
                                       sampling_params=dict(VERL_PARAMS)))


def pointers(server) -> list[int]:
    return ray.get(server.__ray_call__.remote(
        lambda actor: [p.data_ptr() for p in actor.engine.runner.model.parameters()]))


def test_weight_sync_cycle_runs_twice(verl, replica, configs, path):
    rollout, model_config = configs
    adapter = verl.get_rollout_class("rollout_engine")(config=rollout, model_config=model_config,
                                                  device_mesh=None, replica_rank=0)
    server = replica.server_handle

    async def cycle(step: int, model):
        await adapter.resume(tags=["weights"])
        before = pointers(server)
        state = model.state_dict()  # what verl's FSDP engine yields (lm_head.weight included)
        assert "lm_head.weight" in state
        await adapter.update_weights(((n, t) for n, t in state.items()), peft_config=None,
                                     base_sync_done=True, global_steps=step)
        assert pointers(server) == before  # loaded in place
        assert (await server.weights_checksum.remote()
                == weight_sync.checksum(model.named_parameters()))
        await adapter.resume(tags=["kv_cache"])
        out = await server.generate.remote(prompt_ids=PROMPT, request_id=f"step-{step}",
                                           sampling_params=dict(VERL_PARAMS))
        await (replica.sleep() if step == 1 else adapter.release())
        return out

    for step in (1, 2):
        model = trained(path, 30 + step)
        out = asyncio.run(cycle(step, model))
        assert out.extra_fields["global_steps"] == step and out.stop_reason == "completed"
        assert out.log_probs == local_engine_scores(path, out.token_ids, 1.0,
                                                    model.named_parameters())
        stats = ray.get(server.memory_stats.remote())
        assert stats["weights"] == 0 and stats["kv_cache"] == 0  # asleep
    assert ray.get(server.weight_version.remote()) == 2


async def yielded_by_an_async_generator(model):
    """What verl's checkpoint engines other than "naive" (nccl, nixl, ...) hand the adapter."""
    for name, tensor in model.state_dict().items():
        await asyncio.sleep(0)
        yield name, tensor


def test_a_request_arriving_while_a_replica_is_out_waits_for_resume_generation(
        verl, replica, configs, path):
    """verl re-sends requests it aborted for a weight sync (and a load balancer may route one
    to a replica just taken out): between abort_all_requests and resume_generation they wait,
    memory released and weights updated meanwhile, then run on the new weights. The update
    comes from an async generator, as verl's nccl checkpoint engine yields it."""
    rollout, model_config = configs
    adapter = verl.get_rollout_class("rollout_engine")(config=rollout, model_config=model_config,
                                                       device_mesh=None, replica_rank=0)
    asyncio.run(replica.wake_up())
    asyncio.run(replica.abort_all_requests())
    asyncio.run(replica.sleep())  # hybrid: weights dropped, KV cache given back
    late = replica.server_handle.generate.remote(prompt_ids=PROMPT, request_id="late",
                                                 sampling_params=dict(VERL_PARAMS))
    ready, _ = ray.wait([late], timeout=1.0)
    assert not ready, ray.get(late)  # waiting, not refused for the released memory
    model = trained(path, 60)

    async def activate():
        await adapter.resume(tags=["weights"])
        await adapter.update_weights(yielded_by_an_async_generator(model), global_steps=60)
        await adapter.resume(tags=["kv_cache"])
        await replica.resume_generation()
    asyncio.run(activate())
    out = ray.get(late)
    assert out.stop_reason == "completed" and out.extra_fields["global_steps"] == 60
    assert out.log_probs == local_engine_scores(path, out.token_ids, 1.0,
                                                model.named_parameters())


def test_abort_all_requests_with_reject_request_answers_new_requests_aborted(replica):
    """verl's client sends a request answered aborted with no tokens to another replica (as
    verl's vLLM server answers while it rejects); raising failed the trajectory."""
    asyncio.run(replica.abort_all_requests(reject_request=True))
    rejected = generate(replica, "rejected")
    assert (rejected.token_ids, rejected.log_probs, rejected.stop_reason) == ([], None, "aborted")
    assert rejected.extra_fields["global_steps"] == 60
    asyncio.run(replica.resume_generation())
    assert generate(replica, "admitted").stop_reason == "completed"


def test_full_determinism_seeds_each_request_from_the_rollout_seed_and_its_id(verl, path):
    """verl's rollout.full_determinism (its request ids are then stable, one per sample): a
    run replays, and the samples of a group (other ids) still differ."""
    from verl.workers.rollout.replica import RolloutMode

    from integrations.verl.server import RolloutEngineServer, ServerSettings
    config = verl.RolloutConfig(name="rollout_engine", tensor_model_parallel_size=1,
                                prompt_length=32, response_length=8, full_determinism=True,
                                seed=7)
    replica = verl.get_rollout_replica_class("rollout_engine")(
        replica_rank=0, config=config, model_config=verl.HFModelConfig(path=str(path)),
        gpus_per_node=1)
    replica.rollout_mode = RolloutMode.HYBRID  # set by init_hybrid
    assert replica._settings().seed == 7

    def sampled(seed: int | None, request_id: str) -> list[int]:
        settings = ServerSettings("hybrid", 32, RESPONSE_LENGTH, ignore_eos=True, seed=seed)
        server = RolloutEngineServer(str(path), settings, **ENGINE_OPTIONS)
        return asyncio.run(server.generate(PROMPT, dict(VERL_PARAMS), request_id)).token_ids

    with torch_threads(1):
        assert sampled(42, "det-0") == sampled(42, "det-0")
        assert sampled(42, "det-0") != sampled(42, "det-1")
        assert sampled(42, "det-0") != sampled(43, "det-0")
        assert sampled(None, "det-0") != sampled(None, "det-0")  # random seeds otherwise


def test_an_abort_that_comes_while_a_resume_runs_is_the_one_that_holds(path):
    """resume_generation opened the gate (and stopped rejecting) after its engine call
    returned, past an abort_all_requests(reject_request=True) that came meanwhile: a new
    request went into the paused engine and waited instead of being sent elsewhere."""
    from integrations.verl.server import RolloutEngineServer, ServerSettings

    async def race():
        settings = ServerSettings("hybrid", 32, RESPONSE_LENGTH, ignore_eos=True)
        server = RolloutEngineServer(str(path), settings, **ENGINE_OPTIONS)
        await server.abort_all_requests()
        await asyncio.gather(server.resume_generation(),
                             server.abort_all_requests(reject_request=True))
        rejected = await asyncio.wait_for(server.generate(PROMPT, dict(VERL_PARAMS), "a"), 10)
        await server.resume_generation()
        return rejected, await server.generate(PROMPT, dict(VERL_PARAMS), "b")

    with torch_threads(1):
        rejected, admitted = asyncio.run(race())
    assert (rejected.token_ids, rejected.stop_reason) == ([], "aborted")
    assert admitted.stop_reason == "completed"
