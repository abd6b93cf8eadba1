"""The examples run as a user would run them."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_rl_loop_has_zero_sampler_trainer_gap(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "rl_loop.py"), "--steps", "2"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ROLLOUT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"max \|sampler - trainer\| log-prob (\S+), engine now at weight "
                       r"version (\d+) \(checksum match: (\w+)\)", done.stdout)
    assert steps == [("0.0e+00", "1", "True"), ("0.0e+00", "2", "True")]


def run_example(name: str, tmp_path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "ROLLOUT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_ray_group_example_updates_every_engine_and_survives_release(tmp_path):
    out = run_example("ray_group.py", tmp_path)
    assert "sampled 16 completions of 4 prompts on 2 engines (per engine: [2, 2] prompts)" in out
    assert "weight versions [1, 1], every engine's checksum equals the trainer's: True" in out
    assert "released and resumed 2 engines; outputs unchanged: True" in out


def test_verl_plugin_example_runs_two_verl_steps(tmp_path):
    out = run_example("verl_plugin.py", tmp_path)
    assert "verl resolves rollout_engine to RolloutEngineAdapter and RolloutEngineReplica" in out
    steps = re.findall(r"step (\d): weights loaded \(checksum equals the trainer's: (\w+)\); "
                       r"generated (\d+) tokens with (\d+) log-probs, stop reason completed, "
                       r"global_steps (\d); asleep", out)
    assert [(s, same, version) for s, same, _, _, version in steps] == [("1", "True", "1"),
                                                                      ("2", "True", "2")]
    assert all(tokens == logprobs != "0" for _, _, tokens, logprobs, _ in steps)


def test_grpo_toy_learns_with_zero_kl_and_plots(tmp_path):
    plot = tmp_path / "grpo.png"
    done = subprocess.run([sys.executable, str(EXAMPLES / "grpo_toy.py"), "--steps", "5",
                           "--lr", "1e-2", "--plot", str(plot)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ROLLOUT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"reward (\S+)  kl (\S+)  max\|rollout - trainer\| (\S+)  .* weights "
                       r"v(\d+)", done.stdout)
    assert len(steps) == 5, done.stdout
    assert all(kl == "0.0" and diff == "0.0" for _, kl, diff, _ in steps)
    assert [int(v) for *_, v in steps] == [1, 2, 3, 4, 5]
    rewards = [float(r) for r, *_ in steps]
    assert rewards[-1] > rewards[0] + 0.05, rewards
    assert "engine weights equal the trainer's: True" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
