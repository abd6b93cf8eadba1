"""Bad input gets a 4xx that names the field, a pickle that would run code is refused and runs
nothing, and a schema-driven fuzz run over /openapi.json finds no 5xx; the server serves on,
with the same answers as before."""

import asyncio
import base64
import os
import pickle
import subprocess
import sys
import time

import pytest
from tests.serving import env, rollout_serve

GREEDY = {"input_ids": [5, 6, 7], "return_logprob": True,
          "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(qwen3_path):
    with rollout_serve(qwen3_path, "--max-model-len", "32", "--num-kv-blocks", "256",
                       "--max-num-seqs", "64") as served:
        yield served


@pytest.fixture(scope="module")
def before(server):
    """The answer to GREEDY before anything below ran."""
    with server.client() as client:
        return client.post("/generate", json=GREEDY).json()


def sp(**fields) -> dict:
    return {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, **fields}}


BAD = [  # (path, body, field or value the message must name)
    ("/generate", {"input_ids": "abc"}, "input_ids"),
    ("/generate", {"input_ids": [1, "x"]}, "input_ids.1"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": "yes"}, "return_logprob"),
    ("/generate", sp(temperature="hot"), "sampling_params.temperature"),
    ("/generate", {"input_ids": [1], "colour": "red"}, "colour: Extra inputs are not permitted"),
    ("/generate", sp(regex="a+"), "sampling_params.regex: Extra inputs"),
    ("/generate", sp(temperature=-1), "sampling_params.temperature"),
    ("/generate", sp(temperature=1e-45), "sampling_params.temperature: Value error, must be 0"),
    ("/generate", sp(top_p=0), "sampling_params.top_p"),
    ("/generate", sp(top_p=1.5), "sampling_params.top_p"),
    ("/generate", sp(top_k=-2), "sampling_params.top_k"),
    ("/generate", sp(min_p=2), "sampling_params.min_p"),
    ("/generate", sp(n=0), "sampling_params.n"),
    ("/generate", sp(max_new_tokens=-1), "sampling_params.max_new_tokens"),
    ("/generate", sp(sampling_seed=-5), "sampling_params.sampling_seed"),
    ("/generate", sp(stop=[""]), "sampling_params.stop"),
    ("/generate", sp(frequency_penalty=0.5), "penalties are not supported"),
    ("/generate", sp(min_new_tokens=3), "min_new_tokens (3) must be <= max_new_tokens (2)"),
    ("/generate", {"input_ids": [1, 700]}, "prompt token id 700 at position 1 is out of range"),
    ("/generate", {"input_ids": [1] * 30, "sampling_params": {"max_new_tokens": 10}},
     "exceeds the model's context of 32 tokens"),
    ("/generate", {"input_ids": []}, "prompt is empty"),
    ("/generate", {"input_ids": [700], "sampling_params": {"max_new_tokens": 0}},
     "prompt token id 700 at position 0 is out of range"),
    ("/generate", {"text": "a", "input_ids": [1]}, "exactly one of text and input_ids"),
    ("/generate", {"sampling_params": {}}, "exactly one of text and input_ids"),
    ("/generate", {"input_ids": [[1], [2]], "rid": ["a"]}, "rid is a list of 1"),
    ("/generate", {"input_ids": [[1], [2]], "rid": "a"}, "rid 'a' is one id for a batch of 2"),
    ("/generate", {"input_ids": [[1, 2], [3, 700]], "sampling_params": {"max_new_tokens": 2}},
     "input_ids[1]: prompt token id 700 at position 1 is out of range"),
    ("/generate", {"input_ids": [[1, 2], [3, 4]], "stream": True,
                   "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 40}]},
     "input_ids[1]: prompt (2 tokens) + max_tokens (40) exceeds"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 21},
     "top_logprobs_num"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 2,
                   "sampling_params": {"max_new_tokens": 1}},
     "logprob_start_len (2) must be below the prompt length (2)"),
    ("/generate", {"input_ids": [1], "return_hidden_states": True}, "return_hidden_states"),
    ("/abort_request", {}, "give rid, or abort_all"),
    ("/pause_generation", {"mode": "stop"}, "mode"),
    ("/release_memory_occupation", {"tags": ["gpu"]}, "tags.0"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["%%%"]},
     "serialized_named_tensors[0]: not valid base64"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": []},
     "serialized_named_tensors"),
    ("/update_weights_from_distributed",
     {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "nope"},
     "no weight update group 'nope'"),
    ("/update_weights_from_distributed", {"names": ["a", "b"], "dtypes": ["float32"],
                                          "shapes": [[1]]}, "must have the same length"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 70000,
                                    "rank_offset": 1, "world_size": 2}, "master_port"),
    ("/update_weights_from_disk", {"model_path": "/no/such/checkpoint"}, "/no/such/checkpoint"),
    ("/v1/completions", {"model": "qwen30", "prompt": "a", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"model": "qwen30", "prompt": "a", "temperature": 1e-9},
     "temperature: Value error, must be 0 (greedy) or at least 1e-06 (got 1e-09)"),
    ("/v1/completions", {"model": "qwen30", "prompt": "a", "min_tokens": 9, "max_tokens": 3},
     "min_tokens (9) must be <= max_tokens (3)"),
    ("/v1/completions", {"model": "qwen30", "prompt": "a", "presence_penalty": 1},
     "penalties are not supported"),
    ("/v1/chat/completions", {"model": "qwen30", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "qwen30", "messages": [{"role": "user",
                                                               "content": "hi"}],
                              "tools": []}, "tools: Extra inputs"),
]


@pytest.mark.parametrize("path, body, named", BAD, ids=[f"{p}:{n[:30]}" for p, _, n in BAD])
def test_bad_input_gets_a_4xx_naming_the_field(server, path, body, named):
    with server.client() as client:
        reply = client.post(path, json=body)
    assert 400 <= reply.status_code < 500, reply.text
    answer = reply.json()
    assert answer["success"] is False and named in answer["message"], answer["message"]
    assert answer["error"]["message"] == answer["message"]


def test_malformed_json_and_other_4xx(server):
    with server.client() as client:
        reply = client.post("/generate", content=b'{"input_ids": [1, 2',
                            headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "not valid JSON" in reply.json()["message"]
        reply = client.post("/generate", content=b'input_ids=1')
        assert reply.status_code == 400 and "Content-Type: application/json" in reply.text
        reply = client.post("/abort_request", json={"rid": "never-sent"})  # SGLang: 200
        assert reply.status_code == 200 and reply.json()["aborted"] == 0
        assert "'never-sent'" in reply.json()["message"]
        reply = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
        assert reply.status_code == 404 and "'gpt-4'" in reply.json()["message"]
        assert client.get("/no/such/route").status_code == 404
        assert client.get("/generate").status_code == 405


def test_a_lone_surrogate_in_any_string_is_a_400_and_the_server_serves_on(server, before):
    """Valid JSON, but no Unicode text: the tokenizer takes none (a 500 that reset the
    client's connection before), and no answer can encode it back: a rid holding one was a
    500, a weight version holding one made every later /generate and /server_info a 500."""
    with server.client() as client:
        for path, raw, field in [
                ("/generate", b'{"text": "\\ud800abc"}', "text"),
                ("/v1/completions", b'{"model": "qwen30", "prompt": "\\ud800"}', "prompt"),
                ("/generate", b'{"input_ids": [1, 2], "rid": "\\ud800"}', "rid"),
                ("/update_weights_from_disk",
                 b'{"model_path": "/nowhere", "weight_version": "\\udc00"}', "weight_version")]:
            reply = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert reply.status_code == 400, reply.text
            assert f"{field} is not valid Unicode text" in reply.json()["message"]
        assert client.post("/generate", json=GREEDY).json()["output_ids"] == before["output_ids"]
        assert client.get("/server_info").status_code == 200


def test_a_long_text_is_tokenized_off_the_servers_loop(server):
    """Tokenizing a text prompt of megabytes takes seconds; on the event loop it held every
    other client for them (a review saw /health wait 21.8 s behind a 16 MB text)."""
    text = "hello world " * 200_000  # 2.4 MB: refused for length once tokenized

    async def scenario():
        async with server.async_client() as client:
            posts = [asyncio.create_task(client.post("/generate", json=body)) for body in (
                {"text": text, "sampling_params": {"max_new_tokens": 1}},
                {"text": text, "return_logprob": True, "logprob_start_len": 0})]
            await asyncio.sleep(0.3)  # the request is in, its text being tokenized
            gaps = []
            while not all(p.done() for p in posts):
                start = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                gaps.append(time.monotonic() - start)
                await asyncio.sleep(0.05)
            for post in posts:
                reply = await post
                assert reply.status_code == 400 and "exceeds" in reply.json()["message"]
            return gaps
    gaps = asyncio.run(scenario())
    assert gaps and max(gaps) < 1.0, gaps


class RunsCode:
    """Unpickling this calls os.system: the classic pickle exploit."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def exploits(marker) -> dict[str, bytes]:
    """Payloads that would create `marker` if unpickled without restriction."""
    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps(RunsCode(touch)),
        "in a bucket": pickle.dumps({"flattened_tensor": None, "metadata": [RunsCode(touch)]}),
        "builtins.exec": pickle.dumps(Exec(f"import os; os.system({touch!r})")),
        "subprocess": pickle.dumps(Popen(["touch", str(marker)])),
    }


class Exec:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


class Popen:
    def __init__(self, argv: list[str]):
        self.argv = argv

    def __reduce__(self):
        return subprocess.Popen, (self.argv,)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(server, tmp_path, before):
    marker = tmp_path / "pwned"
    with server.client() as client:
        for name, payload in exploits(marker).items():
            for load_format in ("flattened_bucket", None):
                reply = client.post("/update_weights_from_tensor", json={
                    "serialized_named_tensors": [base64.b64encode(payload).decode()],
                    "load_format": load_format})
                assert reply.status_code == 400, (name, reply.text)
                assert "refused" in reply.json()["message"], (name, reply.text)
        assert not marker.exists()
        assert client.get("/get_weight_version").json() == {"weight_version": "0"}
        assert client.post("/generate", json=GREEDY).json()["output_ids"] == before["output_ids"]


def test_the_file_descriptor_strategy_is_refused_with_a_hint(server):
    code = ("import torch, base64, io; from multiprocessing.reduction import ForkingPickler; "
            "b = io.BytesIO(); ForkingPickler(b).dump([('w', torch.ones(4))]); "
            "print(base64.b64encode(b.getvalue()).decode())")
    payload = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=env()).stdout.strip()
    with server.client() as client:
        reply = client.post("/update_weights_from_tensor",
                            json={"serialized_named_tensors": [payload]})
    assert reply.status_code == 400
    assert "set_sharing_strategy('file_system')" in reply.json()["message"]


# stateful calls that would stall the rest of the run (pause), take the engine's memory away
# from it (release), or reach beyond loopback (a group at a fuzzed address)
NOT_FUZZED = ["/pause_generation", "/release_memory_occupation", "/init_weights_update_group"]


def test_fuzzing_the_openapi_schema_finds_no_5xx(server, before, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
           "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing",
           "--max-examples", "12", "--max-time", "45", "--seed", "1", "--workers", "2",
           "--request-timeout", "60", "--generation-database", "none", "--no-color",
           "--report", "junit", "--report-dir", str(tmp_path),
           *[arg for path in NOT_FUZZED for arg in ("--exclude-path", path)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    with server.client() as client:
        assert client.get("/health").status_code == 200
        assert client.post("/generate", json=GREEDY).json()["output_ids"] == before["output_ids"]
