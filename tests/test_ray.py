"""integrations/ray: engine groups on a local Ray instance of two CPUs (two engines, real actors,
real trainer processes), faults, and the ray.data batch rollout."""

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray

import weight_sync
from integrations.ray import BatchRollout, NoEngineLeftError, RolloutActor, RolloutGroup
from rollout import SamplingParams
from tests.peers import trained
from tests.ray_helpers import ENGINE_OPTIONS, comparable, local_generate, samples
from tests.test_weight_sync import finish, free_port, peer

# distinct first tokens: no prompt shares a cached block with another
PROMPTS = [[k] + list(range(300 + 7 * k, 330 + 9 * k)) for k in range(1, 6)] + ["the group"]
SEEDED = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=8)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, seed=1)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def new_group(path, **options) -> RolloutGroup:
    # half a CPU each: this group, a second one and a ray.data pool fit in num_cpus=2
    return RolloutGroup(str(path), 2, num_cpus_per_engine=0.5, **ENGINE_OPTIONS, **options)


@pytest.fixture(scope="module")
def group(ray_session, qwen3_path):
    group = new_group(qwen3_path)
    yield group
    group.shutdown()


def test_group_generates_what_one_local_engine_generates(group, qwen3_path):
    group.update_weights_from_disk(str(qwen3_path), version=0)  # the checkpoint, cache empty
    before = [s.completed for s in group.slots]
    got = group.generate(PROMPTS, SEEDED)
    local = local_generate(qwen3_path, PROMPTS, SEEDED)
    assert comparable(got) == comparable(local)
    assert [s.completed - b for s, b in zip(group.slots, before)] == [3, 3]
    for out in got:  # all samples on one engine: the prompt was prefilled once, then shared
        cached = sorted(c.cached_tokens for c in out.outputs)
        assert cached == [0] + [len(out.prompt_token_ids)] * 3

    actor = group.engines[1]  # one engine's own handle: the engine's methods
    assert samples(ray.get(actor.generate.remote(PROMPTS, SEEDED))) == samples(local)
    c = local[0].outputs[2]
    sequence = local[0].prompt_token_ids + c.token_ids
    assert ray.get(actor.score.remote([sequence], len(local[0].prompt_token_ids))) == [c.logprobs]


def test_the_group_takes_the_prompts_engine_generate_takes(group):
    ids = PROMPTS[0]
    want = samples(group.generate([ids], GREEDY))
    assert samples(group.generate(tuple(ids), GREEDY)) == want
    assert samples(group.generate([np.int64(t) for t in ids], GREEDY)) == want
    with pytest.raises(ValueError, match="must be SamplingParams .or a list of them., got dict"):
        group.generate([ids], {"temperature": 0})


def test_a_weight_update_group_never_formed_and_session_ids_as_one_string_are_refused(group):
    with pytest.raises(ValueError, match=r"no weight update group 'synk' \(the engines are in"):
        group.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], "synk")
    with pytest.raises(ValueError, match=r"no weight update group 'synk' \(the engines are in"):
        group.destroy_weights_update_group("synk")
    with pytest.raises(ValueError, match="session_ids must be a list of one session id .or "
                                         "None. per prompt, got 'ab'"):
        group.generate(PROMPTS[:2], GREEDY, session_ids="ab")  # not sessions "a" and "b"


def test_sessions_stay_on_one_engine_and_async_matches(group):
    before = [s.completed for s in group.slots]
    turns = group.generate(PROMPTS[:4], GREEDY, session_ids=["chat"] * 4)
    served = [s.completed - b for s, b in zip(group.slots, before)]
    assert sorted(served) == [0, 4]

    async def one(prompt):
        return await group.generate_async(prompt, GREEDY, session_id="chat")
    again = asyncio.run(one(PROMPTS[0])).outputs[0]
    assert (again.token_ids, again.logprobs) == (turns[0].outputs[0].token_ids,
                                                 turns[0].outputs[0].logprobs)
    assert again.cached_tokens == 32  # its first block was cached by the first turn
    assert [s.completed - b for s, b in zip(group.slots, before)] == [x and 5 for x in served]


def test_one_gloo_group_updates_every_engine_a_replacement_rejoins_then_release_and_resume(
        group, qwen3_path):
    model = trained(qwen3_path, 5)
    manifest = [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                for n, t in model.named_parameters()]
    port = free_port()
    trainer = peer("collective_trainer", path=str(qwen3_path), seed=5, master_port=port,
                   world_size=3, bucket_bytes=1 << 16)
    group.init_weights_update_group("127.0.0.1", port, "sync", backend="gloo")
    names, dtypes, shapes = map(list, zip(*manifest))
    assert group.update_weights_from_distributed(names, dtypes, shapes, "sync", version=3,
                                                 bucket_bytes=1 << 16) == [3, 3]
    sent = finish(trainer)["checksum"]
    assert sent == weight_sync.checksum(model.named_parameters())
    assert group.weights_checksum() == [sent, sent]

    group.replace(1)  # a new engine 1 (the old one's weights): not a member of "sync"
    with pytest.raises(ValueError, match=r"group 'sync' lost members since it was formed: "
                                         r"engines \[1\] are not in it"):
        group.update_weights_from_distributed(names, dtypes, shapes, "sync", version=4)
    assert group.weight_versions() == [3, 3]
    group.destroy_weights_update_group("sync")  # engine 0 leaves; engine 1 never joined
    port = free_port()
    trainer = peer("collective_trainer", path=str(qwen3_path), seed=6, master_port=port,
                   world_size=3, bucket_bytes=1 << 16)
    group.init_weights_update_group("127.0.0.1", port, "sync", backend="gloo")
    assert group.update_weights_from_distributed(names, dtypes, shapes, "sync", version=4,
                                                 bucket_bytes=1 << 16) == [4, 4]
    sent = finish(trainer)["checksum"]
    model = trained(qwen3_path, 6)
    assert group.weights_checksum() == [sent, sent] == [weight_sync.checksum(
        model.named_parameters())] * 2
    group.destroy_weights_update_group("sync")
    expected = comparable(local_generate(qwen3_path, PROMPTS, GREEDY,
                                         model.named_parameters(), version=4))
    assert comparable(group.generate(PROMPTS, GREEDY)) == expected

    group.release_memory()
    stats = ray.get([e.memory_stats.remote() for e in group.engines])
    assert all(s["weights"] == 0 and s["kv_cache"] == 0 and s["released"]["weights"] > 0
               for s in stats)
    with pytest.raises(RuntimeError, match="memory is released"):
        group.generate(PROMPTS[:1], GREEDY)
    group.resume_memory()
    assert group.weights_checksum() == [sent, sent]
    assert comparable(group.generate(PROMPTS, GREEDY)) == expected


def test_one_zmq_sender_per_engine_updates_every_engine(group, qwen3_path):
    addresses = group.start_weight_receivers()
    assert len(set(addresses)) == 2
    senders = [peer("zmq_sender", address=address, mode="bytes", path=str(qwen3_path), seed=4,
                    bucket_bytes=1 << 16, version=7) for address in addresses]
    assert [finish(sender)["version"] for sender in senders] == [7, 7]
    expected = weight_sync.checksum(trained(qwen3_path, 4).named_parameters())
    assert group.weights_checksum() == [expected, expected]
    assert group.weight_versions() == [7, 7]


LONG = SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=160, ignore_eos=True)


def queued(group) -> int:
    return sum(load["running"] + load["waiting"] for load in group.load())


def test_a_cancelled_async_request_is_aborted_on_its_engine(group):
    """A caller that gives up (an HTTP client gone) must not leave its samples in the engine,
    holding KV cache and a slot until they finish on their own."""
    group.pause_generation("in_place")  # requests queue and wait: nothing finishes by itself
    try:
        async def cancel_one():
            task = asyncio.ensure_future(group.generate_async(PROMPTS[1], LONG))
            deadline = time.monotonic() + 60
            while queued(group) == 0:
                assert time.monotonic() < deadline, "the request never reached an engine"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        asyncio.run(cancel_one())
        deadline = time.monotonic() + 30
        while queued(group):
            assert time.monotonic() < deadline, f"still in the engines: {group.load()}"
            time.sleep(0.05)
    finally:
        group.continue_generation()
    assert group.size == 2


def test_one_bad_prompt_fails_the_batch_and_aborts_the_others(group):
    """As `Engine.generate`, a batch with a bad prompt fails as a whole: its other requests
    must not keep running (a caller who fixes the batch and retries would run them twice)."""
    group.pause_generation("in_place")  # requests queue and wait: nothing finishes by itself
    try:
        with pytest.raises(ValueError, match="token id 99999 at position 1 is out of range"):
            group.generate(PROMPTS[:3] + [[5, 99999]], LONG)
        deadline = time.monotonic() + 10
        while queued(group):
            assert time.monotonic() < deadline, f"still in the engines: {group.load()}"
            time.sleep(0.05)
    finally:
        group.continue_generation()
    assert group.size == 2


def test_generate_calls_waiting_out_a_pause_leave_the_actor_free_for_control_calls(
        ray_session, qwen3_path):
    """More generate and score calls than asyncio's default executor has threads wait out a
    pause: they must hold none of them, or continue_generation never gets one (a hang)."""
    actor = RolloutActor.options(num_cpus=0.5).remote(str(qwen3_path), **ENGINE_OPTIONS)
    try:
        ray.get(actor.pause_generation.remote("in_place"))
        threads = min(32, os.cpu_count() + 4)  # asyncio's default executor
        held = [actor.generate.remote(PROMPTS[:1], GREEDY) for _ in range(threads)]
        scored = actor.score.remote([PROMPTS[0]], 5)
        deadline = time.monotonic() + 30
        while ray.get(actor.load.remote())["waiting"] < threads:
            assert time.monotonic() < deadline, ray.get(actor.load.remote())
            time.sleep(0.05)
        ray.get(actor.continue_generation.remote(), timeout=30)
        outputs = ray.get(held, timeout=60)
        assert all(samples(o) == samples(outputs[0]) for o in outputs)
        assert len(ray.get(scored, timeout=60)[0]) == len(PROMPTS[0]) - 5
    finally:
        ray.kill(actor)


def generate_in_background(group, prompts, params, engines=(0, 1)):
    box = {}

    def run():
        try:
            box["out"] = group.generate(prompts, params)
        except Exception as e:
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until these engines are generating
        loads = ray.get([group.slots[i].actor.load.remote() for i in engines])
        if all(load["running"] > 0 for load in loads):
            return thread, box
        time.sleep(0.005)
    raise AssertionError("the engines never started generating")


def in_background(fn, *args, **kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, box


def test_a_health_check_kills_no_engine_busy_or_paused_or_released_while_its_probe_waits(
        ray_session, qwen3_path):
    """The probe queues behind every waiting sequence of a busy engine: the engine is alive
    by its progress (as SGLang's /health_generate), and one paused or released meanwhile steps
    nothing by request. Killing them killed a healthy group during a large rollout."""
    group = new_group(qwen3_path, max_num_seqs=2)  # 6 sequences an engine: 4 wait
    try:
        params = SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=200, ignore_eos=True)
        thread, box = generate_in_background(group, PROMPTS, params)
        assert group.check_health(timeout_s=1) == [True, True]
        for hold, let_go in [(lambda: group.pause_generation("in_place"),
                              group.continue_generation),
                             (group.release_memory, group.resume_memory)]:
            checking, health = in_background(group.check_health, timeout_s=1)
            time.sleep(0.2)  # its probes are queued
            hold()
            checking.join(timeout=30)
            assert health["out"] == [True, True]
            let_go()
        thread.join(timeout=120)
        assert "error" not in box and len(box["out"]) == len(PROMPTS)
        assert {c.finish_reason for o in box["out"] for c in o.outputs} == {"length"}
    finally:
        group.shutdown()


def wait_for_size(group, size: int) -> None:
    deadline = time.monotonic() + 120
    while group.size < size:
        assert time.monotonic() < deadline, [s.describe() for s in group.slots]
        time.sleep(0.05)


def test_a_killed_engine_loses_nothing_and_replacements_restore_the_group(ray_session,
                                                                          qwen3_path):
    group = new_group(qwen3_path, auto_replace=True)
    try:
        model = trained(qwen3_path, 9)
        assert group.update_weights(model.named_parameters(), version=9) == [9, 9]
        local = local_generate(qwen3_path, PROMPTS, LONG, model.named_parameters(), version=9)
        checksum = weight_sync.checksum(model.named_parameters())

        thread, box = generate_in_background(group, PROMPTS, LONG)
        dead = group.slots[0].actor
        ray.kill(dead)
        thread.join(timeout=120)
        assert "error" not in box and comparable(box["out"]) == comparable(local)

        wait_for_size(group, 2)  # automatic mode: a new engine 0 with the group's weights
        assert group.slots[0].actor != dead
        assert group.weight_versions() == [9, 9]
        assert group.weights_checksum() == [checksum, checksum]

        group.replace(1)  # by hand
        assert group.size == 2 and group.weight_versions() == [9, 9]
        assert group.weights_checksum() == [checksum, checksum]
        before = [s.completed for s in group.slots]
        assert samples(group.generate(PROMPTS, LONG)) == samples(local)
        assert [s.completed - b for s, b in zip(group.slots, before)] == [3, 3]

        dead = group.slots[0].actor  # found dead by a health check, then replaced by hand too
        ray.kill(dead)
        assert group.check_health(timeout_s=10) == [False, True]
        deadline = time.monotonic() + 60
        while group.slots[0].actor == dead:  # the automatic replacement started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        automatic = group.slots[0].actor
        group.replace(0)  # answers the same death: waits for it, does not kill it
        assert group.slots[0].actor == automatic and group.size == 2
        assert group.weights_checksum() == [checksum, checksum]
    finally:
        group.shutdown()


def test_an_engine_replaced_while_the_memory_is_released_joins_with_the_groups_weights(
        ray_session, qwen3_path):
    """Between rollouts the group's memory is released for training; an engine lost then is
    replaced with the weights the group holds (backed up: copied on resume; discarded: the
    next update reaches it like the others)."""
    group = new_group(qwen3_path)
    try:
        model = trained(qwen3_path, 9)
        group.update_weights(model.named_parameters(), version=9)
        checksum = weight_sync.checksum(model.named_parameters())
        group.release_memory()  # weights backed up
        group.replace(1)
        assert group.size == 1 and "waiting for resume_memory()" in group.slots[1].error
        stats = ray.get(group.slots[1].actor.memory_stats.remote())
        assert stats["weights"] == 0 and stats["kv_cache"] == 0
        group.resume_memory([])  # no tag: nothing comes back (as for the engine), none joins
        assert group.size == 1 and "waiting for resume_memory()" in group.slots[1].error
        group.resume_memory()
        assert group.size == 2 and group.weight_versions() == [9, 9]
        assert group.weights_checksum() == [checksum, checksum]

        group.release_memory(weights="discard")  # an update follows
        group.replace(0)
        assert group.size == 2
        assert ray.get(group.slots[0].actor.memory_stats.remote())["weights"] == 0
        group.resume_memory()
        model = trained(qwen3_path, 10)
        assert group.update_weights(model.named_parameters(), version=10) == [10, 10]
        checksum = weight_sync.checksum(model.named_parameters())
        assert group.weights_checksum() == [checksum, checksum]
        local = local_generate(qwen3_path, PROMPTS, GREEDY, model.named_parameters(),
                               version=10)
        assert comparable(group.generate(PROMPTS, GREEDY)) == comparable(local)

        group.release_memory(weights="discard")
        model = trained(qwen3_path, 11)
        group.update_weights(model.named_parameters(), version=11)  # the weights are back
        group.replace(1)  # copies version 11, not a discarded engine
        group.resume_memory()
        checksum = weight_sync.checksum(model.named_parameters())
        assert group.weight_versions() == [11, 11]
        assert group.weights_checksum() == [checksum, checksum]

        group.release_memory(weights="discard")
        group.resume_memory(["weights"])  # resident, empty: an update comes next
        group.replace(0)  # joins empty too, never copying the discarded engine's bytes
        assert ray.get(group.slots[0].actor.weights_state.remote()) == "incomplete"
        model = trained(qwen3_path, 12)
        assert group.update_weights(model.named_parameters(), version=12) == [12, 12]
        checksum = weight_sync.checksum(model.named_parameters())
        assert group.weights_checksum() == [checksum, checksum]
        group.resume_memory()
    finally:
        group.shutdown()


def test_a_replacement_while_released_copies_weights_updated_through_the_engine_handles(
        ray_session, qwen3_path):
    """Weights a trainer updated through the engines' own handles are not the checkpoint: a
    replacement made while they are released waits for them, as after an update of the group
    (it joined with the checkpoint, and the group served two weight sets)."""
    group = new_group(qwen3_path)
    try:
        model = trained(qwen3_path, 9)
        named = [(n, t.detach()) for n, t in model.named_parameters()]
        assert ray.get([e.update_weights.remote(named, 9) for e in group.engines]) == [9, 9]
        group.release_memory()
        group.replace(1)
        assert group.slots[1].describe() == ("engine 1 (waiting for resume_memory() to copy the "
                                             "group's weights)")
        group.resume_memory()
        checksum = weight_sync.checksum(model.named_parameters())
        assert group.weight_versions() == [9, 9]
        assert group.weights_checksum() == [checksum, checksum]
    finally:
        group.shutdown()


def test_requests_of_an_engine_lost_while_the_memory_is_released_run_after_resume(
        ray_session, qwen3_path):
    """Requests a release retracted wait for resume_memory(); those of an engine lost meanwhile
    wait too (sent to an engine whose memory is released, they were refused, failing the
    batch), then run again with the same results."""
    group = new_group(qwen3_path)
    try:
        local = local_generate(qwen3_path, PROMPTS, LONG)
        thread, box = generate_in_background(group, PROMPTS, LONG)
        group.release_memory()
        ray.kill(group.slots[1].actor, no_restart=True)
        deadline = time.monotonic() + 30
        while group.slots[1].ready:  # until the group saw the death (a request failed)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1)
        assert "error" not in box and thread.is_alive()
        group.resume_memory()
        thread.join(timeout=60)
        assert "error" not in box and comparable(box["out"]) == comparable(local)
    finally:
        group.shutdown()


def test_an_engine_lost_during_a_release_or_pause_leaves_the_group_in_the_new_state(
        ray_session, qwen3_path):
    """The group recorded no pause (or release) when one engine failed it, though the others
    made it: its health check then probed the paused engine by generating, which a paused
    engine never answers, and killed the engine that had done what was asked."""
    group = new_group(qwen3_path)
    try:
        checksum = group.weights_checksum()[0]
        ray.kill(group.slots[1].actor, no_restart=True)
        with pytest.raises(RuntimeError, match=r"engines \[1\] failed release_memory that "
                                               r"engines \[0\] made and left service"):
            group.release_memory()
        assert group.check_health(timeout_s=10) == [True, False]  # a ping: it is released
        group.replace(1)  # the checkpoint, released as the group is
        group.resume_memory()
        assert group.size == 2 and group.weights_checksum() == [checksum, checksum]

        ray.kill(group.slots[0].actor, no_restart=True)
        with pytest.raises(RuntimeError, match=r"engines \[0\] failed pause_generation"):
            group.pause_generation("in_place")
        assert group.check_health(timeout_s=10) == [False, True]
        group.replace(0)
        held = group.slots[0].actor.generate.remote(PROMPTS[:1], GREEDY)
        assert ray.wait([held], timeout=3)[1] == [held]  # joined paused, as the group is
        group.continue_generation()
        assert samples(ray.get(held)) == samples(group.generate(PROMPTS[:1], GREEDY))
    finally:
        group.shutdown()


def test_an_update_one_engine_refuses_takes_it_out_of_service(ray_session, qwen3_path):
    """Engines on two versions would answer one request two ways: the one that refused leaves
    service, the error names both sides, and its replacement copies the committed weights."""
    group = new_group(qwen3_path)
    try:
        ray.get(group.slots[1].actor.update_weights_from_disk.remote(str(qwen3_path), "ckpt"))
        model = trained(qwen3_path, 10)
        with pytest.raises(RuntimeError, match=r"engines \[1\] refused the weight update that "
                                               r"engines \[0\] committed \(version 1\)"):
            group.update_weights(model.named_parameters())  # engine 1: no number after 'ckpt'
        assert group.size == 1 and group.weight_versions() == [1]
        group.replace(1)
        checksum = weight_sync.checksum(model.named_parameters())
        assert group.weight_versions() == [1, 1]
        assert group.weights_checksum() == [checksum, checksum]
    finally:
        group.shutdown()


def test_an_engine_an_update_broke_on_takes_no_work_until_the_next_update(ray_session,
                                                                         qwen3_path):
    """A trainer's update to one engine breaks midway: requests go to the other engine (the
    caller never sees the refusal), health checks keep it (while its update was open too: it
    steps nothing then, by design), and the group's next update brings it back. A replacement
    joining with discarded weights takes the group's version number."""
    group = new_group(qwen3_path)
    try:
        model = trained(qwen3_path, 9)
        group.update_weights(model.named_parameters(), version=9)
        local = local_generate(qwen3_path, PROMPTS, GREEDY, model.named_parameters(), version=9)
        address = ray.get(group.slots[0].actor.start_weight_receiver.remote())
        named = {n: t.detach() for n, t in trained(qwen3_path, 10).named_parameters()}
        with weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as sender:
            buckets = sender.begin(named, 10)
            assert group.check_health(timeout_s=1) == [True, True]  # open: not hung
            sender.send_bucket(named, buckets[0])
            with pytest.raises(weight_sync.WeightUpdateError, match="never arrived"):
                sender.commit()  # the rest never came: engine 0's weights are incomplete
        assert comparable(group.generate(PROMPTS, GREEDY)) == comparable(local)
        assert [s.completed for s in group.slots] == [0, len(PROMPTS)]
        assert "refusing work: IncompleteWeightsError" in group.slots[0].describe()
        assert group.check_health() == [True, True] and group.slots[0].refusing

        model = trained(qwen3_path, 11)
        assert group.update_weights(model.named_parameters()) == [10, 10]
        assert group.slots[0].refusing is None
        group.generate(PROMPTS, GREEDY)
        assert group.slots[0].completed > 0

        group.release_memory(weights="discard")
        group.replace(1)
        group.resume_memory()
        assert group.weight_versions() == [10, 10]
        assert group.update_weights(model.named_parameters()) == [11, 11]
    finally:
        group.shutdown()


def test_requests_on_an_engine_an_update_broke_on_run_again_on_another(ray_session, qwen3_path):
    """A trainer's update to one engine breaks while the group's requests run there: they would
    wait for an update that may never come. Once the group sees the engine refuse work, they
    are aborted there and run again on the other engine, with the same results."""
    group = new_group(qwen3_path)
    try:
        local = local_generate(qwen3_path, PROMPTS, LONG)
        address = ray.get(group.slots[0].actor.start_weight_receiver.remote())
        thread, box = generate_in_background(group, PROMPTS, LONG)
        named = {n: t.detach() for n, t in trained(qwen3_path, 10).named_parameters()}
        with weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as sender:
            sender.send_bucket(named, sender.begin(named, 10)[0])
            with pytest.raises(weight_sync.WeightUpdateError, match="never arrived"):
                sender.commit()
        assert group.check_health(timeout_s=5) == [True, True]
        thread.join(timeout=30)
        assert not thread.is_alive(), f"still waiting on the engines: {group.load()}"
        assert "error" not in box and comparable(box["out"]) == comparable(local)
        assert group.load()[0] == {"running": 0, "waiting": 0}
    finally:
        group.shutdown()


def test_a_replacement_copies_a_whole_engine_not_one_an_update_broke_on(ray_session,
                                                                        qwen3_path):
    """The group learns that an engine's weights are incomplete only when it refuses work: a
    replacement asks each engine and copies one whose weights are complete."""
    group = RolloutGroup(str(qwen3_path), 3, num_cpus_per_engine=0.3, **ENGINE_OPTIONS)
    try:
        checksum = group.weights_checksum()[0]
        address = ray.get(group.slots[0].actor.start_weight_receiver.remote())
        named = {n: t.detach() for n, t in trained(qwen3_path, 10).named_parameters()}
        with weight_sync.ZmqWeightSender(address, bucket_bytes=1 << 16) as sender:
            sender.send_bucket(named, sender.begin(named, 10)[0])
            with pytest.raises(weight_sync.WeightUpdateError, match="never arrived"):
                sender.commit()  # engine 0's weights are incomplete; the group does not know
        group.replace(1)
        assert ray.get(group.slots[1].actor.weights_state.remote()) == "complete"
        assert ray.get(group.slots[1].actor.weights_checksum.remote()) == checksum
        local = local_generate(qwen3_path, PROMPTS, GREEDY)
        assert comparable(group.generate(PROMPTS, GREEDY)) == comparable(local)
        assert group.slots[0].completed == 0 and group.slots[1].completed > 0
    finally:
        group.shutdown()


def test_a_replacement_copies_what_a_trainer_sent_the_engines_directly(ray_session, qwen3_path):
    """A trainer sending to each engine over ZMQ changes weights and memory unseen by the group:
    a replacement copies what its donor holds once an update open on it has ended, releases
    only what the donor has released, and `start_weight_receivers()` names its new receiver."""
    group = new_group(qwen3_path)
    try:
        addresses = group.start_weight_receivers()
        group.release_memory()  # training; its update brings the weights back, not the cache
        model = trained(qwen3_path, 9)
        for address in addresses:
            with weight_sync.ZmqWeightSender(address) as sender:
                assert sender.send(model.named_parameters(), version=9) == 9
        group.replace(1)
        group.resume_memory(["kv_cache"])
        assert group.weight_versions() == [9, 9]
        local = local_generate(qwen3_path, PROMPTS, GREEDY, model.named_parameters(), version=9)
        assert comparable(group.generate(PROMPTS, GREEDY)) == comparable(local)
        assert all(s.completed for s in group.slots)

        current = group.start_weight_receivers()
        assert current[0] == addresses[0] and current[1] != addresses[1]
        named = {n: t.detach() for n, t in trained(qwen3_path, 10).named_parameters()}
        with weight_sync.ZmqWeightSender(current[0], bucket_bytes=1 << 16) as sender:
            buckets = sender.begin(named, 10)
            old = group.slots[1].actor
            replacing = threading.Thread(target=group.replace, args=(1,), daemon=True)
            replacing.start()
            deadline = time.monotonic() + 120
            while group.slots[1].actor == old:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ray.get(group.slots[1].actor.weight_version.remote())  # the new engine is up
            time.sleep(0.5)
            assert replacing.is_alive()  # waiting for the update open on its donor
            for bucket in buckets:
                sender.send_bucket(named, bucket)
            assert sender.commit() == 10
        replacing.join(timeout=120)
        assert group.size == 2 and group.weight_versions() == [10, 10]
        checksum = weight_sync.checksum(named.items())
        assert group.weights_checksum() == [checksum, checksum]
    finally:
        group.shutdown()


def test_a_waiting_replacement_joins_once_a_trainer_sent_the_weights_and_the_cache_resumes(
        ray_session, qwen3_path):
    """A trainer's update sent to the engines directly takes their released weights back, then
    it resumes only the KV cache: a replacement waiting for the weights copies them and joins
    (the group still took its weights for released, and the replacement never joined)."""
    group = new_group(qwen3_path)
    try:
        group.start_weight_receivers()
        group.release_memory()
        group.replace(1)
        assert group.slots[1].waiting
        (address,) = group.start_weight_receivers()  # the ready engine's
        model = trained(qwen3_path, 9)
        with weight_sync.ZmqWeightSender(address) as sender:
            assert sender.send(model.named_parameters(), version=9) == 9
        group.resume_memory(["kv_cache"])
        assert group.size == 2 and group.weight_versions() == [9, 9]
        checksum = weight_sync.checksum(model.named_parameters())
        assert group.weights_checksum() == [checksum, checksum]
    finally:
        group.shutdown()


def test_a_broadcast_is_refused_while_a_member_replaced_during_a_release_waits(
        ray_session, qwen3_path):
    """A replacement waiting for resume_memory() holds no rank in a weight update group its old
    engine had joined: a broadcast over it would wait out the group's timeout for a dead rank.
    It is refused up front, as once the replacement has joined."""
    group = new_group(qwen3_path)
    try:
        port = free_port()
        joined = group.init_weights_update_group("127.0.0.1", port, "sync", backend="gloo",
                                                 timeout_s=30, wait=False)
        trainer = weight_sync.WeightUpdateGroup("127.0.0.1", port, 0, 3, "sync", "gloo",
                                                timeout_s=30)
        joined.result(timeout=60)
        group.update_weights(trained(qwen3_path, 9).named_parameters(), version=9)
        group.release_memory()
        group.replace(1)  # waits to copy version 9
        assert group.slots[1].waiting
        update = group.update_weights_from_distributed(["model.norm.weight"], ["float32"],
                                                       [[64]], "sync", wait=False)
        with pytest.raises(ValueError, match=r"group 'sync' lost members since it was formed: "
                                             r"engines \[1\] are not in it \(replaced\)"):
            update.result(timeout=10)
        group.destroy_weights_update_group("sync")
        trainer.destroy()
        group.resume_memory()
        assert group.size == 2
    finally:
        group.shutdown()


def test_a_hung_engine_is_caught_by_the_health_check_and_none_left_fails_naming_them(
        ray_session, qwen3_path):
    group = new_group(qwen3_path)
    try:
        model = trained(qwen3_path, 10)
        group.update_weights(model.named_parameters(), version=10)
        local = local_generate(qwen3_path, PROMPTS, LONG, model.named_parameters(), version=10)
        engine = group.slots[1].actor
        ray.get(engine.pause_generation.remote("in_place"))  # by request: steps nothing, alive
        assert group.check_health(timeout_s=1) == [True, True]
        ray.get(engine.continue_generation.remote())
        pid = ray.get(engine.__ray_call__.remote(lambda actor: os.getpid()))
        os.kill(pid, signal.SIGSTOP)  # hung: its process answers nothing
        thread, box = generate_in_background(group, PROMPTS, LONG, engines=[0])
        assert group.check_health(timeout_s=2) == [True, False]
        assert "died: " in group.slots[1].error and "Timeout" in group.slots[1].error
        thread.join(timeout=120)
        assert "error" not in box and comparable(box["out"]) == comparable(local)

        thread, box = generate_in_background(group, PROMPTS, LONG, engines=[0])
        ray.kill(group.slots[0].actor)
        thread.join(timeout=120)
        assert isinstance(box.get("error"), NoEngineLeftError)
        assert "engine 0 (died: " in str(box["error"]) and "engine 1 (died: " in str(box["error"])
        with pytest.raises(NoEngineLeftError, match="no engine of the group holds its current"):
            group.replace(0)
    finally:
        group.shutdown()


def test_batch_rollout_passes_prompt_rows_as_given_for_the_engine_to_check(qwen3_path):
    """Rows of floats, bools or bytes are refused by the engine, naming them (int() made them
    token ids before); rows of integers, as arrays, generate."""
    rollout = BatchRollout(str(qwen3_path), SamplingParams(max_tokens=2), **ENGINE_OPTIONS)
    for row, message in [(np.array([5.9, 300.7]), "prompt token 0 is 5.9"),
                         (np.array([True, False]), "prompt token 0 is True"),
                         (b"hello", "a prompt must be a string or a list of token ids")]:
        column = np.empty(1, dtype=object)
        column[0] = row
        with pytest.raises(ValueError, match=message):
            rollout({"prompt": column})
    column = np.empty(1, dtype=object)
    column[0] = np.array([5, 300, 301])
    assert len(rollout({"prompt": column})["token_ids"][0]) == 2


def test_ray_data_batch_rollout_matches_the_local_engine(ray_session, qwen3_path):
    prompts = [[(7 * i) % 500 + 1] + [(i * j) % 511 for j in range(3 + i % 29)]
               for i in range(200)]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=4)
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    out = ds.map_batches(BatchRollout, batch_size=50, concurrency=2, num_cpus=0.5,
                         fn_constructor_kwargs=dict(model=str(qwen3_path), sampling_params=params,
                                                    **ENGINE_OPTIONS))
    rows = sorted(out.take_all(), key=lambda r: r["id"])
    expected = local_generate(qwen3_path, prompts, params)
    assert len(rows) == 200
    for row, want in zip(rows, expected):
        c = want.outputs[0]
        assert list(row["token_ids"]) == c.token_ids
        assert list(row["logprobs"]) == c.logprobs
        assert row["finish_reason"] == c.finish_reason
