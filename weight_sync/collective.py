"""Collective transport: a process group spanning trainer rank 0 and the engine ranks, made on
demand (NCCL on GPU, gloo on CPU) without touching the default process group of either side.
The trainer broadcasts flat buckets; both sides plan the same buckets from the same manifest."""

import datetime
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from weight_sync.buckets import (DEFAULT_BUCKET_BYTES, TensorMeta, bucket_size, pack,
                                 plan_buckets, unpack)

BACKENDS = ("gloo", "nccl")


def _group_store(store: dist.Store, group_name: str, backend: str) -> dist.Store:
    """The keys torch's own group creation uses for a named group rendezvousing at a tcp://
    address (how SGLang and slime make this group), so either end may be theirs."""
    device = "cuda" if backend == "nccl" else "cpu"
    return dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/",
                                                           dist.PrefixStore(group_name, store)))


class WeightUpdateGroup:
    """One member of a weight-update group. Rank 0 is the trainer and hosts the rendezvous."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str, backend: str = "gloo", timeout_s: float = 300.0):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of world_size {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                              timeout=timeout)
        self.store = _group_store(store, group_name, backend)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        else:
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size)
        self.rank, self.world_size, self.group_name, self.backend = (rank, world_size,
                                                                     group_name, backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
             bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[TensorMeta]:
        """Trainer side (rank 0): broadcast every tensor, bucket by bucket. Engines must call
        `receive` with the same manifest (names, dtypes, shapes) and bucket size."""
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends; this member is rank {self.rank}")
        named = {n: t.detach() for n, t in named_tensors}
        manifest = [TensorMeta.of(n, t) for n, t in named.items()]
        for metas in plan_buckets(manifest, bucket_bytes):
            self._broadcast(pack(named, metas, torch.empty(bucket_size(metas), dtype=torch.uint8,
                                                           device=self.device)))
        return manifest

    def receive(self, manifest: list[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES
                ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Engine side: yields each received bucket's tensors (views, valid until the next)."""
        for metas in plan_buckets(manifest, bucket_bytes):
            buf = torch.empty(bucket_size(metas), dtype=torch.uint8, device=self.device)
            self._broadcast(buf)
            yield list(unpack(buf, metas))

    def destroy(self) -> None:
        self.pg = None
        self.store = None
