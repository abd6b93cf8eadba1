"""`rollout serve` driven exactly as slime drives SGLang: concurrent /generate posts with
input_ids, abort-all while they run with /v1/loads polled until drained, and weight sync
rounds (pause, flush, an update from a separate trainer process, continue; release and staged
resume) after which outputs match the new weights and carry the new version string."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx2
import pytest

import kernels
from tests.peers import trained
from tests.serving import REPO, env, free_port, rollout_serve
from tests.test_weight_sync import assert_matches

PROMPTS = [[(i * 37 + j * 11) % 250 + 1 for j in range(4 + i % 9)] for i in range(16)]
LONG = 600  # tokens: still running when aborted or paused


def slime_payload(prompt: list[int], max_new_tokens: int, seed: int | None = None,
                  temperature: float = 1.0) -> dict:
    """What slime's generate() posts (sglang_rollout.py), sampling_seed as in its deterministic
    mode; ignore_eos keeps the random model's samples running to max_new_tokens."""
    params = dict(temperature=temperature, top_p=1.0, top_k=-1, max_new_tokens=max_new_tokens,
                  stop=None, stop_token_ids=None, skip_special_tokens=False, no_stop_trim=True,
                  spaces_between_special_tokens=False, ignore_eos=True)
    if seed is not None:
        params["sampling_seed"] = seed
    return {"input_ids": prompt, "sampling_params": params, "return_logprob": True}


def greedy(prompt: list[int], max_new_tokens: int = 6) -> dict:
    return slime_payload(prompt, max_new_tokens, temperature=0.0)


def tokens_and_logprobs(answer: dict) -> list:
    pairs = answer["meta_info"]["output_token_logprobs"]
    return [[t for _, t, _ in pairs], [lp for lp, _, _ in pairs]]


@pytest.fixture(scope="module")
def server(qwen3_path):
    with rollout_serve(qwen3_path, "--num-kv-blocks", "1024") as served:
        yield served


def run_peer(role: str, **kwargs) -> dict:
    """A trainer process. Its output goes to files, not pipes: torch's shared-memory manager,
    which it starts, outlives it and would hold a pipe open."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.peers", role, json.dumps(kwargs)],
                                cwd=REPO, env=env(), stdout=out, stderr=err)
        code = proc.wait(timeout=300)
        out.seek(0), err.seek(0)
        assert code == 0, err.read()[-4000:]
        return json.loads(out.read().strip().splitlines()[-1])


async def until(check, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def load(client) -> dict:
    reply = await client.get("/v1/loads", params={"include": "core"})
    assert reply.status_code == 200
    return reply.json()["loads"][0]


async def running_at_least(client, n: int) -> None:
    async def check():
        return (await load(client))["num_running_reqs"] >= n
    await until(check, what=f"{n} running requests")


async def check_new_weights(client, qwen3_path, seed: int, version: str) -> None:
    """Greedy outputs equal the trained model's (argmax, log-probs within 1e-4), tagged with
    the new version."""
    answers = [(await client.post("/generate", json=greedy(p))).json() for p in PROMPTS[:4]]
    assert {a["meta_info"]["weight_version"] for a in answers} == {version}
    assert_matches(trained(qwen3_path, seed), PROMPTS[:4], [tokens_and_logprobs(a)
                                                            for a in answers])
    reply = await client.get("/get_weight_version")
    assert reply.json() == {"weight_version": version}


def test_abort_all_returns_partial_outputs_and_loads_drain(server):
    async def scenario():
        async with server.async_client() as client:
            posts = [asyncio.create_task(client.post("/generate", json=slime_payload(p, LONG, i)))
                     for i, p in enumerate(PROMPTS)]
            await running_at_least(client, len(PROMPTS))
            await asyncio.sleep(0.3)
            reply = await client.post("/abort_request", json={"abort_all": True})
            assert reply.status_code == 200 and reply.json()["success"]

            async def drained():
                now = await load(client)
                return now["num_running_reqs"] + now["num_waiting_reqs"] == 0
            await until(drained, 30, "the aborts to drain")
            answers = [r.json() for r in await asyncio.gather(*posts)]
            for answer in answers:
                meta = answer["meta_info"]
                assert meta["finish_reason"]["type"] == "abort"
                assert 1 <= meta["completion_tokens"] == len(meta["output_token_logprobs"]) < LONG
                assert answer["output_ids"] == tokens_and_logprobs(answer)[0]
            # partial outputs are the same request's first tokens: rerun up to that length
            for i in (0, 7, 15):
                partial = answers[i]["meta_info"]["completion_tokens"]
                again = (await client.post("/generate", json=slime_payload(
                    PROMPTS[i], partial, i))).json()
                assert again["meta_info"]["finish_reason"] == {"type": "length",
                                                              "length": partial}
                assert tokens_and_logprobs(again) == tokens_and_logprobs(answers[i])
            # slime resubmits prompt + partial response for the remaining budget
            partial = answers[3]["output_ids"]
            rest = (await client.post("/generate", json=slime_payload(
                PROMPTS[3] + partial, 20, 3))).json()
            assert rest["meta_info"]["prompt_tokens"] == len(PROMPTS[3]) + len(partial)
            assert rest["meta_info"]["completion_tokens"] == 20
    asyncio.run(scenario())


def test_pause_flush_update_from_tensor_continue(server, qwen3_path):
    async def scenario():
        async with server.async_client() as client:
            posts = [asyncio.create_task(client.post("/generate", json=slime_payload(p, LONG, i)))
                     for i, p in enumerate(PROMPTS[:4])]
            await running_at_least(client, 4)
            reply = await client.post("/pause_generation", json={})  # slime's call: mode abort
            assert reply.status_code == 200
            for answer in [r.json() for r in await asyncio.gather(*posts)]:
                assert answer["meta_info"]["finish_reason"]["type"] == "abort"
                assert answer["meta_info"]["weight_version"] == "0"
            late = asyncio.create_task(client.post("/generate", json=greedy(PROMPTS[5])))
            await asyncio.sleep(0.5)
            assert not late.done() and (await load(client))["num_waiting_reqs"] == 1
            assert (await client.get("/flush_cache")).status_code == 200
            result = await asyncio.to_thread(run_peer, "tensor_trainer", url=server.url,
                                             path=str(qwen3_path), seed=21, version="step-21",
                                             bucket_bytes=1 << 16)
            assert result["buckets"] > 1
            assert not late.done()
            assert (await client.post("/continue_generation", json={})).status_code == 200
            answer = (await late).json()
            assert answer["meta_info"]["weight_version"] == "step-21"
            assert_matches(trained(qwen3_path, 21), [PROMPTS[5]], [tokens_and_logprobs(answer)])
            await check_new_weights(client, qwen3_path, 21, "step-21")
    asyncio.run(scenario())


def shm_managers() -> set[str]:
    found = subprocess.run(["pgrep", "-x", "torch_shm_manag"], capture_output=True, text=True)
    return set(found.stdout.split())


def test_refused_shared_tensors_are_let_go_before_the_answer(server):
    """A refused payload's tensors (views of the trainer's shared memory) must be freed while
    the trainer's shared-memory manager lives: freeing one after it is gone aborts the server
    process (torch's 'Broken pipe'), which the refusal's traceback made happen at some later
    garbage collection."""
    before = shm_managers()
    assert run_peer("refused_tensor_sender", url=server.url)["statuses"] == [400] * 6
    for pid in shm_managers() - before:  # the trainer's manager goes (its job was killed)
        os.kill(int(pid), signal.SIGTERM)
    with server.client() as client:
        for _ in range(60):  # allocations enough for the collector to run
            assert client.post("/generate", json=greedy([1, 2, 3], 4)).status_code == 200
    assert server.proc.poll() is None


def test_a_client_that_leaves_ends_its_request(server):
    """As SGLang and vLLM do: a non-streamed request whose client disconnected is aborted
    (logged 499), not run to its end for nobody."""
    model = server.client().get("/v1/models").json()["data"][0]["id"]
    for path, body in [("/generate", {**slime_payload(PROMPTS[0], LONG, 1),
                                      "sampling_params": {"n": 8, "max_new_tokens": LONG,
                                                          "ignore_eos": True}}),
                       ("/v1/completions", {"model": model, "prompt": PROMPTS[1], "n": 8,
                                            "max_tokens": LONG, "ignore_eos": True})]:
        decoded = server.client().get("/server_info").json()["scheduler"]["decode_tokens"]
        with server.client(timeout=0.5) as client:
            with pytest.raises(httpx2.TimeoutException):
                client.post(path, json=body)

        async def idle():
            async with server.async_client() as client:
                await until(lambda: _idle(client), timeout_s=60, what="the request to end")
        asyncio.run(idle())
        after = server.client().get("/server_info").json()["scheduler"]["decode_tokens"]
        assert after - decoded < 8 * LONG / 2  # cut short, not 8 x 600 tokens for nobody
        assert f'"POST {path}" 499' in server.log()


async def _idle(client) -> bool:
    return (await load(client))["num_running_reqs"] == 0


def test_retract_then_update_through_a_gloo_group(server, qwen3_path):
    async def scenario():
        async with server.async_client() as client:
            posts = [asyncio.create_task(client.post("/generate", json=slime_payload(p, 300, i)))
                     for i, p in enumerate(PROMPTS[:4])]
            await running_at_least(client, 4)
            reply = await client.post("/pause_generation", json={"mode": "retract"})
            assert reply.status_code == 200
            assert (await load(client))["num_running_reqs"] == 0
            assert (await client.post("/flush_cache")).status_code == 200
            await asyncio.to_thread(run_peer, "group_trainer", url=server.url,
                                    path=str(qwen3_path), seed=22, version="step-22",
                                    master_port=free_port())
            assert (await client.post("/continue_generation")).status_code == 200
            for answer in [r.json() for r in await asyncio.gather(*posts)]:
                meta = answer["meta_info"]  # retracted, recomputed, finished on the new weights
                assert meta["finish_reason"] == {"type": "length", "length": 300}
                assert meta["weight_version"] == "step-22"
            await check_new_weights(client, qwen3_path, 22, "step-22")
    asyncio.run(scenario())


def test_release_and_staged_resume_around_an_update(server, qwen3_path):
    async def scenario():
        async with server.async_client() as client:
            reply = await client.post("/release_memory_occupation", json={})
            assert reply.status_code == 200 and reply.json()["success"]
            released = (await client.get("/get_server_info")).json()["memory"]["released"]
            assert released["weights"] > 0 and released["kv_cache"] > 0
            refused = await client.post("/generate", json=greedy(PROMPTS[0]))
            assert refused.status_code == 409 and "released" in refused.json()["message"]
            reply = await client.post("/resume_memory_occupation", json={"tags": ["weights"]})
            assert reply.status_code == 200
            await asyncio.to_thread(run_peer, "tensor_trainer", url=server.url,
                                    path=str(qwen3_path), seed=23, version="step-23",
                                    bucket_bytes=1 << 18, load_format=None)
            reply = await client.post("/resume_memory_occupation",
                                      json={"tags": ["kv_cache", "cuda_graph"]})
            assert reply.status_code == 200
            memory = (await client.get("/get_server_info")).json()["memory"]
            assert memory["released"] == {"weights": 0, "kv_cache": 0}
            await check_new_weights(client, qwen3_path, 23, "step-23")
    asyncio.run(scenario())


def test_probes_and_logs(server):
    with server.client() as client:
        assert client.get("/health_generate").status_code == 200
        for path in ("/model_info", "/get_model_info"):
            assert client.get(path).json()["is_generation"] is True
        for path in ("/server_info", "/get_server_info"):
            info = client.get(path).json()
            assert (info["tp_size"], info["dp_size"], info["pp_size"], info["ep_size"]) == \
                (1, 1, 1, 1)
            assert info["enable_memory_saver"] is True and info["dtype"] == "float32"
            assert kernels.batch_invariant_mode(expect=info).split_size == info["page_size"]
            assert isinstance(info["threads"], int) and info["threads"] >= 1
    log = server.log()
    assert "Uvicorn running on http://127.0.0.1:" in log  # loopback unless told otherwise
    assert '"POST /generate" 200' in log and '"POST /abort_request" 200' in log


def events(reply) -> list:
    lines = [line for line in reply.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_answer_shapes_streams_and_stops(server):
    with server.client() as client:
        single = client.post("/generate", json=greedy(PROMPTS[1], 8)).json()
        streamed = events(client.post("/generate", json=greedy(PROMPTS[1], 8) | {"stream": True}))
        assert [len(e["output_ids"]) for e in streamed] == sorted({len(e["output_ids"])
                                                                  for e in streamed})
        assert streamed[-1]["output_ids"] == single["output_ids"]
        assert streamed[-1]["meta_info"]["output_token_logprobs"] == \
            single["meta_info"]["output_token_logprobs"]

        # as SGLang's router re-serializes a request: its defaults for the fields it knows
        routed = greedy(PROMPTS[1], 8) | {
            "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
            "return_hidden_states": False, "background": False, "no_logs": False,
            "return_bytes": False, "return_entropy": False}
        assert client.post("/generate", json=routed).json()["output_ids"] == single["output_ids"]

        batch = slime_payload([PROMPTS[1], PROMPTS[2]], 5, seed=3)  # a batch of two, n=2
        batch["sampling_params"]["n"] = 2
        answers = client.post("/generate", json=batch).json()
        assert len(answers) == 4 and len({a["meta_info"]["id"] for a in answers}) == 2
        finals = {}
        for e in events(client.post("/generate", json=batch | {"stream": True})):
            finals[e["index"]] = e
        assert [finals[i]["output_ids"] for i in range(4)] == [a["output_ids"] for a in answers]

        # a stop token: trimmed, unless no_stop_trim (then included and counted)
        stop = single["output_ids"][3]
        first = single["output_ids"].index(stop)
        for keep in (True, False):
            payload = greedy(PROMPTS[1], 8)
            payload["sampling_params"] |= {"stop_token_ids": [stop], "no_stop_trim": keep}
            meta = (answer := client.post("/generate", json=payload).json())["meta_info"]
            assert meta["finish_reason"] == {"type": "stop", "matched": stop}
            kept = first + 1 if keep else first
            assert answer["output_ids"] == single["output_ids"][:kept]
            assert meta["completion_tokens"] == len(meta["output_token_logprobs"]) == kept



def test_scoring_a_prompt_gives_the_generation_logprobs(server):
    """slime's on-policy distillation: max_new_tokens 0, logprob_start_len 0, reading
    input_token_logprobs[1:]; the engine scores with the bits generation returned."""
    with server.client() as client:
        single = client.post("/generate", json=greedy(PROMPTS[1], 8)).json()
        sequence = PROMPTS[1] + single["output_ids"]
        scored = client.post("/generate", json={
            "input_ids": sequence, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0}}).json()
        inputs = scored["meta_info"]["input_token_logprobs"]
        assert scored["output_ids"] == [] and inputs[0] == [None, sequence[0], None]
        assert [t for _, t, _ in inputs] == sequence
        assert inputs[len(PROMPTS[1]):] == single["meta_info"]["output_token_logprobs"]


def test_prompt_scoring_waits_at_the_pause_gate_and_is_aborted_like_generation(qwen3_path):
    """Scoring-only requests (max_new_tokens 0) went around the pause gate and the rid registry:
    /abort_request could not find one, and 45 of them sent while paused each held a worker
    thread until no route could run, /continue_generation included. A generation aborted by
    the pause skips its prompt scoring (it waited at the gate), and a streamed request with a
    rid is scored too."""
    def scoring(sequence: list[int], rid: str, new_tokens: int = 0, **extra) -> dict:
        return {"input_ids": sequence, "return_logprob": True, "logprob_start_len": 0,
                "rid": rid, "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0,
                                                "ignore_eos": True}, **extra}
    short = [(i * 7) % 500 + 1 for i in range(60)]

    async def scenario(served):
        async with served.async_client(timeout=60) as client:
            want = (await client.post("/generate", json=scoring(short, "first"))).json()
            want = want["meta_info"]["input_token_logprobs"]
            reply = await client.post("/generate", json=scoring(short, "s", 3, stream=True))
            final = json.loads(reply.text.split("data: ")[-2])  # a rid, streamed: scored too
            assert final["meta_info"]["input_token_logprobs"] == want

            cut = asyncio.create_task(client.post("/generate", json=scoring(short, "cut", LONG)))
            await running_at_least(client, 1)
            assert (await client.post("/pause_generation", json={})).status_code == 200
            meta = (await cut).json()["meta_info"]  # slime's pause (mode abort): no scoring
            assert meta["finish_reason"]["type"] == "abort" and "input_token_logprobs" not in meta

            waiting = [asyncio.create_task(client.post("/generate", json=scoring(short, f"w{i}")))
                       for i in range(45)]

            async def all_waiting():
                return (await load(client))["num_waiting_reqs"] >= 45
            await until(all_waiting, 30, "45 scoring requests at the pause gate")
            assert (await client.post("/abort_request", json={"rid": "w0"})).status_code == 200
            assert (await waiting[0]).json()["meta_info"]["finish_reason"]["type"] == "abort"
            assert (await client.post("/continue_generation", json={})).status_code == 200
            for reply in await asyncio.gather(*waiting[1:]):
                assert reply.json()["meta_info"]["input_token_logprobs"] == want
    with rollout_serve(qwen3_path) as served:
        asyncio.run(scenario(served))


def test_health_generate_answers_while_requests_queue(qwen3_path):
    """A probe queued behind a busy engine's requests waited its turn and answered 503 after
    20 s on a healthy server (slime's fault tolerance kills such engines); as SGLang's, any step
    the engine completes meanwhile shows it healthy."""
    async def scenario(served):
        async with served.async_client() as client:
            posts = [asyncio.create_task(client.post("/generate", json=slime_payload(
                p, 1000, i))) for i, p in enumerate(PROMPTS)]
            await running_at_least(client, 2)
            start = time.monotonic()
            assert (await client.get("/health_generate")).status_code == 200
            assert time.monotonic() - start < 10
            assert (await load(client))["num_waiting_reqs"] > 0  # the probe did not wait its turn
            await client.post("/abort_request", json={"abort_all": True})
            await asyncio.gather(*posts)
    with rollout_serve(qwen3_path, "--max-num-seqs", "2") as served:
        asyncio.run(scenario(served))


def test_a_sample_across_an_update_lists_both_versions(server, qwen3_path, tmp_path):
    trained(qwen3_path, 25).save_pretrained(tmp_path / "step-25")

    async def scenario():
        async with server.async_client() as client:
            post = asyncio.create_task(client.post("/generate",
                                                   json=slime_payload(PROMPTS[2], LONG, 2)))
            await running_at_least(client, 1)
            reply = await client.post("/update_weights_from_disk", json={
                "model_path": str(tmp_path / "step-25"), "weight_version": "step-25"})
            assert reply.status_code == 200, reply.text
            meta = (await post).json()["meta_info"]
            before = meta["weight_versions"][0]
            assert meta["weight_versions"] == [before, "step-25"] and before != "step-25"
            assert meta["weight_version"] == "step-25"
    asyncio.run(scenario())


def test_prompt_logprobs_priced_after_an_update_list_its_version(qwen3_path, tmp_path):
    """input_token_logprobs are scored after the generation ends; an update between the two
    gave log-probs of the new weights under the old version alone (a trainer silently
    off-policy). One sequence at a time: the scoring waits behind a long request while the
    update lands, and the answer lists both versions."""
    trained(qwen3_path, 26).save_pretrained(tmp_path / "step-26")
    x = {"input_ids": PROMPTS[3], "return_logprob": True, "logprob_start_len": 0,
         "sampling_params": {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}}

    async def scenario(served):
        async with served.async_client(timeout=120) as client:
            old = (await client.post("/generate", json=x)).json()["meta_info"]
            posted = asyncio.create_task(client.post("/generate", json=x))
            await running_at_least(client, 1)
            long = asyncio.create_task(client.post("/generate", json=slime_payload(
                PROMPTS[4], LONG, 1) | {"rid": "long"}))
            made = (await client.get("/server_info")).json()["scheduler"]["decode_tokens"]

            async def scoring_waits():  # x generated its tokens, the long one runs
                info = (await client.get("/server_info")).json()["scheduler"]
                return info["decode_tokens"] >= made + 40 + 3
            await until(scoring_waits, what="the long request running")
            assert (await load(client))["num_waiting_reqs"] == 1  # x's scoring
            reply = await client.post("/update_weights_from_disk", json={
                "model_path": str(tmp_path / "step-26"), "weight_version": "step-26"})
            assert reply.status_code == 200, reply.text
            await client.post("/abort_request", json={"rid": "long"})  # x's scoring runs next
            meta = (await posted).json()["meta_info"]
            await long
            assert meta["output_token_logprobs"] == old["output_token_logprobs"]
            assert meta["input_token_logprobs"] != old["input_token_logprobs"]  # new weights
            assert meta["weight_versions"] == [old["weight_version"], "step-26"]
    with rollout_serve(qwen3_path, "--max-num-seqs", "1") as served:
        asyncio.run(scenario(served))


def test_update_from_disk_and_weight_version_label(server, qwen3_path, tmp_path):
    trained(qwen3_path, 24).save_pretrained(tmp_path / "step-24")
    with server.client() as client:
        reply = client.post("/update_weights_from_disk", json={
            "model_path": str(tmp_path / "step-24"), "weight_version": "step-24"})
        assert reply.status_code == 200 and reply.json()["success"], reply.text
        answers = [client.post("/generate", json=greedy(p)).json() for p in PROMPTS[:4]]
        assert {a["meta_info"]["weight_version"] for a in answers} == {"step-24"}
        assert all(a["meta_info"]["weight_versions"] == ["step-24"] for a in answers)
        assert_matches(trained(qwen3_path, 24), PROMPTS[:4], [tokens_and_logprobs(a)
                                                              for a in answers])
        reply = client.post("/update_weight_version", json={"new_version": "step-24b"})
        assert reply.status_code == 200 and reply.json()["new_version"] == "step-24b"
        assert client.get("/get_weight_version").json() == {"weight_version": "step-24b"}
        again = client.post("/generate", json=greedy(PROMPTS[0])).json()
        assert again["meta_info"]["weight_version"] == "step-24b"
        assert again["output_ids"] == answers[0]["output_ids"]
