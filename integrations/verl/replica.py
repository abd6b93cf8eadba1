"""verl's `RolloutReplica` for this engine: one engine (one server actor) per replica.

In hybrid mode (the trainer's GPUs shared with the rollout) the server actor is placed on the
node of the replica's trainer worker and sees that worker's GPU. It serves no HTTP: verl's agent
loop reaches it through `server_handle.generate`, and `server_address` only names the actor.

Options beyond verl's RolloutConfig go in `engine_kwargs.rollout_engine`: any `Engine` keyword
argument, plus `num_cpus` (the actor's CPUs, default 1) and `torch_threads` (default 1).
"""

import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.workers.config import RolloutConfig
from verl.workers.rollout.replica import RolloutReplica

from integrations.verl.names import NAME, server_name
from integrations.verl.server import RolloutEngineServer, ServerSettings

ACTOR_OPTIONS = ("num_cpus", "torch_threads")


class RolloutEngineReplica(RolloutReplica):
    def __init__(self, replica_rank: int, config: RolloutConfig, model_config,
                 gpus_per_node: int = 8, is_reward_model: bool = False,
                 is_teacher_model: bool = False, name_suffix: str = ""):
        super().__init__(replica_rank, config, model_config, gpus_per_node, is_reward_model,
                         is_teacher_model, name_suffix)
        if self.world_size != 1:
            raise ValueError(
                f"rollout_engine runs one engine per replica: set tensor_model_parallel_size, "
                f"data_parallel_size and pipeline_model_parallel_size to 1 (their product is "
                f"{self.world_size}); verl makes one replica per trainer rank")

    async def launch_servers(self) -> None:
        node_id, devices = await self._worker_placement()
        options = dict(self.config.engine_kwargs.get(NAME) or {})
        actor = {k: options.pop(k) for k in ACTOR_OPTIONS if k in options}
        role = "reward" if self.is_reward_model else "teacher" if self.is_teacher_model else ""
        name = server_name(self.replica_rank, role, self.name_suffix)
        placement = {}
        if node_id is not None:
            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        if devices is not None:  # keep the worker's GPU visible in an actor that reserves none
            placement["runtime_env"] = {
                "env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        server = ray.remote(RolloutEngineServer).options(
            name=name, max_concurrency=self.max_concurrency, num_cpus=actor.get("num_cpus", 1),
            num_gpus=0, **placement,
        ).remote(self._model_path(), self._settings(), actor.get("torch_threads", 1), devices,
                 **{**self._engine_defaults(), **options})
        address = await server.node_ip.remote()  # also waits until the engine is loaded
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{address}/{name}"

    async def _worker_placement(self) -> tuple[str | None, str | None]:
        """(node id, CUDA_VISIBLE_DEVICES) of the trainer worker this replica shares; none in
        modes without workers."""
        if not self.workers:
            return None, None
        return await self.workers[0].__ray_call__.remote(
            lambda _: (ray.get_runtime_context().get_node_id(),
                       os.environ.get("CUDA_VISIBLE_DEVICES")))

    def _model_path(self) -> str:
        return getattr(self.model_config, "local_path", None) or self.model_config.path

    def _settings(self) -> ServerSettings:
        c = self.config
        return ServerSettings(self.rollout_mode.value, c.prompt_length, c.response_length,
                              c.free_cache_engine, c.ignore_eos,
                              seed=c.seed if c.full_determinism else None)

    def _engine_defaults(self) -> dict:
        c = self.config
        return dict(dtype=c.dtype, max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
                    max_num_batched_tokens=c.max_num_batched_tokens,
                    enable_prefix_caching=c.enable_prefix_caching)
