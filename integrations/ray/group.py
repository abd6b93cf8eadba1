"""Several engines behind one object, placed by a Ray placement group (on one node or across
nodes).

Routing: all `n` samples of a prompt go to one engine (they share its prefix cache); otherwise
the engine with the fewest samples in flight, lowest index first; a `session_id` keeps a
conversation on one engine; where one request of a batch fails, the others are aborted. An engine
that dies (Ray's actor errors, or a health check that sees it make no progress in time while it
is neither paused, released nor updating) stops taking work, and its unfinished requests run
again on a healthy engine: determinism makes the result identical. With no engine left, the
request fails with an error naming the dead engines. An engine that answers that its weights are
incomplete (an update that broke on it) takes no requests while another engine can, until an
update commits on it or a health check finds it whole again; the group's requests already on it
run again on another engine. While the group's memory is released, requests that must run again
wait for `resume_memory()`. `replace(i)` starts a new engine that takes no work until it holds the
group's weights (copied from a healthy engine over ZMQ, checksums compared).

The group's bookkeeping lives on one asyncio loop in a background thread; the synchronous
methods submit to it and wait, `generate_async` awaits it from the caller's loop.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field

import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from integrations.ray.actor import Prompt, RolloutActor, as_batch, gather_or_cancel
from rollout import RequestOutput, SamplingParams
from rollout.engine import MEMORY_TAGS
from rollout.weights import IncompleteWeightsError
from weight_sync import DEFAULT_BUCKET_BYTES, split_address

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

log = logging.getLogger(__name__)


class NoEngineLeftError(RuntimeError):
    """Every engine of the group is dead or not yet ready; the message names them."""


@dataclass
class EngineSlot:
    index: int
    actor: ActorHandle | None = None
    ready: bool = False  # alive and holding the group's weights: takes work
    in_flight: int = 0  # samples sent and not yet returned
    completed: int = 0  # requests it answered
    error: str | None = None  # why it was taken out of service
    waiting: bool = False  # a replacement waiting for the group's weights to come back
    refusing: str | None = None  # alive, but answered that its weights are incomplete
    collectives: set[str] = field(default_factory=set)  # weight update groups it joined
    # groups its replaced engine had joined: no broadcast over them until destroyed and formed
    # again (the new engine holds no rank in them)
    replaced_collectives: set[str] = field(default_factory=set)
    calls: set[ray.ObjectRef] = field(default_factory=set)  # the group's requests running on it
    generation: int = 0  # engines started in this slot: which one a death was seen on

    def describe(self) -> str:
        state = "ready" if self.ready else self.error or "starting"
        if self.ready and self.refusing:
            state = f"ready, refusing work: {self.refusing}"
        return f"engine {self.index} ({state})"


class RolloutGroup:
    """`num_engines` engines of `model`, placed "PACK" (fill a node first) or "SPREAD" (one
    per node where possible). `engine_options` are `Engine` keyword arguments.

    auto_replace: replace an engine as soon as it is found dead.
    health_check_interval_s: probe every engine this often (None: only on `check_health()`).
    """

    def __init__(self, model: str | None, num_engines: int = 1, placement: str = "PACK", *,
                 num_cpus_per_engine: float = 1, num_gpus_per_engine: float = 0,
                 torch_threads: int = 1, auto_replace: bool = False,
                 health_check_interval_s: float | None = None,
                 health_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 **engine_options):
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.model, self.engine_options = model, engine_options
        self.torch_threads, self.auto_replace = torch_threads, auto_replace
        self.health_timeout_s, self.startup_timeout_s = health_timeout_s, startup_timeout_s
        self.resources = {"CPU": num_cpus_per_engine, "GPU": num_gpus_per_engine}
        self.placement_group = self._reserve(num_engines, placement, startup_timeout_s)
        self.slots = [EngineSlot(i, self._start(i)) for i in range(num_engines)]
        self._sessions: dict[str, int] = {}
        self._paused = False
        self._released: set[str] = set()
        self._resident = asyncio.Event()  # set while no memory is released: reroutes may run
        self._resident.set()
        self._updated = False  # weights changed since the checkpoint: replacements copy them
        self._auto_replacing: dict[int, asyncio.Task] = {}  # slot index: its replacement
        self._receiver_timeout_s: float | None = None  # ZMQ receivers started: replacements too
        # replacements, updates and memory/pause changes take turns: each sees the group's state
        # (released, paused, members, weights) as the one before it left it
        self._turn = asyncio.Lock()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="rollout-group", daemon=True).start()
        try:  # every engine loaded
            ray.get([s.actor.weight_version.remote() for s in self.slots],
                    timeout=startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        for slot in self.slots:
            slot.ready = True
        if health_check_interval_s is not None:
            self._submit(self._watch(health_check_interval_s))

    def _reserve(self, num_engines: int, placement: str, timeout_s: float):
        group = placement_group([self.resources] * num_engines, placement)
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise TimeoutError(f"Ray could not place {num_engines} engines of {self.resources} "
                               f"with {placement} in {timeout_s:g} s; cluster resources: "
                               f"{ray.cluster_resources()}")
        return group

    def _start(self, index: int) -> ActorHandle:
        strategy = PlacementGroupSchedulingStrategy(self.placement_group,
                                                    placement_group_bundle_index=index)
        return RolloutActor.options(
            num_cpus=self.resources["CPU"], num_gpus=self.resources["GPU"],
            scheduling_strategy=strategy,
        ).remote(self.model, torch_threads=self.torch_threads, **self.engine_options)

    # ---------------------------------------------------------------- the loop

    def _submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _wait(self, coro: Coroutine):
        return self._submit(coro).result()

    @property
    def engines(self) -> list[ActorHandle]:
        """Handles of the engines that take work now."""
        return [s.actor for s in self.slots if s.ready]

    @property
    def size(self) -> int:
        return sum(s.ready for s in self.slots)

    def _ready_slots(self) -> list[EngineSlot]:
        ready = [s for s in self.slots if s.ready]
        if not ready:
            raise NoEngineLeftError("no engine of the group can take work: "
                                    + "; ".join(s.describe() for s in self.slots))
        return ready

    def _lost(self, slot: EngineSlot, error: BaseException) -> None:
        """Take a failed engine out of service for good (killed, in case it only hung)."""
        self._retire(slot, f"died: {_first_line(error)}")

    def _retire(self, slot: EngineSlot, why: str) -> None:
        if not slot.ready:
            return
        slot.ready = False
        slot.error = why
        ray.kill(slot.actor, no_restart=True)
        log.warning("rollout group: %s; its requests go to the other engines", slot.describe())
        if self.auto_replace and any(s.ready for s in self.slots):
            self._auto_replacing[slot.index] = self._loop.create_task(
                self._auto_replace(slot.index, slot.generation))

    async def _auto_replace(self, index: int, generation: int) -> None:
        try:
            await self._replace(index, generation)
        except Exception as e:
            log.error("rollout group: replacing engine %d failed: %s", index, e)
        finally:
            if self._auto_replacing.get(index) is asyncio.current_task():
                del self._auto_replacing[index]

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 session_ids: Sequence[str | None] | None = None) -> list[RequestOutput]:
        """What `Engine.generate` returns, in input order. Where one prompt fails, the others
        are aborted and its error raised."""
        prompts, sampling_params = as_batch(prompts, sampling_params)
        if isinstance(session_ids, str) or not isinstance(session_ids, Iterable | None):
            raise ValueError(f"session_ids must be a list of one session id (or None) per "
                             f"prompt, got {session_ids!r}; for one conversation pass "
                             f"[{session_ids!r}] * len(prompts)")
        sessions = [None] * len(prompts) if session_ids is None else list(session_ids)
        if len(sessions) != len(prompts):
            raise ValueError(f"got {len(sessions)} session ids for {len(prompts)} prompts; pass "
                             "one per prompt")
        return self._wait(self._gather(prompts, sampling_params, sessions))

    async def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                             session_id: str | None = None) -> RequestOutput:
        """One request from asyncio (a server's handler)."""
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got "
                             f"{type(sampling_params).__name__}")
        return await asyncio.wrap_future(self._submit(
            self._request(prompt, sampling_params, session_id)))

    async def _gather(self, prompts, params, sessions) -> list[RequestOutput]:
        return await gather_or_cancel(self._request(p, sp, sid)
                                      for p, sp, sid in zip(prompts, params, sessions))

    def _pick(self, session_id: str | None) -> EngineSlot:
        """The session's engine, else the least loaded; engines refusing work (incomplete
        weights) only where every ready engine does (the request then fails with their
        error)."""
        ready = self._ready_slots()
        ready = [s for s in ready if s.refusing is None] or ready
        if session_id is not None:
            index = self._sessions.get(session_id)
            if index is not None and self.slots[index] in ready:
                return self.slots[index]
        slot = min(ready, key=lambda s: (s.in_flight, s.index))
        if session_id is not None:
            self._sessions[session_id] = slot.index
        return slot

    async def _request(self, prompt: Prompt, params: SamplingParams | None,
                       session_id: str | None) -> RequestOutput:
        """Run again where the engine dies or refuses work; while the group's memory is
        released (every engine refuses), only once it is resumed."""
        while True:
            slot = self._pick(session_id)
            try:
                return await self._call(slot, prompt, params)
            except RayActorError as e:
                self._lost(slot, e)
            except TaskCancelledError:  # aborted by the group: its engine refuses work
                if slot.refusing is None:
                    raise
            except RayTaskError as e:
                if not _refuses(e) or not self._refusing(slot, e):
                    raise
            await self._resident.wait()

    async def _call(self, slot: EngineSlot, prompt: Prompt,
                    params: SamplingParams | None) -> RequestOutput:
        samples = params.n if params is not None else 1
        slot.in_flight += samples
        call = slot.actor.generate_one.remote(prompt, params)
        slot.calls.add(call)
        try:
            output = await call
        except asyncio.CancelledError:  # the caller gave up: the engine stops it too
            ray.cancel(call)
            raise
        finally:
            slot.in_flight -= samples
            slot.calls.discard(call)
        slot.completed += 1
        return output

    def _refusing(self, slot: EngineSlot, error: RayTaskError) -> bool:
        """Note that `slot` refuses work; whether another ready engine may take it instead.
        Where one may, the group's requests on `slot` (waiting there for an update that may
        never come) are aborted to run again on another."""
        if slot.refusing is None:
            log.warning("rollout group: engine %d refuses work (%s); requests go to the others "
                        "until an update commits on it", slot.index, _first_line(error))
        slot.refusing = _first_line(error)
        elsewhere = any(s.ready and s.refusing is None for s in self.slots)
        if elsewhere:
            for call in slot.calls:
                ray.cancel(call)
        return elsewhere

    # ---------------------------------------------------------------- every engine at once

    async def _each(self, call: Callable[[int, ActorHandle], ray.ObjectRef],
                    slots: list[EngineSlot] | None = None) -> list:
        """`call(position, actor)` on every ready engine (or on `slots`); results in engine
        order. An engine that dies meanwhile is taken out of service and its error raised."""
        slots, results = await self._call_each(call, slots)
        for slot, result in zip(slots, results):
            if isinstance(result, RayActorError):
                self._lost(slot, result)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return results

    async def _call_each(self, call: Callable[[int, ActorHandle], ray.ObjectRef],
                         slots: list[EngineSlot] | None = None):
        """(the slots, by default the ready ones; each one's result or exception)."""
        slots = self._ready_slots() if slots is None else slots
        return slots, await asyncio.gather(*(call(k, s.actor) for k, s in enumerate(slots)),
                                           return_exceptions=True)

    def _on_all(self, method: str, *args, **kwargs) -> list:
        return self._wait(self._each(lambda k, a: getattr(a, method).remote(*args, **kwargs)))

    async def _in_turn(self, method: str, *args, then: Callable[[], None]) -> None:
        """`method` on every ready engine, in turn with replacements and updates; `then`
        records the group's new state on the loop, before the next turn."""
        async with self._turn:
            await self._change_each(method, args, then)

    async def _change_each(self, method: str, args: tuple, then: Callable[[], None]) -> None:
        """A change of state (memory, pause) on every ready engine. Where some make it and
        others fail, the group takes the new state and the failing engines leave service (a
        replacement joins in the group's state), and the error names both sides; where all
        fail, the group keeps its state."""
        slots, results = await self._call_each(lambda k, a: getattr(a, method).remote(*args))
        failed = [(s, r) for s, r in zip(slots, results) if isinstance(r, BaseException)]
        if failed and len(failed) == len(slots):
            for slot, error in failed:
                if isinstance(error, RayActorError):
                    self._lost(slot, error)
            raise failed[0][1]
        then()
        if failed:
            done = [s.index for s in slots if all(s is not f for f, _ in failed)]
            for slot, error in failed:
                self._retire(slot, f"failed {method} that engines {done} made: "
                                   f"{_first_line(error)}")
            raise RuntimeError(f"engines {[s.index for s, _ in failed]} failed {method} that "
                               f"engines {done} made and left service; replace() them. First "
                               f"error: {_first_line(failed[0][1])}")

    async def _update_each(self, call: Callable[[int, ActorHandle], ray.ObjectRef]) -> list:
        """A weight update on every ready engine. Where some commit it and others refuse, the
        group would answer from two versions: the refusing engines leave service (`replace`
        them: the new ones copy the committed weights) and the error names both sides."""
        async with self._turn:
            return await self._update_each_in_turn(call)

    async def _update_each_in_turn(self, call: Callable[[int, ActorHandle], ray.ObjectRef]):
        self._updated = True
        slots, results = await self._call_each(call)
        if any(not isinstance(r, BaseException) for r in results):
            self._record_released(self._released - {"weights"})  # an update brings them back
        for slot, result in zip(slots, results):
            if not isinstance(result, BaseException):
                slot.refusing = None  # committed: its weights are whole
        failed = [(s, r) for s, r in zip(slots, results) if isinstance(r, BaseException)]
        if failed and len(failed) < len(slots):
            refused = {s.index for s, _ in failed}
            committed = [s.index for s in slots if s.index not in refused]
            version = next(r for r in results if not isinstance(r, BaseException))
            for slot, error in failed:
                self._retire(slot, f"refused the update that engines {committed} committed as "
                                   f"version {version!r}: {_first_line(error)}")
            raise RuntimeError(f"engines {sorted(refused)} refused the weight "
                               f"update that engines {committed} committed (version "
                               f"{version!r}) and left service; replace() them. First error: "
                               f"{_first_line(failed[0][1])}")
        for slot, result in failed:  # all refused: the group stays on its version
            if isinstance(result, RayActorError):
                self._lost(slot, result)
        if failed:
            raise failed[0][1]
        await self._admit_waiting()  # replacements waiting for the weights take the new ones
        return results

    # ---------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: int | str | None = None) -> list[int | str]:
        """In-process update of every engine: the tensors go to Ray's object store once."""
        ref = ray.put([(name, t.detach().cpu()) for name, t in named_tensors])
        return self._wait(self._update_each(lambda k, a: a.update_weights.remote(ref, version)))

    def update_weights_from_disk(self, path: str,
                                 version: int | str | None = None) -> list[int | str]:
        """Every engine loads the safetensors directory at `path` (visible on every node)."""
        return self._wait(self._update_each(
            lambda k, a: a.update_weights_from_disk.remote(path, version)))

    def start_weight_receivers(self, timeout_s: float = 60.0) -> list[str]:
        """One ZMQ receiver per ready engine, their addresses in engine order; the trainer sends
        to each with a `weight_sync.ZmqWeightSender`. A replacement binds its own, at a new
        address: call again after `replace()` for the current ones."""
        self._updated = True
        self._receiver_timeout_s = timeout_s
        return self._on_all("start_weight_receiver", None, timeout_s)

    def init_weights_update_group(self, master_address: str, master_port: int, group_name: str,
                                  backend: str | None = None, timeout_s: float = 300.0,
                                  wait: bool = True) -> concurrent.futures.Future | None:
        """Every engine joins one collective group with the trainer: trainer rank 0, engine i
        at rank i + 1, world size engines + 1. Blocks until the trainer joined too; with
        wait=False returns a future (for a trainer in this same process)."""
        future = self._submit(self._join(master_address, master_port, group_name, backend,
                                         timeout_s))
        if not wait:
            return future
        future.result()
        return None

    async def _join(self, master_address: str, master_port: int, group_name: str,
                    backend: str | None, timeout_s: float) -> None:
        async with self._turn:
            slots = self._ready_slots()
            await self._each(lambda k, a: a.init_weights_update_group.remote(
                master_address, master_port, k + 1, len(slots) + 1, group_name, backend,
                timeout_s))
            for slot in slots:
                slot.collectives.add(group_name)

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list,
                                        group_name: str, version: int | str | None = None,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                        wait: bool = True
                                        ) -> list[int | str] | concurrent.futures.Future:
        """Every engine receives the trainer's broadcast (`WeightUpdateGroup.send`)."""
        future = self._submit(self._broadcast(group_name, lambda k, a: (
            a.update_weights_from_distributed.remote(names, dtypes, shapes, group_name, version,
                                                     bucket_bytes))))
        return future.result() if wait else future

    async def _broadcast(self, group_name: str, call) -> list[int | str]:
        async with self._turn:
            self._check_collective(group_name)
            outside = [s.index for s in self.slots if group_name in s.replaced_collectives
                       or (s.ready and group_name not in s.collectives)]
            gone = [s.index for s in self.slots if not s.ready and group_name in s.collectives]
            lost = ([f"engines {outside} are not in it (replaced)"] if outside else []) + (
                [f"engines {gone} left service"] if gone else [])
            if lost:
                raise ValueError(f"weight update group {group_name!r} lost members since it was "
                                 f"formed: {'; '.join(lost)}; destroy_weights_update_group("
                                 f"{group_name!r}) and init it again, with the trainer")
            return await self._update_each_in_turn(call)

    def destroy_weights_update_group(self, group_name: str) -> None:
        """Every ready engine that joined `group_name` leaves it."""
        self._wait(self._leave(group_name))

    async def _leave(self, group_name: str) -> None:
        async with self._turn:
            for slot in self.slots:
                if not slot.ready:
                    slot.collectives.discard(group_name)  # dead or replaced: no longer a member
            self._check_collective(group_name)
            for slot in self.slots:
                slot.replaced_collectives.discard(group_name)
            members = [s for s in self._ready_slots() if group_name in s.collectives]
            slots, results = await self._call_each(
                lambda k, a: a.destroy_weights_update_group.remote(group_name), members)
            for slot, result in zip(slots, results):
                if not isinstance(result, BaseException):
                    slot.collectives.discard(group_name)
                elif isinstance(result, RayActorError):
                    self._lost(slot, result)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]

    def _check_collective(self, group_name: str) -> None:
        """Refuse a weight update group no engine of the group is (or was, before a
        replacement) in."""
        known = set().union(*(s.collectives | s.replaced_collectives for s in self.slots))
        if group_name not in known:
            raise ValueError(f"no weight update group {group_name!r} (the engines are in: "
                             f"{', '.join(map(repr, sorted(known))) or 'none'}); "
                             "init_weights_update_group() forms one")

    def weights_checksum(self) -> list[str]:
        """Every ready engine's checksum, in engine order."""
        return self._on_all("weights_checksum")

    def weight_versions(self) -> list[int | str]:
        return self._on_all("weight_version")

    # ---------------------------------------------------------------- memory and control

    def release_memory(self, tags: Sequence[str] | str | None = None, weights: str = "backup",
                       pause_mode: str = "retract") -> None:
        self._wait(self._in_turn("release_memory", tags, weights, pause_mode,
                                 then=lambda: self._record_released(
                                     self._released | _tag_set(tags))))

    def resume_memory(self, tags: Sequence[str] | str | None = None) -> None:
        """Every ready engine takes its memory back; once the weights are back (here, or by a
        trainer's update sent to the engines directly), replacements started meanwhile copy
        them and join."""
        self._wait(self._resume(tags))

    async def _resume(self, tags) -> None:
        async with self._turn:
            try:
                await self._change_each("resume_memory", (tags,), lambda: self._record_released(
                    self._released - _tag_set(tags)))
            finally:  # the weights are back where some engine resumed them
                await self._engines_released()
                if "weights" not in self._released:
                    await self._admit_waiting()

    def _record_released(self, tags: set[str]) -> None:
        """The group's released memory; requests to run again wait while there is some."""
        self._released = tags
        if tags:
            self._resident.clear()
        else:
            self._resident.set()

    async def _engines_released(self) -> None:
        """Take the group's released memory from its ready engines: a trainer's update sent to
        them directly takes released weights back unseen by the group."""
        _, stats = await self._call_each(lambda k, a: a.memory_stats.remote(),
                                         [s for s in self.slots if s.ready])
        stats = [s for s in stats if not isinstance(s, BaseException)]
        if stats:
            self._record_released({tag for s in stats for tag, nbytes in s["released"].items()
                                   if nbytes})

    def pause_generation(self, mode: str = "abort") -> None:
        self._wait(self._in_turn("pause_generation", mode,
                                 then=lambda: setattr(self, "_paused", True)))

    def continue_generation(self) -> None:
        self._wait(self._in_turn("continue_generation",
                                 then=lambda: setattr(self, "_paused", False)))

    def load(self) -> list[dict[str, int]]:
        """Sequences running and waiting in each ready engine."""
        return self._on_all("load")

    # ---------------------------------------------------------------- faults

    def check_health(self, timeout_s: float | None = None) -> list[bool]:
        """Probe every ready engine (a one-token generation, or a step of its work completed
        while the probe waited; a ping while the group is paused or released). An engine that
        fails or shows no progress in `timeout_s`, though not paused, released or updating,
        is killed and taken out of service, its requests rerouted. Returns, per slot, whether
        it is ready afterwards."""
        return self._wait(self._check_all(timeout_s or self.health_timeout_s))

    async def _check_all(self, timeout_s: float) -> list[bool]:
        await asyncio.gather(*(self._check(s, timeout_s) for s in self.slots if s.ready))
        return [s.ready for s in self.slots]

    async def _check(self, slot: EngineSlot, timeout_s: float) -> None:
        idle = self._paused or self._released
        probe = slot.actor.load.remote() if idle else slot.actor.health.remote(timeout_s)
        try:
            # the actor times the probe itself (and knows an open update from a hang); one
            # second more for its answer to arrive
            generated = await asyncio.wait_for(probe, timeout_s + 1.0)
            if not idle and generated is not None:  # a token came: the weights are whole
                slot.refusing = None
        # TimeoutError: here or in the actor (asyncio's is another class before Python 3.11)
        except (RayActorError, TimeoutError, asyncio.TimeoutError) as e:
            self._lost(slot, e)  # killed: its pending calls fail and are rerouted
        except RayTaskError as e:  # it answered: alive, but refusing work
            if _refuses(e):
                self._refusing(slot, e)
            else:  # memory released by someone else...
                log.info("rollout group: %s answered the health check with %s", slot.describe(),
                         _first_line(e))

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._check_all(self.health_timeout_s)

    def replace(self, index: int) -> None:
        """Start a new engine in slot `index` (the old one is killed if still alive; where an
        automatic replacement of it is under way, wait for that instead). It takes work once it
        holds the group's weights: copied from a ready engine whose weights are complete,
        checksums equal.
        While the group's weights are released (backed up, after an update), it waits with its
        memory released and copies them in `resume_memory` or after the next update; while they
        are discarded, it joins empty and takes the next update."""
        if not 0 <= index < len(self.slots):
            raise ValueError(f"engine index {index} is outside the group of {len(self.slots)}")
        self._wait(self._replace_by_hand(index))

    async def _replace_by_hand(self, index: int) -> None:
        """An automatic replacement of this slot under way answers the death the caller saw:
        wait for it rather than kill its new engine; replace once more only if it failed."""
        auto = self._auto_replacing.get(index)
        if auto is not None:
            await asyncio.shield(auto)  # it logs its own failure
            if self.slots[index].ready:
                return
        await self._replace(index)

    async def _replace(self, index: int, generation: int | None = None) -> None:
        """`generation`: replace only the engine started as that one (an automatic replacement
        does nothing where another replaced the dead engine meanwhile)."""
        async with self._turn:
            slot = self.slots[index]
            if generation is not None and slot.generation != generation:
                return
            donors = [s for s in self.slots if s.ready and s is not slot]
            if not donors and self._updated:  # refused before the old engine is killed
                raise NoEngineLeftError(f"engine {index} cannot be replaced: no engine of the "
                                        "group holds its current weights besides it; update "
                                        "the weights of a new group instead")
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
            slot.ready, slot.waiting, slot.error = False, False, "being replaced"
            slot.refusing = None
            slot.replaced_collectives |= slot.collectives
            slot.collectives.clear()
            slot.actor = self._start(index)
            slot.generation += 1
            try:
                await self._install(slot, *await self._donor(donors))
                if self._receiver_timeout_s is not None:
                    address = await slot.actor.start_weight_receiver.remote(
                        None, self._receiver_timeout_s)
                    log.warning("rollout group: engine %d's weight receiver is now at %s "
                                "(start_weight_receivers() gives it with its token)", index,
                                split_address(address)[0])
            except Exception as e:
                self._drop(slot, f"replacement failed: {_first_line(e)}")
                raise

    async def _donor(self, donors: list[EngineSlot]) -> tuple[EngineSlot | None, str]:
        """The engine to copy the group's weights from and their state, once no update is open
        on it (a trainer's sent to it directly): the first whose weights are complete, else one
        whose are released (backed up), else one whose are incomplete (an update fills them);
        (None, "checkpoint") without donors."""
        states = []
        for donor in sorted(donors, key=lambda s: s.refusing is not None):
            state = await self._settled(donor)
            if state == "complete":
                return donor, state
            states.append((donor, state))
        return min(states, key=lambda ds: ds[1] != "released", default=(None, "checkpoint"))

    async def _install(self, slot: EngineSlot, donor: EngineSlot | None, state: str) -> None:
        """Give a new engine the group's weights as the donor holds them (`state`), and its
        memory as the donor's is."""
        if donor is not None:  # a direct update takes released weights back unseen by the group
            stats = await donor.actor.memory_stats.remote()
            self._record_released({tag for tag, n in stats["released"].items() if n})
        if state == "complete":
            await self._copy_weights(donor, slot)
        elif state == "incomplete":  # discarded (or a broken update): the next update fills them
            await slot.actor.release_memory.remote(["weights"], "discard")
            if "weights" not in self._released:
                await slot.actor.resume_memory.remote(["weights"])
            # the group's version, so that an update without one numbers every engine alike
            await slot.actor.update_weight_version.remote(
                await donor.actor.weight_version.remote())
            slot.refusing = donor.refusing
        elif state == "released" and await self._changed(donor, slot):  # in the backups
            await slot.actor.release_memory.remote(None, "discard")
            slot.waiting = True
            slot.error = "waiting for resume_memory() to copy the group's weights"
            return
        # else the group holds the checkpoint (this engine's weights)
        await self._match_group(slot)

    async def _changed(self, donor: EngineSlot, slot: EngineSlot) -> bool:
        """Whether the group's weights may differ from the checkpoint a new engine loads:
        updated through the group, or the donor's version is not the new engine's (updated
        through the engines' own handles)."""
        if self._updated:
            return True
        versions = await asyncio.gather(donor.actor.weight_version.remote(),
                                        slot.actor.weight_version.remote())
        return versions[0] != versions[1]

    async def _settled(self, donor: EngineSlot) -> str:
        """The donor's weights state once no update is open on it (a transport ends a stalled
        one by its own timeout)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while (state := await donor.actor.weights_state.remote()) == "updating":
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine {donor.index}'s weight update stayed open for "
                                   f"{self.startup_timeout_s:g} s; nothing to copy from it")
            await asyncio.sleep(0.05)
        return state

    async def _admit_waiting(self) -> None:
        """Replacements that waited for the group's weights to come back copy them and join."""
        failed = []
        for slot in [s for s in self.slots if s.waiting]:
            try:
                donor, state = await self._donor(self._ready_slots())
                if state != "complete":
                    continue  # no engine holds the group's weights again yet: it waits on
                slot.waiting = False
                await slot.actor.resume_memory.remote(sorted(set(MEMORY_TAGS) - self._released))
                await self._copy_weights(donor, slot)
                await self._match_group(slot)
            except Exception as e:
                self._drop(slot, f"copying the group's weights failed: {_first_line(e)}")
                failed.append(slot.describe())
        if failed:
            raise RuntimeError("replacements could not join: " + "; ".join(failed))

    def _drop(self, slot: EngineSlot, why: str) -> None:
        """A replacement that could not join: killed (its placement and memory freed)."""
        ray.kill(slot.actor, no_restart=True)
        slot.ready, slot.waiting, slot.error = False, False, why

    async def _copy_weights(self, donor: EngineSlot, slot: EngineSlot) -> None:
        address = await slot.actor.start_weight_receiver.remote(
            None, self._receiver_timeout_s or 60.0)
        await donor.actor.send_weights.remote(address)
        want, got = await asyncio.gather(donor.actor.weights_checksum.remote(),
                                         slot.actor.weights_checksum.remote())
        if want != got:
            raise RuntimeError(f"engine {slot.index}: weights checksum {got} differs from the "
                               f"group's {want}")

    async def _match_group(self, slot: EngineSlot) -> None:
        """Pause and release as the group is, then take work."""
        if self._paused:
            await slot.actor.pause_generation.remote("in_place")
        if self._released:
            await slot.actor.release_memory.remote(sorted(self._released))
        slot.ready, slot.error = True, None

    def shutdown(self) -> None:
        """Kill the engines and free their placement."""
        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
            slot.ready = False
        remove_placement_group(self.placement_group)
        if self._loop.is_running():  # calls still waiting on the group end with CancelledError
            self._loop.call_soon_threadsafe(self._stop_loop)

    def _stop_loop(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_soon(self._loop.stop)


def _tag_set(tags: Sequence[str] | str | None) -> set[str]:
    """The memory tags a call names: None is all of them, an empty list none (as the engine
    takes them)."""
    return {tags} if isinstance(tags, str) else set(MEMORY_TAGS if tags is None else tags)


def _refuses(error: RayTaskError) -> bool:
    """The engine answered that its weights are incomplete (it takes no work until an update
    rewrites them)."""
    return isinstance(error.cause, IncompleteWeightsError)


def _first_line(error: BaseException) -> str:
    if isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause  # the engine's own exception, not Ray's wrapper
    line = next(iter(str(error).splitlines()), "")[:200]
    return f"{type(error).__name__}: {line}".rstrip(": ")
