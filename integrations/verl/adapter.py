"""verl's trainer-side rollout (its "ServerAdapter"): runs in each trainer worker and drives
that worker's replica server: resume, release, and weight updates streamed from verl's
generator of `(name, tensor)` into the engine's weights in place, over our ZMQ transport.

The engine's update is a transaction that names every tensor before the first byte lands; the
server gives the full manifest (its tensors, in its dtype) up front, so the generator is sent
bucket by bucket as it yields, never held whole.
"""

import contextlib
import os
from collections.abc import AsyncIterable, Iterable

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.utils import ensure_async_iterator

from integrations.verl.names import server_name
from weight_sync import TensorMeta, WeightUpdateError, ZmqWeightSender, plan_buckets
from weight_sync.buckets import dtype_from_name


class RolloutEngineAdapter(BaseRollout):
    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        if replica_rank < 0:  # one replica per trainer rank (a replica is one engine)
            replica_rank = int(os.environ.get("RANK", "0"))
        self.replica_rank = replica_rank
        self._server = None

    @property
    def server(self) -> ray.actor.ActorHandle:
        if self._server is None:  # started by the replica, after this adapter
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        """Take back "weights" (empty after a hybrid sleep: an update must follow) and/or
        "kv_cache"."""
        if self.config.free_cache_engine:
            await self.server.resume_memory.remote(list(tags))

    async def release(self) -> None:
        if self.config.free_cache_engine:
            await self.server.sleep.remote()

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                             | AsyncIterable[tuple[str, torch.Tensor]],
                             wire_format: str = "named_tensors", global_steps: int | None = None,
                             peft_config=None, base_sync_done: bool = True, **kwargs) -> None:
        """Load the trainer's weights into the engine in place; `global_steps` becomes the
        weight version every later output reports (None keeps the current one, as verl's
        vLLM and SGLang servers do). `weights` is a generator, or an async one (what verl's
        checkpoint engines other than "naive" yield)."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"rollout_engine takes full tensors "
                                      f"(wire_format='named_tensors'), not {wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError("rollout_engine loads full weights, not LoRA adapters: set "
                                      "actor_rollout_ref.model.lora.merge=True")
        if global_steps is None:
            global_steps = await self.server.weight_version.remote()
        target = await self.server.weight_receiver.remote()
        same_node = target["node_id"] == ray.get_runtime_context().get_node_id()
        bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        manifest = [TensorMeta.from_wire(m) for m in target["manifest"]]
        await stream_weights(target["address"], manifest, set(target["aliases"]), weights,
                             global_steps, mode="handle" if same_node else "bytes",
                             bucket_bytes=bucket_bytes)


async def stream_weights(address: str, manifest: list[TensorMeta], aliases: set[str],
                         weights: Iterable[tuple[str, torch.Tensor]]
                         | AsyncIterable[tuple[str, torch.Tensor]],
                         version: int | None, mode: str, bucket_bytes: int) -> int:
    """Open an update for the whole `manifest`, then send the tensors in the order `weights`
    yields them, converted to the engine's dtypes and copied as they come (verl may hand out
    views of storage it changes once the generator ends), a bucket at a time. Names in
    `aliases` are skipped (the same storage arrives under its main name). A tensor the engine
    does not have, or one that never arrives, fails the update; the engine then refuses to
    generate until a complete update lands. Returns the engine's new version."""
    dtypes = {m.name: dtype_from_name(m.dtype) for m in manifest}
    shapes = {m.name: tuple(m.shape) for m in manifest}
    seen: set[str] = set()
    with ZmqWeightSender(address, mode=mode, bucket_bytes=bucket_bytes) as sender:
        sender.begin({m.name: torch.empty(m.shape, dtype=dtypes[m.name], device="meta")
                      for m in manifest}, version)
        try:
            bucket: dict[str, torch.Tensor] = {}
            size = 0
            async for name, tensor in ensure_async_iterator(weights):
                if name in aliases:
                    continue
                if name not in dtypes:
                    raise ValueError(f"the trainer sent {name!r}, which the rollout engine's "
                                     f"model does not have (it has {len(dtypes)} tensors, e.g. "
                                     f"{sorted(dtypes)[:3]})")
                _check(name, tensor, shapes[name], seen)
                bucket[name] = tensor.detach().to(dtypes[name], copy=True)
                size += bucket[name].nbytes
                if size >= bucket_bytes:
                    _send_bucket(sender, bucket)
                    bucket, size = {}, 0
            _send_bucket(sender, bucket)
        except BaseException:
            with contextlib.suppress(WeightUpdateError):
                sender.commit()  # closes the engine's transaction now, as broken
            raise
        return sender.commit()


def _check(name: str, tensor: torch.Tensor, shape: tuple, seen: set[str]) -> None:
    """What the engine checks of a manifest, for tensors the conversion above would hide: an
    integer tensor cast to floats, a name sent twice (the second overwrote the first)."""
    if name in seen:
        raise ValueError(f"the trainer sent {name!r} twice")
    seen.add(name)
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: dtype {tensor.dtype} is not a floating-point type")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the rollout engine's model has "
                         f"{shape}")


def _send_bucket(sender: ZmqWeightSender, bucket: dict[str, torch.Tensor]) -> None:
    if bucket:
        (metas,) = plan_buckets([TensorMeta.of(n, t) for n, t in bucket.items()], 1 << 62)
        sender.send_bucket(bucket, metas)
