"""ZMQ transport: a msgpack header plus raw tensor frames, one bucket per request.

The trainer's `ZmqWeightSender` (REQ) talks to the engine's `ZmqWeightReceiver` (ROUTER):
`begin` carries the full manifest, which the engine validates before any byte lands; each
`bucket` carries its bytes as a zero-copy frame ("bytes" mode) or, on one host, only a handle
("handle" mode: a shared-memory segment on the CPU, a CUDA IPC handle on GPU); `commit` ends
the transaction. Every request is answered, so errors reach the sender as exceptions.

A receiver takes only messages that carry its token, a secret drawn when it binds (or given in
the address it binds): it reports its address as "tcp://host:port#token=<hex>", and a sender
given that address sends the token with every message. A peer that can reach the port without
the address (another host, when the receiver binds a node's address for Ray) is refused before
its message is read further, and an update open from the trainer stays open.
"""

import hmac
import pickle
import secrets
import threading
import time
import warnings
from collections.abc import Iterable
from multiprocessing import resource_tracker, shared_memory
from typing import Protocol

import msgpack
import torch
import zmq
from torch.multiprocessing import reductions

from weight_sync import safe_pickle
from weight_sync.buckets import (DEFAULT_BUCKET_BYTES, TensorMeta, bucket_size, pack,
                                 plan_buckets, unpack)

MODES = ("bytes", "handle")
TOKEN_MARK = "#token="


def split_address(address: str) -> tuple[str, str | None]:
    """(the ZMQ endpoint, the receiver's token or None) of a receiver's address."""
    endpoint, mark, token = address.partition(TOKEN_MARK)
    if mark and not token:
        raise ValueError(f"address {endpoint}{TOKEN_MARK}... has an empty token")
    return endpoint, token if mark else None


class WeightSink(Protocol):
    """What a receiver drives: the engine's transactional in-place loader."""

    def begin(self, version: int | str | None, manifest: list[TensorMeta]) -> None: ...
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...
    def commit(self) -> int | str: ...
    def abort(self, reason: str) -> None: ...


class WeightUpdateError(RuntimeError):
    """The engine refused or failed an update; the message says why."""


class _Slot:
    """One staging buffer for a bucket: a shared-memory segment in CPU handle mode."""

    def __init__(self, size: int, device: torch.device, shared: bool):
        self.shm = shared_memory.SharedMemory(create=True, size=max(size, 1)) if shared else None
        if shared:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.buffer = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=size)
        else:
            pinned = device.type == "cpu" and torch.cuda.is_available()
            self.buffer = torch.empty(size, dtype=torch.uint8, device=device, pin_memory=pinned)

    def close(self) -> None:
        if self.shm is not None:
            del self.buffer
            self.shm.close()
            self.shm.unlink()


class ZmqWeightSender:
    """Trainer side. Buckets are pipelined: the next one is packed into a second staging
    buffer while the engine loads the previous one."""

    def __init__(self, address: str, mode: str = "bytes",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.bucket_bytes, self.timeout_s = mode, bucket_bytes, timeout_s
        endpoint, self._token = split_address(address)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # an identity of its own: the receiver knows this sender again after a reconnect
        self._sock.setsockopt(zmq.ROUTING_ID, b"s" + secrets.token_bytes(15))
        self._sock.connect(endpoint)
        self._slots: list[_Slot] = []
        self._busy: _Slot | None = None
        self._sent = 0
        self._in_flight = False
        self._shared: shared_memory.SharedMemory | None = None
        self._shared_offsets: dict[str, tuple[int, int]] = {}  # name -> (data_ptr, offset)

    def _send(self, header: dict, frames: list = ()) -> None:
        if self._token is not None:
            header = {**header, "token": self._token}
        self._sock.send_multipart([b"", msgpack.packb(header), *frames], copy=False)
        self._in_flight = True

    def _reply(self) -> dict:
        if not self._sock.poll(int(self.timeout_s * 1000)):
            raise WeightUpdateError(f"the engine did not answer within {self.timeout_s:g} s")
        _, raw = self._sock.recv_multipart()
        self._in_flight = False
        reply = msgpack.unpackb(raw)
        if not reply.get("ok"):
            raise WeightUpdateError(reply.get("error", "the engine refused the update"))
        return reply

    def _request(self, header: dict) -> dict:
        if self._in_flight:
            self._reply()
        self._send(header)
        return self._reply()

    def _slot(self, size: int, device: torch.device) -> _Slot:
        shared = self.mode == "handle" and device.type == "cpu"
        # two slots overlap packing with the engine's load; on CPU handle mode both copies
        # compete for the same memory bandwidth, and one slot measured faster
        index = 0 if shared else self._sent % 2
        while len(self._slots) <= index:
            self._slots.append(None)
        slot = self._slots[index]
        if slot is None or slot.buffer.numel() < size or slot.buffer.device != device:
            if slot is not None:
                if self._in_flight and slot is self._busy:
                    self._reply()  # the engine may not have mapped this segment yet
                slot.close()
            slot = self._slots[index] = _Slot(size, device, shared)
        return slot

    def share(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Handle mode on the CPU: move these tensors' storage into one shared-memory segment
        (each tensor object stays the same; its data becomes a view of the segment), so later
        updates cost the engine a single copy and the sender none. Done once, before training
        continues; in-place optimizer steps keep the tensors in the segment."""
        if self.mode != "handle":
            raise ValueError("share() is for mode='handle'")
        named = dict(named_tensors)
        if any(t.device.type != "cpu" for t in named.values()):
            raise ValueError("share() places CPU tensors in shared memory; GPU tensors already "
                             "travel as CUDA IPC handles")
        (metas,) = plan_buckets([TensorMeta.of(n, t) for n, t in named.items()],
                                bucket_bytes=1 << 62)
        self._shared = shared_memory.SharedMemory(create=True, size=max(bucket_size(metas), 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segment = torch.frombuffer(self._shared.buf, dtype=torch.uint8,
                                       count=bucket_size(metas))
        pack(named, metas, segment)
        for (name, view), m in zip(unpack(segment, metas), metas):
            named[name].data = view
            self._shared_offsets[name] = (view.data_ptr(), m.offset)

    def _shared_metas(self, named: dict[str, torch.Tensor], metas: list[TensorMeta]):
        """Wire metas pointing into the shared segment, if every tensor still lives there."""
        if self._shared is None:
            return None
        out = []
        for m in metas:
            ptr, offset = self._shared_offsets.get(m.name, (None, None))
            if ptr is None or named[m.name].data_ptr() != ptr:
                return None
            out.append(TensorMeta(m.name, m.dtype, m.shape, offset).to_wire())
        return out

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
             version: int | str | None = None) -> int | str:
        """Push the tensors as one versioned update; returns the engine's new version."""
        named = {n: t.detach() for n, t in named_tensors}
        plan = self.begin(named, version)
        for metas in plan:
            self.send_bucket(named, metas)
        return self.commit()

    def begin(self, named: dict[str, torch.Tensor], version: int | str | None = None
              ) -> list[list[TensorMeta]]:
        """Open the update (the engine validates the whole manifest now); returns the buckets
        to send, in order."""
        manifest = [TensorMeta.of(n, t) for n, t in named.items()]
        self._request({"op": "begin", "version": version,
                       "manifest": [m.to_wire() for m in manifest]})
        return plan_buckets(manifest, self.bucket_bytes)

    def send_bucket(self, named: dict[str, torch.Tensor], metas: list[TensorMeta]) -> None:
        """Pack this bucket (while the engine loads the previous one), then send it."""
        size = bucket_size(metas)
        device = named[metas[0].name].device
        header = {"op": "bucket", "tensors": [m.to_wire() for m in metas], "nbytes": size}
        shared = self._shared_metas(named, metas)
        if shared is not None:  # the tensors live in a segment the engine can map: no packing
            if self._in_flight:
                self._reply()
            self._send({**header, "tensors": shared, "nbytes": self._shared.size,
                        "shm": self._shared.name})
            return
        slot = self._slot(size, device)
        if self._in_flight and slot is self._busy:
            self._reply()  # the engine may still be reading this slot
        buf = pack(named, metas, slot.buffer[:size])
        if self._in_flight:
            self._reply()
        self._sent += 1
        self._busy = slot
        if self.mode == "bytes":
            self._send(header, [buf.cpu().numpy() if buf.is_cuda else buf.numpy()])
        elif device.type == "cpu":
            self._send({**header, "shm": slot.shm.name})
        else:
            from torch.multiprocessing.reductions import reduce_tensor
            torch.cuda.current_stream(device).synchronize()
            self._send({**header, "cuda_ipc": pickle.dumps(reduce_tensor(buf))})

    def commit(self) -> int | str:
        return self._request({"op": "commit"})["version"]

    def close(self) -> None:
        for slot in self._slots:
            if slot is not None:
                slot.close()
        self._slots = []
        if self._shared is not None:  # the shared tensors keep their mapping until freed
            self._shared.unlink()
        self._sock.close()
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ZmqWeightReceiver:
    """Binds `address` and feeds updates into `sink` from a background thread. A transaction
    whose sender goes silent for `timeout_s` is aborted (the sink marks its weights incomplete).
    The mappings of a sender's two shared-memory segments are kept between updates (senders
    reuse theirs), and let go when other segments arrive or the receiver closes.
    """

    def __init__(self, sink: WeightSink, address: str, device: torch.device | str = "cpu",
                 timeout_s: float = 60.0):
        self.sink, self.device, self.timeout_s = sink, torch.device(device), timeout_s
        endpoint, token = split_address(address)
        self._token = token or secrets.token_hex(16)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a sender reconnecting keeps its id
        if endpoint.endswith(":0"):
            port = self._sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            self._sock.bind(endpoint)
        self.endpoint = endpoint
        self.address = f"{endpoint}{TOKEN_MARK}{self._token}"  # what a sender needs
        self._open = False
        self._sender = b""  # the routing id of the sender whose update is open
        self._last = 0.0
        self._shm: dict[str, shared_memory.SharedMemory] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weight-receiver", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    if self._open and time.monotonic() - self._last > self.timeout_s:
                        self._abort(f"the sender sent nothing for {self.timeout_s:g} s")
                    continue
                ident, *parts = self._sock.recv_multipart(copy=False)
                try:
                    reply = self._handle_message(ident.bytes, parts)
                except Exception as e:  # answer every request; the engine keeps serving
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                if self._open and ident.bytes == self._sender:  # silence from the answer on
                    self._last = time.monotonic()
                self._sock.send_multipart([ident, b"", msgpack.packb(reply)])
        finally:
            if self._open:  # never leave the engine waiting on an update nobody can finish
                self._abort("the weight receiver stopped")

    def _handle_message(self, sender: bytes, parts: list) -> dict:
        if len(parts) < 2 or parts[0].bytes:
            raise ValueError(f"a message is an empty delimiter frame, a msgpack header and "
                             f"data frames; got {len(parts)} frame(s) after the identity")
        try:
            header = msgpack.unpackb(parts[1].bytes)
        except Exception as e:
            raise ValueError(f"the header is not msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"the header must be a msgpack map, got {type(header).__name__}")
        return self._handle(sender, header, parts[2:])

    def _handle(self, sender: bytes, header: dict, frames: list) -> dict:
        token = header.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
            raise PermissionError("refused: the message does not carry this receiver's token "
                                  "(send to the whole address the receiver reported, with its "
                                  f"{TOKEN_MARK}... part)")
        op = header.get("op")
        if op == "begin":
            if self._open:  # a restarted trainer's, or a second sender's: the open one ends
                self._abort("a new update began before the previous one committed")
            self.sink.begin(header.get("version"),
                            [TensorMeta.from_wire(m) for m in header["manifest"]])
            self._open, self._sender = True, sender
            return {"ok": True}
        if not self._open:
            raise RuntimeError(f"{op!r} outside an update: send 'begin' first")
        if sender != self._sender:
            raise RuntimeError(f"{op!r} refused: the open update was begun by another sender "
                               f"(a sender's begin ends an update another one left open)")
        if op == "bucket":
            metas = [TensorMeta.from_wire(m) for m in header["tensors"]]
            try:
                bucket = self._bucket(header, frames)
                self.sink.load(unpack(bucket, metas))
                if bucket.is_cuda:  # the sender refills a CUDA IPC buffer once answered
                    torch.cuda.current_stream(bucket.device).synchronize()
            except Exception:
                self._abort("a bucket failed to load")
                raise
            return {"ok": True}
        if op == "commit":
            self._open = False
            return {"ok": True, "version": self.sink.commit()}
        raise ValueError(f"unknown op {op!r}")

    def _bucket(self, header: dict, frames: list) -> torch.Tensor:
        if "shm" in header:
            shm = self._shm.get(header["shm"])
            if shm is None:  # senders reuse their two segments: keep the latest mappings
                if len(self._shm) >= 2:
                    self._release_shm()
                shm = shared_memory.SharedMemory(name=header["shm"])
                resource_tracker.unregister(shm._name, "shared_memory")  # the sender owns it
                self._shm[header["shm"]] = shm
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.frombuffer(shm.buf, dtype=torch.uint8, count=header["nbytes"])
        if "cuda_ipc" in header:
            rebuild, args = safe_pickle.loads(header["cuda_ipc"])
            if rebuild is not reductions.rebuild_cuda_tensor:
                raise ValueError(f"a cuda_ipc handle must rebuild with rebuild_cuda_tensor, "
                                 f"got {getattr(rebuild, '__name__', rebuild)!r}")
            return rebuild(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only frame: we only read it
            return torch.frombuffer(frames[0].buffer, dtype=torch.uint8)

    def _abort(self, reason: str) -> None:
        self._open = False
        self._release_shm()
        self.sink.abort(reason)

    def _release_shm(self) -> None:
        for shm in self._shm.values():
            try:
                shm.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
        self._shm.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._release_shm()
        self._sock.close()
        self._ctx.term()
