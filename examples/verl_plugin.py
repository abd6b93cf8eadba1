"""The engine as a verl rollout: the plugin loads through VERL_USE_EXTERNAL_MODULES, then this
script makes the calls verl's trainer makes in one step of hybrid (colocated) training:

    replica.init_hybrid(...)             launch the engine's server actor
    rollout.resume(["weights"])          take the weights' memory back
    rollout.update_weights(generator)    the trainer's (name, tensor) pairs, loaded in place
    rollout.resume(["kv_cache"])
    server.generate(prompt_ids, ...)     what verl's agent loop sends, per sample
    replica.sleep()                      give the memory back for training

Runs on the CPU with the small built-in preset:

    pip install -e ".[verl]"
    python examples/verl_plugin.py

In a verl run, set VERL_USE_EXTERNAL_MODULES=integrations.verl and
actor_rollout_ref.rollout.name=rollout_engine; verl then makes these calls itself.
"""

import argparse
import asyncio
import os
from types import SimpleNamespace

import ray
import torch
import transformers

import weight_sync
from rollout.presets import preset_path


async def one_step(replica, rollout, model, step: int) -> None:
    server = replica.server_handle
    await rollout.resume(tags=["weights"])
    await rollout.update_weights(iter(model.state_dict().items()), global_steps=step)
    same = (await server.weights_checksum.remote()
            == weight_sync.checksum(model.named_parameters()))
    await rollout.resume(tags=["kv_cache"])
    out = await server.generate.remote(
        prompt_ids=[1, 2, 3, 4, 5, 6], request_id=f"step-{step}",
        sampling_params=dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                             logprobs=True))
    await replica.sleep()
    print(f"step {step}: weights loaded (checksum equals the trainer's: {same}); generated "
          f"{len(out.token_ids)} tokens with {len(out.log_probs)} log-probs, stop reason "
          f"{out.stop_reason}, global_steps {out.extra_fields['global_steps']}; asleep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: small preset)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    path = args.model or str(preset_path("qwen3-tiny-random"))

    os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "integrations.verl")  # before verl loads
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class
    print(f"verl resolves rollout_engine to {get_rollout_class('rollout_engine').__name__} and "
          f"{get_rollout_replica_class('rollout_engine').__name__}")

    ray.init(num_cpus=2, include_dashboard=False)
    config = RolloutConfig(name="rollout_engine", dtype="float32", tensor_model_parallel_size=1,
                           prompt_length=64, response_length=16)
    model_config = HFModelConfig(path=path)
    replica = get_rollout_replica_class("rollout_engine")(
        replica_rank=0, config=config, model_config=model_config, gpus_per_node=1)
    # verl passes its trainer workers (the server joins the first one's node); here: none
    asyncio.run(replica.init_hybrid(SimpleNamespace(workers=[])))
    rollout = get_rollout_class("rollout_engine")(config=config, model_config=model_config,
                                                  device_mesh=None, replica_rank=0)

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for step in range(1, args.steps + 1):
        with torch.no_grad():  # stands in for a training step
            for p in model.parameters():
                p.mul_(0.99)
        asyncio.run(one_step(replica, rollout, model, step))
    ray.shutdown()


if __name__ == "__main__":
    main()
